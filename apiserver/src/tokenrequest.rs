//! `serviceaccounts/NAME/token` (TokenRequest, what `kubectl create token` asks): bound,
//! expiring tokens of a ServiceAccount. A token is `sat1.<claims>.<HMAC-SHA256>` under a key
//! only the server reads (`DATA_DIR/serviceaccount-token.key`, 0600); nothing is stored per
//! token. It authenticates as `system:serviceaccount:NS:NAME` (groups
//! `system:serviceaccounts`, `system:serviceaccounts:NS`) until it expires, while the
//! ServiceAccount (and the Pod it is bound to, if any) still exists with the same uid: deleting
//! either revokes it at once.

use std::path::Path;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::error::ApiError;
use crate::handlers::{self, Call, Reply};
use crate::meta;
use crate::pki::{PkiError, User};
use crate::store::Store;

const PREFIX: &str = "sat1";
/// The shortest lifetime granted (Kubernetes' minimum).
pub const MIN_SECONDS: i64 = 600;
/// The longest lifetime granted; longer requests are cut to it.
pub const MAX_SECONDS: i64 = 48 * 3600;
/// The lifetime when the request names none.
pub const DEFAULT_SECONDS: i64 = 3600;

/// Mints and checks ServiceAccount tokens.
pub struct ServiceAccountTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for ServiceAccountTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceAccountTokens")
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Claims {
    ns: String,
    sa: String,
    sa_uid: String,
    /// Expiry, seconds since the epoch.
    exp: i64,
    aud: Vec<String>,
    /// The pod it is bound to: (name, uid).
    pod: Option<(String, String)>,
}

impl ServiceAccountTokens {
    /// Reads the key at `path`, creating it (32 random bytes, 0600) when missing.
    pub fn load_or_create(path: &Path) -> Result<Self, PkiError> {
        let engine = base64::engine::general_purpose::STANDARD;
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(key) = engine.decode(text.trim())
            && key.len() >= 32
        {
            return Ok(Self { key });
        }
        let key: [u8; 32] = rand::random();
        crate::pki::write_private(path, engine.encode(key))?;
        Ok(Self { key: key.to_vec() })
    }

    fn mac(&self, claims: &[u8]) -> Vec<u8> {
        match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mut mac) => {
                mac.update(claims);
                mac.finalize().into_bytes().to_vec()
            }
            Err(_) => Vec::new(),
        }
    }

    fn mint(&self, claims: &Claims) -> String {
        let body = serde_json::to_vec(claims).unwrap_or_default();
        format!("{PREFIX}.{}.{}", b64(&body), b64(&self.mac(&body)))
    }

    fn verify(&self, token: &str, now: i64) -> Option<Claims> {
        let mut parts = token.split('.');
        let (Some(PREFIX), Some(body), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let body = engine.decode(body).ok()?;
        let mut check = Hmac::<Sha256>::new_from_slice(&self.key).ok()?;
        check.update(&body);
        check.verify_slice(&engine.decode(mac).ok()?).ok()?;
        let claims: Claims = serde_json::from_slice(&body).ok()?;
        (claims.exp > now).then_some(claims)
    }

    /// The user of a genuine, unexpired token whose ServiceAccount (and bound pod) still exist.
    pub fn authenticate(&self, token: &str, store: &Store) -> Option<User> {
        if !token.starts_with(PREFIX) {
            return None;
        }
        let claims = self.verify(token, jiff_now())?;
        let uid_of = |key: String| {
            store
                .get(&key)
                .and_then(|s| meta::meta_str(&s.value, "uid").map(str::to_owned))
        };
        if uid_of(format!("core/serviceaccounts/{}/{}", claims.ns, claims.sa)).as_deref()
            != Some(claims.sa_uid.as_str())
        {
            return None;
        }
        if let Some((pod, uid)) = &claims.pod
            && uid_of(format!("core/pods/{}/{pod}", claims.ns)).as_deref() != Some(uid.as_str())
        {
            return None;
        }
        Some(User {
            name: format!("system:serviceaccount:{}:{}", claims.ns, claims.sa),
            uid: claims.sa_uid.clone(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", claims.ns),
                "system:authenticated".into(),
            ],
        })
    }
}

fn jiff_now() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

/// `POST serviceaccounts/NAME/token`.
pub fn create(api: &crate::server::Api, call: &Call) -> Result<Reply, ApiError> {
    let ns = call.path.namespace.clone().unwrap_or_default();
    let name = call.path.name.clone().unwrap_or_default();
    let body = handlers::decode_body(&call.content_type, &call.body)?;
    let invalid = |field: &str, message: &str| {
        ApiError::invalid_field(
            "TokenRequest",
            "authentication.k8s.io",
            &name,
            field,
            message,
        )
    };
    let account = api
        .store
        .get(&format!("core/serviceaccounts/{ns}/{name}"))
        .ok_or_else(|| ApiError::not_found("", "serviceaccounts", &name))?;
    let spec = body.get("spec").cloned().unwrap_or(json!({}));
    let seconds = match spec.get("expirationSeconds").and_then(Value::as_i64) {
        None => DEFAULT_SECONDS,
        Some(s) if s < MIN_SECONDS => {
            return Err(invalid(
                "spec.expirationSeconds",
                &format!("Invalid value: {s}: may not specify a duration less than 10 minutes"),
            ));
        }
        Some(s) => s.min(MAX_SECONDS),
    };
    let audiences: Vec<String> = spec
        .get("audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let pod = match spec.get("boundObjectRef").filter(|r| !r.is_null()) {
        None => None,
        Some(r) => {
            let kind = r.get("kind").and_then(Value::as_str).unwrap_or_default();
            if kind != "Pod" {
                return Err(invalid(
                    "spec.boundObjectRef.kind",
                    &format!("Unsupported value: {kind:?}: supported values: \"Pod\""),
                ));
            }
            let pod_name = r.get("name").and_then(Value::as_str).unwrap_or_default();
            let stored = api
                .store
                .get(&format!("core/pods/{ns}/{pod_name}"))
                .ok_or_else(|| ApiError::not_found("", "pods", pod_name))?;
            let uid = meta::meta_str(&stored.value, "uid")
                .unwrap_or_default()
                .to_owned();
            if let Some(want) = r
                .get("uid")
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty())
                && want != uid
            {
                return Err(ApiError::conflict_with(
                    "",
                    "pods",
                    pod_name,
                    &format!(
                        "the UID in the bound object reference ({want}) does not match the pod's ({uid})"
                    ),
                    vec![],
                ));
            }
            Some((pod_name.to_owned(), uid))
        }
    };
    let exp = jiff_now() + seconds;
    let claims = Claims {
        ns: ns.clone(),
        sa: name.clone(),
        sa_uid: meta::meta_str(&account.value, "uid")
            .unwrap_or_default()
            .to_owned(),
        exp,
        aud: audiences.clone(),
        pod,
    };
    let token = api.sa_tokens.mint(&claims);
    let expires = k8s_openapi::jiff::Timestamp::from_second(exp)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    let mut spec_out = spec.clone();
    spec_out["expirationSeconds"] = json!(seconds);
    spec_out["audiences"] = json!(audiences);
    Ok(Reply {
        code: 201,
        body: json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "metadata": { "name": name, "namespace": ns, "creationTimestamp": meta::now() },
            "spec": spec_out,
            "status": { "token": token, "expirationTimestamp": expires },
        }),
        raw: None,
        warnings: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_signed_expire_and_cannot_be_altered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serviceaccount-token.key");
        let tokens = ServiceAccountTokens::load_or_create(&path).unwrap();
        let claims = Claims {
            ns: "default".into(),
            sa: "builder".into(),
            sa_uid: "u-1".into(),
            exp: 2_000,
            aud: vec![],
            pod: None,
        };
        let token = tokens.mint(&claims);
        assert_eq!(tokens.verify(&token, 1_999), Some(claims.clone()));
        assert_eq!(tokens.verify(&token, 2_000), None, "expired");
        // The same key after a restart; another key refuses it.
        assert!(
            ServiceAccountTokens::load_or_create(&path)
                .unwrap()
                .verify(&token, 0)
                .is_some()
        );
        let other = ServiceAccountTokens::load_or_create(&dir.path().join("other")).unwrap();
        assert_eq!(other.verify(&token, 0), None);
        // Claims changed under the old MAC: refused.
        let mut forged = claims.clone();
        forged.sa = "admin".into();
        let body = b64(&serde_json::to_vec(&forged).unwrap());
        let mac = token.rsplit('.').next().unwrap();
        assert_eq!(tokens.verify(&format!("{PREFIX}.{body}.{mac}"), 0), None);
        for junk in ["", "sat1", "sat1..", "sat1.a.b.c", &"x".repeat(5000)] {
            assert_eq!(tokens.verify(junk, 0), None);
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
