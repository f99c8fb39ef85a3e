//! Security material of a server: a certificate authority kept in the data directory, a
//! serving certificate signed by it at every start, bearer-token users from a file, and the
//! admin kubeconfig. Private keys, tokens and the kubeconfig are written with mode 0600.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use rand::RngExt;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Why the security material could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The TLS configuration was refused.
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    /// The token file has a malformed line.
    #[error("{path}:{line}: expected `token,user,uid[,\"group1,group2\"]`")]
    TokenFile {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
}

impl PkiError {
    /// Whether trying again could succeed (only I/O errors may be transient).
    pub fn is_retryable(&self) -> bool {
        matches!(self, PkiError::Io { .. })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `contents` to `path` readable by the owner only (0600), atomically: a unique
/// temporary file in the same directory, synced, renamed over `path`, and the directory
/// synced, so a crash leaves the old contents or the new, never a mix. A missing directory is
/// created readable by the owner only (0700). The one implementation every crate uses for
/// keys, certificates and kubeconfigs.
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents.as_ref())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A CA kept in `dir` (`ca.crt`, and `ca.key` readable by the owner only): loaded, or created
/// self-signed from `params` on first use (the key is written before the certificate, so a
/// certificate on disk always has its key). The one implementation the API server and the
/// hub use.
pub fn load_or_create_ca(
    dir: &Path,
    params: rcgen::CertificateParams,
) -> Result<(String, KeyPair), PkiError> {
    let cert_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    if cert_path.exists() && key_path.exists() {
        let cert = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        return Ok((cert, KeyPair::from_pem(&key)?));
    }
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_private(&key_path, key.serialize_pem())?;
    write_private(&cert_path, cert.pem())?;
    Ok((cert.pem(), key))
}

/// The server's certificate authority and serving certificate.
#[derive(Clone)]
pub struct Pki {
    /// The CA certificate (PEM), what clients trust.
    pub ca_pem: String,
    /// The serving certificate chain (PEM).
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "sedna-apiserver-ca");
    dn.push(DnType::OrganizationName, "sedna");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    set_validity(&mut params, now - 86400, now + 10 * 365 * 86400);
    Ok(params)
}

/// Sets a certificate's validity to the UTC calendar days of two Unix times.
fn set_validity(params: &mut CertificateParams, from: i64, to: i64) {
    let day = |seconds: i64| {
        let date = k8s_openapi::jiff::Timestamp::from_second(seconds)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
            .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC)
            .date();
        (i32::from(date.year()), date.month() as u8, date.day() as u8)
    };
    let (y, m, d) = day(from);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = day(to);
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

impl Pki {
    /// Loads the CA from `dir` (creating it on first use) and issues a serving certificate
    /// for `localhost`, the loopback addresses and `extra_names` (names or IP addresses).
    pub fn load_or_create(dir: &Path, extra_names: &[String]) -> Result<Pki, PkiError> {
        let (ca_pem, ca_key) = load_or_create_ca(dir, ca_params()?)?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        for n in extra_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "sedna-apiserver");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        set_validity(&mut params, now - 86400, now + 365 * 86400);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Pki {
            ca_pem,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A rustls server configuration serving HTTP/2 and HTTP/1.1.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User name.
    pub name: String,
    /// User uid.
    pub uid: String,
    /// Groups, e.g. `system:masters`.
    pub groups: Vec<String>,
}

/// Bearer tokens and their users, from a static token file (`token,user,uid,"g1,g2"` per
/// line, as kube-apiserver's `--token-auth-file`).
#[derive(Clone, Default)]
pub struct Tokens(Vec<(String, User)>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Tokens").field(&self.0.len()).finish()
    }
}

/// A random token: 32 bytes, URL-safe base64.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    /// Reads the token file, creating it with one admin token (group `system:masters`) when
    /// it does not exist. Returns the tokens and the admin token.
    pub fn load_or_create(path: &Path) -> Result<(Tokens, String), PkiError> {
        if !path.exists() {
            let token = random_token();
            write_private(path, format!("{token},admin,admin,\"system:masters\"\n"))?;
        }
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(4, ',');
            let (Some(token), Some(name), Some(uid)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(PkiError::TokenFile {
                    path: path.display().to_string(),
                    line: i + 1,
                });
            };
            let groups = parts
                .next()
                .map(|g| {
                    g.trim_matches('"')
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            tokens.push((
                token.trim().to_owned(),
                User {
                    name: name.trim().to_owned(),
                    uid: uid.trim().to_owned(),
                    groups,
                },
            ));
        }
        let admin = tokens
            .iter()
            .find(|(_, u)| u.groups.iter().any(|g| g == "system:masters"))
            .map(|(t, _)| t.clone())
            .unwrap_or_default();
        Ok((Tokens(tokens), admin))
    }

    /// The user a bearer token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<&User> {
        self.0
            .iter()
            .find(|(t, _)| constant_time_eq(t.as_bytes(), token.as_bytes()))
            .map(|(_, u)| u)
    }
}

/// A kubeconfig for `server` trusting `ca_pem` and authenticating with `token`.
pub fn kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sedna\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\n\
         contexts:\n- name: sedna\n  context:\n    cluster: sedna\n    user: admin\n    \
         namespace: default\ncurrent-context: sedna\npreferences: {{}}\n"
    )
}

/// Paths of the files a server keeps in its data directory.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The data directory.
    pub dir: PathBuf,
}

impl Layout {
    /// The SQLite database.
    pub fn database(&self) -> PathBuf {
        self.dir.join("state.db")
    }
    /// The PKI directory.
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    /// The token file.
    pub fn tokens(&self) -> PathBuf {
        self.dir.join("tokens.csv")
    }
    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_ca_is_kept_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let first = Pki::load_or_create(dir.path(), &["10.0.0.5".into()]).unwrap();
        let second = Pki::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(first.ca_pem, second.ca_pem);
        assert_ne!(first.cert_pem, second.cert_pem);
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        first.server_config().unwrap();
    }

    #[test]
    fn the_token_file_is_created_with_an_admin_and_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.csv");
        let (tokens, admin) = Tokens::load_or_create(&path).unwrap();
        assert!(admin.len() >= 40);
        let user = tokens.authenticate(&admin).unwrap();
        assert_eq!(user.name, "admin");
        assert_eq!(user.groups, ["system:masters"]);
        assert!(tokens.authenticate("nope").is_none());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        std::fs::write(&path, "t1,alice,1,\"dev,ops\"\nbroken\n").unwrap();
        assert!(matches!(
            Tokens::load_or_create(&path),
            Err(PkiError::TokenFile { line: 2, .. })
        ));
    }

    #[test]
    fn kubeconfigs_are_yaml_with_the_ca_and_token() {
        let text = kubeconfig("https://127.0.0.1:6443", "PEM", "tok");
        let v: serde_json::Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(v["users"][0]["user"]["token"], "tok");
        assert_eq!(
            v["clusters"][0]["cluster"]["certificate-authority-data"],
            "UEVN"
        );
    }
}
