//! kube-rs against a started server: typed CRUD, optimistic concurrency, selectors, watchers
//! and reflectors across stream ends and compaction, streaming lists, server-side apply,
//! the finalizer helper, the event recorder, and ownerReference garbage collection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, PropagationPolicy,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{CustomResourceExt, Resource, ResourceExt};
use sedna_api::model::{Model, ModelSpec};
use serde_json::json;
use support::{TestServer, eventually};

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
        ..Default::default()
    }
}

async fn install_model_crd(client: &kube::Client) {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    crds.create(&PostParams::default(), &Model::crd())
        .await
        .unwrap();
}

fn model(name: &str, url: &str) -> Model {
    Model::new(
        name,
        ModelSpec {
            url: url.into(),
            format: "onnx".into(),
            device_soc_versions: vec![],
            credential_name: None,
        },
    )
}

#[tokio::test]
async fn typed_crud_on_a_custom_resource() {
    let server = TestServer::start().await;
    let client = server.client().await;
    install_model_crd(&client).await;
    let models: Api<Model> = Api::namespaced(client, "default");
    let created = models
        .create(&PostParams::default(), &model("edge", "/m/edge.onnx"))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let fetched = models.get("edge").await.unwrap();
    assert_eq!(fetched.spec.url, "/m/edge.onnx");

    let mut replaced = fetched.clone();
    replaced.spec.url = "/m/edge-v2.onnx".into();
    let replaced = models
        .replace("edge", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));

    let status = json!({ "status": { "phase": "Ready" } });
    let with_status = models
        .patch_status("edge", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(
        with_status.metadata.generation,
        Some(2),
        "status writes keep generation"
    );
    assert!(with_status.status.is_some());

    let listed = models.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    models
        .delete("edge", &DeleteParams::default())
        .await
        .unwrap();
    let err = models.get("edge").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err}"
    );
}

#[tokio::test]
async fn a_stale_update_is_a_409_conflict() {
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let first = cms
        .create(&PostParams::default(), &cm("c", &[]))
        .await
        .unwrap();
    let mut newer = first.clone();
    newer.data = Some(BTreeMap::from([("k".into(), "newer".into())]));
    cms.replace("c", &PostParams::default(), &newer)
        .await
        .unwrap();
    let mut stale = first;
    stale.data = Some(BTreeMap::from([("k".into(), "stale".into())]));
    let err = cms
        .replace("c", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert_eq!(s.reason, "Conflict");
            assert!(
                s.message.contains("the object has been modified"),
                "{}",
                s.message
            );
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    for (name, tier) in [("a", "edge"), ("b", "edge"), ("c", "cloud")] {
        cms.create(
            &PostParams::default(),
            &cm(name, &[("tier", tier), ("app", "demo")]),
        )
        .await
        .unwrap();
    }
    let names = |list: kube::core::ObjectList<ConfigMap>| {
        list.items
            .iter()
            .map(ResourceExt::name_any)
            .collect::<Vec<_>>()
    };
    let edge = cms
        .list(&ListParams::default().labels("tier=edge"))
        .await
        .unwrap();
    assert_eq!(names(edge), ["a", "b"]);
    let not_edge = cms
        .list(&ListParams::default().labels("app=demo,tier notin (edge)"))
        .await
        .unwrap();
    assert_eq!(names(not_edge), ["c"]);
    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(names(by_name), ["b"]);
    let paged = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(paged.items.len(), 2);
    let token = paged.metadata.continue_.clone().unwrap();
    let rest = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(rest), ["c"]);
    let bad = cms
        .list(&ListParams::default().fields("data.k=v"))
        .await
        .unwrap_err();
    assert!(
        matches!(bad, kube::Error::Api(ref s) if s.code == 400),
        "{bad}"
    );
}

#[tokio::test]
async fn a_reflector_survives_stream_ends_and_relists_after_a_compaction() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let server = TestServer::start_with(|c| {
        c.watch_timeout = Duration::from_millis(700);
        c.bookmark_interval = Duration::from_secs(3600);
    })
    .await;
    let client = server.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let (reader, writer) = reflector::store();
    let lists = Arc::new(AtomicUsize::new(0));
    let counter = lists.clone();
    let events = watcher(cms.clone(), watcher::Config::default()).inspect(move |e| {
        if matches!(e, Ok(watcher::Event::Init)) {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let stream = reflector(writer, events).applied_objects().boxed();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("x{i}"), &[]))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(10), || reader.state().len() == 5).await;
    // Several server-side stream ends later, changes still arrive without a relist.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    cms.delete("x0", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(10), || reader.state().len() == 4).await;
    assert_eq!(lists.load(Ordering::SeqCst), 1);

    // Move the log past the watcher's resourceVersion with other objects, and compact it:
    // the next watch gets an ERROR event with a 410 and the watcher lists again.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, "default");
    for i in 0..5 {
        let mut s = k8s_openapi::api::core::v1::Secret::default();
        s.metadata.name = Some(format!("s{i}"));
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    let head = server.server.store().head();
    server.server.store().compact_at(head).await.unwrap();
    eventually(Duration::from_secs(10), || {
        lists.load(Ordering::SeqCst) >= 2
    })
    .await;
    cms.delete("x1", &DeleteParams::default()).await.unwrap();
    cms.create(&PostParams::default(), &cm("after-compaction", &[]))
        .await
        .unwrap();
    eventually(Duration::from_secs(15), || {
        let names: Vec<String> = reader.state().iter().map(|c| c.name_any()).collect();
        names.len() == 4
            && names.contains(&"after-compaction".to_owned())
            && !names.contains(&"x1".to_owned())
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_gets_an_error_event_with_410() {
    use kube::api::{WatchEvent, WatchParams};
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let first = cms
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    let old = first.resource_version().unwrap();
    // From a retained revision, exactly the missed events arrive, in order.
    let mut replay = cms
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    let mut names = vec![];
    while let Some(Ok(WatchEvent::Added(c))) = replay.next().await {
        names.push(c.name_any());
        if names.len() == 2 {
            break;
        }
    }
    assert_eq!(names, ["a", "b"]);
    let mut after = cms
        .watch(&WatchParams::default().timeout(1), &old)
        .await
        .unwrap()
        .boxed();
    match after.next().await {
        Some(Ok(WatchEvent::Added(c))) => assert_eq!(c.name_any(), "b"),
        other => panic!("{other:?}"),
    }
    let head = server.server.store().head();
    server.server.store().compact_at(head).await.unwrap();
    let mut stale = cms
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match stale.next().await {
        Some(Ok(WatchEvent::Error(e))) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn streaming_lists_end_with_the_initial_events_bookmark() {
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    for i in 0..3 {
        cms.create(&PostParams::default(), &cm(&format!("s{i}"), &[]))
            .await
            .unwrap();
    }
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().streaming_lists();
    let stream = reflector(writer, watcher(cms.clone(), config))
        .applied_objects()
        .boxed();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    eventually(Duration::from_secs(10), || reader.state().len() == 3).await;
    cms.create(&PostParams::default(), &cm("s3", &[]))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || reader.state().len() == 4).await;
    task.abort();
}

#[tokio::test]
async fn server_side_apply_reports_conflicts_and_force_takes_ownership() {
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let applied = json!({ "apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": { "name": "cfg" }, "data": { "mode": "edge" } });
    cms.patch(
        "cfg",
        &PatchParams::apply("deployer"),
        &Patch::Apply(&applied),
    )
    .await
    .unwrap();
    let rival = json!({ "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": { "name": "cfg" }, "data": { "mode": "cloud" } });
    let err = cms
        .patch(
            "cfg",
            &PatchParams::apply("operator"),
            &Patch::Apply(&rival),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert!(
                s.message.contains("conflict with \"deployer\""),
                "{}",
                s.message
            );
            assert!(s.message.contains(".data.mode"), "{}", s.message);
        }
        other => panic!("{other}"),
    }
    let forced = cms
        .patch(
            "cfg",
            &PatchParams::apply("operator").force(),
            &Patch::Apply(&rival),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["mode"], "cloud");
    let managers: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(
        managers,
        ["operator"],
        "the forced field moved to its new owner"
    );
    let without_manager = cms
        .patch("cfg", &PatchParams::default(), &Patch::Apply(&rival))
        .await
        .unwrap_err();
    assert!(matches!(without_manager, kube::Error::Api(ref s) if s.code == 422 || s.code == 400));
}

#[tokio::test]
async fn the_finalizer_helper_adds_and_removes_its_finalizer() {
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::{Event as Finalizer, finalizer};
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    cms.create(&PostParams::default(), &cm("guarded", &[]))
        .await
        .unwrap();
    let reconcile = |obj: Arc<ConfigMap>| {
        let cms = cms.clone();
        async move {
            finalizer(&cms, "sedna.io/cleanup", obj, |event| async move {
                match event {
                    Finalizer::Apply(_) | Finalizer::Cleanup(_) => {
                        Ok::<_, std::convert::Infallible>(Action::await_change())
                    }
                }
            })
            .await
        }
    };
    reconcile(Arc::new(cms.get("guarded").await.unwrap()))
        .await
        .unwrap();
    let with = cms.get("guarded").await.unwrap();
    assert_eq!(with.finalizers(), ["sedna.io/cleanup"]);
    cms.delete("guarded", &DeleteParams::default())
        .await
        .unwrap();
    let deleting = cms.get("guarded").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    reconcile(Arc::new(deleting)).await.unwrap();
    let gone = cms.get_opt("guarded").await.unwrap();
    assert!(
        gone.is_none(),
        "the last finalizer's removal deletes the object"
    );
}

#[tokio::test]
async fn recorded_events_are_listed_as_core_events_of_the_object() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let server = TestServer::start().await;
    let client = server.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let obj = cms
        .create(&PostParams::default(), &cm("observed", &[]))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "sedna-gm".into(),
            instance: Some("gm-0".into()),
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "Synced".into(),
        note: Some("configuration pushed to 3 nodes".into()),
        action: "Sync".into(),
        secondary: None,
    };
    let reference = obj.object_ref(&());
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, "default");
    let selected = core
        .list(
            &ListParams::default()
                .fields("involvedObject.name=observed,involvedObject.kind=ConfigMap"),
        )
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 1);
    let e = &selected.items[0];
    assert_eq!(e.reason.as_deref(), Some("Synced"));
    assert_eq!(
        e.message.as_deref(),
        Some("configuration pushed to 3 nodes")
    );
    assert_eq!(
        e.series.as_ref().and_then(|s| s.count),
        Some(2),
        "the repeat became a series"
    );
}

fn owned(name: &str, owner: &ConfigMap) -> ConfigMap {
    let mut c = cm(name, &[]);
    c.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: owner.name_any(),
        uid: owner.uid().unwrap(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    c
}

#[tokio::test]
async fn the_sweep_removes_dependents_of_owners_that_never_existed_and_prunes_mixed_owners() {
    let server = TestServer::start_with(|c| c.gc_interval = Duration::from_millis(200)).await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let owner = cms
        .create(&PostParams::default(), &cm("alive", &[]))
        .await
        .unwrap();
    let mut ghost = cm("ghost", &[]);
    ghost.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
    // No deletion event ever names these owners: only the sweep can find them gone.
    let orphan = owned("orphan", &ghost);
    let mut mixed = owned("mixed", &owner);
    mixed
        .metadata
        .owner_references
        .as_mut()
        .unwrap()
        .extend(owned("x", &ghost).metadata.owner_references.unwrap());
    let kept = owned("kept", &owner);
    for c in [&orphan, &mixed, &kept] {
        cms.create(&PostParams::default(), c).await.unwrap();
    }
    let mut swept = false;
    for _ in 0..100 {
        let owners = |c: Option<ConfigMap>| c.map(|c| c.owner_references().len());
        if cms.get_opt("orphan").await.unwrap().is_none()
            && owners(cms.get_opt("mixed").await.unwrap()) == Some(1)
        {
            swept = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        swept,
        "the orphan is deleted and mixed keeps only its live owner"
    );
    let mixed = cms.get("mixed").await.unwrap();
    assert_eq!(mixed.owner_references()[0].uid, owner.uid().unwrap());
    let kept = cms.get("kept").await.unwrap();
    assert_eq!(
        kept.owner_references().len(),
        1,
        "live owners are left alone"
    );
    assert!(cms.get_opt("alive").await.unwrap().is_some());
}

#[tokio::test]
async fn owner_references_are_garbage_collected_by_every_propagation_policy() {
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let exists = |name: &'static str| {
        let cms = cms.clone();
        async move { cms.get_opt(name).await.unwrap().is_some() }
    };

    // Background: the owner goes at once, its dependent soon after.
    let owner = cms
        .create(&PostParams::default(), &cm("bg-owner", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &owned("bg-child", &owner))
        .await
        .unwrap();
    cms.delete("bg-owner", &DeleteParams::background())
        .await
        .unwrap();
    assert!(!exists("bg-owner").await);
    for _ in 0..100 {
        if !exists("bg-child").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !exists("bg-child").await,
        "background deletion removes the dependent"
    );

    // Foreground: the owner waits for its dependents.
    let owner = cms
        .create(&PostParams::default(), &cm("fg-owner", &[]))
        .await
        .unwrap();
    let mut child = owned("fg-child", &owner);
    child.metadata.finalizers = Some(vec!["test/hold".into()]);
    cms.create(&PostParams::default(), &child).await.unwrap();
    cms.delete("fg-owner", &DeleteParams::foreground())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = cms.get("fg-owner").await.unwrap();
    assert!(
        waiting
            .finalizers()
            .contains(&"foregroundDeletion".to_owned())
    );
    assert!(
        cms.get("fg-child")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    cms.patch(
        "fg-child",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
    )
    .await
    .unwrap();
    for _ in 0..100 {
        if !exists("fg-owner").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!exists("fg-child").await && !exists("fg-owner").await);

    // Orphan: the dependent stays, without its owner reference.
    let owner = cms
        .create(&PostParams::default(), &cm("or-owner", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &owned("or-child", &owner))
        .await
        .unwrap();
    let orphan = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..Default::default()
    };
    cms.delete("or-owner", &orphan).await.unwrap();
    for _ in 0..100 {
        if !exists("or-owner").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!exists("or-owner").await);
    let child = cms.get("or-child").await.unwrap();
    assert!(
        child
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test]
async fn deleting_a_namespace_removes_its_content_first() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("temp".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "temp");
    cms.create(&PostParams::default(), &cm("inside", &[]))
        .await
        .unwrap();
    namespaces
        .delete("temp", &DeleteParams::default())
        .await
        .unwrap();
    for _ in 0..100 {
        if namespaces.get_opt("temp").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(namespaces.get_opt("temp").await.unwrap().is_none());
    assert!(
        cms.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn delete_collection_honours_label_selectors() {
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    for (name, tier) in [("a", "edge"), ("b", "edge"), ("c", "cloud")] {
        cms.create(&PostParams::default(), &cm(name, &[("tier", tier)]))
            .await
            .unwrap();
    }
    cms.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("tier=edge"),
    )
    .await
    .unwrap();
    let left: Vec<String> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(left, ["c"]);
}

#[tokio::test]
async fn an_exact_list_at_a_compacted_revision_is_410_gone() {
    use kube::api::VersionMatch;
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let first = cms
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    let old = first.resource_version().unwrap();
    let exact = ListParams::default().at(&old).matching(VersionMatch::Exact);
    let past = cms.list(&exact).await.unwrap();
    assert_eq!(past.items.len(), 1, "the list as it was at that revision");
    let head = server.server.store().head();
    server.server.store().compact_at(head).await.unwrap();
    let err = cms.list(&exact).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 410 && s.reason == "Expired"),
        "{err}"
    );
}

#[tokio::test]
async fn dry_runs_validate_without_persisting() {
    let server = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let created = cms
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &cm("ghost", &[]),
        )
        .await
        .unwrap();
    assert_eq!(created.name_any(), "ghost");
    assert!(cms.get_opt("ghost").await.unwrap().is_none());
}

#[tokio::test]
async fn raw_http_limits_authentication_and_media_types() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let send = |req: http::Request<Vec<u8>>| {
        let client = client.clone();
        async move {
            let res = client
                .send(req.map(kube::client::Body::from))
                .await
                .unwrap();
            let status = res.status().as_u16();
            let body = http_body_util::BodyExt::collect(res.into_body())
                .await
                .unwrap()
                .to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default(),
            )
        }
    };
    // A body over the 3 MiB limit is refused with 413.
    let huge = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "big" },
                       "data": { "blob": "x".repeat(4 * 1024 * 1024) } });
    let req = http::Request::post("/api/v1/namespaces/default/configmaps")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&huge).unwrap())
        .unwrap();
    let (status, body) = send(req).await;
    assert_eq!(status, 413);
    assert_eq!(body["reason"], "RequestEntityTooLarge");

    // Strategic merge patch is refused for custom resources.
    install_model_crd(&client).await;
    let models: Api<Model> = Api::namespaced(client.clone(), "default");
    models
        .create(&PostParams::default(), &model("m", "/m.onnx"))
        .await
        .unwrap();
    let req = http::Request::patch("/apis/sedna.io/v1alpha1/namespaces/default/models/m")
        .header("content-type", "application/strategic-merge-patch+json")
        .body(br#"{"spec":{"format":"pth"}}"#.to_vec())
        .unwrap();
    let (status, body) = send(req).await;
    assert_eq!(status, 415, "{body}");

    // ...and applied to built-in kinds, merging lists by their keys.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "default");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": { "name": "p" },
        "spec": { "containers": [{ "name": "a", "image": "x", "env": [{ "name": "A", "value": "1" }] }] }
    })).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let patch = json!({ "spec": { "containers": [{ "name": "a", "env": [{ "name": "B", "value": "2" }] }] } });
    let patched = pods
        .patch("p", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    let env = patched.spec.unwrap().containers[0].env.clone().unwrap();
    assert_eq!(env.len(), 2, "env merged by name");

    // Without a token nothing but health and version is served.
    let url = server.server.url();
    let anonymous = kube::Client::try_from({
        let mut c = kube::Config::new(url.parse().unwrap());
        c.root_cert = Some(vec![server_ca_der(server.server.ca_pem())]);
        c
    })
    .unwrap();
    let err = Api::<ConfigMap>::namespaced(anonymous.clone(), "default")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 401),
        "{err}"
    );
    assert!(anonymous.apiserver_version().await.is_ok());
}

fn server_ca_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}
