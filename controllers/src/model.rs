//! The Model controller: checks that a Model's URL is one the workers can resolve
//! (`s3://bucket/key`, `file:///path` or an absolute path), resolves `s3://` objects through
//! object storage with the endpoint and credentials of the Model's `credentialName` Secret
//! (the object must exist; its last change becomes `updateTime`; looked at again every 5
//! minutes), and reports `phase` and a `Ready` condition. Paths on the nodes are checked where
//! they are read.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use sedna_api::common::{Condition, ConditionStatus, ResourcePhase, set_condition};
use sedna_api::model::Model;

use crate::Error;

/// Why a URL cannot be used, or `None` when it can.
pub fn check_url(url: &str) -> Option<String> {
    if let Some(rest) = url.strip_prefix("s3://") {
        return match rest.split_once('/') {
            Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => None,
            _ => Some(format!("{url:?} is not s3://bucket/key")),
        };
    }
    let path = match url.strip_prefix("file://") {
        Some(path) => path,
        None if url.contains("://") => {
            return Some(format!(
                "{url:?}: unsupported scheme (use s3://, file:// or an absolute path)"
            ));
        }
        None => url,
    };
    if !path.starts_with('/') {
        return Some(format!("{url:?}: a local path must be absolute"));
    }
    if path.split('/').any(|c| c == "..") {
        return Some(format!("{url:?}: a local path must not contain .."));
    }
    None
}

/// What resolving a Model's URL found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The object exists in the store: size and last change.
    Object {
        /// Bytes.
        size: u64,
        /// Last change, RFC 3339.
        last_modified: String,
    },
    /// A path on the nodes: valid, checked where it is read.
    NodePath,
}

/// The S3 endpoint and credentials a Model's Secret carries: Sedna's annotations
/// `s3-endpoint` (+ `s3-usehttps: "0"` for plain HTTP) or a `S3_ENDPOINT_URL` key, and the
/// keys `ACCESS_KEY_ID` / `SECRET_ACCESS_KEY`.
pub fn s3_settings(secret: &Secret) -> (Option<String>, Option<sedna::config::Credentials>) {
    let data = |key: &str| -> Option<String> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key).cloned())
            })
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let annotations = secret.annotations();
    let endpoint = data("S3_ENDPOINT_URL").or_else(|| {
        annotations.get("s3-endpoint").map(|host| {
            if host.contains("://") {
                host.clone()
            } else if annotations.get("s3-usehttps").map(String::as_str) == Some("0") {
                format!("http://{host}")
            } else {
                format!("https://{host}")
            }
        })
    });
    let credentials = match (data("ACCESS_KEY_ID"), data("SECRET_ACCESS_KEY")) {
        (Some(access_key_id), Some(secret_access_key)) => Some(sedna::config::Credentials {
            access_key_id,
            secret_access_key,
            session_token: data("SESSION_TOKEN"),
        }),
        _ => None,
    };
    (endpoint, credentials)
}

/// Resolves a Model URL through object storage (`s3://`: the object must exist), with the
/// Secret's endpoint and credentials; node paths are only checked for form.
pub async fn resolve(
    url: &str,
    secret: Option<&Secret>,
    cache_dir: &std::path::Path,
) -> Result<Resolved, String> {
    if let Some(problem) = check_url(url) {
        return Err(problem);
    }
    if !url.starts_with("s3://") {
        return Ok(Resolved::NodePath);
    }
    let mut options = sedna::storage::StorageOptions::new(cache_dir);
    if let Some(secret) = secret {
        let (endpoint, credentials) = s3_settings(secret);
        options.allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        options.s3_endpoint = endpoint;
        options.credentials = credentials;
    }
    let storage = sedna::storage::Storage::new(options).map_err(|e| e.to_string())?;
    let info = storage.stat(url).await.map_err(|e| e.to_string())?;
    Ok(Resolved::Object {
        size: info.size,
        last_modified: info.last_modified,
    })
}

struct Context {
    client: Client,
    cache_dir: std::path::PathBuf,
    failures: crate::Failures,
}

async fn reconcile(model: Arc<Model>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = model.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Model> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Time(jiff::Timestamp::now());
    let secret = match &model.spec.credential_name {
        Some(name) => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            secrets.get_opt(name).await?
        }
        None => None,
    };
    let resolved = resolve(&model.spec.url, secret.as_ref(), &ctx.cache_dir).await;
    let mut status = model.status.clone().unwrap_or_default();
    let mut update_time = status.update_time.clone();
    let (phase, condition) = match &resolved {
        Ok(Resolved::Object {
            size,
            last_modified,
        }) => {
            if let Ok(t) = last_modified.parse::<jiff::Timestamp>() {
                update_time = Some(Time(t));
            }
            (
                ResourcePhase::Ready,
                Condition::new("Ready", ConditionStatus::True, now)
                    .with_reason("ObjectFound")
                    .with_message(format!("{size} bytes in the object store")),
            )
        }
        Ok(Resolved::NodePath) => (
            ResourcePhase::Ready,
            Condition::new("Ready", ConditionStatus::True, now)
                .with_reason("URLValid")
                .with_message("a path on the nodes, read where the workers run"),
        ),
        Err(message) => (
            ResourcePhase::Failed,
            Condition::new("Ready", ConditionStatus::False, now)
                .with_reason(if check_url(&model.spec.url).is_some() {
                    "InvalidURL"
                } else {
                    "Unresolvable"
                })
                .with_message(message.clone()),
        ),
    };
    let changed = set_condition(&mut status.conditions, condition)
        || status.phase != phase
        || status.update_time != update_time;
    if changed {
        status.phase = phase;
        let patch = serde_json::json!({"status": {
            "phase": status.phase, "conditions": status.conditions, "updateTime": update_time,
        }});
        api.patch_status(
            &model.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    // Objects in a store can change or appear: look again now and then.
    Ok(if model.spec.url.starts_with("s3://") {
        Action::requeue(std::time::Duration::from_secs(if resolved.is_ok() {
            300
        } else {
            30
        }))
    } else {
        Action::await_change()
    })
}

fn error_policy(model: Arc<Model>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.failures.failed(&*model);
    tracing::warn!(model = %model.name_any(), %error, retry_in = ?delay, "model reconcile failed");
    Action::requeue(delay)
}

/// Runs the Model controller until `shutdown`.
pub async fn run(
    client: Client,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Model> = Api::all(client.clone());
    let cache_dir = std::env::temp_dir().join(format!("sedna-gm-{}", std::process::id()));
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            |model, ctx: Arc<Context>| async move {
                let result = reconcile(model.clone(), ctx.clone()).await;
                if result.is_ok() {
                    ctx.failures.succeeded(&*model);
                }
                result
            },
            error_policy,
            Arc::new(Context {
                client,
                cache_dir,
                failures: crate::Failures::default(),
            }),
        )
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(check_url("s3://models/edge.onnx"), None);
        assert_eq!(check_url("/models/edge.onnx"), None);
        assert_eq!(check_url("file:///models/edge.onnx"), None);
        assert!(
            check_url("s3://models")
                .unwrap()
                .contains("s3://bucket/key")
        );
        assert!(
            check_url("gs://b/k")
                .unwrap()
                .contains("unsupported scheme")
        );
        assert!(check_url("models/edge.onnx").unwrap().contains("absolute"));
        assert!(check_url("/a/../etc/passwd").unwrap().contains(".."));
    }
}
