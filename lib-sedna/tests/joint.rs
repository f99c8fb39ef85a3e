//! Joint inference over real HTTP with the real digits model at both ends: hard examples go
//! to the cloud; while the cloud is down they are queued on disk and answered after it
//! returns; nothing is lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{held_out, model_path};
use std::sync::Arc;
use std::time::Duration;

use ndarray::{Array2, Axis};
use sedna::hem;
use sedna::inference::{Model, SessionOptions, Tensor};
use sedna::joint::{
    Deferred, HardExampleQueue, HttpCloud, JointError, JointInference, QueueLimits, serve_http,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

fn model() -> Arc<Model> {
    let options = SessionOptions {
        intra_threads: 1,
        ..SessionOptions::default()
    };
    Arc::new(Model::load(model_path(), &options).unwrap())
}

struct Cloud {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start_cloud(listener: TcpListener) -> Cloud {
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(serve_http(listener, model(), async move {
        let _ = stopped.await;
    }));
    Cloud {
        stop: Some(stop),
        task,
    }
}

impl Cloud {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn sample(x: &Array2<f32>, i: usize) -> Vec<(String, Tensor)> {
    let row = x
        .index_axis(Axis(0), i)
        .to_owned()
        .insert_axis(Axis(0))
        .into_dyn();
    vec![("input".into(), Tensor::F32(row))]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_examples_are_queued_while_the_cloud_is_down_and_answered_after() {
    let (x, _) = held_out();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let cloud = start_cloud(listener).await;
    let dir = tempfile::tempdir().unwrap();
    let queue = HardExampleQueue::open(dir.path(), QueueLimits::default()).unwrap();
    let mining = hem::registry()
        .build("CrossEntropy", &[("threshold_cross_entropy", "0.9")])
        .unwrap();
    let client = HttpCloud::new(&format!("http://{address}"), Duration::from_secs(2)).unwrap();
    let ji = Arc::new(JointInference::new(
        model(),
        mining,
        Box::new(client),
        queue,
    ));

    // Cloud up: hard examples carry cloud results.
    let mut hard_up = 0;
    for i in 0..150 {
        let r = ji
            .inference(&format!("s{i}"), &sample(&x, i))
            .await
            .unwrap();
        if r.is_hard {
            hard_up += 1;
            let cloud = r
                .cloud
                .as_ref()
                .expect("a hard example gets a cloud answer");
            assert_eq!(r.result(), cloud.outputs);
            assert_eq!(cloud.model_version.as_deref(), Some("1"));
            assert_eq!(r.deferred, Deferred::No);
        } else {
            assert!(r.cloud.is_none());
            assert_eq!(r.result(), r.edge.values);
        }
    }
    assert!(hard_up > 0, "the threshold makes some examples hard");

    // Cloud down: edge results, hard examples queued.
    cloud.stop().await;
    let mut queued_ids = Vec::new();
    for i in 150..300 {
        let r = ji
            .inference(&format!("s{i}"), &sample(&x, i))
            .await
            .unwrap();
        if r.is_hard {
            assert!(r.cloud.is_none());
            assert_eq!(r.result(), r.edge.values, "the edge result stands in");
            assert!(
                matches!(r.deferred, Deferred::Queued(_)),
                "{:?}",
                r.deferred
            );
            queued_ids.push(r.id.clone());
        }
    }
    assert!(!queued_ids.is_empty());
    assert_eq!(ji.queued(), queued_ids.len());
    let (answers, error) = ji.resend().await;
    assert!(answers.is_empty());
    assert!(matches!(error, Some(JointError::Cloud(_))), "{error:?}");

    // Cloud back on the same address: the queue drains in order, every example answered.
    let cloud = start_cloud(TcpListener::bind(address).await.unwrap()).await;
    let (answers, error) = ji.resend().await;
    assert!(error.is_none(), "{error:?}");
    let answered: Vec<String> = answers.iter().map(|a| a.id.clone()).collect();
    assert_eq!(answered, queued_ids);
    assert!(
        answers
            .iter()
            .all(|a| a.cloud.outputs.iter().any(|(n, _)| n == "label"))
    );
    assert_eq!(ji.queued(), 0);

    let stats = ji.stats();
    assert_eq!(stats.inferences, 300);
    assert_eq!(stats.hard_examples as usize, hard_up + queued_ids.len());
    assert_eq!(stats.queued as usize, queued_ids.len());
    assert_eq!(
        stats.cloud_answers, stats.hard_examples,
        "every hard example answered"
    );
    assert_eq!(stats.refused, 0);
    assert!(stats.uplink_bytes >= stats.hard_examples * 64 * 4);
    assert!((stats.upload_ratio() - stats.hard_examples as f64 / 300.0).abs() < 1e-12);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_and_counts_and_a_background_resender_drains_it() {
    let (x, _) = held_out();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener); // nobody listens yet
    let dir = tempfile::tempdir().unwrap();
    let queue = HardExampleQueue::open(
        dir.path(),
        QueueLimits {
            max_items: 3,
            max_bytes: 1 << 20,
        },
    )
    .unwrap();
    let mining = hem::registry().build("CloudOnly", &[]).unwrap();
    let client = HttpCloud::new(&format!("http://{address}"), Duration::from_millis(500)).unwrap();
    let ji = Arc::new(JointInference::new(
        model(),
        mining,
        Box::new(client),
        queue,
    ));
    let mut refused = 0;
    for i in 0..5 {
        let r = ji
            .inference(&format!("s{i}"), &sample(&x, i))
            .await
            .unwrap();
        assert!(r.is_hard);
        if r.deferred == Deferred::Refused {
            refused += 1;
        }
    }
    assert_eq!(refused, 2);
    assert_eq!(ji.stats().refused, 2);
    assert_eq!(ji.queued(), 3);

    let cloud = start_cloud(TcpListener::bind(address).await.unwrap()).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let resender = tokio::spawn(ji.clone().resend_forever(
        Duration::from_millis(20),
        sedna::joint::Backoff::new(Duration::from_millis(10), Duration::from_millis(200)),
        move |answer| {
            let _ = tx.send(answer.id);
        },
    ));
    let mut ids = Vec::new();
    while ids.len() < 3 {
        ids.push(
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(ids, vec!["s0", "s1", "s2"]);
    resender.abort();
    assert_eq!(ji.queued(), 0);
    cloud.stop().await;
}

#[tokio::test]
async fn the_cloud_server_names_bad_requests() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let cloud = start_cloud(listener).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let url = format!("http://{address}/sedna/predict");
    let r = http.post(&url).body("not tensors").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("SDNT"));
    let wrong = sedna::joint::encode_tensors(&[(
        "input".into(),
        Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 3]))),
    )])
    .unwrap();
    let r = http.post(&url).body(wrong).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("dimension 1 must be 64"));
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = http
        .post(format!("http://{address}/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    cloud.stop().await;
}
