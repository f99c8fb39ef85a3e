//! Worker configuration: what the controllers inject into a worker, read with Sedna's
//! environment names into typed fields, with errors naming the variable.
//!
//! Secrets are never read from the environment: storage credentials come from files mounted
//! from a Kubernetes Secret ([`Credentials::load`]). If the environment carries Sedna's
//! `ACCESS_KEY_ID` / `SECRET_ACCESS_KEY`, they are ignored and named in
//! [`Config::ignored_secret_variables`] so the worker can warn.
//!
//! ```
//! use sedna::config::Config;
//! let env = [
//!     ("WORKER_NAME", "helmet-edge-0"),
//!     ("MODEL_URL", "s3://models/edge.onnx"),
//!     ("BIG_MODEL_IP", "10.0.0.7"),
//!     ("HEM_NAME", "Threshold"),
//!     ("HEM_PARAMETERS", r#"[{"key": "threshold", "value": "0.8"}]"#),
//! ];
//! let config = Config::from_lookup(|name| {
//!     env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
//! })?;
//! assert_eq!(config.big_model.as_ref().unwrap().port, 5000);
//! assert!(config.hard_example_mining()?.is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::hem::{self, HardExampleMining};

/// Where storage credentials are mounted unless `SEDNA_CREDENTIALS_DIR` says otherwise.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/var/run/secrets/sedna/credentials";
/// The cloud inference port Sedna uses when `BIG_MODEL_PORT` is unset.
pub const DEFAULT_BIG_MODEL_PORT: u16 = 5000;
/// The aggregation port Sedna uses when `AGG_PORT` is unset.
pub const DEFAULT_AGG_PORT: u16 = 7363;
/// The largest credential file read (a Secret value is at most 1 MiB).
pub const MAX_CREDENTIAL_BYTES: u64 = 1 << 20;

/// A configuration error, naming the variable or file. Never retryable: the worker's
/// configuration must change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable has a value that cannot be used.
    #[error("{variable}={value:?}: {reason}")]
    Invalid {
        /// The environment variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A variable the worker needs is unset or empty.
    #[error("{variable} is not set: {reason}")]
    Missing {
        /// The environment variable.
        variable: &'static str,
        /// Why it is needed.
        reason: &'static str,
    },
    /// A mounted credential file could not be read.
    #[error("credential file {path}: {reason}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// `HEM_NAME` / `HEM_PARAMETERS` do not build an algorithm.
    #[error("HEM_NAME/HEM_PARAMETERS: {0}")]
    Hem(#[from] hem::HemError),
}

impl ConfigError {
    /// Whether trying again unchanged can succeed: never.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// IP address or DNS name.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How FL clients and the aggregator exchange weights (`TRANSMITTER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmitter {
    /// Directly over the aggregator's connection (`ws`, the default).
    Ws,
    /// Through object storage at `AGG_DATA_PATH` (`s3`).
    S3,
}

/// The hard-example mining the service asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HemConfig {
    /// `HEM_NAME`.
    pub name: String,
    /// `HEM_PARAMETERS`, parsed.
    pub parameters: Vec<(String, String)>,
}

/// A worker's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `NAMESPACE`.
    pub namespace: String,
    /// `WORKER_NAME`.
    pub worker_name: String,
    /// `SERVICE_NAME` (joint inference).
    pub service_name: Option<String>,
    /// `JOB_NAME` (learning jobs).
    pub job_name: Option<String>,
    /// `LC_SERVER`: the node's local controller.
    pub lc_server: Option<String>,
    /// `MODEL_URL`.
    pub model_url: Option<String>,
    /// `MODEL_NAME`.
    pub model_name: Option<String>,
    /// `MODEL_URLS`, `;`-separated (an FL job's or an evaluation's models).
    pub model_urls: Vec<String>,
    /// `BASE_MODEL_URL` (or Sedna's older `PRETRAINED_MODEL_URL`).
    pub base_model_url: Option<String>,
    /// `BIG_MODEL_IP` + `BIG_MODEL_PORT` (default 5000): the cloud worker.
    pub big_model: Option<Endpoint>,
    /// `HEM_NAME` + `HEM_PARAMETERS`.
    pub hem: Option<HemConfig>,
    /// `DATASET_URL`.
    pub dataset_url: Option<String>,
    /// `ORIGINAL_DATASET_URL`.
    pub original_dataset_url: Option<String>,
    /// `TRAIN_DATASET_URL`.
    pub train_dataset_url: Option<String>,
    /// `TEST_DATASET_URL`.
    pub test_dataset_url: Option<String>,
    /// `DATA_PATH_PREFIX` (default `/home/data`): where dataset paths are rooted.
    pub data_path_prefix: PathBuf,
    /// `AGG_IP` + `AGG_PORT` (default 7363): the FL aggregator.
    pub aggregator: Option<Endpoint>,
    /// `PARTICIPANTS_COUNT`.
    pub participants_count: Option<u32>,
    /// `TRANSMITTER` (default `ws`).
    pub transmitter: Transmitter,
    /// `AGG_DATA_PATH`.
    pub agg_data_path: Option<String>,
    /// `S3_ENDPOINT_URL` (not a secret).
    pub s3_endpoint_url: Option<String>,
    /// `MODEL_HOT_UPDATE` (default false).
    pub model_hot_update: bool,
    /// `MODEL_POLL_PERIOD_SECONDS` (default 60).
    pub model_poll_period: Duration,
    /// `PARAMETERS`: the job's hyperparameters (Sedna's JSON list of `{key, value}`).
    pub parameters: BTreeMap<String, String>,
    /// `SEDNA_CREDENTIALS_DIR` (default [`DEFAULT_CREDENTIALS_DIR`]).
    pub credentials_dir: PathBuf,
    /// Secret-bearing variables found in the environment and ignored.
    pub ignored_secret_variables: Vec<&'static str>,
}

/// Variables that carry secrets in Sedna and are never read here.
const SECRET_VARIABLES: [&str; 2] = ["ACCESS_KEY_ID", "SECRET_ACCESS_KEY"];

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (tests and embedders pass their own).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let url = |name: &'static str| -> Result<Option<String>, ConfigError> {
            get(name).map(|v| check_url(name, v)).transpose()
        };
        let endpoint = |host_var: &'static str,
                        port_var: &'static str,
                        default_port: u16|
         -> Result<Option<Endpoint>, ConfigError> {
            let port = match get(port_var) {
                None => default_port,
                Some(value) => parse_port(port_var, &value)?,
            };
            match get(host_var) {
                None => Ok(None),
                Some(host) => {
                    check_host(host_var, &host)?;
                    Ok(Some(Endpoint { host, port }))
                }
            }
        };
        let hem = match get("HEM_NAME") {
            None => {
                if get("HEM_PARAMETERS").is_some() {
                    return Err(ConfigError::Missing {
                        variable: "HEM_NAME",
                        reason: "HEM_PARAMETERS is set, so the algorithm must be named",
                    });
                }
                None
            }
            Some(name) => Some(HemConfig {
                name,
                parameters: hem::parse_parameters(&get("HEM_PARAMETERS").unwrap_or_default())?,
            }),
        };
        let parameters = match get("PARAMETERS") {
            None => BTreeMap::new(),
            Some(json) => hem::parse_parameters(&json)
                .map_err(|e| ConfigError::Invalid {
                    variable: "PARAMETERS",
                    value: json.clone(),
                    reason: e.to_string().replace("HEM_PARAMETERS is not", "not"),
                })?
                .into_iter()
                .collect(),
        };
        let participants_count =
            match get("PARTICIPANTS_COUNT") {
                None => None,
                Some(value) => Some(value.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(
                    || ConfigError::Invalid {
                        variable: "PARTICIPANTS_COUNT",
                        value: value.clone(),
                        reason: "not a positive whole number".into(),
                    },
                )?),
            };
        let transmitter = match get("TRANSMITTER").map(|t| t.to_ascii_lowercase()) {
            None => Transmitter::Ws,
            Some(t) if t == "ws" => Transmitter::Ws,
            Some(t) if t == "s3" => Transmitter::S3,
            Some(t) => {
                return Err(ConfigError::Invalid {
                    variable: "TRANSMITTER",
                    value: t,
                    reason: "expected ws or s3".into(),
                });
            }
        };
        let model_hot_update = match get("MODEL_HOT_UPDATE") {
            None => false,
            Some(value) => parse_bool("MODEL_HOT_UPDATE", &value)?,
        };
        let model_poll_period = match get("MODEL_POLL_PERIOD_SECONDS") {
            None => Duration::from_secs(60),
            Some(value) => Duration::from_secs(
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (1..=86_400).contains(s))
                    .ok_or_else(|| ConfigError::Invalid {
                        variable: "MODEL_POLL_PERIOD_SECONDS",
                        value: value.clone(),
                        reason: "not a whole number of seconds between 1 and 86400".into(),
                    })?,
            ),
        };
        let model_urls = match get("MODEL_URLS") {
            None => Vec::new(),
            Some(list) => list
                .split(';')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(|u| check_url("MODEL_URLS", u.to_string()))
                .collect::<Result<_, _>>()?,
        };
        if transmitter == Transmitter::S3 && get("AGG_DATA_PATH").is_none() {
            return Err(ConfigError::Missing {
                variable: "AGG_DATA_PATH",
                reason: "TRANSMITTER=s3 exchanges weights through that path",
            });
        }
        Ok(Config {
            namespace: get("NAMESPACE").unwrap_or_else(|| "default".into()),
            worker_name: get("WORKER_NAME").unwrap_or_default(),
            service_name: get("SERVICE_NAME"),
            job_name: get("JOB_NAME"),
            lc_server: url("LC_SERVER")?,
            model_url: url("MODEL_URL")?,
            model_name: get("MODEL_NAME"),
            model_urls,
            base_model_url: match url("BASE_MODEL_URL")? {
                Some(u) => Some(u),
                None => url("PRETRAINED_MODEL_URL")?,
            },
            big_model: endpoint("BIG_MODEL_IP", "BIG_MODEL_PORT", DEFAULT_BIG_MODEL_PORT)?,
            hem,
            dataset_url: url("DATASET_URL")?,
            original_dataset_url: url("ORIGINAL_DATASET_URL")?,
            train_dataset_url: url("TRAIN_DATASET_URL")?,
            test_dataset_url: url("TEST_DATASET_URL")?,
            data_path_prefix: PathBuf::from(
                get("DATA_PATH_PREFIX").unwrap_or_else(|| "/home/data".into()),
            ),
            aggregator: endpoint("AGG_IP", "AGG_PORT", DEFAULT_AGG_PORT)?,
            participants_count,
            transmitter,
            agg_data_path: url("AGG_DATA_PATH")?,
            s3_endpoint_url: url("S3_ENDPOINT_URL")?,
            model_hot_update,
            model_poll_period,
            parameters,
            credentials_dir: PathBuf::from(
                get("SEDNA_CREDENTIALS_DIR").unwrap_or_else(|| DEFAULT_CREDENTIALS_DIR.into()),
            ),
            ignored_secret_variables: SECRET_VARIABLES
                .into_iter()
                .filter(|name| get(name).is_some())
                .collect(),
        })
    }

    /// `MODEL_URL`, or an error naming it.
    pub fn require_model_url(&self) -> Result<&str, ConfigError> {
        self.model_url.as_deref().ok_or(ConfigError::Missing {
            variable: "MODEL_URL",
            reason: "the worker loads its model from there",
        })
    }

    /// The hard-example mining algorithm `HEM_NAME` names, built from the process-wide
    /// registry with `HEM_PARAMETERS`; `None` when `HEM_NAME` is unset.
    pub fn hard_example_mining(&self) -> Result<Option<Box<dyn HardExampleMining>>, ConfigError> {
        let Some(hem) = &self.hem else {
            return Ok(None);
        };
        let pairs: Vec<(&str, &str)> = hem
            .parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Ok(Some(hem::registry().build(&hem.name, &pairs)?))
    }

    /// A hyperparameter from `PARAMETERS`, parsed, or `default` when absent.
    pub fn parameter<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, ConfigError> {
        match self.parameters.get(key) {
            None => Ok(default),
            Some(value) => value.parse::<T>().map_err(|_| ConfigError::Invalid {
                variable: "PARAMETERS",
                value: format!("{key}={value}"),
                reason: format!("{key} is not a valid {}", std::any::type_name::<T>()),
            }),
        }
    }

    /// The storage credentials mounted in [`Config::credentials_dir`], if any.
    pub fn credentials(&self) -> Result<Option<Credentials>, ConfigError> {
        Credentials::load(&self.credentials_dir)
    }
}

fn check_url(variable: &'static str, value: String) -> Result<String, ConfigError> {
    if value.chars().any(char::is_control) {
        return Err(ConfigError::Invalid {
            variable,
            value,
            reason: "contains control characters".into(),
        });
    }
    if let Some((scheme, rest)) = value.split_once("://") {
        let ok_scheme = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !ok_scheme || rest.is_empty() {
            return Err(ConfigError::Invalid {
                variable,
                value,
                reason: "not a URL (scheme://location) or a path".into(),
            });
        }
    }
    Ok(value)
}

fn check_host(variable: &'static str, host: &str) -> Result<(), ConfigError> {
    let host_ok = host.parse::<std::net::IpAddr>().is_ok()
        || (host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            }));
    if host_ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            variable,
            value: host.into(),
            reason: "not an IP address or a DNS name".into(),
        })
    }
}

fn parse_port(variable: &'static str, value: &str) -> Result<u16, ConfigError> {
    value
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ConfigError::Invalid {
            variable,
            value: value.into(),
            reason: "not a port number (1-65535)".into(),
        })
}

fn parse_bool(variable: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::Invalid {
            variable,
            value: value.into(),
            reason: "expected true or false".into(),
        }),
    }
}

/// Storage credentials read from files mounted from a Kubernetes Secret (one file per key,
/// as kubelet mounts them). `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `SESSION_TOKEN`, when the Secret has one.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Credentials {
    /// Reads `ACCESS_KEY_ID` and `SECRET_ACCESS_KEY` (and `SESSION_TOKEN` if present) from
    /// `dir`. `None` when the directory does not exist (no Secret mounted); an error naming
    /// the file when only part of the pair is there or a file cannot be read.
    pub fn load(dir: &Path) -> Result<Option<Credentials>, ConfigError> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let read = |name: &str| -> Result<Option<String>, ConfigError> {
            let path = dir.join(name);
            let error = |reason: String| ConfigError::Credentials {
                path: path.clone(),
                reason,
            };
            match std::fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(error(e.to_string())),
                Ok(meta) if meta.len() > MAX_CREDENTIAL_BYTES => {
                    return Err(error(format!(
                        "{} bytes, more than the {MAX_CREDENTIAL_BYTES} a credential may have",
                        meta.len()
                    )));
                }
                Ok(_) => {}
            }
            let text = std::fs::read_to_string(&path).map_err(|e| error(e.to_string()))?;
            let value = text.trim().to_string();
            if value.is_empty() {
                return Err(error("empty".into()));
            }
            Ok(Some(value))
        };
        let access = read("ACCESS_KEY_ID")?;
        let secret = read("SECRET_ACCESS_KEY")?;
        match (access, secret) {
            (None, None) => Ok(None),
            (Some(access_key_id), Some(secret_access_key)) => Ok(Some(Credentials {
                access_key_id,
                secret_access_key,
                session_token: read("SESSION_TOKEN")?,
            })),
            (Some(_), None) => Err(ConfigError::Credentials {
                path: dir.join("SECRET_ACCESS_KEY"),
                reason: "missing while ACCESS_KEY_ID is present".into(),
            }),
            (None, Some(_)) => Err(ConfigError::Credentials {
                path: dir.join("ACCESS_KEY_ID"),
                reason: "missing while SECRET_ACCESS_KEY is present".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn sedna_variables_are_read_with_sedna_defaults() {
        let c = config(&[
            ("NAMESPACE", "demo"),
            ("WORKER_NAME", "edge-0"),
            ("SERVICE_NAME", "helmet"),
            ("MODEL_URL", "s3://models/edge.onnx"),
            ("BIG_MODEL_IP", "helmet-cloud.demo"),
            ("AGG_IP", "10.0.0.9"),
            ("AGG_PORT", "8000"),
            ("MODEL_URLS", "file:///a.onnx; s3://b/c.onnx;"),
            ("PARTICIPANTS_COUNT", "3"),
            ("MODEL_HOT_UPDATE", "true"),
            ("MODEL_POLL_PERIOD_SECONDS", "30"),
            ("PARAMETERS", r#"[{"key":"epochs","value":"5"}]"#),
        ])
        .unwrap();
        assert_eq!(c.namespace, "demo");
        assert_eq!(c.service_name.as_deref(), Some("helmet"));
        assert_eq!(
            c.big_model,
            Some(Endpoint {
                host: "helmet-cloud.demo".into(),
                port: 5000
            })
        );
        assert_eq!(c.aggregator.as_ref().unwrap().to_string(), "10.0.0.9:8000");
        assert_eq!(c.model_urls, vec!["file:///a.onnx", "s3://b/c.onnx"]);
        assert_eq!(c.participants_count, Some(3));
        assert!(c.model_hot_update);
        assert_eq!(c.model_poll_period, Duration::from_secs(30));
        assert_eq!(c.parameter("epochs", 1u32).unwrap(), 5);
        assert_eq!(c.parameter("batch_size", 32u32).unwrap(), 32);
        assert_eq!(c.transmitter, Transmitter::Ws);
        assert_eq!(c.data_path_prefix, PathBuf::from("/home/data"));
        assert!(c.hem.is_none());
    }

    #[test]
    fn an_unset_configuration_has_defaults_and_no_endpoints() {
        let c = config(&[]).unwrap();
        assert_eq!(c.namespace, "default");
        assert!(c.big_model.is_none() && c.aggregator.is_none());
        assert!(!c.model_hot_update);
        assert_eq!(c.model_poll_period, Duration::from_secs(60));
        let err = c.require_model_url().unwrap_err().to_string();
        assert!(err.starts_with("MODEL_URL is not set"), "{err}");
    }

    #[test]
    fn every_bad_value_is_refused_naming_its_variable() {
        for (vars, needle) in [
            (
                vec![("BIG_MODEL_IP", "a b"), ("BIG_MODEL_PORT", "5000")],
                "BIG_MODEL_IP=\"a b\": not an IP",
            ),
            (
                vec![("BIG_MODEL_IP", "10.0.0.1"), ("BIG_MODEL_PORT", "70000")],
                "BIG_MODEL_PORT=\"70000\"",
            ),
            (
                vec![("AGG_IP", "h"), ("AGG_PORT", "0")],
                "AGG_PORT=\"0\": not a port",
            ),
            (
                vec![("PARTICIPANTS_COUNT", "-1")],
                "PARTICIPANTS_COUNT=\"-1\"",
            ),
            (
                vec![("MODEL_HOT_UPDATE", "maybe")],
                "MODEL_HOT_UPDATE=\"maybe\": expected true or false",
            ),
            (
                vec![("MODEL_POLL_PERIOD_SECONDS", "0")],
                "MODEL_POLL_PERIOD_SECONDS=\"0\"",
            ),
            (
                vec![("TRANSMITTER", "carrier-pigeon")],
                "TRANSMITTER=\"carrier-pigeon\"",
            ),
            (vec![("TRANSMITTER", "s3")], "AGG_DATA_PATH is not set"),
            (
                vec![("MODEL_URL", "://nowhere")],
                "MODEL_URL=\"://nowhere\"",
            ),
            (vec![("PARAMETERS", "{\"epochs\": 5}")], "PARAMETERS="),
            (vec![("HEM_PARAMETERS", "[]")], "HEM_NAME is not set"),
            (
                vec![
                    ("HEM_NAME", "Threshold"),
                    ("HEM_PARAMETERS", "[{\"value\": 1}]"),
                ],
                "HEM_NAME/HEM_PARAMETERS",
            ),
        ] {
            let err = config(&vars).unwrap_err().to_string();
            assert!(err.contains(needle), "{vars:?}: {err}");
        }
    }

    #[test]
    fn hem_is_built_from_the_registry_with_a_clear_error_for_a_bad_value() {
        let c = config(&[
            ("HEM_NAME", "CrossEntropy"),
            (
                "HEM_PARAMETERS",
                r#"[{"key":"threshold_cross_entropy","value":"0.9"}]"#,
            ),
        ])
        .unwrap();
        assert_eq!(
            c.hard_example_mining().unwrap().unwrap().name(),
            "CrossEntropy"
        );
        let c = config(&[
            ("HEM_NAME", "Threshold"),
            ("HEM_PARAMETERS", r#"[{"key":"threshold","value":"1.5"}]"#),
        ])
        .unwrap();
        let err = c.hard_example_mining().unwrap_err().to_string();
        assert!(err.contains("threshold") && err.contains("1.5"), "{err}");
        let c = config(&[("HEM_NAME", "Magic")]).unwrap();
        let err = c.hard_example_mining().unwrap_err().to_string();
        assert!(
            err.contains("unknown hard-example mining algorithm \"Magic\""),
            "{err}"
        );
    }

    #[test]
    fn credentials_come_from_mounted_files_and_secret_variables_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(&[
            ("SEDNA_CREDENTIALS_DIR", dir.path().to_str().unwrap()),
            ("ACCESS_KEY_ID", "from-env"),
            ("SECRET_ACCESS_KEY", "from-env-secret"),
        ])
        .unwrap();
        assert_eq!(
            c.ignored_secret_variables,
            vec!["ACCESS_KEY_ID", "SECRET_ACCESS_KEY"]
        );
        assert_eq!(c.credentials().unwrap(), None);
        std::fs::write(dir.path().join("ACCESS_KEY_ID"), "AKIAFILE\n").unwrap();
        let err = c.credentials().unwrap_err().to_string();
        assert!(err.contains("SECRET_ACCESS_KEY: missing"), "{err}");
        std::fs::write(dir.path().join("SECRET_ACCESS_KEY"), "s3cr3t").unwrap();
        let creds = c.credentials().unwrap().unwrap();
        assert_eq!(creds.access_key_id, "AKIAFILE");
        assert_eq!(creds.secret_access_key, "s3cr3t");
        let shown = format!("{creds:?} {c:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("from-env-secret"),
            "{shown}"
        );
        let none = Credentials::load(&dir.path().join("absent")).unwrap();
        assert!(none.is_none());
    }
}
