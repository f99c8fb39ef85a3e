//! Workers report figures into their workload's status through the node's local API
//! (`SEDNA_LOCAL_KUBECONFIG`, which the edge agent gives every pod): a merge patch of the
//! status fields the worker owns. The node relays the write to the cloud through its outbox,
//! so a report made while the cloud is unreachable arrives later. (Cargo feature `kube`.)

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};

/// Writes status patches for one custom resource.
#[derive(Clone)]
pub struct StatusReporter {
    api: kube::Api<DynamicObject>,
    name: String,
}

impl std::fmt::Debug for StatusReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusReporter")
            .field("name", &self.name)
            .finish()
    }
}

impl StatusReporter {
    /// A reporter for `kind` (`group/version`, e.g. `sedna.io/v1alpha1`) `namespace/name`
    /// through the local API, or `None` (logged) when the pod has no usable local API.
    pub async fn connect(
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<StatusReporter> {
        let client = local_client().await?;
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let plural = format!("{}s", kind.to_ascii_lowercase());
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            &plural,
        );
        Some(StatusReporter {
            api: kube::Api::namespaced_with(client, namespace, &resource),
            name: name.to_string(),
        })
    }

    /// Merges `status` (the fields this worker owns) into the object's status; failures are
    /// logged, not fatal (the next report carries the figures again).
    pub async fn report(&self, status: serde_json::Value) {
        let patch = serde_json::json!({ "status": status });
        if let Err(e) = self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(error = %e, name = %self.name, "reporting the status failed");
        }
    }
}

/// Figures as Sedna's `[{key, value}]` metrics list (numbers written with 4 decimals).
pub fn metrics_list(figures: &serde_json::Value) -> Vec<serde_json::Value> {
    figures
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::Number(n) => match n.as_f64() {
                    Some(f) if n.is_f64() => format!("{f:.4}"),
                    _ => n.to_string(),
                },
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            serde_json::json!({"key": k, "value": value})
        })
        .collect()
}

/// A client of the node's local API (`SEDNA_LOCAL_KUBECONFIG`, which the edge agent gives
/// every pod), or `None` (logged) when the pod has none.
pub async fn local_client() -> Option<kube::Client> {
    let path = std::env::var_os("SEDNA_LOCAL_KUBECONFIG")?;
    let kubeconfig = match kube::config::Kubeconfig::read_from(&path) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "local API kubeconfig unreadable");
            return None;
        }
    };
    let config = match kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(error = %e, "local API unusable");
            return None;
        }
    };
    match kube::Client::try_from(config) {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::warn!(error = %e, "local API unusable");
            None
        }
    }
}

/// The `spec.url` of Model `namespace/name`, read through `client` (the node's local API: it
/// answers from the node's copy while the cloud is unreachable).
pub async fn model_url(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<String, kube::Error> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("sedna.io", "v1alpha1", "Model"),
        "models",
    );
    let api: kube::Api<DynamicObject> =
        kube::Api::namespaced_with(client.clone(), namespace, &resource);
    let model = api.get(name).await?;
    Ok(model
        .data
        .pointer("/spec/url")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string())
}
