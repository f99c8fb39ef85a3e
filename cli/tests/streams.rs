//! `kubectl logs`, `exec`, `attach` and `port-forward`, with the real kubectl, reach a pod on
//! an edge node through the hub: the node serves them on streams it opens back over its own
//! connection (it listens on no port for them), in both protocols kubectl speaks (websocket,
//! and SPDY when websockets are turned off); users without the rights are refused, and a node's
//! stream bound answers with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::time::Duration;

mod support;
use support::{Kubectl, container_pid, free_port, up_with, wait_until};

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn pod(http_port: u16) -> String {
    // A system Python: pods with their own uids cannot run one under root's home (pyenv).
    let python = ["/usr/bin/python3", "/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("python3");
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{ name: web }}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: sh
    command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.2; done"]
    env: [{{ name: GREETING, value: hello-from-the-pod-spec }}]
  - name: http
    image: python3
    command: ["{python}", "-m", "http.server", "{http_port}", "--bind", "127.0.0.1"]
    ports: [{{ containerPort: {http_port} }}]
  - name: once
    image: sh
    command: ["sh", "-c", "echo run-$(date +%s%N); sleep 0.5; exit 1"]
"#
    )
}

/// kubectl with its stdin fed `input`; returns (exit code, stdout, stderr).
fn kubectl_with_input(
    kubectl: &Kubectl,
    env: &[(&str, &str)],
    args: &[&str],
    input: &str,
) -> (i32, String, String) {
    let out = kubectl.run_with_input(env, args, input);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A kubectl that keeps running (logs -f, attach, port-forward), killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(
    kubectl: &Kubectl,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Running, BufReader<std::process::ChildStdout>) {
    let mut child = kubectl
        .command(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (Running(child), stdout)
}

fn line_number(line: &str) -> u64 {
    line.trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a counter line: {line:?}"))
}

/// An HTTP GET through a forwarded local port.
fn http_get(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// Runs `kubectl port-forward` with `env`, waits for it to listen, GETs through it.
fn forward_and_get(kubectl: &Kubectl, env: &[(&str, &str)], remote: u16) -> (String, Running) {
    let local = free_port();
    let (running, mut out) = spawn(
        kubectl,
        env,
        &[
            "port-forward",
            "pod/web",
            &format!("{local}:{remote}"),
            "--address",
            "127.0.0.1",
        ],
    );
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(
        first.contains(&format!("Forwarding from 127.0.0.1:{local} -> {remote}")),
        "{first}"
    );
    (http_get(local), running)
}

#[test]
fn logs_exec_attach_and_port_forward_reach_an_edge_pod_through_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    // As root, pods (and what is exec'd in them) run under their own uids.
    let root = running_as_root();
    let mut extra = vec!["--streams-per-node", "3"];
    if root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        extra.extend(["--pod-uids", "310000-310099"]);
    }
    let (_up, kubectl) = up_with(&dir.path().join("up"), 1, &extra);
    let http_port = free_port();
    kubectl.apply(&pod(http_port));
    wait_until(
        "web running with its server up",
        Duration::from_secs(60),
        || {
            let phase = kubectl.ok(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"]);
            (phase == "Running" && std::net::TcpStream::connect(("127.0.0.1", http_port)).is_ok())
                .then_some(())
        },
    );
    let logs = |args: &[&str]| -> String {
        let mut all = vec!["logs", "web", "-c", "main"];
        all.extend_from_slice(args);
        kubectl.ok(&all)
    };
    wait_until("ten lines of output", Duration::from_secs(30), || {
        (logs(&[]).lines().count() >= 10).then_some(())
    });

    // kubectl logs: the whole log, --tail, --timestamps, --since, --limit-bytes.
    let all = logs(&[]);
    assert!(all.starts_with("line 1\nline 2\n"), "{all}");
    let tail = logs(&["--tail=3"]);
    let tail: Vec<&str> = tail.lines().collect();
    assert_eq!(tail.len(), 3, "{tail:?}");
    assert!(line_number(tail[2]) >= line_number(all.lines().last().unwrap()));
    let stamped = logs(&["--tail=2", "--timestamps"]);
    let now = jiff::Timestamp::now();
    for line in stamped.lines() {
        let (time, text) = line.split_once(' ').unwrap();
        let time: jiff::Timestamp = time.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
        let age = now.duration_since(time).as_secs_f64();
        assert!((-1.0..30.0).contains(&age), "{line} is {age}s old");
        assert!(text.starts_with("line "), "{line}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let recent = logs(&["--since=1s"]);
    let recent_count = recent.lines().count();
    assert!(
        (1..logs(&[]).lines().count() / 2).contains(&recent_count),
        "--since=1s gave {recent_count} lines"
    );
    assert_eq!(logs(&["--limit-bytes=7"]), "line 1\n");

    // kubectl logs -f keeps streaming lines written after it started.
    let (follower, mut followed) = spawn(
        &kubectl,
        &[],
        &["logs", "-f", "web", "-c", "main", "--tail=1"],
    );
    let mut first = String::new();
    followed.read_line(&mut first).unwrap();
    let start = line_number(&first);
    let mut later = String::new();
    for _ in 0..10 {
        later.clear();
        followed.read_line(&mut later).unwrap();
    }
    assert_eq!(
        line_number(&later),
        start + 10,
        "followed lines arrive in order"
    );
    drop(follower);

    // kubectl attach streams the container's output from now on.
    let (attached, mut attached_out) = spawn(&kubectl, &[], &["attach", "web", "-c", "main"]);
    let mut seen = String::new();
    attached_out.read_line(&mut seen).unwrap();
    assert!(line_number(&seen) > start, "{seen}");
    drop(attached);

    // kubectl exec, in the container's context, over websocket (default) and SPDY.
    for env in [
        &[][..],
        &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")][..],
    ] {
        let (code, out, err) = kubectl_with_input(
            &kubectl,
            env,
            &[
                "exec",
                "web",
                "-c",
                "main",
                "--",
                "sh",
                "-c",
                "echo $GREETING; echo oops >&2; exit 3",
            ],
            "",
        );
        assert_eq!(code, 3, "{env:?}: {err}");
        assert_eq!(out, "hello-from-the-pod-spec\n", "{env:?}");
        assert!(
            err.contains("oops") && err.contains("command terminated with exit code 3"),
            "{env:?}: {err}"
        );
        let (code, out, err) = kubectl_with_input(
            &kubectl,
            env,
            &["exec", "-i", "web", "-c", "main", "--", "tr", "a-z", "A-Z"],
            "through the hub\nand back\n",
        );
        assert_eq!(
            (code, out.as_str()),
            (0, "THROUGH THE HUB\nAND BACK\n"),
            "{env:?}: {err}"
        );
        let (code, _, err) = kubectl_with_input(
            &kubectl,
            env,
            &["exec", "web", "-c", "main", "--", "no-such-program"],
            "",
        );
        assert_ne!(code, 0);
        assert!(err.contains("no-such-program"), "{env:?}: {err}");
    }

    // The exec'd command runs under the container's own uid.
    let (code, out, err) = kubectl_with_input(
        &kubectl,
        &[],
        &["exec", "web", "-c", "main", "--", "id", "-u"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let exec_uid: u32 = out.trim().parse().unwrap();
    let pid = container_pid(&dir.path().join("up/nodes/edge-1"), "web", "main").unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let container_uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(exec_uid, container_uid);
    if root {
        assert!((310_000..=310_099).contains(&exec_uid), "{exec_uid}");
    } else {
        eprintln!("not root: pods and exec run as the agent's user");
    }

    // kubectl port-forward, websocket-tunnelled (default) and SPDY, to a declared port only.
    for env in [&[][..], &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")][..]] {
        let (page, _pf) = forward_and_get(&kubectl, env, http_port);
        assert!(page.starts_with("HTTP/1.0 200"), "{env:?}: {page}");
        assert!(page.contains("Directory listing"), "{env:?}: {page}");
    }
    let undeclared = free_port();
    let local = free_port();
    let mut pf = kubectl
        .command(&[
            "port-forward",
            "pod/web",
            &format!("{local}:{undeclared}"),
            "--address",
            "127.0.0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stdout stays open: kubectl writes to it as connections come.
    let mut stdout = BufReader::new(pf.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let got = http_get(local);
    assert!(got.is_empty(), "{got}");
    wait_until("port-forward to end", Duration::from_secs(20), || {
        pf.try_wait().unwrap().map(|_| ())
    });
    let mut err = String::new();
    pf.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains(&format!(
            "port {undeclared} is not a port the pod declares (declared: {http_port})"
        )),
        "{err}"
    );

    // --previous: the run before the current one.
    wait_until("a restarted container", Duration::from_secs(60), || {
        let out = kubectl.run(&["logs", "web", "-c", "once", "--previous"]);
        out.status.success().then_some(())
    });
    let previous = kubectl.ok(&["logs", "web", "-c", "once", "--previous"]);
    let current = kubectl.ok(&["logs", "web", "-c", "once"]);
    assert!(
        previous.starts_with("run-") && current.starts_with("run-"),
        "{previous} / {current}"
    );
    assert_ne!(previous, current);

    // Rights: a viewer may read logs but not exec or forward; a user without rights nothing.
    kubectl.apply(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: viewer}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: viewer}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}\n\
         subjects: [{kind: ServiceAccount, name: viewer, namespace: default}]\n",
    );
    // A protobuf body, as kubectl sends it.
    kubectl.ok(&["create", "serviceaccount", "nobody"]);
    let viewer = kubectl.ok(&["create", "token", "viewer"]);
    let nobody = kubectl.ok(&["create", "token", "nobody"]);
    let as_user = |token: &str, args: &[&str]| {
        let mut all = vec!["--token", token.trim()];
        all.extend_from_slice(args);
        kubectl.run(&all)
    };
    let read = as_user(&viewer, &["logs", "web", "-c", "main", "--tail=1"]);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    for (token, args, says) in [
        (
            &viewer,
            &["exec", "web", "-c", "main", "--", "true"][..],
            "cannot create resource \"pods/exec\"",
        ),
        (
            &viewer,
            &["attach", "web", "-c", "main"][..],
            "cannot create resource \"pods/attach\"",
        ),
        (
            &nobody,
            &["logs", "web", "-c", "main"][..],
            "cannot get resource \"pods\"",
        ),
    ] {
        let out = as_user(token, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }
    let direct = as_user(
        &nobody,
        &["get", "--raw", "/api/v1/namespaces/default/pods/web/log"],
    );
    let err = String::from_utf8_lossy(&direct.stderr);
    assert!(
        err.contains("cannot get resource \"pods/log\""),
        "the subresource itself is authorized: {err}"
    );

    // The node's bound: three streams at once, a fourth is refused with the reason, and the
    // slots come back when the streams end.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let (r, mut out) = spawn(
                &kubectl,
                &[],
                &["logs", "-f", "web", "-c", "main", "--tail=1"],
            );
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            (r, out)
        })
        .collect();
    let refused = kubectl.run(&["logs", "web", "-c", "main", "--tail=1"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("node edge-1 has 3 streams open, the most the hub allows per node"),
        "{err}"
    );
    drop(held);
    wait_until("a stream slot back", Duration::from_secs(20), || {
        kubectl
            .run(&["logs", "web", "-c", "main", "--tail=1"])
            .status
            .success()
            .then_some(())
    });
}
