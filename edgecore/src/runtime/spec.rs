//! From a Pod to what to run: for each container the program, its arguments, environment and
//! working directory, and the volumes to materialise. Pure functions of the pod and the
//! objects it refers to (looked up through a closure), so they are tested without processes.
//!
//! How containers map to processes (there is no image to pull on the node):
//! - `command[0]`, when given, is the program (absolute, or looked up in the node's program
//!   directory, then `PATH`); the rest of `command` and all of `args` are its arguments.
//! - Otherwise the image names the program: its last path component without tag or digest
//!   (`registry.example.com/sedna/edge-worker:v1` → `edge-worker`), with `args` as arguments.
//! - A volume cannot be mounted at `mountPath` without container isolation; each mounted
//!   volume's directory on the node is given to the process as `SEDNA_MOUNT_<NAME>` (name
//!   upper-cased, `-` → `_`), and `SEDNA_POD_DIR` names the pod's directory. An environment
//!   value or argument that is a `mountPath` or a path under one is rewritten to the volume's
//!   directory (`SEDNA_CREDENTIALS_DIR=/var/run/secrets/sedna/credentials` names the mounted
//!   Secret's files), so manifests written for containers work unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Volume};

/// Why a container cannot be started (reported as the container's waiting reason).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A referenced ConfigMap, Secret or key is missing.
    #[error("{0}")]
    CreateContainerConfigError(String),
    /// The program cannot be found.
    #[error("{0}")]
    ProgramNotFound(String),
    /// A name the runtime turns into a path is not a valid name (it could leave the pod's
    /// directory). Not retryable: the pod must be fixed.
    #[error("{0}")]
    InvalidName(String),
}

impl SpecError {
    /// The Kubernetes waiting reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::CreateContainerConfigError(_) => "CreateContainerConfigError",
            SpecError::ProgramNotFound(_) => "ErrImagePull",
            SpecError::InvalidName(_) => "CreateContainerConfigError",
        }
    }

    /// Whether the pod may start later (once the missing object arrives).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SpecError::InvalidName(_))
    }
}

/// What one container runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    /// Container name.
    pub name: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment (only these variables, plus `PATH` and `HOME` from the agent).
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub working_dir: PathBuf,
    /// Memory limit in bytes, if any.
    pub memory_limit: Option<u64>,
    /// CPU limit in millicores, if any.
    pub cpu_limit_millis: Option<u64>,
    /// The uid (and gid) it runs under; `None`: the agent's.
    pub run_as: Option<u32>,
}

/// A ConfigMap's or Secret's data as strings (Secret values decoded).
pub type Data = BTreeMap<String, Vec<u8>>;

/// Looks up `(kind, namespace, name)` → its data; `None` when absent.
pub type Lookup<'a> = dyn Fn(&str, &str, &str) -> Option<Data> + 'a;

/// A volume to create under the pod directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumePlan {
    /// An empty directory.
    Empty,
    /// Files from a ConfigMap's or Secret's data; `private` for secrets (mode 0600).
    Files {
        /// File name → content.
        files: BTreeMap<String, Vec<u8>>,
        /// Whether the files hold secrets.
        private: bool,
    },
    /// A directory of the node.
    Host {
        /// The path.
        path: PathBuf,
        /// Create it when missing (`DirectoryOrCreate`).
        create: bool,
    },
}

/// The program an image names.
pub fn program_of_image(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last).to_owned()
}

/// Finds a program: absolute as is; else in `program_dirs`, then in `PATH`.
pub fn resolve_program(name: &str, program_dirs: &[PathBuf]) -> Result<PathBuf, SpecError> {
    let path = Path::new(name);
    if path.is_absolute() {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(SpecError::ProgramNotFound(format!(
                "program {name} does not exist"
            )))
        };
    }
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    program_dirs
        .iter()
        .chain(from_path.iter())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            SpecError::ProgramNotFound(format!(
                "no program {name:?} in the node's program directories or PATH (the image \
                 names the program to run; see the edge runtime docs)"
            ))
        })
}

/// The env var name of a mounted volume's directory.
pub fn mount_env(volume: &str) -> String {
    format!(
        "SEDNA_MOUNT_{}",
        volume.to_uppercase().replace(['-', '.'], "_")
    )
}

fn parse_quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let (number, unit) = q
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((q, ""), |i| q.split_at(i));
    let n: f64 = number.parse().ok()?;
    let factor: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        _ => return None,
    };
    Some((n * factor) as u64)
}

fn parse_cpu_millis(q: &str) -> Option<u64> {
    let q = q.trim();
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0) as u64),
    }
}

fn text(data: &Data, key: &str) -> Option<String> {
    data.get(key)
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

/// Resolves one environment variable.
fn env_value(
    pod: &Pod,
    var: &EnvVar,
    ns: &str,
    node: &str,
    host_ip: &str,
    lookup: &Lookup<'_>,
) -> Result<Option<String>, SpecError> {
    if let Some(v) = &var.value {
        return Ok(Some(v.clone()));
    }
    let Some(from) = &var.value_from else {
        return Ok(Some(String::new()));
    };
    let missing = |what: String| SpecError::CreateContainerConfigError(what);
    if let Some(r) = &from.config_map_key_ref {
        let data = lookup("ConfigMap", ns, &r.name);
        return match data.and_then(|d| text(&d, &r.key)) {
            Some(v) => Ok(Some(v)),
            None if r.optional == Some(true) => Ok(None),
            None => Err(missing(format!(
                "configmap {:?} or its key {:?} not found",
                r.name, r.key
            ))),
        };
    }
    if let Some(r) = &from.secret_key_ref {
        let data = lookup("Secret", ns, &r.name);
        return match data.and_then(|d| text(&d, &r.key)) {
            Some(v) => Ok(Some(v)),
            None if r.optional == Some(true) => Ok(None),
            None => Err(missing(format!(
                "secret {:?} or its key {:?} not found",
                r.name, r.key
            ))),
        };
    }
    if let Some(f) = &from.field_ref {
        let meta = &pod.metadata;
        let value = match f.field_path.as_str() {
            "metadata.name" => meta.name.clone().unwrap_or_default(),
            "metadata.namespace" => ns.to_owned(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            "spec.nodeName" => node.to_owned(),
            "spec.serviceAccountName" => pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            "status.podIP" | "status.hostIP" => host_ip.to_owned(),
            other => {
                if let Some(label) = other
                    .strip_prefix("metadata.labels['")
                    .and_then(|l| l.strip_suffix("']"))
                {
                    meta.labels
                        .as_ref()
                        .and_then(|l| l.get(label).cloned())
                        .unwrap_or_default()
                } else if let Some(a) = other
                    .strip_prefix("metadata.annotations['")
                    .and_then(|l| l.strip_suffix("']"))
                {
                    meta.annotations
                        .as_ref()
                        .and_then(|l| l.get(a).cloned())
                        .unwrap_or_default()
                } else {
                    return Err(missing(format!("unsupported fieldRef {other:?}")));
                }
            }
        };
        return Ok(Some(value));
    }
    Ok(Some(String::new()))
}

/// Everything needed to start one container.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    pod: &Pod,
    container: &Container,
    node: &str,
    host_ip: &str,
    pod_dir: &Path,
    volume_dirs: &BTreeMap<String, PathBuf>,
    program_dirs: &[PathBuf],
    lookup: &Lookup<'_>,
) -> Result<Launch, SpecError> {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut env = BTreeMap::new();
    for from in container.env_from.as_deref().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional) = match (&from.config_map_ref, &from.secret_ref) {
            (Some(c), _) => ("ConfigMap", c.name.clone(), c.optional == Some(true)),
            (None, Some(s)) => ("Secret", s.name.clone(), s.optional == Some(true)),
            _ => continue,
        };
        match lookup(kind, &ns, &name) {
            Some(data) => {
                for (k, v) in data {
                    env.insert(
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
            None if optional => {}
            None => {
                return Err(SpecError::CreateContainerConfigError(format!(
                    "{} {name:?} not found",
                    kind.to_lowercase()
                )));
            }
        }
    }
    for var in container.env.as_deref().unwrap_or_default() {
        if let Some(v) = env_value(pod, var, &ns, node, host_ip, lookup)? {
            env.insert(var.name.clone(), v);
        }
    }
    env.insert("SEDNA_POD_DIR".into(), pod_dir.display().to_string());
    let mut mounted: Vec<(String, String)> = Vec::new();
    for mount in container.volume_mounts.as_deref().unwrap_or_default() {
        if let Some(dir) = volume_dirs.get(&mount.name) {
            let path = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => dir.join(sub),
                None => dir.clone(),
            };
            let at = mount.mount_path.trim_end_matches('/');
            if at.starts_with('/') && at.len() > 1 {
                mounted.push((at.to_owned(), path.display().to_string()));
            }
            env.insert(mount_env(&mount.name), path.display().to_string());
        }
    }
    // The longest mount path first, so nested mounts resolve to the innermost volume.
    mounted.sort_by_key(|(at, _)| std::cmp::Reverse(at.len()));
    let relocate = |value: &str| -> Option<String> {
        mounted.iter().find_map(|(at, dir)| {
            let rest = value.strip_prefix(at.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then(|| format!("{dir}{rest}"))
        })
    };
    for value in env.values_mut() {
        if let Some(moved) = relocate(value) {
            *value = moved;
        }
    }
    let command = container.command.clone().unwrap_or_default();
    let mut args: Vec<String> = Vec::new();
    let program_name = match command.split_first() {
        Some((first, rest)) => {
            args.extend(rest.iter().cloned());
            first.clone()
        }
        None => program_of_image(container.image.as_deref().unwrap_or_default()),
    };
    args.extend(container.args.clone().unwrap_or_default());
    let expand = |s: &str| {
        let mut out = s.to_owned();
        for (k, v) in &env {
            out = out.replace(&format!("$({k})"), v);
        }
        out
    };
    let args = args
        .iter()
        .map(|a| {
            let a = expand(a);
            relocate(&a).unwrap_or(a)
        })
        .collect();
    let program = resolve_program(&expand(&program_name), program_dirs)?;
    let working_dir = container
        .working_dir
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| pod_dir.to_owned());
    let limits = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    Ok(Launch {
        name: container.name.clone(),
        program,
        args,
        env,
        working_dir,
        memory_limit: limits
            .get("memory")
            .and_then(|q| parse_quantity_bytes(&q.0)),
        cpu_limit_millis: limits.get("cpu").and_then(|q| parse_cpu_millis(&q.0)),
        run_as: None,
    })
}

/// A DNS-1123 label: lowercase letters, digits and `-`, starting and ending with a letter or
/// digit, at most 63 characters (what Kubernetes requires of container and volume names).
pub fn dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A name the runtime puts in a path component: no separators, not `.` or `..`, not empty.
fn path_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// Checks every name the runtime turns into a path — the pod's namespace, name and uid, its
/// containers' and volumes' names — before anything is created (the API server validates
/// them too; the node does not rely on it).
pub fn check_names(pod: &Pod) -> Result<(), SpecError> {
    let bad = |what: &str, name: &str| {
        Err(SpecError::InvalidName(format!(
            "{what} {name:?} is not a valid name (a DNS-1123 label)"
        )))
    };
    for (what, name) in [
        (
            "namespace",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        ),
        ("pod name", pod.metadata.name.as_deref().unwrap_or_default()),
        ("pod uid", pod.metadata.uid.as_deref().unwrap_or_default()),
    ] {
        if !path_component(name) {
            return bad(what, name);
        }
    }
    let spec = pod.spec.as_ref();
    for c in spec.iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    }) {
        if !dns_label(&c.name) {
            return bad("container", &c.name);
        }
    }
    for v in spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        if !dns_label(&v.name) {
            return bad("volume", &v.name);
        }
    }
    Ok(())
}

/// What each volume of the pod becomes.
pub fn volumes(pod: &Pod, lookup: &Lookup<'_>) -> Result<BTreeMap<String, VolumePlan>, SpecError> {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut out = BTreeMap::new();
    let spec_volumes: &[Volume] = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default();
    for v in spec_volumes {
        let plan = if let Some(cm) = &v.config_map {
            match lookup("ConfigMap", &ns, &cm.name) {
                Some(data) => VolumePlan::Files {
                    files: select(data, cm.items.as_deref()),
                    private: false,
                },
                None if cm.optional == Some(true) => VolumePlan::Empty,
                None => {
                    return Err(SpecError::CreateContainerConfigError(format!(
                        "configmap {:?} not found",
                        cm.name
                    )));
                }
            }
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            match lookup("Secret", &ns, &name) {
                Some(data) => VolumePlan::Files {
                    files: select(data, s.items.as_deref()),
                    private: true,
                },
                None if s.optional == Some(true) => VolumePlan::Empty,
                None => {
                    return Err(SpecError::CreateContainerConfigError(format!(
                        "secret {name:?} not found"
                    )));
                }
            }
        } else if let Some(h) = &v.host_path {
            VolumePlan::Host {
                path: PathBuf::from(&h.path),
                create: h.type_.as_deref() == Some("DirectoryOrCreate"),
            }
        } else {
            VolumePlan::Empty
        };
        out.insert(v.name.clone(), plan);
    }
    Ok(out)
}

fn select(
    data: Data,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> BTreeMap<String, Vec<u8>> {
    match items {
        None => data,
        Some(items) => items
            .iter()
            .filter_map(|i| data.get(&i.key).map(|v| (i.path.clone(), v.clone())))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_that_would_leave_the_pod_directory_are_refused() {
        let pod = |container: &str, volume: &str, name: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": name, "namespace": "default", "uid": "u-1" },
                "spec": { "containers": [{ "name": container }],
                          "volumes": [{ "name": volume, "emptyDir": {} }] }
            }))
            .unwrap()
        };
        assert!(check_names(&pod("worker", "data", "p")).is_ok());
        for (c, v, n) in [
            ("../../x", "data", "p"),
            ("worker", "../etc", "p"),
            ("worker", "Data", "p"),
            ("worker", "data", ".."),
            ("worker", "data", "a/b"),
        ] {
            let err = check_names(&pod(c, v, n)).unwrap_err();
            assert!(!err.is_retryable(), "{err}");
            assert!(err.to_string().contains("is not a valid name"), "{err}");
        }
    }

    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({ "metadata": { "name": "p", "namespace": "ns", "uid": "u1",
                                                     "labels": { "app": "demo" } },
                                       "spec": spec }),
        )
        .unwrap()
    }

    fn lookup(kind: &str, ns: &str, name: &str) -> Option<Data> {
        match (kind, ns, name) {
            ("ConfigMap", "ns", "settings") => Some(BTreeMap::from([
                ("MODE".to_owned(), b"edge".to_vec()),
                ("threshold".to_owned(), b"0.9".to_vec()),
            ])),
            ("Secret", "ns", "s3") => Some(BTreeMap::from([("key".to_owned(), b"AKIA".to_vec())])),
            _ => None,
        }
    }

    #[test]
    fn images_name_programs() {
        assert_eq!(program_of_image("sedna-edge-worker"), "sedna-edge-worker");
        assert_eq!(
            program_of_image("registry.example.com/sedna/edge-worker:v1"),
            "edge-worker"
        );
        assert_eq!(program_of_image("worker@sha256:abc"), "worker");
    }

    #[test]
    fn command_args_env_and_mounts_become_a_process() {
        let p = pod(json!({ "nodeName": "edge-1", "containers": [{
            "name": "c", "command": ["sh", "-c"], "args": ["echo $(CFG_MODE) > out"],
            "env": [
                { "name": "THRESHOLD", "valueFrom": { "configMapKeyRef": { "name": "settings", "key": "threshold" } } },
                { "name": "POD", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                { "name": "NODE", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
                { "name": "APP", "valueFrom": { "fieldRef": { "fieldPath": "metadata.labels['app']" } } },
                { "name": "LITERAL", "value": "x" }
            ],
            "envFrom": [{ "configMapRef": { "name": "settings" }, "prefix": "CFG_" }],
            "volumeMounts": [{ "name": "out-dir", "mountPath": "/data" }],
            "resources": { "limits": { "memory": "64Mi", "cpu": "500m" } } }] }));
        let container = &p.spec.as_ref().unwrap().containers[0];
        let dirs = BTreeMap::from([("out-dir".to_owned(), PathBuf::from("/pods/u1/out-dir"))]);
        let l = launch(
            &p,
            container,
            "edge-1",
            "10.0.0.5",
            Path::new("/pods/u1"),
            &dirs,
            &[],
            &lookup,
        )
        .unwrap();
        assert!(l.program.ends_with("sh"));
        assert_eq!(l.args, ["-c", "echo edge > out"]);
        assert_eq!(l.env["THRESHOLD"], "0.9");
        assert_eq!(l.env["POD"], "p");
        assert_eq!(l.env["NODE"], "edge-1");
        assert_eq!(l.env["APP"], "demo");
        assert_eq!(l.env["CFG_MODE"], "edge");
        assert_eq!(l.env["SEDNA_MOUNT_OUT_DIR"], "/pods/u1/out-dir");
        assert_eq!(l.memory_limit, Some(64 * 1024 * 1024));
        assert_eq!(l.cpu_limit_millis, Some(500));
        assert_eq!(l.working_dir, PathBuf::from("/pods/u1"));
    }

    #[test]
    fn mount_paths_in_env_and_args_name_the_volumes_directories() {
        let p = pod(json!({ "nodeName": "edge-1", "containers": [{
            "name": "c", "command": ["sh", "/app/run.sh", "/var/run/secrets/sedna/credentials/key"],
            "env": [
                { "name": "SEDNA_CREDENTIALS_DIR", "value": "/var/run/secrets/sedna/credentials" },
                { "name": "TOKEN_FILE", "value": "/var/run/secrets/sedna/service/token" },
                { "name": "ELSEWHERE", "value": "/var/run/secrets/sedna/credentials-old" },
                { "name": "PLAIN", "value": "/app" }
            ],
            "volumeMounts": [
                { "name": "creds", "mountPath": "/var/run/secrets/sedna/credentials" },
                { "name": "token", "mountPath": "/var/run/secrets/sedna/service/" },
                { "name": "app", "mountPath": "/app" },
                { "name": "root", "mountPath": "/" }
            ] }] }));
        let container = &p.spec.as_ref().unwrap().containers[0];
        let dirs = BTreeMap::from([
            ("creds".to_owned(), PathBuf::from("/pods/u1/volumes/creds")),
            ("token".to_owned(), PathBuf::from("/pods/u1/volumes/token")),
            ("app".to_owned(), PathBuf::from("/pods/u1/volumes/app")),
            ("root".to_owned(), PathBuf::from("/pods/u1/volumes/root")),
        ]);
        let l = launch(
            &p,
            container,
            "edge-1",
            "10.0.0.5",
            Path::new("/pods/u1"),
            &dirs,
            &[],
            &lookup,
        )
        .unwrap();
        assert_eq!(l.env["SEDNA_CREDENTIALS_DIR"], "/pods/u1/volumes/creds");
        assert_eq!(l.env["TOKEN_FILE"], "/pods/u1/volumes/token/token");
        assert_eq!(l.env["ELSEWHERE"], "/var/run/secrets/sedna/credentials-old");
        assert_eq!(l.env["PLAIN"], "/pods/u1/volumes/app");
        assert_eq!(
            l.args,
            ["/pods/u1/volumes/app/run.sh", "/pods/u1/volumes/creds/key"]
        );
    }

    #[test]
    fn missing_references_and_programs_are_container_config_errors() {
        let p = pod(json!({ "containers": [{ "name": "c", "image": "sh",
            "env": [{ "name": "K", "valueFrom": { "secretKeyRef": { "name": "gone", "key": "k" } } }] }] }));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let err = launch(
            &p,
            c,
            "n",
            "",
            Path::new("/p"),
            &BTreeMap::new(),
            &[],
            &lookup,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "CreateContainerConfigError");
        assert!(err.to_string().contains("\"gone\""));
        let p =
            pod(json!({ "containers": [{ "name": "c", "image": "no-such-program-anywhere" }] }));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let err = launch(
            &p,
            c,
            "n",
            "",
            Path::new("/p"),
            &BTreeMap::new(),
            &[],
            &lookup,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "ErrImagePull");
    }

    #[test]
    fn volumes_plan_files_with_secrets_private() {
        let p = pod(json!({ "containers": [], "volumes": [
            { "name": "cfg", "configMap": { "name": "settings", "items": [{ "key": "MODE", "path": "mode.txt" }] } },
            { "name": "creds", "secret": { "secretName": "s3" } },
            { "name": "scratch", "emptyDir": {} },
            { "name": "video", "hostPath": { "path": "/srv/video", "type": "DirectoryOrCreate" } } ] }));
        let plan = volumes(&p, &lookup).unwrap();
        assert_eq!(
            plan["cfg"],
            VolumePlan::Files {
                files: BTreeMap::from([("mode.txt".to_owned(), b"edge".to_vec())]),
                private: false
            }
        );
        assert!(matches!(
            &plan["creds"],
            VolumePlan::Files { private: true, .. }
        ));
        assert_eq!(plan["scratch"], VolumePlan::Empty);
        assert_eq!(
            plan["video"],
            VolumePlan::Host {
                path: "/srv/video".into(),
                create: true
            }
        );
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(parse_quantity_bytes("2Gi"), Some(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_quantity_bytes("64M"), Some(64_000_000));
        assert_eq!(parse_cpu_millis("100m"), Some(100));
        assert_eq!(parse_cpu_millis("1.5"), Some(1500));
    }
}
