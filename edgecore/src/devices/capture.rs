//! Recording a device's readings into a Dataset on its node: one CSV row per reading
//! (`timestamp,device,property,value`) appended to the Dataset's file, so the node's dataset
//! monitor counts them into `numberOfSamples` and incremental-learning triggers fire on them.
//!
//! Rows are written on the node whatever the hub does. Beyond `maxSamples` rows or `maxBytes`
//! the oldest rows are dropped — down to 90% of the bound, so a full dataset is rewritten once
//! per tenth of its size, not once per row — and the drop is counted and said in an event.
//!
//! The agent writes only below its capture directory: a Dataset's URL elsewhere (or through a
//! symbolic link) is refused, so whoever may create Datasets cannot make the agent write over
//! the node's files.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::{Component, Path, PathBuf};

use sedna_api::dataset::{Dataset, DatasetFormat};
use sedna_api::devices::Device;

/// Rows kept when the Device names no bound.
pub const DEFAULT_MAX_SAMPLES: u64 = 100_000;

/// Bytes kept when the Device names no bound.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// The first line of every capture file.
pub const HEADER: &str = "timestamp,device,property,value\n";

/// Where and what a device records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturePlan {
    /// The Dataset's file.
    pub path: PathBuf,
    /// The properties recorded (empty: all).
    pub properties: BTreeSet<String>,
    /// Rows kept.
    pub max_samples: u64,
    /// Bytes kept.
    pub max_bytes: u64,
}

/// What `device.spec.capture` asks for, checked against its Dataset and the capture directory.
/// `Ok(None)`: nothing is captured.
pub fn plan(
    device: &Device,
    dataset: Option<&Dataset>,
    node: &str,
    capture_dir: &Path,
    frames: bool,
) -> Result<Option<CapturePlan>, String> {
    let Some(capture) = &device.spec.capture else {
        return Ok(None);
    };
    let dataset = dataset.ok_or_else(|| {
        format!(
            "capture: Dataset {:?} is not on this node (its spec.nodeName must be {node})",
            capture.dataset
        )
    })?;
    if dataset.spec.node_name.as_deref() != Some(node) {
        return Err(format!(
            "capture: Dataset {:?} is on node {:?}, not {node}",
            capture.dataset, dataset.spec.node_name
        ));
    }
    let (wanted, what) = if frames {
        (DatasetFormat::Dir, "dir (a camera's frames are files)")
    } else {
        (DatasetFormat::Csv, "csv")
    };
    if dataset.spec.format != wanted {
        return Err(format!(
            "capture: Dataset {:?} must have format {what}",
            capture.dataset
        ));
    }
    let path = crate::datasets::local_path(&dataset.spec.url).ok_or_else(|| {
        format!(
            "capture: Dataset URL {:?} is not a local path",
            dataset.spec.url
        )
    })?;
    let inside = path.strip_prefix(capture_dir).ok().filter(|rest| {
        rest.components().count() > 0
            && rest.components().all(|c| matches!(c, Component::Normal(_)))
    });
    let Some(rest) = inside else {
        return Err(format!(
            "capture: Dataset URL {:?} is outside this node's capture directory {}",
            dataset.spec.url,
            capture_dir.display()
        ));
    };
    let mut at = capture_dir.to_path_buf();
    for part in rest.components() {
        at.push(part);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "capture: {} is a symbolic link; the agent does not follow it",
                at.display()
            ));
        }
    }
    let bound = |v: Option<i64>, default: u64| v.map_or(default, |v| v.max(1) as u64);
    Ok(Some(CapturePlan {
        path,
        properties: capture.properties.iter().cloned().collect(),
        max_samples: bound(capture.max_samples, DEFAULT_MAX_SAMPLES),
        max_bytes: bound(capture.max_bytes, DEFAULT_MAX_BYTES).max(1024),
    }))
}

/// Appends a device's rows to its Dataset's file and keeps it within bounds.
#[derive(Debug)]
pub struct Recorder {
    plan: CapturePlan,
    rows: u64,
    bytes: u64,
    pending: Vec<u8>,
    pending_rows: u64,
    /// Rows dropped since the recorder started.
    pub dropped: u64,
}

impl Recorder {
    /// Opens (or creates, with its header) the Dataset's file and counts what it holds.
    pub fn open(plan: CapturePlan) -> std::io::Result<Recorder> {
        if let Some(dir) = plan.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let (rows, bytes) = match std::fs::File::open(&plan.path) {
            Ok(file) => {
                let bytes = file.metadata()?.len();
                let lines = std::io::BufReader::new(file).lines().count() as u64;
                (lines.saturating_sub(1), bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                append(&plan.path, HEADER.as_bytes())?;
                (0, HEADER.len() as u64)
            }
            Err(e) => return Err(e),
        };
        Ok(Recorder {
            plan,
            rows,
            bytes,
            pending: Vec::new(),
            pending_rows: 0,
            dropped: 0,
        })
    }

    /// The plan it records by.
    pub fn plan(&self) -> &CapturePlan {
        &self.plan
    }

    /// Whether `property` is recorded.
    pub fn records(&self, property: &str) -> bool {
        self.plan.properties.is_empty() || self.plan.properties.contains(property)
    }

    /// Queues a row (written by [`Recorder::flush`]).
    pub fn record(&mut self, at: &str, device: &str, property: &str, value: &str) {
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(&mut self.pending);
        // Values never hold line breaks (the mappers refuse control characters), so a row is
        // one line and the dataset monitor's line count is the row count.
        let _ = w.write_record([at, device, property, value]);
        let _ = w.flush();
        self.pending_rows += 1;
    }

    /// Appends the queued rows; drops the oldest when a bound is passed. Returns how many rows
    /// were dropped.
    pub fn flush(&mut self) -> std::io::Result<u64> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        append(&self.plan.path, &self.pending)?;
        self.rows += self.pending_rows;
        self.bytes += self.pending.len() as u64;
        self.pending.clear();
        self.pending_rows = 0;
        if self.rows <= self.plan.max_samples && self.bytes <= self.plan.max_bytes {
            return Ok(0);
        }
        self.trim()
    }

    /// Rewrites the file with the newest rows within 90% of both bounds.
    fn trim(&mut self) -> std::io::Result<u64> {
        let text = std::fs::read(&self.plan.path)?;
        let body = text
            .strip_prefix(HEADER.as_bytes())
            .unwrap_or(&text[text.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1)..]);
        let lines: Vec<&[u8]> = body
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let keep_rows = (self.plan.max_samples * 9 / 10).max(1) as usize;
        let keep_bytes = (self.plan.max_bytes * 9 / 10) as usize - HEADER.len().min(1024);
        let mut kept = 0usize;
        let mut size = 0usize;
        for line in lines.iter().rev() {
            if kept + 1 > keep_rows || size + line.len() > keep_bytes {
                break;
            }
            kept += 1;
            size += line.len();
        }
        let dropped = (lines.len() - kept) as u64;
        let tmp = self.plan.path.with_extension("csv.trim");
        {
            let mut out = std::fs::File::create(&tmp)?;
            out.write_all(HEADER.as_bytes())?;
            for line in &lines[lines.len() - kept..] {
                out.write_all(line)?;
            }
            out.sync_data()?;
        }
        std::fs::rename(&tmp, &self.plan.path)?;
        self.rows = kept as u64;
        self.bytes = (HEADER.len() + size) as u64;
        self.dropped += dropped;
        Ok(dropped)
    }

    /// Rows the file holds.
    pub fn rows(&self) -> u64 {
        self.rows
    }
}

/// Writes a camera's frames as files into the Dataset's directory (`<device>-<seq>.<ext>`,
/// each written under a hidden name and renamed, so a reader never sees half a frame), and
/// deletes the oldest beyond the bounds.
#[derive(Debug)]
pub struct FrameRecorder {
    plan: CapturePlan,
    files: std::collections::VecDeque<(PathBuf, u64)>,
    bytes: u64,
    next: u64,
    /// Frames deleted since the recorder started.
    pub dropped: u64,
}

impl FrameRecorder {
    /// Opens the directory (created if missing) and takes stock of the frames in it.
    pub fn open(plan: CapturePlan) -> std::io::Result<FrameRecorder> {
        std::fs::create_dir_all(&plan.path)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&plan.path)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !meta.is_file() || name.starts_with('.') {
                continue;
            }
            let seq = name
                .rsplit_once('-')
                .and_then(|(_, rest)| rest.split('.').next()?.parse::<u64>().ok());
            if let Some(seq) = seq {
                found.push((seq, entry.path(), meta.len()));
            }
        }
        found.sort();
        let next = found.last().map_or(0, |(seq, _, _)| seq + 1);
        let bytes = found.iter().map(|(_, _, len)| len).sum();
        Ok(FrameRecorder {
            plan,
            files: found.into_iter().map(|(_, p, len)| (p, len)).collect(),
            bytes,
            next,
            dropped: 0,
        })
    }

    /// The plan it records by.
    pub fn plan(&self) -> &CapturePlan {
        &self.plan
    }

    /// Frames the directory holds.
    pub fn frames(&self) -> u64 {
        self.files.len() as u64
    }

    /// Writes a frame; deletes the oldest beyond the bounds. Returns how many were deleted.
    pub fn record(&mut self, device: &str, extension: &str, frame: &[u8]) -> std::io::Result<u64> {
        use std::os::unix::fs::OpenOptionsExt;
        let name = format!("{device}-{:010}.{extension}", self.next);
        let path = self.plan.path.join(&name);
        let tmp = self.plan.path.join(format!(".{name}.tmp"));
        {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&tmp)?;
            file.write_all(frame)?;
        }
        std::fs::rename(&tmp, &path)?;
        self.next += 1;
        self.files.push_back((path, frame.len() as u64));
        self.bytes += frame.len() as u64;
        let mut dropped = 0;
        while self.files.len() as u64 > self.plan.max_samples
            || (self.bytes > self.plan.max_bytes && self.files.len() > 1)
        {
            let Some((old, len)) = self.files.pop_front() else {
                break;
            };
            let _ = std::fs::remove_file(&old);
            self.bytes -= len;
            dropped += 1;
        }
        self.dropped += dropped;
        Ok(dropped)
    }
}

/// Appends to `path` without following a symbolic link there.
fn append(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device(capture: serde_json::Value) -> Device {
        serde_json::from_value(json!({
            "metadata": { "name": "d", "namespace": "default" },
            "spec": { "deviceModelRef": { "name": "m" }, "nodeName": "edge-1", "capture": capture }
        }))
        .unwrap()
    }

    fn dataset(url: &str, node: &str, format: &str) -> Dataset {
        serde_json::from_value(json!({
            "metadata": { "name": "readings", "namespace": "default" },
            "spec": { "url": url, "format": format, "nodeName": node }
        }))
        .unwrap()
    }

    #[test]
    fn a_capture_writes_only_inside_the_capture_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("captured");
        std::fs::create_dir_all(&root).unwrap();
        let d = device(json!({ "dataset": "readings", "properties": ["t"], "maxSamples": 10 }));
        let inside = format!("{}/site/readings.csv", root.display());
        let plan = plan(
            &d,
            Some(&dataset(&inside, "edge-1", "csv")),
            "edge-1",
            &root,
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(plan.path, PathBuf::from(&inside));
        assert_eq!(plan.max_samples, 10);
        assert_eq!(plan.max_bytes, DEFAULT_MAX_BYTES);
        assert_eq!(
            super::plan(
                &device(serde_json::Value::Null),
                None,
                "edge-1",
                &root,
                false
            ),
            Ok(None)
        );
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        for (url, node, format, wanted) in [
            (
                "/etc/passwd",
                "edge-1",
                "csv",
                "outside this node's capture directory",
            ),
            (
                &format!("{}/../x.csv", root.display())[..],
                "edge-1",
                "csv",
                "outside",
            ),
            (
                &format!("{}/etc/x.csv", root.display()),
                "edge-1",
                "csv",
                "symbolic link",
            ),
            (&inside, "edge-2", "csv", "not edge-1"),
            (&inside, "edge-1", "txt", "format csv"),
            ("s3://bucket/x.csv", "edge-1", "csv", "not a local path"),
        ] {
            let e = super::plan(
                &d,
                Some(&dataset(url, node, format)),
                "edge-1",
                &root,
                false,
            )
            .unwrap_err();
            assert!(e.contains(wanted), "{url}: {e}");
        }
        let e = super::plan(&d, None, "edge-1", &root, false).unwrap_err();
        assert!(e.contains("not on this node"), "{e}");
    }

    #[test]
    fn frames_are_files_and_the_oldest_go_beyond_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let plan = CapturePlan {
            path: dir.path().join("frames"),
            properties: BTreeSet::new(),
            max_samples: 5,
            max_bytes: 1 << 20,
        };
        let mut r = FrameRecorder::open(plan.clone()).unwrap();
        let mut dropped = 0;
        for i in 0..12u8 {
            dropped += r.record("cam", "pgm", &[i; 100]).unwrap();
        }
        assert_eq!((r.frames(), dropped, r.dropped), (5, 7, 7));
        let mut names: Vec<String> = std::fs::read_dir(&plan.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names.first().map(String::as_str),
            Some("cam-0000000007.pgm")
        );
        assert_eq!(names.len(), 5, "no temporary files left: {names:?}");
        assert_eq!(
            crate::datasets::count("dir", &plan.path),
            crate::datasets::Count::Samples(5)
        );
        // A restarted recorder continues the numbering and the bounds.
        let mut again = FrameRecorder::open(plan.clone()).unwrap();
        again.record("cam", "pgm", &[1; 100]).unwrap();
        assert!(plan.path.join("cam-0000000012.pgm").exists());
        assert_eq!(again.frames(), 5);
        let small = CapturePlan {
            max_samples: 100,
            max_bytes: 250,
            ..plan
        };
        let mut s = FrameRecorder::open(small).unwrap();
        s.record("cam", "pgm", &[0; 200]).unwrap();
        assert_eq!(
            s.frames(),
            1,
            "bytes bound: 5 x 100 + 200 > 250 leaves the newest only"
        );
    }

    #[test]
    fn rows_append_and_the_oldest_are_dropped_beyond_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/readings.csv");
        let plan = CapturePlan {
            path: path.clone(),
            properties: BTreeSet::new(),
            max_samples: 100,
            max_bytes: 1 << 20,
        };
        let mut r = Recorder::open(plan.clone()).unwrap();
        let mut dropped = 0;
        for i in 0..250 {
            r.record(
                "2026-11-30T00:00:00Z",
                "d",
                "t",
                &format!("{i}, \"quoted\""),
            );
            if i % 7 == 0 {
                dropped += r.flush().unwrap();
            }
        }
        dropped += r.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], HEADER.trim_end());
        assert!(lines.len() - 1 <= 100, "{}", lines.len());
        assert_eq!(lines.len() as u64 - 1, r.rows());
        assert_eq!(
            dropped + r.rows(),
            250,
            "every row kept or counted as dropped"
        );
        assert_eq!(r.dropped, dropped);
        assert!(
            lines.last().unwrap().contains("\"249, \"\"quoted\"\"\""),
            "{}",
            lines.last().unwrap()
        );
        // The dataset monitor counts exactly the rows.
        assert_eq!(
            crate::datasets::count("csv", &path),
            crate::datasets::Count::Samples(r.rows())
        );
        // A restarted recorder continues the file.
        let mut again = Recorder::open(plan).unwrap();
        assert_eq!(again.rows(), r.rows());
        again.record("t", "d", "t", "1");
        again.flush().unwrap();
        assert_eq!(again.rows(), r.rows() + 1);
        // The byte bound holds as well.
        let small = CapturePlan {
            path: dir.path().join("small.csv"),
            properties: BTreeSet::new(),
            max_samples: 1_000_000,
            max_bytes: 2048,
        };
        let mut s = Recorder::open(small.clone()).unwrap();
        for i in 0..500 {
            s.record("2026-11-30T00:00:00Z", "d", "t", &i.to_string());
            s.flush().unwrap();
        }
        assert!(std::fs::metadata(&small.path).unwrap().len() <= 2048);
        assert!(s.dropped > 400);
    }
}
