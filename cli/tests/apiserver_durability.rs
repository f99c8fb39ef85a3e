//! `sedna apiserver` as a user runs it: a real process, killed with SIGKILL in the middle of a
//! write loop, loses no write it acknowledged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sedna"))
        .args(["apiserver", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn client(dir: &Path) -> kube::Client {
    let path = dir.join("kubeconfig");
    for _ in 0..200 {
        if path.exists() {
            let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .unwrap();
            let client = kube::Client::try_from(config).unwrap();
            if client.apiserver_version().await.is_ok() {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the API server did not come up");
}

fn config_map(name: &str, value: u64) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("n".to_owned(), value.to_string())])),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_write_loop_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("apiserver");
    let port = free_port();
    let mut server = start(&data, port);
    let first = client(&data).await;
    let cms: Api<ConfigMap> = Api::namespaced(first, "default");

    // Eight writers create objects and keep updating a counter in each; every acknowledged
    // write is recorded.
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let cms = cms.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0u64.. {
                let name = format!("w{w}-{}", i / 4);
                let result = if i % 4 == 0 {
                    cms.create(&PostParams::default(), &config_map(&name, i))
                        .await
                        .map(drop)
                } else {
                    let mut current = match cms.get(&name).await {
                        Ok(c) => c,
                        Err(_) => return,
                    };
                    current.data = Some(BTreeMap::from([("n".to_owned(), i.to_string())]));
                    cms.replace(&name, &PostParams::default(), &current)
                        .await
                        .map(drop)
                };
                match result {
                    Ok(()) => {
                        acked.lock().unwrap().insert(name, i);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the loop wrote too little to be meaningful: {}",
        acked.len()
    );

    let mut server = start(&data, port);
    let restarted = client(&data).await;
    let cms: Api<ConfigMap> = Api::namespaced(restarted, "default");
    let stored: BTreeMap<String, u64> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| {
            let n = c.data.unwrap()["n"].parse().unwrap();
            (c.metadata.name.unwrap(), n)
        })
        .collect();
    for (name, value) in &acked {
        let after = stored.get(name).copied();
        assert!(
            after.is_some_and(|v| v >= *value),
            "{name}: acknowledged {value}, found {after:?} after kill -9"
        );
    }
    server.kill().unwrap();
    server.wait().unwrap();
}
