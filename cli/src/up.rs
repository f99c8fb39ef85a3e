//! `sedna up`: the whole platform on one machine, in one process: the embedded API server,
//! the hub, one cloud-role node and N edge nodes joined with tokens, each with its own data
//! directory, the CRDs installed and the global manager's controllers running. Running it again
//! reuses the data (nodes already joined are not joined again).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use prometheus_client::registry::Registry;

use crate::node::{MaybeAddr, parse_optional_addr};

/// `sedna up`.
#[derive(Args)]
pub(crate) struct UpArgs {
    /// Directory for everything (API server, hub, one directory per node).
    #[arg(long, value_name = "DIR", default_value = "sedna-data")]
    data_dir: PathBuf,
    /// Number of edge nodes (edge-1 … edge-N).
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=64))]
    edges: u16,
    /// API server address (loopback unless other machines must reach it).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6443")]
    api_listen: SocketAddr,
    /// Hub address edge nodes dial.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10000")]
    hub_listen: SocketAddr,
    /// First port of the nodes' local APIs (cloud, edge-1, …, one port each; "off" to disable).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10550", value_parser = parse_optional_addr)]
    local_api: MaybeAddr,
    /// Where to serve /metrics and /healthz for everything ("off" to disable).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9440", value_parser = parse_optional_addr)]
    metrics_addr: MaybeAddr,
    /// Acknowledge API writes once in the OS page cache (survives kill -9, not power loss).
    #[arg(long)]
    no_fsync: bool,
    /// Run each pod under its own uid from this range, e.g. `524288-589823`, shared by every
    /// node (`sedna up` must run as root; the programs, models and data pods use must be
    /// readable by other users, and DATA_DIR's parents traversable).
    #[arg(long, value_name = "FIRST-LAST")]
    pod_uids: Option<String>,
    /// At most one twin (reported device values) write per device per this interval
    /// ("0s": one write per change).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::node::parse_duration)]
    twin_interval: std::time::Duration,
    /// Most `kubectl logs -f` / `exec` / `attach` / `port-forward` streams open at once per
    /// node.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    streams_per_node: u16,
    /// Most bytes per second through one node's streams (all together, both ways).
    #[arg(long, value_name = "BYTES", default_value_t = 8 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    stream_bytes_per_second: u64,
}

/// The nodes `sedna up` runs: the cloud-role node first.
fn node_names(edges: u16) -> Vec<(String, &'static str)> {
    std::iter::once(("cloud".to_owned(), "cloud"))
        .chain((1..=edges).map(|i| (format!("edge-{i}"), "edge")))
        .collect()
}

pub(crate) async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Labels the Node `node-role.sedna.io/<role>` as the administrator: a node may not give
/// itself a role other than `edge` (the hub leaves such labels out of the node's own writes).
async fn grant_role(client: &kube::Client, name: &str, role: &str) -> Result<()> {
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let label = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "labels": { format!("node-role.sedna.io/{role}"): "" } },
    });
    nodes
        .patch(
            name,
            &kube::api::PatchParams::apply("sedna-up"),
            &kube::api::Patch::Apply(&label),
        )
        .await
        .with_context(|| format!("granting node {name} the {role} role"))?;
    Ok(())
}

async fn ensure_joined(client: &kube::Client, hub: &str, name: &str, dir: &Path) -> Result<()> {
    if sedna_edgecore::join::Identity::load(dir)
        .with_context(|| format!("reading the identity of node {name}"))?
        .is_some()
    {
        return Ok(());
    }
    let token = sedna_cloudcore::tokens::create(client, Some(name), Duration::from_secs(600))
        .await
        .context("creating a join token")?;
    sedna_edgecore::join::join(hub, &token.to_string(), name, dir)
        .await
        .with_context(|| format!("joining node {name}"))?;
    Ok(())
}

pub(crate) async fn up(args: UpArgs) -> Result<()> {
    // Before anything starts: a SIGTERM during the start stops it cleanly afterwards.
    let signals = crate::Signals::install();
    let d = &args.data_dir;
    std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    let d = d
        .canonicalize()
        .with_context(|| format!("resolving {}", d.display()))?;

    let mut api_config = sedna_apiserver::Config::new(d.join("apiserver"));
    api_config.listen = args.api_listen;
    if args.no_fsync {
        api_config.store.durability = sedna_apiserver::store::Durability::Process;
    }
    // `kubectl logs/exec/attach/port-forward` go to nodes through the hub, started below.
    let hub_dialer: std::sync::Arc<std::sync::OnceLock<sedna_apiserver::nodestream::NodeDialer>> =
        std::sync::Arc::default();
    let dialer = hub_dialer.clone();
    api_config.node_dialer = Some(sedna_apiserver::nodestream::NodeDialer(
        std::sync::Arc::new(move |node: &str| match dialer.get() {
            Some(d) => (d.0)(node),
            None => Box::pin(std::future::ready(Err(
                sedna_apiserver::nodestream::DialError::Failed("the hub is starting".into()),
            ))),
        }),
    ));
    let server = sedna_apiserver::ApiServer::start(api_config)
        .await
        .context("starting the API server")?;
    let kubeconfig = d.join("kubeconfig");
    let text = std::fs::read(server.kubeconfig_path())?;
    sedna_apiserver::pki::write_private(&kubeconfig, &text)?;
    let client = client_for(&kubeconfig).await?;

    let mut hub_config = sedna_cloudcore::HubConfig::new(d.join("cloudcore"));
    hub_config.listen = args.hub_listen;
    hub_config.streams.per_node = usize::from(args.streams_per_node);
    hub_config.streams.bytes_per_second = args.stream_bytes_per_second;
    let hub = sedna_cloudcore::Hub::start(hub_config, client.clone())
        .await
        .context("starting the hub")?;
    let hub_addr = hub.addr().to_string();
    let _ = hub_dialer.set(hub.node_dialer());

    let mut registry = Registry::default();
    registry
        .sub_registry_with_prefix("sedna_apiserver")
        .register_collector(Box::new(crate::ops::apiserver_figures(&server)));
    registry
        .sub_registry_with_prefix("sedna_hub")
        .register_collector(Box::new(crate::ops::hub_figures(&hub)));

    install_crds(&client).await?;
    let (stop_gm, gm_stopped) = tokio::sync::oneshot::channel::<()>();
    // The embedded control plane has no kube-scheduler or kube-controller-manager: the global
    // manager runs the scheduler and the workload controllers too.
    let gm = tokio::spawn(sedna_controllers::run_with(
        client.clone(),
        true,
        async move {
            let _ = gm_stopped.await;
        },
    ));

    let pod_users = match &args.pod_uids {
        Some(range) => Some(std::sync::Arc::new(
            sedna_edgecore::runtime::users::PodUsers::parse(range).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    if pod_users.is_some() {
        // Pods with their own uids walk down to their nodes' directories (each node's agent
        // makes its own traversable, not listable).
        use std::os::unix::fs::PermissionsExt;
        let nodes = d.join("nodes");
        std::fs::create_dir_all(&nodes)
            .and_then(|()| std::fs::set_permissions(&nodes, std::fs::Permissions::from_mode(0o711)))
            .with_context(|| format!("making {} traversable", nodes.display()))?;
    }
    let mut agents = Vec::new();
    // Every node's figures, one family per metric with a `node` label.
    let mut node_figures = crate::ops::NodeFigures::default();
    for (i, (name, role)) in node_names(args.edges).into_iter().enumerate() {
        let dir = d.join("nodes").join(&name);
        ensure_joined(&client, &hub_addr, &name, &dir).await?;
        if role != "edge" {
            grant_role(&client, &name, role).await?;
        }
        link_workers(&dir.join("bin"))?;
        let mut config =
            sedna_edgecore::AgentConfig::new(sedna_edgecore::EdgeConfig::new(&hub_addr, &dir));
        config.role = role.to_owned();
        config.pod_users = pod_users.clone();
        config.dataset_interval = Duration::from_secs(2);
        config.devices.report_interval = args.twin_interval;
        // One capture directory for every node of this machine: DATA_DIR/captured.
        config.devices.capture_dir = d.join("captured");
        config.host_ip = Some("127.0.0.1".into());
        match (args.local_api.0, config.metaserver.as_mut()) {
            (Some(base), Some(meta)) => {
                let port = base
                    .port()
                    .checked_add(i as u16)
                    .filter(|_| base.port() != 0);
                meta.listen = SocketAddr::new(base.ip(), port.unwrap_or(0));
            }
            (None, _) => config.metaserver = None,
            _ => {}
        }
        let agent = sedna_edgecore::Agent::start(config)
            .await
            .with_context(|| format!("starting node {name}"))?;
        node_figures.add(name.clone(), crate::ops::agent_figures(&agent));
        agents.push((name, agent));
    }
    registry
        .sub_registry_with_prefix("sedna_edge")
        .register_collector(Box::new(node_figures));
    let connected = {
        let hub_stats = hub.stats();
        let want = agents.len() as u64;
        move || {
            hub_stats
                .connected
                .load(std::sync::atomic::Ordering::Relaxed)
                >= want
        }
    };
    crate::ops::start(
        args.metrics_addr.0,
        registry,
        std::sync::Arc::new(connected),
    )
    .await;

    println!("API server: {}", server.url());
    println!("hub: {hub_addr}");
    for (name, agent) in &agents {
        match agent.metaserver() {
            Some(m) => println!("node {name}: local API {}", m.url()),
            None => println!("node {name}"),
        }
        if let Some(socket) = agent.mapper_socket() {
            println!(
                "node {name}: device mappers connect to {}",
                socket.display()
            );
        }
    }
    println!("kubeconfig: {}", kubeconfig.display());
    println!(
        "try: KUBECONFIG={} kubectl get nodes   (Ctrl-C stops everything)",
        kubeconfig.display()
    );

    println!(
        "global manager: Model, JointInferenceService, IncrementalLearningJob and FederatedLearningJob controllers running"
    );

    signals.wait().await;
    println!("stopping");
    let _ = stop_gm.send(());
    let _ = gm.await;
    for (_, agent) in agents {
        agent.shutdown_with_workloads().await;
    }
    hub.shutdown().await;
    server.shutdown().await;
    Ok(())
}

/// Installs (or updates) the platform's CRDs with server-side apply.
async fn install_crds(client: &kube::Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let params = kube::api::PatchParams::apply("sedna-up").force();
    for crd in sedna_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &kube::api::Patch::Apply(&crd))
            .await
            .with_context(|| format!("installing CRD {name}"))?;
    }
    Ok(())
}

/// Makes the worker programs pods name (`sedna-edge-worker`, `sedna-cloud-worker`) resolve
/// to this binary in a node's program directory.
fn link_workers(bin: &Path) -> Result<()> {
    std::fs::create_dir_all(bin).with_context(|| format!("creating {}", bin.display()))?;
    let exe = std::env::current_exe().context("locating the sedna binary")?;
    for name in crate::WORKERS {
        let link = bin.join(name);
        if std::fs::read_link(&link).ok().as_deref() == Some(exe.as_path()) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link)
            .with_context(|| format!("linking {} to {}", link.display(), exe.display()))?;
    }
    Ok(())
}

/// Checks what clap cannot.
pub(crate) fn check_args(args: &UpArgs) -> Result<()> {
    if args.api_listen == args.hub_listen {
        bail!("--api-listen and --hub-listen must differ");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cloud_node_comes_first_then_numbered_edges() {
        let names: Vec<String> = node_names(2).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["cloud", "edge-1", "edge-2"]);
        assert_eq!(node_names(0).len(), 1);
        assert_eq!(node_names(3)[3].1, "edge");
        assert_eq!(node_names(3)[0].1, "cloud");
    }
}
