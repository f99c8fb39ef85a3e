//! Joining a hub, and the node's identity on disk (`<data dir>/pki/{ca.crt,node.pem}`,
//! the key with mode 0600). The key never leaves the node: the hub signs a request for
//! `system:node:<name>`.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sedna_proto::channel::JoinRequest;
use sedna_proto::channel::hub_client::HubClient;
use sedna_proto::identity::{self, JoinToken};

use crate::tls;

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The token or node name is malformed.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The hub could not be reached (or did not prove the pinned CA).
    #[error("cannot reach the hub at {hub}: {reason}")]
    Unreachable {
        /// The address.
        hub: String,
        /// Why.
        reason: String,
    },
    /// The hub refused the join.
    #[error("the hub refused the join: {0}")]
    Refused(String),
    /// The hub's answer is not acceptable.
    #[error("the hub's answer is not acceptable: {0}")]
    BadAnswer(String),
    /// Key or request generation failed.
    #[error("key generation failed: {0}")]
    Key(#[from] rcgen::Error),
    /// The identity could not be read or written.
    #[error("{path}: {reason}")]
    Files {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

impl JoinError {
    /// Whether trying again could succeed (the hub may come up).
    pub fn is_retryable(&self) -> bool {
        matches!(self, JoinError::Unreachable { .. })
    }
}

/// A node's credentials.
#[derive(Clone)]
pub struct Identity {
    /// The node name.
    pub node: String,
    /// The hub CA (PEM).
    pub ca_pem: String,
    /// The node certificate (PEM).
    pub cert_pem: String,
    /// The node key (PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The node's key and certificate, in one file (PEM: the key, then the certificate).
pub const IDENTITY_FILE: &str = "node.pem";

fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

fn files_err(path: &Path, e: impl std::fmt::Display) -> JoinError {
    JoinError::Files {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn write(path: &Path, contents: &str) -> Result<(), JoinError> {
    sedna_apiserver::pki::write_private(path, contents).map_err(|e| files_err(path, e))
}

impl Identity {
    /// Reads the identity saved in `data_dir`, if the node has joined.
    pub fn load(data_dir: &Path) -> Result<Option<Identity>, JoinError> {
        let dir = pki_dir(data_dir);
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| files_err(&p, e))
        };
        let (key_pem, cert_pem) = if dir.join(IDENTITY_FILE).exists() {
            let both = read(IDENTITY_FILE)?;
            let at = both.find("-----BEGIN CERTIFICATE-----").ok_or_else(|| {
                files_err(&dir.join(IDENTITY_FILE), "no certificate after the key")
            })?;
            (both[..at].to_owned(), both[at..].to_owned())
        } else if dir.join("node.crt").exists() {
            // Written by an earlier version: a key and a certificate apart.
            (read("node.key")?, read("node.crt")?)
        } else {
            return Ok(None);
        };
        let node = certificate_info(&cert_pem)?
            .node_name()
            .map(str::to_owned)
            .ok_or_else(|| {
                JoinError::BadAnswer("the saved certificate is not a node certificate".into())
            })?;
        Ok(Some(Identity {
            node,
            ca_pem: read("ca.crt")?,
            cert_pem,
            key_pem,
        }))
    }

    /// Saves the identity into `data_dir`: the key and its certificate in one file, replaced
    /// atomically (a renewal interrupted by a crash leaves the old pair or the new, never a
    /// key with another key's certificate), readable by the agent alone.
    pub fn save(&self, data_dir: &Path) -> Result<(), JoinError> {
        let dir = pki_dir(data_dir);
        // The agent's data (its key, its store, its pods' secrets) is readable by it alone.
        crate::private_dir(data_dir).map_err(|e| files_err(data_dir, e))?;
        crate::private_dir(&dir).map_err(|e| files_err(&dir, e))?;
        write(&dir.join("ca.crt"), &self.ca_pem)?;
        let mut both = self.key_pem.clone();
        if !both.ends_with('\n') {
            both.push('\n');
        }
        both.push_str(&self.cert_pem);
        write(&dir.join(IDENTITY_FILE), &both)?;
        for old in ["node.key", "node.crt"] {
            let _ = std::fs::remove_file(dir.join(old));
        }
        Ok(())
    }
}

/// Reads the first certificate of a PEM.
pub fn certificate_info(pem: &str) -> Result<identity::CertificateInfo, JoinError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| JoinError::BadAnswer(format!("certificate: {e}")))?;
    Ok(identity::certificate_info(&der)?)
}

/// A new key and a certificate request (DER) for `node`.
pub fn new_request(node: &str) -> Result<(KeyPair, Vec<u8>), JoinError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity::node_common_name(node));
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// Joins the hub at `hub` (`host:port`) as `node` with `token`; saves and returns the identity.
pub async fn join(
    hub: &str,
    token: &str,
    node: &str,
    data_dir: &Path,
) -> Result<Identity, JoinError> {
    join_with(hub, token, node, data_dir, false).await
}

/// [`join`], replacing a node of the same name that is connected now when `replace` is set
/// (without it the hub refuses such a join).
pub async fn join_with(
    hub: &str,
    token: &str,
    node: &str,
    data_dir: &Path,
    replace: bool,
) -> Result<Identity, JoinError> {
    identity::check_node_name(node)?;
    let token: JoinToken = token.parse()?;
    let (key, csr) = new_request(node)?;
    let verifier = tls::PinVerifier::new(&token.ca_pin);
    let config = tls::join_config(verifier.clone()).map_err(|e| JoinError::Unreachable {
        hub: hub.into(),
        reason: e.to_string(),
    })?;
    let channel = tls::connect(hub, config)
        .await
        .map_err(|reason| JoinError::Unreachable {
            hub: hub.into(),
            reason,
        })?;
    let answer = HubClient::new(channel)
        .join(JoinRequest {
            token: token.to_string(),
            node_name: node.to_owned(),
            csr_der: csr,
            replace,
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable => JoinError::Unreachable {
                hub: hub.into(),
                reason: s.message().to_owned(),
            },
            _ => JoinError::Refused(s.message().to_owned()),
        })?
        .into_inner();
    let ca_der = CertificateDer::from_pem_slice(answer.ca_pem.as_bytes())
        .map_err(|e| JoinError::BadAnswer(format!("CA: {e}")))?;
    if identity::ca_pin(&ca_der) != token.ca_pin
        || verifier.ca().as_deref() != Some(ca_der.as_ref())
    {
        return Err(JoinError::BadAnswer(
            "the CA returned is not the pinned one".into(),
        ));
    }
    let info = certificate_info(&answer.certificate_pem)?;
    if info.node_name() != Some(node) {
        return Err(JoinError::BadAnswer(format!(
            "the certificate is for {:?}, not {node:?}",
            info.common_name
        )));
    }
    let identity = Identity {
        node: node.to_owned(),
        ca_pem: answer.ca_pem,
        cert_pem: answer.certificate_pem,
        key_pem: key.serialize_pem(),
    };
    identity.save(data_dir)?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_identity_is_readable_by_the_agent_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        // An existing, world-readable data directory is made private too.
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        let identity = Identity {
            node: "edge-1".into(),
            ca_pem: "ca".into(),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
        };
        identity.save(&data).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("pki")), 0o700);
        assert_eq!(mode(&data.join("pki/node.pem")), 0o600);
    }

    #[test]
    fn key_and_certificate_are_saved_and_replaced_together() {
        let dir = tempfile::tempdir().unwrap();
        let (key, csr) = new_request("edge-1").unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&ca_key)
            .unwrap();
        let issuer = rcgen::Issuer::new(rcgen::CertificateParams::default(), ca_key);
        let csr = rcgen::CertificateSigningRequestParams::from_der(&csr.into()).unwrap();
        let cert = csr.signed_by(&issuer).unwrap();
        let identity = Identity {
            node: "edge-1".into(),
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        // A data directory from an earlier version (key and certificate apart) still loads…
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        std::fs::write(pki.join("ca.crt"), &identity.ca_pem).unwrap();
        std::fs::write(pki.join("node.key"), &identity.key_pem).unwrap();
        std::fs::write(pki.join("node.crt"), &identity.cert_pem).unwrap();
        let loaded = Identity::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.key_pem, identity.key_pem);
        // … and saving writes the pair as one file, leaving no stray halves.
        identity.save(dir.path()).unwrap();
        assert!(!pki.join("node.key").exists() && !pki.join("node.crt").exists());
        let loaded = Identity::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.node, "edge-1");
        assert_eq!(loaded.key_pem.trim_end(), identity.key_pem.trim_end());
        assert_eq!(loaded.cert_pem, identity.cert_pem);
    }
}
