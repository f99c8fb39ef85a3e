//! Join tokens, kept in the Kubernetes API so that any hub instance can check them and
//! `sedna token create` needs only a kubeconfig: one Secret per token in `kube-system`
//! (type `sedna.io/join-token`) holding the SHA-256 of the secret (never the secret itself),
//! the node name it is restricted to, if any, and its expiry. The hub's CA certificate is
//! published in the ConfigMap `kube-public/sedna-hub-ca`, from which the token's pin is taken.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use rand::RngExt;
use sedna_proto::identity::{self, JoinToken};

/// Namespace of token Secrets.
pub const TOKEN_NAMESPACE: &str = "kube-system";
/// Type of token Secrets.
pub const TOKEN_SECRET_TYPE: &str = "sedna.io/join-token";
/// Namespace and name of the ConfigMap carrying the hub CA.
pub const CA_CONFIGMAP: (&str, &str) = ("kube-public", "sedna-hub-ca");

/// Why a join was refused, or a token could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unknown token, wrong secret, or not a join token.
    #[error("the join token is not valid")]
    Invalid,
    /// The token expired.
    #[error("the join token expired at {0}")]
    Expired(String),
    /// The token is restricted to another node name.
    #[error("the join token is for node {allowed:?}, not {asked:?}")]
    WrongNode {
        /// The name the token allows.
        allowed: String,
        /// The name asked for.
        asked: String,
    },
    /// A single-use token was used already.
    #[error("the join token was for a single use and has been used")]
    Used,
    /// The hub CA has not been published yet (start the hub first).
    #[error("the hub CA is not published in {}/{}: start `sedna cloudcore` first", CA_CONFIGMAP.0, CA_CONFIGMAP.1)]
    NoHubCa,
    /// The Kubernetes API failed.
    #[error("Kubernetes API error: {0}")]
    Api(#[from] kube::Error),
}

impl TokenError {
    /// Whether trying again could succeed (the API may come back).
    pub fn is_retryable(&self) -> bool {
        matches!(self, TokenError::Api(_))
    }
}

fn random_string(len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

fn secret_name(id: &str) -> String {
    format!("sedna-join-{id}")
}

fn rfc3339(seconds: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Publishes the hub CA (done by the hub at start).
pub async fn publish_ca(client: &kube::Client, ca_pem: &str) -> Result<(), TokenError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), CA_CONFIGMAP.0);
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": CA_CONFIGMAP.1 },
        "data": { "ca.crt": ca_pem },
    });
    api.patch(
        CA_CONFIGMAP.1,
        &PatchParams::apply("sedna-cloudcore").force(),
        &Patch::Apply(&cm),
    )
    .await?;
    Ok(())
}

/// Creates a token valid for `ttl`, restricted to `node` when given, for any number of joins.
pub async fn create(
    client: &kube::Client,
    node: Option<&str>,
    ttl: Duration,
) -> Result<JoinToken, TokenError> {
    create_with(client, node, ttl, false).await
}

/// Creates a token valid for `ttl`, restricted to `node` when given; a `single_use` token is
/// deleted by the join that uses it (a second join with it is refused).
pub async fn create_with(
    client: &kube::Client,
    node: Option<&str>,
    ttl: Duration,
    single_use: bool,
) -> Result<JoinToken, TokenError> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), CA_CONFIGMAP.0);
    let ca_pem = cms
        .get_opt(CA_CONFIGMAP.1)
        .await?
        .and_then(|c| c.data)
        .and_then(|d| d.get("ca.crt").cloned())
        .ok_or(TokenError::NoHubCa)?;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|_| TokenError::NoHubCa)?;
    let token = JoinToken {
        ca_pin: identity::ca_pin(&der),
        id: random_string(6, b"abcdefghijklmnopqrstuvwxyz0123456789"),
        secret: random_string(
            32,
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        ),
    };
    let expires = k8s_openapi::jiff::Timestamp::now().as_second() + ttl.as_secs() as i64;
    let mut data = BTreeMap::from([
        (
            "secret-sha256".to_owned(),
            identity::secret_hash(&token.secret),
        ),
        ("expiration".to_owned(), rfc3339(expires)),
    ]);
    if let Some(n) = node {
        data.insert("node-name".into(), n.to_owned());
    }
    if single_use {
        data.insert("usage".into(), "single".into());
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&token.id)),
            namespace: Some(TOKEN_NAMESPACE.into()),
            ..Default::default()
        },
        type_: Some(TOKEN_SECRET_TYPE.into()),
        string_data: Some(data),
        ..Default::default()
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), TOKEN_NAMESPACE);
    secrets.create(&PostParams::default(), &secret).await?;
    Ok(token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a token for a join as `node`; a single-use token is consumed (deleted, with its
/// resourceVersion as a precondition, so two joins racing with it cannot both pass).
pub async fn validate(
    client: &kube::Client,
    token: &JoinToken,
    node: &str,
) -> Result<(), TokenError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), TOKEN_NAMESPACE);
    let secret = secrets
        .get_opt(&secret_name(&token.id))
        .await?
        .ok_or(TokenError::Invalid)?;
    if secret.type_.as_deref() != Some(TOKEN_SECRET_TYPE) {
        return Err(TokenError::Invalid);
    }
    let data = secret.data.unwrap_or_default();
    let field = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    let want = field("secret-sha256");
    let got = identity::secret_hash(&token.secret);
    if !constant_time_eq(want.as_bytes(), got.as_bytes()) {
        return Err(TokenError::Invalid);
    }
    let expiration = field("expiration");
    let expires = expiration
        .parse::<k8s_openapi::jiff::Timestamp>()
        .map_err(|_| TokenError::Invalid)?;
    if expires <= k8s_openapi::jiff::Timestamp::now() {
        return Err(TokenError::Expired(expiration));
    }
    let allowed = field("node-name");
    if !allowed.is_empty() && allowed != node {
        return Err(TokenError::WrongNode {
            allowed,
            asked: node.to_owned(),
        });
    }
    if field("usage") == "single" {
        let params = kube::api::DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: secret.metadata.resource_version.clone(),
                uid: None,
            }),
            ..Default::default()
        };
        match secrets.delete(&secret_name(&token.id), &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
                return Err(TokenError::Used);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
