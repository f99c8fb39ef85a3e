//! The hub's certificate authority: it signs the hub's serving certificate and every node's
//! client certificate (`CN=system:node:<name>`, `O=system:nodes`), and it is what join tokens
//! pin. Keys are written with mode 0600.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use sedna_proto::identity::{self, NODES_GROUP};

/// The name the hub's serving certificate always carries, whatever address edges dial.
pub const HUB_NAME: &str = "sedna-hub";

/// Why certificates could not be prepared or issued.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Key or certificate generation or parsing failed.
    #[error("certificate error: {0}")]
    Certificate(#[from] rcgen::Error),
    /// TLS configuration failed.
    #[error("TLS configuration error: {0}")]
    Tls(String),
    /// The CA's files could not be read or written.
    #[error(transparent)]
    Files(#[from] sedna_apiserver::pki::PkiError),
    /// A CSR asks for a different identity than the one allowed.
    #[error("the certificate request is for {found:?}, not {expected:?}")]
    WrongSubject {
        /// What the CSR's common name is.
        found: String,
        /// What it had to be.
        expected: String,
    },
}

impl PkiError {
    /// Whether trying again could succeed (I/O only).
    pub fn is_retryable(&self) -> bool {
        matches!(self, PkiError::Files(e) if e.is_retryable())
    }
}

/// Sets validity from `from` to `to` (Unix seconds), at calendar-day granularity when the
/// span is long and to the second when short (rotation tests use minutes).
fn set_validity(params: &mut CertificateParams, from: i64, to: i64) {
    use rcgen::date_time_ymd;
    let day = |s: i64| {
        let d = k8s_openapi::jiff::Timestamp::from_second(s)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
            .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC);
        (
            d.year() as i32,
            d.month() as u8,
            d.day() as u8,
            d.hour(),
            d.minute(),
            d.second(),
        )
    };
    let at = |s: i64| {
        let (y, m, d, h, mi, se) = day(s);
        let base = date_time_ymd(y, m, d);
        base + std::time::Duration::from_secs(
            u64::try_from(h).unwrap_or(0) * 3600
                + u64::try_from(mi).unwrap_or(0) * 60
                + u64::try_from(se).unwrap_or(0),
        )
    };
    params.not_before = at(from);
    params.not_after = at(to);
}

fn now() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "sedna-hub-ca");
    dn.push(DnType::OrganizationName, "sedna");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, now() - 86400, now() + 10 * 365 * 86400);
    Ok(params)
}

/// The hub's CA and serving identity.
pub struct HubPki {
    ca_pem: String,
    ca_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    server_cert_pem: String,
    server_key_pem: String,
}

impl std::fmt::Debug for HubPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubPki")
            .field("pin", &self.pin())
            .finish_non_exhaustive()
    }
}

impl HubPki {
    /// Loads the CA from `dir` (creating it on first use) and issues a serving certificate for
    /// [`HUB_NAME`], `localhost`, the loopback addresses and `names`.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<HubPki, PkiError> {
        let cert_path = dir.join("ca.crt");
        let (ca_pem, ca_key) = sedna_apiserver::pki::load_or_create_ca(dir, ca_params()?)?;
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| PkiError::Tls(format!("{}: {e}", cert_path.display())))?
            .to_vec();
        let issuer = Issuer::new(ca_params()?, ca_key);
        let mut all = vec![
            HUB_NAME.to_owned(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ];
        for n in names {
            if !all.contains(n) {
                all.push(n.clone());
            }
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = all
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, HUB_NAME);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, now() - 86400, now() + 365 * 86400);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(HubPki {
            ca_pem,
            ca_der,
            issuer,
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        })
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The pin join tokens carry: hex SHA-256 of the CA's DER.
    pub fn pin(&self) -> String {
        identity::ca_pin(&self.ca_der)
    }

    /// Signs a node's CSR (DER) for `node`, valid for `validity_seconds`. The CSR's common
    /// name must be `system:node:<node>`; every other field of the CSR is ignored.
    pub fn sign_node(
        &self,
        csr_der: &[u8],
        node: &str,
        validity_seconds: i64,
    ) -> Result<String, PkiError> {
        let der = CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut csr = CertificateSigningRequestParams::from_der(&der)?;
        let expected = identity::node_common_name(node);
        let found = match csr.params.distinguished_name.get(&DnType::CommonName) {
            Some(DnValue::Utf8String(s)) => s.clone(),
            Some(DnValue::PrintableString(s)) => s.as_str().to_owned(),
            Some(DnValue::Ia5String(s)) => s.as_str().to_owned(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        if found != expected {
            return Err(PkiError::WrongSubject { found, expected });
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, expected);
        dn.push(DnType::OrganizationName, NODES_GROUP);
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // Backdated a little for clocks that lag, never by more than a tenth of the lifetime
        // (renewal is planned from the validity span).
        let backdate = (validity_seconds / 10).min(300);
        set_validity(&mut params, now() - backdate, now() + validity_seconds);
        // The issuance time, to the millisecond, as the serial number: revocation refuses
        // the certificates issued up to a node's deletion (see `crate::revocation`).
        params.serial_number = Some(crate::revocation::now_ms().into());
        csr.params = params;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }

    /// The hub's TLS configuration: its serving certificate, HTTP/2, and client certificates
    /// verified against the CA when presented (joins come without one; the channel demands
    /// one).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let tls = |e: &dyn std::fmt::Display| PkiError::Tls(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .map_err(|e| tls(&e))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(&e))?;
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.server_cert_pem.as_bytes())
                .chain(CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()))
                .collect::<Result<_, _>>()
                .map_err(|e| tls(&e))?;
        let key =
            PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes()).map_err(|e| tls(&e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| tls(&e))?;
        // The framed channel (edges that offer it) and HTTP/2 for gRPC (joins, tunnels, and
        // edges that only speak gRPC).
        config.alpn_protocols = vec![sedna_proto::frame::ALPN.to_vec(), b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}
