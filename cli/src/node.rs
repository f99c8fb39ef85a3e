//! The node-layer commands: the hub, join tokens, joining, and the edge agent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

/// `sedna cloudcore`.
#[derive(Args)]
pub(crate) struct CloudcoreArgs {
    /// Kubeconfig of the API server (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Directory for the hub CA.
    #[arg(long, value_name = "DIR", default_value = "sedna-data/cloudcore")]
    data_dir: PathBuf,
    /// Address edges dial.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10000")]
    listen: std::net::SocketAddr,
    /// Extra DNS names or IP addresses for the hub certificate.
    #[arg(long = "tls-san", value_name = "NAME")]
    tls_sans: Vec<String>,
    /// Heartbeat interval of the channel.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Drop a node connection silent for this long.
    #[arg(long, value_name = "DURATION", default_value = "35s", value_parser = parse_duration)]
    read_deadline: Duration,
    /// Validity of node certificates.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    node_cert_validity: Duration,
    /// Where to serve /metrics and /healthz ("off" to disable).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9441", value_parser = parse_optional_addr)]
    metrics_addr: MaybeAddr,
    /// How often node leases are checked (nodes whose lease expired become NotReady).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    node_monitor_period: Duration,
    /// Leave node lifecycle to another controller (kube-controller-manager on a real cluster).
    #[arg(long)]
    no_node_lifecycle: bool,
    /// How old the API's copy of a connected node's Lease may grow ("0s": written as the node
    /// renews it, once the stored one is half its duration old). The hub judges the nodes it
    /// holds sessions with by their sessions; the Lease it writes is stretched by this much.
    /// With --no-node-lifecycle Leases are always written as the node renews them.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    node_lease_refresh: Duration,
    /// Join a tier of hubs sharing the nodes in this many partitions (every hub of the tier
    /// gives the same number); ownership is negotiated through Leases in kube-system.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096), requires = "hub_id")]
    partitions: Option<u32>,
    /// This hub's id in the tier (a DNS label, unique).
    #[arg(long, value_name = "ID")]
    hub_id: Option<String>,
    /// Where edges reach this hub, told to nodes redirected here (default: --listen).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Every hub active: partitions follow the live hubs (otherwise static, with
    /// --primary-for and --standby-for).
    #[arg(long)]
    multi_primary: bool,
    /// Static tier: partitions this hub serves while it is live, e.g. `0-7`.
    #[arg(long, value_name = "LIST", default_value = "")]
    primary_for: String,
    /// Static tier: partitions this hub takes over while their primary is not live.
    #[arg(long, value_name = "LIST", default_value = "")]
    standby_for: String,
    /// Most node TLS handshakes started per second (a reconnection storm is admitted at this
    /// pace).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes_per_second: u32,
    /// Most connections waiting for a TLS handshake slot (0: none wait, a connection without a
    /// slot is closed at once). Each holds a file descriptor: connected nodes, the 256 slots and
    /// these must fit the process's open-file limit.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=65_536))]
    max_waiting_handshakes: u32,
    /// Duration of the tier's Leases (a dead hub's partitions move after about this long).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    tier_lease: Duration,
}

/// `sedna token ...`.
#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a join token and print it.
    Create {
        /// Kubeconfig of the API server (default: $KUBECONFIG, then ~/.kube/config).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// Allow only this node name to join with the token.
        #[arg(long, value_name = "NAME", required_unless_present = "any_node")]
        node: Option<String>,
        /// Let any node name join with the token (a fleet-wide token: keep its TTL short).
        #[arg(long, conflicts_with = "node")]
        any_node: bool,
        /// Let the token join once: the join that uses it deletes it.
        #[arg(long)]
        single_use: bool,
        /// How long the token stays valid.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

/// `sedna node …`.
#[derive(Subcommand)]
pub(crate) enum NodeCommand {
    /// Revoke every certificate issued to a node until now: hubs refuse its attach, renewal
    /// and tunnels at once and end its session; the Node object stays. The node can return
    /// only by joining again with a new token (`sedna join --replace`).
    Revoke {
        /// Kubeconfig of the API server (default: $KUBECONFIG, then ~/.kube/config).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// The node.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `sedna node`.
pub(crate) async fn node(command: NodeCommand) -> Result<()> {
    match command {
        NodeCommand::Revoke { kubeconfig, name } => {
            sedna_proto::identity::check_node_name(&name)?;
            let client = kube_client(kubeconfig).await?;
            let at = sedna_cloudcore::revocation::now_ms();
            sedna_cloudcore::revocation::Revocations::persist(&client, &name, at)
                .await
                .context("recording the revocation")?;
            println!("node/{name} revoked: certificates issued until now are refused");
            Ok(())
        }
    }
}

/// `sedna join`.
#[derive(Args)]
pub(crate) struct JoinArgs {
    /// The hub, `host:port`.
    #[arg(long, value_name = "ADDR")]
    cloud: String,
    /// Token from `sedna token create`.
    #[arg(long, value_name = "TOKEN")]
    token: String,
    /// Name of this node.
    #[arg(long, value_name = "NAME")]
    node_name: String,
    /// Directory for the node identity and store.
    #[arg(long, value_name = "DIR", default_value = "sedna-data/edge")]
    data_dir: PathBuf,
    /// Replace a node of this name that is connected now (a reinstalled machine); without
    /// it such a join is refused.
    #[arg(long)]
    replace: bool,
}

/// `sedna edgecore`.
#[derive(Args)]
pub(crate) struct EdgecoreArgs {
    /// The hub, `host:port`; in a tier of hubs, several, comma-separated (any of them sends
    /// the node to the hub serving it).
    #[arg(long, value_name = "ADDR")]
    cloud: String,
    /// Directory of the joined node.
    #[arg(long, value_name = "DIR", default_value = "sedna-data/edge")]
    data_dir: PathBuf,
    /// Heartbeat interval of the channel.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Drop the connection when the hub is silent for this long.
    #[arg(long, value_name = "DURATION", default_value = "35s", value_parser = parse_duration)]
    read_deadline: Duration,
    /// Role label of the node: `node-role.sedna.io/<ROLE>`. A role other than `edge` must be
    /// granted by an administrator (`kubectl label node <name> node-role.sedna.io/<ROLE>=`);
    /// the hub leaves out labels a node may not give itself.
    #[arg(long, value_name = "ROLE", default_value = "edge")]
    role: String,
    /// Extra Node labels, `key=value[,key=value...]`.
    #[arg(long, value_name = "LABELS", value_parser = parse_labels, default_value = "")]
    labels: BTreeMap<String, String>,
    /// Address reported for the node and its pods (default: the address of the default route).
    #[arg(long, value_name = "IP")]
    node_ip: Option<std::net::IpAddr>,
    /// First delay before restarting a crashed container (doubles up to 5m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    restart_backoff: Duration,
    /// Node lease renewal interval (the lease lasts four times as long).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    lease_interval: Duration,
    /// Directory searched for the programs images name, before `PATH` (default: DATA_DIR/bin).
    #[arg(long = "program-dir", value_name = "DIR")]
    program_dirs: Vec<PathBuf>,
    /// Where to serve /metrics and /healthz ("off" to disable).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9442", value_parser = parse_optional_addr)]
    metrics_addr: MaybeAddr,
    /// Where to serve the node's local Kubernetes API ("off" to disable); its kubeconfig is
    /// DATA_DIR/metaserver/kubeconfig.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10550", value_parser = parse_optional_addr)]
    local_api: MaybeAddr,
    /// Run each pod under its own uid from this range, e.g. `524288-589823` (the agent must
    /// run as root; programs, models and data the pods use must be readable by other users).
    #[arg(long, value_name = "FIRST-LAST")]
    pod_uids: Option<String>,
    /// At most one twin (reported device values) write per device per this interval; the
    /// latest value of every property goes in each ("0s": one write per change).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    twin_interval: Duration,
    /// Device readings are captured into Datasets only below this directory (default:
    /// DATA_DIR/captured).
    #[arg(long, value_name = "DIR")]
    capture_dir: Option<PathBuf>,
    /// The Unix socket where device mappers of your own connect (`proto/mapper.proto`;
    /// default: DATA_DIR/mappers.sock; made 0600).
    #[arg(long, value_name = "PATH")]
    mapper_socket: Option<PathBuf>,
}

/// Parses `key=value,key=value`.
pub(crate) fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("invalid label {pair:?}: expected key=value"))?;
        let valid = |t: &str, max: usize| {
            t.len() <= max
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        if k.is_empty() || !valid(k, 316) || !valid(v, 63) || v.contains('/') {
            return Err(format!("invalid label {pair:?}: not a Kubernetes label"));
        }
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

/// An address to serve on, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MaybeAddr(pub(crate) Option<std::net::SocketAddr>);

/// Parses an address, or `off`.
pub(crate) fn parse_optional_addr(s: &str) -> Result<MaybeAddr, String> {
    if s == "off" {
        return Ok(MaybeAddr(None));
    }
    s.parse()
        .map(|a| MaybeAddr(Some(a)))
        .map_err(|e| format!("invalid address {s:?}: {e} (use host:port or off)"))
}

/// Parses `90s`, `5m`, `24h`, `7d` (or a plain number of seconds).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 5m, 24h, 7d"))?;
    let scale = |unit: u64| {
        n.checked_mul(unit)
            .ok_or_else(|| format!("duration {s:?} is too long"))
    };
    let seconds = match unit {
        "" | "s" => n,
        "ms" => return Ok(Duration::from_millis(n)),
        "m" => scale(60)?,
        "h" => scale(3600)?,
        "d" => scale(86400)?,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?}: use ms, s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(seconds))
}

async fn kube_client(kubeconfig: Option<PathBuf>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig: pass --kubeconfig or set KUBECONFIG")?,
    };
    Ok(kube::Client::try_from(config)?)
}

pub(crate) async fn cloudcore(args: CloudcoreArgs) -> Result<()> {
    let client = kube_client(args.kubeconfig).await?;
    let mut config = sedna_cloudcore::HubConfig::new(&args.data_dir);
    config.listen = args.listen;
    config.extra_sans = args.tls_sans;
    config.session.heartbeat = args.heartbeat;
    config.session.read_deadline = args.read_deadline;
    config.node_cert_validity = args.node_cert_validity;
    config.max_handshakes_per_second = args.max_handshakes_per_second;
    config.max_waiting_handshakes = args.max_waiting_handshakes as usize;
    anyhow::ensure!(
        args.node_lease_refresh <= Duration::from_secs(3600),
        "--node-lease-refresh must be at most 1h (a node whose hub dies is NotReady only after it)"
    );
    config.lifecycle =
        (!args.no_node_lifecycle).then_some(sedna_cloudcore::lifecycle::LifecycleConfig {
            period: args.node_monitor_period.max(Duration::from_millis(100)),
            lease_refresh: args.node_lease_refresh,
            ..Default::default()
        });
    if let Some(partitions) = args.partitions {
        let id = args.hub_id.clone().unwrap_or_default();
        anyhow::ensure!(
            sedna_edgecore::runtime::spec::dns_label(&id),
            "--hub-id {id:?} must be a DNS label (lowercase letters, digits, '-')"
        );
        let list = |s: &str, flag: &str| {
            sedna_cloudcore::partitions::parse_partitions(s, partitions)
                .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
        };
        anyhow::ensure!(
            args.tier_lease >= Duration::from_secs(1),
            "--tier-lease must be at least 1s"
        );
        config.tier = Some(sedna_cloudcore::tier::TierConfig {
            id,
            address: args
                .advertise
                .clone()
                .unwrap_or_else(|| args.listen.to_string()),
            partitions,
            mode: if args.multi_primary {
                sedna_cloudcore::partitions::Mode::MultiPrimary
            } else {
                sedna_cloudcore::partitions::Mode::Static
            },
            primary: list(&args.primary_for, "--primary-for")?,
            standby: list(&args.standby_for, "--standby-for")?,
            lease: args.tier_lease,
        });
    }
    let hub = sedna_cloudcore::Hub::start(config, client)
        .await
        .context("starting the hub")?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("sedna_hub");
    registry.register_collector(Box::new(crate::ops::hub_figures(&hub)));
    crate::ops::start(args.metrics_addr.0, registry, std::sync::Arc::new(|| true)).await;
    println!("hub listening on {} (CA pin {})", hub.addr(), hub.pin());
    crate::wait_for_signal().await;
    hub.shutdown().await;
    Ok(())
}

pub(crate) async fn token(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create {
            kubeconfig,
            node,
            any_node: _,
            single_use,
            ttl,
        } => {
            if let Some(n) = &node {
                sedna_proto::identity::check_node_name(n)?;
            }
            if ttl.is_zero() {
                bail!("--ttl must be positive");
            }
            let client = kube_client(kubeconfig).await?;
            let token =
                sedna_cloudcore::tokens::create_with(&client, node.as_deref(), ttl, single_use)
                    .await?;
            println!("{token}");
            Ok(())
        }
    }
}

pub(crate) async fn join(args: JoinArgs) -> Result<()> {
    let identity = sedna_edgecore::join::join_with(
        &args.cloud,
        &args.token,
        &args.node_name,
        &args.data_dir,
        args.replace,
    )
    .await?;
    println!(
        "node {} joined {}; identity saved in {}",
        identity.node,
        args.cloud,
        args.data_dir.join("pki").display()
    );
    Ok(())
}

pub(crate) async fn edgecore(args: EdgecoreArgs) -> Result<()> {
    let mut edge = sedna_edgecore::EdgeConfig::new(&args.cloud, &args.data_dir);
    edge.machine.heartbeat = args.heartbeat;
    edge.machine.read_deadline = args.read_deadline;
    let mut config = sedna_edgecore::AgentConfig::new(edge);
    config.role = args.role;
    config.labels = args.labels;
    config.host_ip = args.node_ip.map(|ip| ip.to_string());
    config.backoff.base = args.restart_backoff;
    config.lease_interval = args.lease_interval;
    config.lease_duration = args.lease_interval * 4;
    config.devices.report_interval = args.twin_interval;
    if let Some(path) = args.mapper_socket {
        config.devices.mapper_socket = Some(path);
    }
    if let Some(dir) = args.capture_dir {
        config.devices.capture_dir = dir;
    }
    if !args.program_dirs.is_empty() {
        config.program_dirs = args.program_dirs;
    }
    match (args.local_api.0, config.metaserver.as_mut()) {
        (Some(addr), Some(meta)) => meta.listen = addr,
        (None, _) => config.metaserver = None,
        _ => {}
    }
    if let Some(range) = &args.pod_uids {
        config.pod_users = Some(std::sync::Arc::new(
            sedna_edgecore::runtime::users::PodUsers::parse(range).map_err(anyhow::Error::msg)?,
        ));
    }
    let agent = sedna_edgecore::Agent::start(config)
        .await
        .context("starting the edge agent")?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("sedna_edge");
    registry.register_collector(Box::new(crate::ops::agent_figures(&agent)));
    crate::ops::start(args.metrics_addr.0, registry, std::sync::Arc::new(|| true)).await;
    println!(
        "edge node {} connecting to {}",
        agent.hub().node(),
        args.cloud
    );
    if let Some(m) = agent.metaserver() {
        println!(
            "local API on {} (kubeconfig: {})",
            m.url(),
            m.kubeconfig_path().display()
        );
    }
    crate::wait_for_signal().await;
    agent.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unit"));
        assert!(
            parse_duration("999999999999999999d")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn labels_and_addresses_parse_or_say_why_not() {
        let l = parse_labels("zone=a, sedna.io/gpu=true").unwrap();
        assert_eq!(l["zone"], "a");
        assert_eq!(l["sedna.io/gpu"], "true");
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("zone").unwrap_err().contains("key=value"));
        assert!(
            parse_labels("zone=a b")
                .unwrap_err()
                .contains("not a Kubernetes label")
        );
        assert_eq!(parse_optional_addr("off").unwrap(), MaybeAddr(None));
        assert!(parse_optional_addr("127.0.0.1:1").unwrap().0.is_some());
        assert!(
            parse_optional_addr("nowhere")
                .unwrap_err()
                .contains("host:port")
        );
    }
}
