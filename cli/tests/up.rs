//! `sedna up` as a user runs it: one command brings up the API server, the hub, a cloud node
//! and two edge nodes; `kubectl get nodes` shows them Ready; a pod runs on an edge; Ctrl-C
//! (SIGTERM here) stops everything, workloads included; running it again reuses the data.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

mod support;
use support::{Kubectl, alive, container_pid, free_port, sedna};

fn up(dir: &Path, api: u16, hub: u16, metrics: u16) -> Child {
    sedna(&[
        "up",
        "--edges",
        "2",
        "--local-api",
        "off",
        "--no-fsync",
        "--data-dir",
    ])
    .arg(dir)
    .args([
        "--api-listen",
        &format!("127.0.0.1:{api}"),
        "--hub-listen",
        &format!("127.0.0.1:{hub}"),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
    ])
    .spawn()
    .unwrap()
}

fn wait_nodes_ready(kubectl: &Kubectl) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = kubectl.run(&["get", "nodes", "--no-headers"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let ready = text
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("Ready"))
            .count();
        if ready == 3 {
            return text;
        }
        assert!(Instant::now() < deadline, "nodes never all Ready: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn stop(mut child: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "sedna up exited with {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sedna up did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sedna_up_runs_a_cloud_and_two_edges_ready_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let (api, hub, metrics) = (free_port(), free_port(), free_port());
    let first = up(&d, api, hub, metrics);
    let kubeconfig = d.join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !kubeconfig.exists() {
        assert!(Instant::now() < deadline, "no kubeconfig written");
        std::thread::sleep(Duration::from_millis(100));
    }
    let kubectl = Kubectl::new(&kubeconfig).expect("kubectl is not installed: run scripts/setup");
    let nodes = wait_nodes_ready(&kubectl);
    for (name, role) in [("cloud", "cloud"), ("edge-1", "edge"), ("edge-2", "edge")] {
        assert!(
            nodes
                .lines()
                .any(|l| l.starts_with(&format!("{name} ")) && l.contains(role)),
            "{name} ({role}) missing: {nodes}"
        );
    }
    let metrics_text = http_get(metrics, "/metrics");
    assert!(
        metrics_text.contains("sedna_hub_connected_nodes 3"),
        "{metrics_text}"
    );
    assert!(
        metrics_text.contains("sedna_edge_connected{node=\"edge-2\"} 1"),
        "{metrics_text}"
    );
    assert!(http_get(metrics, "/healthz").starts_with("HTTP/1.1 200"));

    kubectl.ok(&[
        "run",
        "sleeper",
        "--image=sleep",
        "--restart=Never",
        "--overrides={\"spec\":{\"nodeName\":\"edge-1\"}}",
        "--",
        "300",
    ]);
    let edge_1 = d.join("nodes/edge-1");
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        if let Some(p) = container_pid(&edge_1, "sleeper", "sleeper").filter(|p| alive(*p)) {
            break p;
        }
        assert!(Instant::now() < deadline, "the pod never ran on edge-1");
        std::thread::sleep(Duration::from_millis(100));
    };
    let identity = std::fs::metadata(edge_1.join("pki"))
        .unwrap()
        .modified()
        .unwrap();
    stop(first);
    assert!(!alive(pid), "Ctrl-C left the workload running");

    // Again, on the same data: the same nodes, not joined again, the pod running again.
    let second = up(&d, api, hub, metrics);
    wait_nodes_ready(&kubectl);
    assert_eq!(
        std::fs::metadata(edge_1.join("pki"))
            .unwrap()
            .modified()
            .unwrap(),
        identity,
        "the node joined again"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !container_pid(&edge_1, "sleeper", "sleeper").is_some_and(alive) {
        assert!(
            Instant::now() < deadline,
            "the pod did not run again after a restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(second);
}
