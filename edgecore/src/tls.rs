//! TLS towards the hub: a join verifies the hub against the CA pinned in the token; the
//! channel is mutual TLS with the node certificate. Connections carry HTTP/2 for gRPC.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use sedna_proto::identity;

/// The name the hub's certificate carries whatever address it is dialed at.
pub const HUB_SERVER_NAME: &str = "sedna-hub";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the hub only if its chain contains the pinned CA and the hub's certificate is
/// signed by it. Remembers the CA.
#[derive(Debug)]
pub struct PinVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
    ca: Mutex<Option<Vec<u8>>>,
}

impl PinVerifier {
    /// A verifier for CA pin `pin` (hex SHA-256 of the CA's DER).
    pub fn new(pin: &str) -> Arc<Self> {
        Arc::new(Self {
            pin: pin.to_ascii_lowercase(),
            provider: provider(),
            ca: Mutex::new(None),
        })
    }

    /// The CA (DER) the hub presented, once a handshake succeeded.
    pub fn ca(&self) -> Option<Vec<u8>> {
        self.ca
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let ca = intermediates
            .iter()
            .find(|c| identity::ca_pin(c) == self.pin)
            .ok_or_else(|| {
                Error::General("the hub's CA does not match the pin in the join token".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        *self
            .ca
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ca.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn with_h2(config: rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    with_alpn(config, b"h2")
}

fn with_alpn(mut config: rustls::ClientConfig, protocol: &[u8]) -> Arc<rustls::ClientConfig> {
    config.alpn_protocols = vec![protocol.to_vec()];
    // A configuration serves one connection (it is built from the identity on disk at each
    // dial), so a session cache could never be reused; rustls's default one is sized for 256
    // sessions and held by every connection (≈ 14 KiB, heaptrack of a simulator).
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Client configuration for a join: no client certificate, hub checked against the pin.
pub fn join_config(verifier: Arc<PinVerifier>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(with_h2(config))
}

/// Client configuration for the channel over gRPC: the hub checked against its CA, the node
/// authenticated by its certificate.
pub fn channel_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    Ok(with_h2(mutual_config(ca_pem, cert_pem, key_pem)?))
}

/// Client configuration for the framed channel ([`sedna_proto::frame`]): as
/// [`channel_config`], offering only the framed protocol.
pub fn framed_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    Ok(with_alpn(
        mutual_config(ca_pem, cert_pem, key_pem)?,
        sedna_proto::frame::ALPN,
    ))
}

fn mutual_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig, Error> {
    let pem_err = |e: rustls::pki_types::pem::Error| Error::General(e.to_string());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.map_err(pem_err)?)?;
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(pem_err)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err)?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    Ok(config)
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DialFailure {
    /// The TCP connection was made (the hub's process is there), the failure came later:
    /// in the TLS handshake, or the HTTP/2 one.
    pub reached: bool,
    /// What failed.
    pub message: String,
}

/// Opens a gRPC channel to `hub` (`host:port`) over TLS with `config`.
pub async fn connect(
    hub: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, String> {
    connect_from(hub, config, None).await.map_err(|f| f.message)
}

/// [`connect`] from a given local address (simulated fleets spread their connections over
/// several loopback addresses, each with its own ephemeral ports).
pub async fn connect_from(
    hub: &str,
    config: Arc<rustls::ClientConfig>,
    source: Option<std::net::IpAddr>,
) -> Result<tonic::transport::Channel, DialFailure> {
    let addr = hub.to_owned();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{hub}"))
        .map_err(|e| DialFailure {
            reached: false,
            message: e.to_string(),
        })?
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(3600));
    // Set once the TCP connection is made: what failed after it did, failed at a live hub.
    let reached = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reached_in = reached.clone();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let addr = addr.clone();
        let config = config.clone();
        let reached = reached_in.clone();
        async move {
            let tls = tls_connect(&addr, config, source, &reached).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            DialFailure {
                reached: reached.load(std::sync::atomic::Ordering::Relaxed),
                message: text,
            }
        })
}

/// TCP (from `source`, if given) then TLS to `addr`; `reached` is set once the TCP connection
/// is made.
async fn tls_connect(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    source: Option<std::net::IpAddr>,
    reached: &std::sync::atomic::AtomicBool,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = match source {
        None => tokio::net::TcpStream::connect(addr).await?,
        Some(ip) => {
            let target = tokio::net::lookup_host(addr)
                .await?
                .next()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
            let socket = if target.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
            socket.connect(target).await?
        }
    };
    reached.store(true, std::sync::atomic::Ordering::Relaxed);
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(HUB_SERVER_NAME)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A TLS connection to `hub` (`host:port`) with `config` (from [`framed_config`]), from
/// `source` if given, within 10 s; for the framed channel ([`sedna_proto::frame`]). Whether
/// the hub chose that protocol is the connection's ALPN protocol (a hub that only speaks gRPC
/// chooses none).
pub async fn connect_framed(
    hub: &str,
    config: Arc<rustls::ClientConfig>,
    source: Option<std::net::IpAddr>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, DialFailure> {
    let reached = std::sync::atomic::AtomicBool::new(false);
    let connect = tls_connect(hub, config, source, &reached);
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), connect).await;
    let failure = |message: String| DialFailure {
        reached: reached.load(std::sync::atomic::Ordering::Relaxed),
        message,
    };
    match result {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(failure(format!("connecting to {hub}: {e}"))),
        Err(_) => Err(failure(format!(
            "connecting to {hub}: timed out after 10 s"
        ))),
    }
}
