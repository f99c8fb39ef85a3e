//! Which objects a Pod or a platform workload refers to by name: the ConfigMaps and Secrets
//! a pod mounts or reads into its environment, the workload that owns it, and the Models and
//! Datasets a workload names. The hub routes exactly these to a node; the node's local API
//! lets a pod read exactly these.
//!
//! ```
//! let pod = serde_json::json!({
//!     "metadata": { "ownerReferences": [{ "apiVersion": "sedna.io/v1alpha1",
//!         "kind": "JointInferenceService", "name": "digits", "uid": "u" }] },
//!     "spec": { "containers": [{ "name": "c",
//!         "envFrom": [{ "secretRef": { "name": "s3-creds" } }] }] } });
//! let refs = sedna_api::references::pod_references(&pod);
//! assert!(refs.iter().any(|r| r.kind == "Secret" && r.name == "s3-creds"));
//! assert!(refs.iter().any(|r| r.kind == "JointInferenceService" && r.name == "digits"));
//! ```

use serde_json::Value;

/// The platform's workload kinds (`sedna.io/v1alpha1`).
pub const WORKLOAD_KINDS: [&str; 3] = [
    "JointInferenceService",
    "IncrementalLearningJob",
    "FederatedLearningJob",
];

const SEDNA: &str = "sedna.io/v1alpha1";

/// An object named by another one, in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reference {
    /// `apiVersion` of the named object.
    pub api_version: &'static str,
    /// Its kind.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = v;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_str()
}

fn items<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    let mut v = v;
    for p in path {
        match v.get(*p) {
            Some(next) => v = next,
            None => return &[],
        }
    }
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn push(
    out: &mut Vec<Reference>,
    api_version: &'static str,
    kind: &'static str,
    name: Option<&str>,
) {
    if let Some(n) = name.filter(|n| !n.is_empty()) {
        out.push(Reference {
            api_version,
            kind,
            name: n.to_owned(),
        });
    }
}

/// ConfigMaps and Secrets a pod uses (volumes, projected sources, env, envFrom, image pull
/// secrets) and the platform workloads that own it.
pub fn pod_references(pod: &Value) -> Vec<Reference> {
    let mut out = Vec::new();
    for vol in items(pod, &["spec", "volumes"]) {
        push(
            &mut out,
            "v1",
            "ConfigMap",
            str_at(vol, &["configMap", "name"]),
        );
        push(
            &mut out,
            "v1",
            "Secret",
            str_at(vol, &["secret", "secretName"]),
        );
        for source in items(vol, &["projected", "sources"]) {
            push(
                &mut out,
                "v1",
                "ConfigMap",
                str_at(source, &["configMap", "name"]),
            );
            push(
                &mut out,
                "v1",
                "Secret",
                str_at(source, &["secret", "name"]),
            );
        }
    }
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for c in items(pod, &["spec", list]) {
            for env in items(c, &["env"]) {
                push(
                    &mut out,
                    "v1",
                    "ConfigMap",
                    str_at(env, &["valueFrom", "configMapKeyRef", "name"]),
                );
                push(
                    &mut out,
                    "v1",
                    "Secret",
                    str_at(env, &["valueFrom", "secretKeyRef", "name"]),
                );
            }
            for from in items(c, &["envFrom"]) {
                push(
                    &mut out,
                    "v1",
                    "ConfigMap",
                    str_at(from, &["configMapRef", "name"]),
                );
                push(
                    &mut out,
                    "v1",
                    "Secret",
                    str_at(from, &["secretRef", "name"]),
                );
            }
        }
    }
    for s in items(pod, &["spec", "imagePullSecrets"]) {
        push(&mut out, "v1", "Secret", str_at(s, &["name"]));
    }
    for owner in items(pod, &["metadata", "ownerReferences"]) {
        let api_version = str_at(owner, &["apiVersion"]).unwrap_or_default();
        let kind = str_at(owner, &["kind"]).unwrap_or_default();
        if api_version == SEDNA
            && let Some(k) = WORKLOAD_KINDS.iter().find(|k| **k == kind)
        {
            push(&mut out, SEDNA, k, str_at(owner, &["name"]));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Models and Datasets a workload of `kind` names.
pub fn workload_references(kind: &str, w: &Value) -> Vec<Reference> {
    let mut out = Vec::new();
    let mut add =
        |k: &'static str, path: &[&str], v: &Value| push(&mut out, SEDNA, k, str_at(v, path));
    match kind {
        "JointInferenceService" => {
            add("Model", &["spec", "edgeWorker", "model", "name"], w);
            add("Model", &["spec", "cloudWorker", "model", "name"], w);
        }
        "IncrementalLearningJob" => {
            add("Dataset", &["spec", "dataset", "name"], w);
            add("Model", &["spec", "initialModel", "name"], w);
            add(
                "Model",
                &["spec", "evalSpec", "initialEvalModel", "name"],
                w,
            );
            add("Model", &["spec", "deploySpec", "model", "name"], w);
        }
        "FederatedLearningJob" => {
            add("Model", &["spec", "aggregationWorker", "model", "name"], w);
            add("Model", &["spec", "pretrainedModel", "name"], w);
            for t in items(w, &["spec", "trainingWorkers"]) {
                add("Dataset", &["dataset", "name"], t);
            }
        }
        _ => {}
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pods_name_their_configmaps_secrets_and_owners_only() {
        let pod = json!({
            "metadata": { "ownerReferences": [
                { "apiVersion": "sedna.io/v1alpha1", "kind": "FederatedLearningJob", "name": "fl" },
                { "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs" } ] },
            "spec": {
                "volumes": [ { "name": "a", "configMap": { "name": "cm1" } },
                             { "name": "b", "secret": { "secretName": "s1" } },
                             { "name": "c", "projected": { "sources": [ { "secret": { "name": "s2" } } ] } } ],
                "containers": [ { "name": "x", "env": [
                    { "name": "K", "valueFrom": { "configMapKeyRef": { "name": "cm2", "key": "k" } } } ] } ],
                "imagePullSecrets": [ { "name": "pull" } ] } });
        let names: Vec<(&str, String)> = pod_references(&pod)
            .into_iter()
            .map(|r| (r.kind, r.name))
            .collect();
        assert_eq!(
            names,
            vec![
                ("FederatedLearningJob", "fl".to_owned()),
                ("ConfigMap", "cm1".to_owned()),
                ("ConfigMap", "cm2".to_owned()),
                ("Secret", "pull".to_owned()),
                ("Secret", "s1".to_owned()),
                ("Secret", "s2".to_owned()),
            ]
        );
    }

    #[test]
    fn workloads_name_their_models_and_datasets() {
        let il = json!({ "spec": { "dataset": { "name": "d" }, "initialModel": { "name": "m0" },
                                   "deploySpec": { "model": { "name": "m1" } } } });
        let refs = workload_references("IncrementalLearningJob", &il);
        assert_eq!(refs.len(), 3);
        assert!(refs.iter().all(|r| r.api_version == "sedna.io/v1alpha1"));
        assert!(workload_references("Pod", &il).is_empty());
    }
}
