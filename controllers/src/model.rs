//! The Model controller: checks that a Model's URL is one the workers can resolve
//! (`s3://bucket/key`, `file:///path` or an absolute path; a `file` path must exist when the
//! controller shares the workers' machine) and reports `phase` and a `Ready` condition.

use std::sync::Arc;

use futures_util::StreamExt;
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

struct Context {
    client: Client,
}

async fn reconcile(model: Arc<Model>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = model.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Model> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Time(jiff::Timestamp::now());
    let problem = check_url(&model.spec.url);
    let mut status = model.status.clone().unwrap_or_default();
    let (phase, condition) = match &problem {
        None => (
            ResourcePhase::Ready,
            Condition::new("Ready", ConditionStatus::True, now).with_reason("URLValid"),
        ),
        Some(message) => (
            ResourcePhase::Failed,
            Condition::new("Ready", ConditionStatus::False, now)
                .with_reason("InvalidURL")
                .with_message(message.clone()),
        ),
    };
    let changed = set_condition(&mut status.conditions, condition) || status.phase != phase;
    if changed {
        status.phase = phase;
        let patch =
            serde_json::json!({"status": {"phase": status.phase, "conditions": status.conditions}});
        api.patch_status(
            &model.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(Action::await_change())
}

fn error_policy(_: Arc<Model>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(%error, "model reconcile failed");
    Action::requeue(crate::backoff(3))
}

/// Runs the Model controller until `shutdown`.
pub async fn run(
    client: Client,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Model> = Api::all(client.clone());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, Arc::new(Context { client }))
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
