//! The local controller's dataset monitor: counts the samples of the Datasets placed on this
//! node (`spec.nodeName`) and reports `status.numberOfSamples`, `phase` and `updateTime`
//! upstream through the outbox whenever the count changes (also offline: the report waits).
//!
//! Counting follows the index formats: `txt` counts non-empty, non-comment lines; `csv`
//! counts rows after the header; `dir` counts the files below the directory. Datasets in
//! object storage (`s3://`) are counted where they are read, by their workers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sedna_proto::channel::{ObjectRef, Upstream, upstream::Kind as UpstreamKind};
use serde_json::{Value, json};

use crate::runtime::Reporter;
use crate::store::EdgeStore;

/// The most files or lines counted in one dataset.
pub const MAX_SAMPLES: u64 = 100_000_000;

/// What a dataset's count came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Count {
    /// Samples found.
    Samples(u64),
    /// Not countable here (why).
    Unreadable(String),
}

pub(crate) fn local_path(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("file://").unwrap_or(url);
    (path.starts_with('/') && !url.contains("://") || url.starts_with("file://"))
        .then(|| PathBuf::from(path))
}

/// Counts the samples of a dataset index.
pub fn count(format: &str, path: &Path) -> Count {
    let unreadable = |e: std::io::Error| Count::Unreadable(format!("{}: {e}", path.display()));
    match format {
        "txt" | "csv" => match std::fs::read_to_string(path) {
            Err(e) => unreadable(e),
            Ok(text) => {
                let lines = text
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                    .count() as u64;
                Count::Samples(if format == "csv" {
                    lines.saturating_sub(1)
                } else {
                    lines
                })
            }
        },
        "dir" => {
            let mut files = 0u64;
            let mut stack = vec![path.to_path_buf()];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) => return unreadable(e),
                };
                for entry in entries.flatten() {
                    match entry.file_type() {
                        Ok(t) if t.is_dir() => stack.push(entry.path()),
                        Ok(t) if t.is_file() => files += 1,
                        _ => {}
                    }
                    if files >= MAX_SAMPLES {
                        return Count::Samples(files);
                    }
                }
            }
            Count::Samples(files)
        }
        "idx" => {
            // The images file's header: magic 0x00000803, then the count (big-endian).
            let mut header = [0u8; 8];
            let read = std::fs::File::open(path).and_then(|file| {
                use std::io::Read;
                if path.extension().is_some_and(|e| e == "gz") {
                    flate2::read::GzDecoder::new(file).read_exact(&mut header)
                } else {
                    let mut file = file;
                    file.read_exact(&mut header)
                }
            });
            match read {
                Err(e) => unreadable(e),
                Ok(()) if header[..4] != [0, 0, 8, 3] => {
                    Count::Unreadable(format!("{}: not an IDX file of images", path.display()))
                }
                Ok(()) => Count::Samples(u64::from(u32::from_be_bytes([
                    header[4], header[5], header[6], header[7],
                ]))),
            }
        }
        other => Count::Unreadable(format!("unknown format {other:?}")),
    }
}

/// Counts the node's datasets every `interval` and reports changes.
pub async fn run(node: String, store: EdgeStore, reporter: Arc<dyn Reporter>, interval: Duration) {
    let mut reported: HashMap<String, Count> = HashMap::new();
    loop {
        if let Ok(datasets) = store.list("Dataset") {
            for d in datasets {
                let Ok(value) = serde_json::from_slice::<Value>(&d.value) else {
                    continue;
                };
                if value.pointer("/spec/nodeName").and_then(Value::as_str) != Some(node.as_str()) {
                    continue;
                }
                let url = value
                    .pointer("/spec/url")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let format = value
                    .pointer("/spec/format")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let Some(path) = local_path(url) else {
                    continue;
                };
                let counted = count(format, &path);
                if reported.get(&d.uid) == Some(&counted) {
                    continue;
                }
                let now = jiff::Timestamp::now().to_string();
                let status = match &counted {
                    Count::Samples(n) => json!({
                        "phase": "Ready", "numberOfSamples": n, "updateTime": now,
                        "conditions": [{"type": "Ready", "status": "True", "reason": "Counted",
                                        "lastTransitionTime": now,
                                        "message": format!("{n} samples on node {node}")}],
                    }),
                    Count::Unreadable(why) => json!({
                        "phase": "Failed", "updateTime": now,
                        "conditions": [{"type": "Ready", "status": "False", "reason": "Unreadable",
                                        "lastTransitionTime": now, "message": why}],
                    }),
                };
                let upstream = Upstream {
                    kind: UpstreamKind::Status as i32,
                    object: Some(ObjectRef {
                        api_version: d.api_version.clone(),
                        kind: d.kind.clone(),
                        namespace: d.namespace.clone(),
                        name: d.name.clone(),
                        uid: d.uid.clone(),
                    }),
                    payload: json!({ "status": status }).to_string().into_bytes(),
                };
                match reporter.report(&upstream) {
                    Ok(_) => {
                        reported.insert(d.uid.clone(), counted);
                    }
                    Err(e) => {
                        tracing::warn!(dataset = %d.name, error = %e, "dataset count not queued")
                    }
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_counted_per_format() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("train.txt");
        std::fs::write(&txt, "# header comment\na.jpg 1\n\nb.jpg 0\nc.jpg 1\n").unwrap();
        assert_eq!(count("txt", &txt), Count::Samples(3));
        let csv = dir.path().join("data.csv");
        std::fs::write(&csv, "temp,label\n21,ok\n35,alarm\n").unwrap();
        assert_eq!(count("csv", &csv), Count::Samples(2));
        let images = dir.path().join("images");
        std::fs::create_dir_all(images.join("cats")).unwrap();
        for f in ["a.jpg", "b.jpg", "cats/c.jpg"] {
            std::fs::write(images.join(f), b"x").unwrap();
        }
        assert_eq!(count("dir", &images), Count::Samples(3));
        let shard = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/mnist/shards/client-0-images.idx3-ubyte.gz");
        assert_eq!(count("idx", &shard), Count::Samples(2054));
        assert!(matches!(count("idx", &csv), Count::Unreadable(m) if m.contains("not an IDX")));
        assert!(
            matches!(count("txt", &dir.path().join("none.txt")), Count::Unreadable(m) if m.contains("none.txt"))
        );
        assert_eq!(local_path("s3://bucket/key"), None);
        assert_eq!(
            local_path("file:///data/x.txt"),
            Some(PathBuf::from("/data/x.txt"))
        );
        assert_eq!(
            local_path("/data/x.txt"),
            Some(PathBuf::from("/data/x.txt"))
        );
    }
}
