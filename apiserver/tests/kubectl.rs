//! The real `kubectl` against a started server: every interaction users rely on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::{Kubectl, TestServer, kubectls};

async fn setup() -> (TestServer, Kubectl) {
    let server = TestServer::start().await;
    let kubectl = Kubectl::new(&kubectls().dispatcher, server.kubeconfig());
    (server, kubectl)
}

fn install_crds(kubectl: &Kubectl) {
    kubectl.ok(&["apply", "-f", "crds/manifests/"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dispatcher_runs_the_client_matching_the_server_version() {
    let (_server, kubectl) = setup().await;
    let out = kubectl.ok(&["version"]);
    assert!(out.contains("Server Version: v1.33.0"), "{out}");
    assert!(out.contains("Client Version: v1.33"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn applied_crds_are_established_and_their_kinds_served_with_short_names() {
    let (_server, kubectl) = setup().await;
    install_crds(&kubectl);
    let crd = kubectl.ok(&[
        "get",
        "crd",
        "jointinferenceservices.sedna.io",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
    ]);
    assert_eq!(crd, "True");
    let resources = kubectl.ok(&["api-resources", "--api-group=sedna.io"]);
    for short in ["ji", "il", "fl"] {
        assert!(resources.contains(&format!(" {short} ")), "{resources}");
    }
    let empty = kubectl.run(&["get", "ji"]);
    assert!(empty.ok, "{empty:?}");
    assert!(empty.stderr.contains("No resources found"), "{empty:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_reapply_and_server_side_apply_of_a_custom_resource() {
    let (_server, kubectl) = setup().await;
    install_crds(&kubectl);
    let file = "examples/joint-inference/helmet-detection.yaml";
    let first = kubectl.ok(&["apply", "-f", file]);
    assert!(
        first.contains("jointinferenceservice.sedna.io/helmet-detection-inference created"),
        "{first}"
    );
    let again = kubectl.ok(&["apply", "-f", file]);
    assert!(
        again.contains("helmet-detection-inference unchanged"),
        "{again}"
    );
    let rv1 = kubectl.ok(&[
        "get",
        "ji",
        "helmet-detection-inference",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    let again = kubectl.ok(&["apply", "-f", file]);
    assert!(again.contains("unchanged"));
    let rv2 = kubectl.ok(&[
        "get",
        "ji",
        "helmet-detection-inference",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    assert_eq!(rv1, rv2, "an unchanged apply writes nothing");

    let changed = std::fs::read_to_string(support::repo_root().join(file))
        .unwrap()
        .replace("value: \"0.9\"", "value: \"0.8\"");
    let out = kubectl.run_with_stdin(&["apply", "-f", "-"], Some(&changed));
    assert!(
        out.ok && out.stdout.contains("helmet-detection-inference configured"),
        "{out:?}"
    );
    let value = kubectl.ok(&[
        "get",
        "ji",
        "helmet-detection-inference",
        "-o",
        "jsonpath={.spec.edgeWorker.hardExampleMining.parameters[0].value}",
    ]);
    assert_eq!(value, "0.8");

    let ssa = kubectl.run_with_stdin(&["apply", "--server-side", "-f", "-"], Some(&changed));
    assert!(
        ssa.ok && ssa.stdout.contains("serverside-applied"),
        "{ssa:?}"
    );

    let other = changed.replace("value: \"0.8\"", "value: \"0.7\"");
    let conflict = kubectl.run_with_stdin(
        &["apply", "--server-side", "--field-manager=tuner", "-f", "-"],
        Some(&other),
    );
    assert!(!conflict.ok, "{conflict:?}");
    assert!(conflict.stderr.contains("conflict"), "{conflict:?}");
    let forced = kubectl.run_with_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=tuner",
            "--force-conflicts",
            "-f",
            "-",
        ],
        Some(&other),
    );
    assert!(forced.ok, "{forced:?}");
    let value = kubectl.ok(&[
        "get",
        "ji",
        "helmet-detection-inference",
        "-o",
        "jsonpath={.spec.edgeWorker.hardExampleMining.parameters[0].value}",
    ]);
    assert_eq!(value, "0.7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_prints_the_crd_printer_columns() {
    let (_server, kubectl) = setup().await;
    install_crds(&kubectl);
    kubectl.ok(&["apply", "-f", "examples/federated-learning/"]);
    let out = kubectl.ok(&["get", "fl"]);
    let header = out.lines().next().unwrap();
    for column in ["NAME", "PHASE", "ROUND", "ROUNDS", "ACTIVE", "AGE"] {
        assert!(header.contains(column), "{out}");
    }
    assert!(
        !header.contains("ALGORITHM"),
        "priority-1 columns only with -o wide"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("surface-defect-detection"))
        .unwrap();
    assert!(row.contains(" 20 "), "{out}");
    let wide = kubectl.ok(&["get", "fl", "-o", "wide"]);
    assert!(wide.contains("FedAvg"), "{wide}");
    let datasets = kubectl.ok(&["get", "datasets"]);
    assert!(
        datasets.contains("FORMAT") && datasets.contains("edge-1"),
        "{datasets}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_watch_sees_modified_and_deleted_events() {
    let (_server, kubectl) = setup().await;
    install_crds(&kubectl);
    kubectl.ok(&["apply", "-f", "examples/incremental-learning/"]);
    let mut watch = kubectl
        .command(&["get", "models", "-w", "--output-watch-events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    kubectl.ok(&["label", "model", "initial-model", "stage=prod"]);
    kubectl.ok(&["delete", "model", "deploy-model"]);
    std::thread::sleep(Duration::from_millis(1500));
    watch.kill().unwrap();
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("ADDED") && l.contains("initial-model")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("MODIFIED") && l.contains("initial-model")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("DELETED") && l.contains("deploy-model")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn describe_shows_the_events_about_an_object() {
    let (_server, kubectl) = setup().await;
    install_crds(&kubectl);
    kubectl.ok(&["apply", "-f", "examples/joint-inference/"]);
    let uid = kubectl.ok(&[
        "get",
        "ji",
        "helmet-detection-inference",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let event = format!(
        "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata: {{name: ji-workers, namespace: default}}\n\
         eventTime: \"2026-01-01T00:00:00.000000Z\"\nreason: WorkersCreated\n\
         note: created the cloud and edge workers\ntype: Normal\naction: Create\n\
         reportingController: sedna.io/gm\nreportingInstance: gm-0\n\
         regarding: {{apiVersion: sedna.io/v1alpha1, kind: JointInferenceService, \
         name: helmet-detection-inference, namespace: default, uid: {uid}}}\n"
    );
    let created = kubectl.run_with_stdin(&["create", "-f", "-"], Some(&event));
    assert!(created.ok, "{created:?}");
    let out = kubectl.ok(&["describe", "ji", "helmet-detection-inference"]);
    let events = out.split("Events:").nth(1).unwrap_or_default();
    assert!(events.contains("WorkersCreated"), "{out}");
    assert!(
        events.contains("created the cloud and edge workers"),
        "{out}"
    );
    let listed = kubectl.ok(&["get", "events"]);
    assert!(
        listed.contains("jointinferenceservice/helmet-detection-inference"),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_waits_for_a_finalizer_that_a_second_client_removes() {
    let (_server, kubectl) = setup().await;
    install_crds(&kubectl);
    kubectl.ok(&["apply", "-f", "examples/incremental-learning/"]);
    kubectl.ok(&[
        "patch",
        "model",
        "initial-model",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["sedna.io/model-in-use"]}}"#,
    ]);
    let deleting = kubectl
        .command(&["delete", "model", "initial-model", "--timeout=30s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let stamp = kubectl.ok(&[
        "get",
        "model",
        "initial-model",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(!stamp.is_empty(), "the object waits, marked for deletion");
    let second = Kubectl::new(&kubectl.bin, &kubectl.kubeconfig);
    second.ok(&[
        "patch",
        "model",
        "initial-model",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let out = deleting.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = kubectl.run(&["get", "model", "initial-model"]);
    assert!(!gone.ok && gone.stderr.contains("NotFound"), "{gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_configmap_secret_and_namespace_over_protobuf() {
    let (_server, kubectl) = setup().await;
    kubectl.ok(&["create", "namespace", "factory"]);
    kubectl.ok(&[
        "create",
        "configmap",
        "settings",
        "-n",
        "factory",
        "--from-literal=mode=edge",
    ]);
    kubectl.ok(&[
        "create",
        "secret",
        "generic",
        "s3",
        "-n",
        "factory",
        "--from-literal=access-key=AKIA",
    ]);
    let mode = kubectl.ok(&[
        "get",
        "cm",
        "settings",
        "-n",
        "factory",
        "-o",
        "jsonpath={.data.mode}",
    ]);
    assert_eq!(mode, "edge");
    let key = kubectl.ok(&[
        "get",
        "secret",
        "s3",
        "-n",
        "factory",
        "-o",
        "jsonpath={.type} {.data.access-key}",
    ]);
    assert_eq!(key, "Opaque QUtJQQ==");
    let ns = kubectl.ok(&["get", "ns", "factory"]);
    assert!(ns.contains("Active"), "{ns}");
    let missing = kubectl.run(&["create", "configmap", "x", "-n", "nowhere"]);
    assert!(
        !missing.ok && missing.stderr.contains("namespaces \"nowhere\" not found"),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_shows_a_custom_kinds_schema() {
    let (_server, kubectl) = setup().await;
    install_crds(&kubectl);
    let out = kubectl.ok(&["explain", "incrementallearningjob.spec.dataset"]);
    assert!(out.contains("trainProb"), "{out}");
    assert!(
        out.contains("Fraction of the samples used for training"),
        "{out}"
    );
    let fl = kubectl.ok(&["explain", "fl.spec.aggregation.algorithm"]);
    assert!(fl.contains("FedAvg"), "{fl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_custom_resource_is_refused_with_the_field_path() {
    let (_server, kubectl) = setup().await;
    install_crds(&kubectl);
    let text = std::fs::read_to_string(
        support::repo_root().join("examples/incremental-learning/helmet-detection.yaml"),
    )
    .unwrap()
    .replace("trainProb: 0.8", "trainProb: 1.5");
    let out = kubectl.run_with_stdin(&["apply", "-f", "-"], Some(&text));
    assert!(!out.ok, "{out:?}");
    assert!(out.stderr.contains("is invalid"), "{out:?}");
    assert!(out.stderr.contains("spec.dataset.trainProb"), "{out:?}");
    assert!(
        out.stderr.contains("should be less than or equal to 1"),
        "{out:?}"
    );
    let typo = "apiVersion: sedna.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n\
                spec: {url: /m.onnx, format: onnx, formt: onnx}\n";
    let out = kubectl.run_with_stdin(&["apply", "-f", "-"], Some(typo));
    assert!(
        !out.ok && out.stderr.contains("unknown field \"spec.formt\""),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_oldest_and_newest_bundled_kubectl_work_too() {
    let server = TestServer::start().await;
    let all = kubectls();
    assert!(
        all.bundled.len() >= 2,
        "bundled kubectl clients not found next to the dispatcher"
    );
    let (oldest, newest) = (all.bundled.first().unwrap(), all.bundled.last().unwrap());
    for (minor, bin) in [oldest, newest] {
        let kubectl = Kubectl::new(bin, server.kubeconfig());
        let ns = format!("k{minor}");
        kubectl.ok(&["create", "namespace", &ns]);
        install_crds(&kubectl);
        kubectl.ok(&["apply", "-n", &ns, "-f", "examples/federated-learning/"]);
        let out = kubectl.ok(&["get", "fl", "-n", &ns]);
        assert!(
            out.contains("surface-defect-detection"),
            "kubectl 1.{minor}: {out}"
        );
        kubectl.ok(&["apply", "-n", &ns, "-f", "examples/federated-learning/"]);
        kubectl.ok(&["delete", "-n", &ns, "-f", "examples/federated-learning/"]);
        let after = kubectl.run(&["get", "fl", "-n", &ns]);
        assert!(
            after.stderr.contains("No resources found"),
            "kubectl 1.{minor}: {after:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reapplying_a_built_in_kind_uses_a_strategic_merge_patch() {
    let (_server, kubectl) = setup().await;
    let v1 = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {mode: edge, level: '1'}\n";
    let v2 = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {mode: cloud}\n";
    let first = kubectl.run_with_stdin(&["apply", "-f", "-"], Some(v1));
    assert!(
        first.ok && first.stdout.contains("configmap/settings created"),
        "{first:?}"
    );
    let second = kubectl.run_with_stdin(&["apply", "-f", "-"], Some(v2));
    assert!(
        second.ok && second.stdout.contains("configmap/settings configured"),
        "{second:?}"
    );
    let data = kubectl.ok(&["get", "cm", "settings", "-o", "jsonpath={.data}"]);
    assert_eq!(
        data, r#"{"mode":"cloud"}"#,
        "a key dropped from the manifest is removed"
    );
}

/// A kubeconfig like the admin's, authenticating with `token`.
fn kubeconfig_for(server: &TestServer, token: &str, name: &str) -> std::path::PathBuf {
    let admin = std::fs::read_to_string(server.kubeconfig()).unwrap();
    let admin_token = server.server.admin_token().to_owned();
    let path = server.dir.path().join(format!("{name}.kubeconfig"));
    std::fs::write(&path, admin.replace(&admin_token, token)).unwrap();
    path
}

/// `kubectl auth can-i …` as `kubectl` answers it: `yes` or `no` (its first word).
fn can_i(kubectl: &Kubectl, question: &[&str]) -> String {
    let mut args = vec!["auth", "can-i"];
    args.extend_from_slice(question);
    let answer = kubectl.run(&args).stdout;
    answer
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_file_groups_get_only_what_their_role_bindings_grant() {
    let server = TestServer::start_with(|config| {
        std::fs::create_dir_all(&config.data_dir).unwrap();
        std::fs::write(
            config.data_dir.join("tokens.csv"),
            "admin-token-0123456789,admin,admin,\"system:masters\"\n\
             viewer-token-0123456789,alice,alice,\"viewers,staff\"\n\
             team-token-0123456789,bob,bob,\"team-a\"\n",
        )
        .unwrap();
    })
    .await;
    let dispatcher = &kubectls().dispatcher;
    let admin = Kubectl::new(dispatcher, server.kubeconfig());
    let alice = Kubectl::new(
        dispatcher,
        &kubeconfig_for(&server, "viewer-token-0123456789", "alice"),
    );
    let bob = Kubectl::new(
        dispatcher,
        &kubeconfig_for(&server, "team-token-0123456789", "bob"),
    );
    admin.ok(&["create", "namespace", "team-a"]);
    admin.ok(&["create", "configmap", "settings", "--from-literal=a=1"]);
    admin.ok(&["create", "secret", "generic", "creds", "--from-literal=k=v"]);

    // Nothing bound yet: an authenticated user without bindings may do nothing.
    let denied = alice.run(&["get", "configmaps"]);
    assert!(!denied.ok, "{denied:?}");
    assert!(
        denied.stderr.contains(
            "configmaps is forbidden: User \"alice\" cannot list resource \"configmaps\" in API \
             group \"\" in the namespace \"default\""
        ),
        "{denied:?}"
    );

    // The default ClusterRoles exist; bind `view` to a group and `edit` in one namespace.
    let roles = admin.ok(&["get", "clusterroles", "-o", "name"]);
    for role in ["cluster-admin", "admin", "edit", "view"] {
        assert!(
            roles.contains(&format!("clusterrole.rbac.authorization.k8s.io/{role}")),
            "{roles}"
        );
    }
    admin.ok(&[
        "create",
        "clusterrolebinding",
        "viewers",
        "--clusterrole=view",
        "--group=viewers",
    ]);
    admin.ok(&[
        "create",
        "rolebinding",
        "team-a-edit",
        "--clusterrole=edit",
        "--group=team-a",
        "-n",
        "team-a",
    ]);

    // `kubectl auth can-i` asks the server (SelfSubjectAccessReview).
    assert_eq!(
        alice.ok(&["auth", "can-i", "list", "configmaps"]).trim(),
        "yes"
    );
    let cannot = alice.run(&["auth", "can-i", "delete", "configmaps"]);
    assert!(
        !cannot.ok && cannot.stdout.starts_with("no - configmaps is forbidden"),
        "{cannot:?}"
    );
    let listed = alice.ok(&["get", "configmaps"]);
    assert!(listed.contains("settings"), "{listed}");
    let secrets = alice.run(&["get", "secret", "creds"]);
    assert!(
        !secrets.ok && secrets.stderr.contains("is forbidden"),
        "{secrets:?}"
    );
    let delete = alice.run(&["delete", "configmap", "settings"]);
    assert!(
        !delete.ok && delete.stderr.contains("cannot delete resource"),
        "{delete:?}"
    );
    // A viewer cannot grant itself more.
    let escalate = alice.run(&[
        "create",
        "clusterrolebinding",
        "mine",
        "--clusterrole=cluster-admin",
        "--user=alice",
    ]);
    assert!(
        !escalate.ok && escalate.stderr.contains("is forbidden"),
        "{escalate:?}"
    );

    // The team edits its own namespace, and nothing elsewhere.
    assert_eq!(
        can_i(&bob, &["create", "configmaps", "-n", "team-a"]),
        "yes"
    );
    assert_eq!(
        can_i(&bob, &["create", "configmaps", "-n", "default"]),
        "no"
    );
    bob.ok(&[
        "create",
        "configmap",
        "app",
        "-n",
        "team-a",
        "--from-literal=x=1",
    ]);
    bob.ok(&["delete", "configmap", "app", "-n", "team-a"]);
    let outside = bob.run(&["create", "configmap", "app", "--from-literal=x=1"]);
    assert!(
        !outside.ok && outside.stderr.contains("in the namespace \"default\""),
        "{outside:?}"
    );
    let nodes = bob.run(&["get", "nodes"]);
    assert!(
        !nodes.ok && nodes.stderr.contains("at the cluster scope"),
        "{nodes:?}"
    );
    // `edit` does not include RBAC: the team cannot bind roles even in its namespace.
    let bind = bob.run(&[
        "create",
        "rolebinding",
        "x",
        "--clusterrole=admin",
        "--user=bob",
        "-n",
        "team-a",
    ]);
    assert!(!bind.ok && bind.stderr.contains("is forbidden"), "{bind:?}");

    // Nothing the refused requests asked for happened.
    assert!(
        admin
            .ok(&["get", "configmap", "settings", "-o", "name"])
            .contains("settings")
    );
    let bindings = admin.ok(&["get", "clusterrolebindings", "-o", "name"]);
    assert!(!bindings.contains("/mine"), "{bindings}");
    // A token the file does not hold is refused outright.
    let stranger = Kubectl::new(dispatcher, &kubeconfig_for(&server, "no-such-token", "x"));
    let refused = stranger.run(&["get", "pods"]);
    assert!(
        !refused.ok && refused.stderr.contains("provide credentials"),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_create_token_mints_a_bound_expiring_service_account_token() {
    let (server, admin) = setup().await;
    // Discovery lists the workload groups, policy (evictions) and apiregistration, whose
    // APIServices name every built-in group.
    let versions = admin.ok(&["api-versions"]);
    for gv in [
        "apps/v1",
        "batch/v1",
        "policy/v1",
        "apiregistration.k8s.io/v1",
    ] {
        assert!(
            versions.lines().any(|l| l == gv),
            "{gv} missing: {versions}"
        );
    }
    let resources = admin.ok(&["api-resources", "--api-group=apps", "-o", "name"]);
    for r in ["deployments.apps", "replicasets.apps", "daemonsets.apps"] {
        assert!(resources.contains(r), "{resources}");
    }
    let services = admin.ok(&["get", "apiservices", "-o", "name"]);
    assert!(
        services.contains("apiservice.apiregistration.k8s.io/v1.apps"),
        "{services}"
    );
    assert!(
        services.contains("apiservice.apiregistration.k8s.io/v1."),
        "{services}"
    );
    // The default ServiceAccount and the `kubernetes` Service exist from the start.
    let svc = admin.ok(&[
        "get",
        "service",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP} {.spec.ports[0].port}",
    ]);
    assert_eq!(svc.trim(), "10.96.0.1 443");
    let token = admin.ok(&["create", "token", "default", "--duration=15m"]);
    let token = token.trim();
    let as_sa = Kubectl::new(
        &kubectls().dispatcher,
        &kubeconfig_for(&server, token, "sa"),
    );
    // Authenticated as the ServiceAccount, which nothing is bound to yet.
    let denied = as_sa.run(&["get", "configmaps"]);
    assert!(!denied.ok);
    assert!(
        denied
            .stderr
            .contains("User \"system:serviceaccount:default:default\" cannot list"),
        "{denied:?}"
    );
    admin.ok(&[
        "create",
        "rolebinding",
        "sa-view",
        "--clusterrole=view",
        "--serviceaccount=default:default",
    ]);
    as_sa.ok(&["get", "configmaps"]);
    // Too short a lifetime is refused with the field.
    let short = admin.run(&["create", "token", "default", "--duration=1m"]);
    assert!(
        !short.ok && short.stderr.contains("spec.expirationSeconds"),
        "{short:?}"
    );
    // A token bound to a pod dies with the pod.
    let applied = admin.run_with_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: {name: holder}\nspec: {containers: [{name: c, image: sh}]}\n"),
    );
    assert!(applied.ok, "{applied:?}");
    let bound = admin.ok(&[
        "create",
        "token",
        "default",
        "--bound-object-kind=Pod",
        "--bound-object-name=holder",
    ]);
    let as_pod = Kubectl::new(
        &kubectls().dispatcher,
        &kubeconfig_for(&server, bound.trim(), "pod"),
    );
    as_pod.ok(&["get", "configmaps"]);
    admin.ok(&["delete", "pod", "holder", "--grace-period=0", "--force"]);
    let revoked = as_pod.run(&["get", "configmaps"]);
    assert!(
        !revoked.ok && revoked.stderr.contains("Unauthorized"),
        "{revoked:?}"
    );
    // Deleting the ServiceAccount revokes its tokens.
    admin.ok(&["delete", "serviceaccount", "default"]);
    let gone = as_sa.run(&["get", "configmaps"]);
    assert!(!gone.ok && gone.stderr.contains("Unauthorized"), "{gone:?}");
}
