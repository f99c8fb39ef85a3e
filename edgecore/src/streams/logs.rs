//! Container logs as `kubectl logs` asks for them: `follow`, `previous`, `tailLines`,
//! `sinceSeconds` / `sinceTime`, `timestamps`, `limitBytes`.
//!
//! A container writes its output straight into `logs/<name>.log` (see the runtime), so
//! nothing stamps each line. The agent keeps a time index beside each log instead
//! (`<name>.log.times`: 16-byte records, the file's size and the time it was seen, taken
//! every [`INDEX_INTERVAL`] while the log grows); a line's time is that of the first record
//! at or past its end — the time the agent saw it written, within that interval. When a
//! container restarts, its log and index become `<name>.log.previous` and
//! `<name>.log.previous.times` (what `previous` reads).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the agent looks at growing logs to record when bytes were written.
pub const INDEX_INTERVAL: Duration = Duration::from_millis(250);
/// How often a followed log is polled for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// The most records one index keeps (older ones are dropped by halving).
const MAX_INDEX_RECORDS: u64 = 65_536;

/// What `kubectl logs` asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep streaming new lines until the container stops or the client leaves.
    pub follow: bool,
    /// The container's previous run.
    pub previous: bool,
    /// Only the last lines.
    pub tail_lines: Option<u64>,
    /// Only lines written at or after this time (unix nanoseconds).
    pub since_nanos: Option<i128>,
    /// Prefix each line with its RFC 3339 time.
    pub timestamps: bool,
    /// Stop after this many bytes.
    pub limit_bytes: Option<u64>,
}

impl LogOptions {
    /// Parses the query of a `containerLogs` request; `now` resolves `sinceSeconds`.
    pub fn parse(query: &str, now: jiff::Timestamp) -> Result<Self, String> {
        let mut o = LogOptions::default();
        for (key, value) in url_pairs(query) {
            let flag = || value.is_empty() || value == "true" || value == "1";
            let number = |what: &str| -> Result<u64, String> {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{what} must be a non-negative integer, not {value:?}"))
            };
            match key.as_str() {
                "follow" => o.follow = flag(),
                "previous" => o.previous = flag(),
                "timestamps" => o.timestamps = flag(),
                "tailLines" => o.tail_lines = Some(number("tailLines")?),
                "limitBytes" => {
                    let n = number("limitBytes")?;
                    if n == 0 {
                        return Err("limitBytes must be greater than zero".into());
                    }
                    o.limit_bytes = Some(n);
                }
                "sinceSeconds" => {
                    let n = number("sinceSeconds")?;
                    if n == 0 {
                        return Err("sinceSeconds must be greater than zero".into());
                    }
                    o.since_nanos =
                        Some(now.as_nanosecond() - i128::from(n.min(1 << 40)) * 1_000_000_000);
                }
                "sinceTime" => {
                    let t: jiff::Timestamp = value
                        .parse()
                        .map_err(|e| format!("sinceTime {value:?} is not an RFC 3339 time: {e}"))?;
                    o.since_nanos = Some(t.as_nanosecond());
                }
                _ => {}
            }
        }
        Ok(o)
    }
}

/// `key=value` pairs of a query string, percent-decoded.
pub fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// The log file of a container's current (or previous) run.
pub fn log_path(pod_dir: &Path, container: &str, previous: bool) -> PathBuf {
    let name = if previous {
        format!("{container}.log.previous")
    } else {
        format!("{container}.log")
    };
    pod_dir.join("logs").join(name)
}

fn index_path(log: &Path) -> PathBuf {
    PathBuf::from(format!("{}.times", log.display()))
}

/// Moves a container's log (and its index) aside as its previous run's, before it restarts.
pub fn keep_as_previous(pod_dir: &Path, container: &str) {
    let (current, previous) = (
        log_path(pod_dir, container, false),
        log_path(pod_dir, container, true),
    );
    if std::fs::rename(&current, &previous).is_ok() {
        let _ = std::fs::rename(index_path(&current), index_path(&previous));
    } else {
        let _ = std::fs::remove_file(index_path(&current));
    }
}

fn read_index(log: &Path) -> Vec<(u64, i128)> {
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(index_path(log)) {
        let _ = f.read_to_end(&mut bytes);
    }
    bytes
        .chunks_exact(16)
        .map(|r| {
            let offset = u64::from_le_bytes(r[..8].try_into().unwrap_or_default());
            let nanos = i64::from_le_bytes(r[8..].try_into().unwrap_or_default());
            (offset, i128::from(nanos))
        })
        .collect()
}

/// Records, for every log under `pods_dir` that grew since the last call, its size and the
/// time now; `seen` keeps the sizes between calls. A log that shrank (rotated) starts a new
/// index.
pub fn index_logs(pods_dir: &Path, seen: &mut HashMap<PathBuf, u64>, now: jiff::Timestamp) {
    let Ok(pods) = std::fs::read_dir(pods_dir) else {
        return;
    };
    let mut alive = HashMap::with_capacity(seen.len());
    for pod in pods.flatten() {
        let Ok(logs) = std::fs::read_dir(pod.path().join("logs")) else {
            continue;
        };
        for log in logs.flatten() {
            let path = log.path();
            if path.extension().is_none_or(|e| e != "log") {
                continue;
            }
            let Ok(size) = log.metadata().map(|m| m.len()) else {
                continue;
            };
            let last = match seen.get(&path) {
                Some(s) => *s,
                None => read_index(&path).last().map_or(0, |r| r.0),
            };
            if size < last {
                let _ = std::fs::remove_file(index_path(&path));
            }
            if size != last {
                append_record(&path, size, now);
            }
            alive.insert(path, size);
        }
    }
    *seen = alive;
}

fn append_record(log: &Path, size: u64, now: jiff::Timestamp) {
    let index = index_path(log);
    if std::fs::metadata(&index).is_ok_and(|m| m.len() >= MAX_INDEX_RECORDS * 16) {
        // Keep every other record: coarser times for old lines, bounded space.
        let records = read_index(log);
        let mut kept = Vec::with_capacity(records.len() / 2 * 16);
        for (offset, nanos) in records.into_iter().skip(1).step_by(2) {
            kept.extend_from_slice(&offset.to_le_bytes());
            kept.extend_from_slice(&(nanos as i64).to_le_bytes());
        }
        let _ = std::fs::write(&index, kept);
    }
    let mut record = [0u8; 16];
    record[..8].copy_from_slice(&size.to_le_bytes());
    record[8..].copy_from_slice(&(now.as_nanosecond() as i64).to_le_bytes());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&index)
    {
        let _ = f.write_all(&record);
    }
}

/// One line of a log: its bytes (with the newline, if any) and when it was written.
#[derive(Debug, PartialEq, Eq)]
struct Line<'a> {
    bytes: &'a [u8],
    nanos: i128,
}

/// Splits `text` (starting at byte `base` of the file) into lines stamped from `index`;
/// lines past the last record get `now`.
fn lines<'a>(text: &'a [u8], base: u64, index: &[(u64, i128)], now: i128) -> Vec<Line<'a>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let end = text[start..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(text.len(), |p| start + p + 1);
        let file_end = base + end as u64;
        let at = index.partition_point(|(offset, _)| *offset < file_end);
        let nanos = index.get(at).map_or(now, |r| r.1);
        out.push(Line {
            bytes: &text[start..end],
            nanos,
        });
        start = end;
    }
    out
}

fn format_time(nanos: i128) -> String {
    jiff::Timestamp::from_nanosecond(nanos)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Renders the selected lines of `text` (bytes `base..` of the log) into `out`, within the
/// byte budget; returns whether the budget is spent.
fn render(
    text: &[u8],
    base: u64,
    index: &[(u64, i128)],
    options: &LogOptions,
    tail: Option<u64>,
    budget: &mut Option<u64>,
    out: &mut Vec<u8>,
) -> bool {
    let now = jiff::Timestamp::now().as_nanosecond();
    let mut selected = lines(text, base, index, now);
    if let Some(since) = options.since_nanos {
        selected.retain(|l| l.nanos >= since);
    }
    if let Some(n) = tail {
        let skip = selected.len().saturating_sub(n as usize);
        selected.drain(..skip);
    }
    for line in selected {
        let mut piece = Vec::with_capacity(line.bytes.len() + 32);
        if options.timestamps {
            piece.extend_from_slice(format_time(line.nanos).as_bytes());
            piece.push(b' ');
        }
        piece.extend_from_slice(line.bytes);
        if let Some(left) = budget {
            if piece.len() as u64 >= *left {
                out.extend_from_slice(&piece[..*left as usize]);
                *left = 0;
                return true;
            }
            *left -= piece.len() as u64;
        }
        out.extend_from_slice(&piece);
    }
    false
}

/// The log as asked, without following: everything written so far.
pub fn read(pod_dir: &Path, container: &str, options: &LogOptions) -> std::io::Result<Vec<u8>> {
    let path = log_path(pod_dir, container, options.previous);
    let text = std::fs::read(&path)?;
    let index = read_index(&path);
    let mut out = Vec::new();
    let mut budget = options.limit_bytes;
    render(
        &text,
        0,
        &index,
        options,
        options.tail_lines,
        &mut budget,
        &mut out,
    );
    Ok(out)
}

/// Streams the log as asked into `send` (each call one chunk); with `follow`, keeps sending
/// new lines until `running` says the container stopped (and its last lines are sent), the
/// budget is spent or `send` fails (the client left).
pub async fn stream<F, Fut>(
    pod_dir: &Path,
    container: &str,
    options: &LogOptions,
    running: impl Fn() -> bool,
    mut send: F,
) -> std::io::Result<()>
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let path = log_path(pod_dir, container, options.previous);
    let mut file = std::fs::File::open(&path)?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    let mut budget = options.limit_bytes;
    let mut out = Vec::new();
    let spent = render(
        &text,
        0,
        &read_index(&path),
        options,
        options.tail_lines,
        &mut budget,
        &mut out,
    );
    if !out.is_empty() && !send(out).await {
        return Ok(());
    }
    if spent || !options.follow || options.previous {
        return Ok(());
    }
    // Only whole lines are sent while following; a partial last line waits for its end.
    let mut offset = text.len() as u64;
    let partial = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    let mut pending = text.split_off(partial);
    offset -= pending.len() as u64;
    let following = LogOptions {
        since_nanos: None,
        ..options.clone()
    };
    loop {
        let stopped = !running();
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size < offset + pending.len() as u64 {
            // Rotated (truncated in place): start again from its beginning.
            offset = 0;
            pending.clear();
        }
        file.seek(SeekFrom::Start(offset + pending.len() as u64))?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh)?;
        pending.extend_from_slice(&fresh);
        let upto = if stopped {
            pending.len()
        } else {
            pending
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1)
        };
        if upto > 0 {
            let mut out = Vec::new();
            let spent = render(
                &pending[..upto],
                offset,
                &read_index(&path),
                &following,
                None,
                &mut budget,
                &mut out,
            );
            if !out.is_empty() && !send(out).await {
                return Ok(());
            }
            if spent {
                return Ok(());
            }
            offset += upto as u64;
            pending.drain(..upto);
        }
        if stopped {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> jiff::Timestamp {
        "2026-12-01T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn options_parse_as_kubectl_sends_them() {
        let o = LogOptions::parse(
            "follow=true&tailLines=5&timestamps=true&limitBytes=100&container=main",
            now(),
        )
        .unwrap();
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(5), Some(100)));
        let o = LogOptions::parse("sinceSeconds=60&previous=true", now()).unwrap();
        assert!(o.previous);
        assert_eq!(o.since_nanos, Some(now().as_nanosecond() - 60_000_000_000));
        let o = LogOptions::parse("sinceTime=2026-12-01T09%3A59%3A00Z", now()).unwrap();
        assert_eq!(o.since_nanos, Some(now().as_nanosecond() - 60_000_000_000));
        for (bad, says) in [
            ("tailLines=-1", "tailLines must be a non-negative integer"),
            ("limitBytes=0", "limitBytes must be greater than zero"),
            ("sinceSeconds=x", "sinceSeconds must be"),
            (
                "sinceTime=yesterday",
                "sinceTime \"yesterday\" is not an RFC 3339 time",
            ),
        ] {
            let err = LogOptions::parse(bad, now()).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn lines_take_the_time_of_the_first_index_record_past_their_end() {
        let text = b"one\ntwo\nthree\nfour";
        let index = [(4, 100), (14, 200)];
        let got: Vec<(String, i128)> = lines(text, 0, &index, 999)
            .into_iter()
            .map(|l| (String::from_utf8_lossy(l.bytes).into_owned(), l.nanos))
            .collect();
        assert_eq!(
            got,
            [
                ("one\n".to_string(), 100),
                ("two\n".to_string(), 200),
                ("three\n".to_string(), 200),
                ("four".to_string(), 999),
            ]
        );
    }

    fn pod_with_log(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        std::fs::write(dir.path().join("logs/c.log"), text).unwrap();
        dir
    }

    #[test]
    fn tail_since_timestamps_and_limit_select_and_shape_lines() {
        let dir = pod_with_log("a\nb\nc\nd\n");
        let log = log_path(dir.path(), "c", false);
        let t0 = now().as_nanosecond();
        for (size, at) in [
            (4u64, t0),
            (6, t0 + 10_000_000_000),
            (8, t0 + 10_250_000_000),
        ] {
            let mut r = size.to_le_bytes().to_vec();
            r.extend_from_slice(&(at as i64).to_le_bytes());
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(index_path(&log))
                .unwrap();
            f.write_all(&r).unwrap();
        }
        let read = |q: &str| {
            String::from_utf8(read(dir.path(), "c", &LogOptions::parse(q, now()).unwrap()).unwrap())
                .unwrap()
        };
        assert_eq!(read(""), "a\nb\nc\nd\n");
        assert_eq!(read("tailLines=2"), "c\nd\n");
        assert_eq!(read("tailLines=0"), "");
        assert_eq!(read("limitBytes=3"), "a\nb");
        assert_eq!(read("sinceTime=2026-12-01T10:00:05Z"), "c\nd\n");
        assert_eq!(
            read("sinceTime=2026-12-01T10:00:10.1Z&timestamps=true"),
            "2026-12-01T10:00:10.25Z d\n"
        );
        assert_eq!(
            read("timestamps=true&tailLines=3"),
            "2026-12-01T10:00:00Z b\n2026-12-01T10:00:10Z c\n2026-12-01T10:00:10.25Z d\n"
        );
        assert!(read_err(dir.path(), "previous=true").contains("No such file"));
    }

    fn read_err(dir: &Path, q: &str) -> String {
        read(dir, "c", &LogOptions::parse(q, now()).unwrap())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_indexer_records_growth_and_restarts_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("default_p_u1");
        std::fs::create_dir_all(pod.join("logs")).unwrap();
        let log = pod.join("logs/c.log");
        let mut seen = HashMap::new();
        std::fs::write(&log, "x\n").unwrap();
        index_logs(dir.path(), &mut seen, now());
        index_logs(dir.path(), &mut seen, now());
        assert_eq!(read_index(&log), [(2, now().as_nanosecond())]);
        std::fs::write(&log, "x\nyy\n").unwrap();
        let later = now() + jiff::SignedDuration::from_secs(1);
        index_logs(dir.path(), &mut seen, later);
        assert_eq!(read_index(&log).len(), 2);
        // A restarted agent continues from the index on disk.
        let mut fresh = HashMap::new();
        index_logs(dir.path(), &mut fresh, later);
        assert_eq!(read_index(&log).len(), 2);
        std::fs::write(&log, "z\n").unwrap();
        index_logs(dir.path(), &mut seen, later);
        assert_eq!(read_index(&log), [(2, later.as_nanosecond())]);
        keep_as_previous(&pod, "c");
        assert!(!log.exists());
        assert_eq!(
            read_index(&log_path(&pod, "c", true)),
            [(2, later.as_nanosecond())]
        );
    }

    #[tokio::test]
    async fn following_sends_whole_new_lines_until_the_container_stops() {
        let dir = pod_with_log("old\n");
        let log = log_path(dir.path(), "c", false);
        let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = {
            let (dir, running) = (dir.path().to_path_buf(), running.clone());
            tokio::spawn(async move {
                let options = LogOptions {
                    follow: true,
                    ..Default::default()
                };
                stream(
                    &dir,
                    "c",
                    &options,
                    || running.load(std::sync::atomic::Ordering::SeqCst),
                    |chunk| {
                        let tx = tx.clone();
                        async move { tx.send(chunk).is_ok() }
                    },
                )
                .await
            })
        };
        assert_eq!(rx.recv().await.unwrap(), b"old\n");
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"new\npart").unwrap();
        assert_eq!(rx.recv().await.unwrap(), b"new\n");
        f.write_all(b"ial").unwrap();
        running.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(rx.recv().await.unwrap(), b"partial");
        task.await.unwrap().unwrap();
        assert!(rx.recv().await.is_none());
    }
}
