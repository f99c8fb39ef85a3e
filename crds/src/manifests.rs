//! The CRD manifests in `crds/manifests/`: their file names, their YAML text, and the check
//! that the files in the repository are what the types generate.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The command that regenerates the manifests, quoted in their header and in drift errors.
pub const REGENERATE: &str = "cargo run -p sedna-cli -- crds --out-dir crds/manifests";

/// Why manifests could not be rendered, written or compared.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A CRD could not be serialized to YAML.
    #[error("cannot render {name} as YAML: {source}")]
    Render {
        /// Name of the CRD.
        name: String,
        /// The serializer's error.
        source: serde_norway::Error,
    },
    /// A manifest file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl ManifestError {
    /// Whether trying again could succeed (an I/O error may be transient).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ManifestError::Io { .. })
    }
}

/// File name of a CRD's manifest: `<group>_<plural>.yaml`, as Sedna and kubebuilder name them.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// The YAML text of a CRD's manifest, with a header saying how it was generated.
pub fn render(crd: &CustomResourceDefinition) -> Result<String, ManifestError> {
    let body = serde_norway::to_string(crd).map_err(|source| ManifestError::Render {
        name: crd.metadata.name.clone().unwrap_or_default(),
        source,
    })?;
    let body = quote_yaml11_scalars(&body);
    Ok(format!(
        "# Generated from the Rust types in crds/src by `{REGENERATE}`. Do not edit.\n{body}"
    ))
}

/// Plain scalars that YAML 1.1 parsers (PyYAML, older Go and Ruby parsers) read as something
/// other than a string: `=` (the "value" key) and the 1.1 booleans.
const YAML11_SPECIAL: &[&str] = &[
    "=", "y", "Y", "n", "N", "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off",
    "OFF",
];

/// Quotes the plain scalars of `yaml` (a YAML 1.2 rendering) that YAML 1.1 would misread, so
/// the manifests load the same in every common parser.
fn quote_yaml11_scalars(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len() + 16);
    for line in yaml.lines() {
        let value_start = if let Some(rest) = line.trim_start().strip_prefix("- ") {
            Some(line.len() - rest.len())
        } else {
            line.find(": ").map(|i| i + 2)
        };
        match value_start {
            Some(at) if YAML11_SPECIAL.contains(&&line[at..]) => {
                out.push_str(&line[..at]);
                out.push('\'');
                out.push_str(&line[at..]);
                out.push('\'');
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Every CRD as `(file name, YAML text)`, in [`crate::crds`] order.
pub fn render_all() -> Result<Vec<(String, String)>, ManifestError> {
    crate::crds()
        .iter()
        .map(|crd| Ok((file_name(crd), render(crd)?)))
        .collect()
}

/// Every CRD as one multi-document YAML stream, ready for `kubectl apply -f -`.
pub fn render_stream() -> Result<String, ManifestError> {
    let docs: Vec<String> = render_all()?.into_iter().map(|(_, text)| text).collect();
    Ok(docs.join("---\n"))
}

/// Writes every manifest into `dir` (created if missing) and removes stale `*.yaml` files that
/// no CRD generates. Returns the names of the files written.
pub fn write_all(dir: &Path) -> Result<Vec<String>, ManifestError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ManifestError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let rendered = render_all()?;
    for (name, text) in &rendered {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let generated = rendered.iter().any(|(n, _)| n == name);
        if name.ends_with(".yaml") && !generated {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(rendered.into_iter().map(|(name, _)| name).collect())
}

/// Compares the manifests in `dir` with what the types generate. Returns one line per
/// difference (a file missing, stale, or different); empty when they agree.
pub fn drift(dir: &Path) -> Result<Vec<String>, ManifestError> {
    let mut differences = Vec::new();
    let rendered = render_all()?;
    for (name, text) in &rendered {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == *text => {}
            Ok(on_disk) => {
                let line = first_difference(&on_disk, text);
                differences.push(format!(
                    "{name} differs from the types (first at line {line})"
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                differences.push(format!("{name} is missing"))
            }
            Err(source) => {
                return Err(ManifestError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && !rendered.iter().any(|(n, _)| *n == name) {
            differences.push(format!("{name} is not generated by any type"));
        }
    }
    differences.sort();
    Ok(differences)
}

fn first_difference(a: &str, b: &str) -> usize {
    let mut lines = a.lines().zip(b.lines());
    let same = lines.by_ref().take_while(|(x, y)| x == y).count();
    same + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_follow_group_and_plural() {
        let names: Vec<String> = crate::crds().iter().map(file_name).collect();
        assert!(names.contains(&"sedna.io_jointinferenceservices.yaml".to_owned()));
        assert!(names.contains(&"devices.sedna.io_devicemodels.yaml".to_owned()));
    }

    #[test]
    fn rendering_is_deterministic() {
        assert_eq!(render_all().unwrap(), render_all().unwrap());
    }

    #[test]
    fn drift_names_missing_changed_and_stale_files() {
        let dir = std::env::temp_dir().join(format!("sedna-drift-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_all(&dir).unwrap();
        assert!(drift(&dir).unwrap().is_empty());

        let jis = dir.join("sedna.io_jointinferenceservices.yaml");
        let text = std::fs::read_to_string(&jis).unwrap();
        std::fs::write(&jis, text.replace("- ji\n", "- jis\n")).unwrap();
        std::fs::remove_file(dir.join("sedna.io_models.yaml")).unwrap();
        std::fs::write(dir.join("sedna.io_old.yaml"), "kind: Old\n").unwrap();
        let found = drift(&dir).unwrap();
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("sedna.io_jointinferenceservices.yaml differs"));
        assert_eq!(found[1], "sedna.io_models.yaml is missing");
        assert_eq!(found[2], "sedna.io_old.yaml is not generated by any type");

        write_all(&dir).unwrap();
        assert!(drift(&dir).unwrap().is_empty(), "write_all repairs drift");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod yaml11_tests {
    use super::*;

    #[test]
    fn scalars_yaml_1_1_misreads_are_quoted() {
        let yaml = "enum:\n- '>'\n- =\n- ==\nflag: on\nname: one\n";
        assert_eq!(
            quote_yaml11_scalars(yaml),
            "enum:\n- '>'\n- '='\n- ==\nflag: 'on'\nname: one\n"
        );
        for (_, text) in render_all().unwrap() {
            for line in text.lines() {
                let value = line
                    .trim_start()
                    .strip_prefix("- ")
                    .or_else(|| line.split_once(": ").map(|(_, v)| v));
                assert!(
                    !value.is_some_and(|v| YAML11_SPECIAL.contains(&v)),
                    "unquoted YAML 1.1 scalar: {line}"
                );
            }
        }
    }
}
