//! Identity conventions of the channel: a node's certificate names it `system:node:<name>`, a
//! join token pins the hub's CA by its SHA-256, and node names are DNS subdomains.

use sha2::{Digest, Sha256};

/// Prefix of a node certificate's common name.
pub const NODE_PREFIX: &str = "system:node:";

/// Organisation of node certificates.
pub const NODES_GROUP: &str = "system:nodes";

/// Why a token, name or certificate is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The token does not have the form `<ca sha256>.<id>.<secret>`.
    #[error(
        "malformed join token: expected <ca-sha256>.<id>.<secret> as printed by `sedna token create`"
    )]
    MalformedToken,
    /// The node name is not a DNS subdomain.
    #[error(
        "invalid node name {0:?}: use lower-case letters, digits, '-' and '.', at most 253 characters"
    )]
    BadNodeName(String),
    /// A certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
}

impl IdentityError {
    /// Whether trying again could succeed: never, the input must change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// The common name of `node`'s certificate.
pub fn node_common_name(node: &str) -> String {
    format!("{NODE_PREFIX}{node}")
}

/// Checks a node name (DNS subdomain, as Kubernetes Node names).
pub fn check_node_name(node: &str) -> Result<(), IdentityError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if node.len() <= 253 && node.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(IdentityError::BadNodeName(node.to_owned()))
    }
}

/// The pin of a CA certificate: the hex SHA-256 of its DER.
pub fn ca_pin(ca_der: &[u8]) -> String {
    hex::encode(Sha256::digest(ca_der))
}

/// The hex SHA-256 of a token secret, as the hub stores it.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A join token: `<ca sha256>.<id>.<secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Hex SHA-256 of the hub CA's DER.
    pub ca_pin: String,
    /// Public identifier (6 lower-case alphanumerics).
    pub id: String,
    /// The secret part.
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_pin", &self.ca_pin)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.ca_pin, self.id, self.secret)
    }
}

impl std::str::FromStr for JoinToken {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        let (Some(pin), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::MalformedToken);
        };
        let hex_ok = pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit());
        let id_ok = id.len() == 6
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let secret_ok =
            (16..=128).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_alphanumeric());
        if !(hex_ok && id_ok && secret_ok) {
            return Err(IdentityError::MalformedToken);
        }
        Ok(JoinToken {
            ca_pin: pin.to_ascii_lowercase(),
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// What the channel needs to know of a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Subject common name.
    pub common_name: String,
    /// Start of validity (Unix seconds).
    pub not_before: i64,
    /// End of validity (Unix seconds).
    pub not_after: i64,
    /// Serial number (big-endian bytes; node certificates carry their issuance time).
    pub serial: Vec<u8>,
}

impl CertificateInfo {
    /// The node a node certificate names, if it is one.
    pub fn node_name(&self) -> Option<&str> {
        self.common_name.strip_prefix(NODE_PREFIX)
    }
}

/// Reads a DER certificate.
pub fn certificate_info(der: &[u8]) -> Result<CertificateInfo, IdentityError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok(CertificateInfo {
        common_name,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.tbs_certificate.raw_serial().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_print() {
        let pin = "a".repeat(64);
        let text = format!("{pin}.abc123.0123456789abcdefXYZ");
        let token: JoinToken = text.parse().unwrap();
        assert_eq!(token.id, "abc123");
        assert_eq!(token.to_string(), text);
        assert!(
            !format!("{token:?}").contains("0123456789"),
            "Debug hides the secret"
        );
        for bad in [
            "",
            "a.b.c",
            &format!("{pin}.ABC123.0123456789abcdef"),
            &format!("{pin}.abc123.short"),
            &format!("{pin}.abc123.0123456789abcdef.x"),
        ] {
            assert_eq!(
                bad.parse::<JoinToken>(),
                Err(IdentityError::MalformedToken),
                "{bad}"
            );
        }
    }

    #[test]
    fn node_names_are_dns_subdomains() {
        assert!(check_node_name("edge-1").is_ok());
        assert!(check_node_name("site.edge-1").is_ok());
        for bad in ["", "Edge", "edge_1", "-edge", &"a".repeat(64)] {
            assert!(check_node_name(bad).is_err(), "{bad}");
        }
    }
}
