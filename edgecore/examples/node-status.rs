//! Prints the Node object this machine would report (capacity, allocatable, conditions,
//! node info), e.g. to check that GPUs are seen through NVML:
//! `cargo run --release -p sedna-edgecore --example node-status [DATA_DIR]`.

use std::collections::BTreeMap;
use std::time::Duration;

use sedna_edgecore::node::{self, NodeConfig};

fn main() {
    let data_dir = std::env::args().nth(1).unwrap_or_else(|| ".".into());
    let config = NodeConfig {
        name: "this-machine".into(),
        labels: BTreeMap::new(),
        role: "edge".into(),
        host_ip: sedna_edgecore::agent::host_ip(),
        data_dir: data_dir.into(),
        lease_interval: Duration::from_secs(10),
        lease_duration: Duration::from_secs(40),
        status_interval: Duration::from_secs(60),
    };
    let capacity = node::capacity(&config.data_dir);
    let object = node::node_object(&config, &capacity, &BTreeMap::new());
    match serde_json::to_string_pretty(&object) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: {e}"),
    }
}
