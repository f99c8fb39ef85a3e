//! The node-layer commands: the hub, join tokens, joining, and the edge agent.

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
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Drop a node connection silent for this long.
    #[arg(long, value_name = "DURATION", default_value = "25s", value_parser = parse_duration)]
    read_deadline: Duration,
    /// Validity of node certificates.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    node_cert_validity: Duration,
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
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// How long the token stays valid.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
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
}

/// `sedna edgecore`.
#[derive(Args)]
pub(crate) struct EdgecoreArgs {
    /// The hub, `host:port`.
    #[arg(long, value_name = "ADDR")]
    cloud: String,
    /// Directory of the joined node.
    #[arg(long, value_name = "DIR", default_value = "sedna-data/edge")]
    data_dir: PathBuf,
    /// Heartbeat interval of the channel.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Drop the connection when the hub is silent for this long.
    #[arg(long, value_name = "DURATION", default_value = "25s", value_parser = parse_duration)]
    read_deadline: Duration,
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
    let seconds = match unit {
        "" | "s" => n,
        "ms" => return Ok(Duration::from_millis(n)),
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
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
    let hub = sedna_cloudcore::Hub::start(config, client)
        .await
        .context("starting the hub")?;
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
            ttl,
        } => {
            if let Some(n) = &node {
                sedna_proto::identity::check_node_name(n)?;
            }
            if ttl.is_zero() {
                bail!("--ttl must be positive");
            }
            let client = kube_client(kubeconfig).await?;
            let token = sedna_cloudcore::tokens::create(&client, node.as_deref(), ttl).await?;
            println!("{token}");
            Ok(())
        }
    }
}

pub(crate) async fn join(args: JoinArgs) -> Result<()> {
    let identity =
        sedna_edgecore::join::join(&args.cloud, &args.token, &args.node_name, &args.data_dir)
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
    let mut config = sedna_edgecore::EdgeConfig::new(&args.cloud, &args.data_dir);
    config.machine.heartbeat = args.heartbeat;
    config.machine.read_deadline = args.read_deadline;
    let edge = sedna_edgecore::EdgeHub::start(config)
        .await
        .context("starting the edge agent")?;
    println!("edge node {} connecting to {}", edge.node(), args.cloud);
    crate::wait_for_signal().await;
    edge.shutdown().await;
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
    }
}
