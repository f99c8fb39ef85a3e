//! Dataset indexes as Sedna writes them, plus plain directories of files.
//!
//! - `txt` ([`parse_txt`]): one sample per line, `path [label]`, whitespace-separated;
//!   relative paths are taken from the index file's directory (Sedna's convention for
//!   `Dataset.spec.url`). Blank lines and `#` comments are skipped.
//! - `csv` ([`parse_csv`]): structured data with a header; one column may be the label,
//!   the others the features.
//! - a directory ([`scan_directory`]): every file (optionally by extension), sorted; files in
//!   a subdirectory take the subdirectory's name as label (`cats/1.jpg` → `cats`).
//!
//! - images: binary PGM ([`decode_pgm`]) and MNIST's IDX files ([`read_idx_images`],
//!   [`read_idx_labels`]; gzipped files, as MNIST is distributed, are read too).
//!
//! Every parser has explicit [`Limits`] and names the line or row of a problem.
//!
//! ```
//! use sedna::dataset::{parse_txt, Limits};
//! let samples = parse_txt("images/1.jpg 0\nimages/2.jpg 1\n", "/data/helmet".as_ref(), &Limits::default())?;
//! assert_eq!(samples[1].path.to_str(), Some("/data/helmet/images/2.jpg"));
//! assert_eq!(samples[1].label.as_deref(), Some("1"));
//! # Ok::<(), sedna::dataset::DatasetError>(())
//! ```

use std::path::{Path, PathBuf};

use ndarray::Array2;

/// Bounds on what the parsers accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most samples (lines, rows, files).
    pub max_samples: usize,
    /// Longest line or row, in bytes.
    pub max_line_bytes: usize,
    /// Most columns in a csv file.
    pub max_columns: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_samples: 10_000_000,
            max_line_bytes: 64 * 1024,
            max_columns: 100_000,
        }
    }
}

/// Dataset errors. None is retryable: the data must change.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A line of a txt index is wrong.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A csv file is wrong.
    #[error("csv {location}: {reason}")]
    Csv {
        /// Row (1-based, header = 1) and column, as known.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// A limit was exceeded.
    #[error("dataset exceeds a limit: {0}")]
    TooLarge(String),
    /// A file is not in the format it should be (an image, an IDX file).
    #[error("{what}: {reason}")]
    Format {
        /// The file or kind of data.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl DatasetError {
    /// Whether trying again unchanged can succeed: only for I/O errors.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DatasetError::Io { .. })
    }
}

type Result<T, E = DatasetError> = std::result::Result<T, E>;

/// One sample of a file-based dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The file.
    pub path: PathBuf,
    /// Its label, when the index gives one.
    pub label: Option<String>,
}

/// Parses a Sedna `txt` index; relative paths are resolved against `base`.
pub fn parse_txt(text: &str, base: &Path, limits: &Limits) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.len() > limits.max_line_bytes {
            return Err(DatasetError::Line {
                line: number,
                reason: format!(
                    "{} bytes, more than the {}-byte limit",
                    line.len(),
                    limits.max_line_bytes
                ),
            });
        }
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut fields = trimmed.split_whitespace();
        let Some(path) = fields.next() else {
            continue;
        };
        let label = fields.next().map(str::to_string);
        if let Some(extra) = fields.next() {
            return Err(DatasetError::Line {
                line: number,
                reason: format!(
                    "expected \"path [label]\", found a third field {extra:?} (paths with spaces are not supported)"
                ),
            });
        }
        let path = Path::new(path);
        if path.is_absolute() {
            return Err(DatasetError::Line {
                line: number,
                reason: format!(
                    "path {} is absolute: an index names files relative to its own directory",
                    path.display()
                ),
            });
        }
        if path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(DatasetError::Line {
                line: number,
                reason: format!("path {} leaves the dataset (..)", path.display()),
            });
        }
        if samples.len() == limits.max_samples {
            return Err(DatasetError::TooLarge(format!(
                "more than {} samples",
                limits.max_samples
            )));
        }
        samples.push(Sample {
            path: base.join(path),
            label,
        });
    }
    Ok(samples)
}

/// Reads and parses a `txt` index file; relative paths are taken from its directory.
pub fn load_txt(index: &Path, limits: &Limits) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(index).map_err(|source| DatasetError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    parse_txt(&text, index.parent().unwrap_or(Path::new("/")), limits)
}

/// A structured (csv) dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Feature column names, in order.
    pub columns: Vec<String>,
    /// Feature values, one row per sample.
    pub rows: Vec<Vec<String>>,
    /// The label column, when one was named.
    pub labels: Option<Vec<String>>,
}

impl Table {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The features as numbers; the error names the row and column of a non-number.
    pub fn features_f32(&self) -> Result<Array2<f32>> {
        let mut values = Vec::with_capacity(self.rows.len() * self.columns.len());
        for (r, row) in self.rows.iter().enumerate() {
            for (c, value) in row.iter().enumerate() {
                let number = value.trim().parse::<f32>().map_err(|_| DatasetError::Csv {
                    location: format!("row {}, column {}", r + 2, self.columns[c]),
                    reason: format!("{value:?} is not a number"),
                })?;
                values.push(number);
            }
        }
        Array2::from_shape_vec((self.rows.len(), self.columns.len()), values).map_err(|e| {
            DatasetError::Csv {
                location: "table".into(),
                reason: e.to_string(),
            }
        })
    }
}

/// Parses csv with a header. `label` names the label column (removed from the features);
/// `columns`, when not empty, keeps only those feature columns (in that order).
pub fn parse_csv(
    reader: impl std::io::Read,
    label: Option<&str>,
    columns: &[&str],
    limits: &Limits,
) -> Result<Table> {
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(reader);
    let csv_error = |e: csv::Error| {
        let location = e
            .position()
            .map_or_else(|| "input".to_string(), |p| format!("row {}", p.line()));
        DatasetError::Csv {
            location,
            reason: e.to_string(),
        }
    };
    let header: Vec<String> = csv
        .headers()
        .map_err(csv_error)?
        .iter()
        .map(str::to_string)
        .collect();
    if header.len() > limits.max_columns {
        return Err(DatasetError::TooLarge(format!(
            "{} columns, more than {}",
            header.len(),
            limits.max_columns
        )));
    }
    let find = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| DatasetError::Csv {
                location: "header".into(),
                reason: format!("no column {name:?} (columns: {})", header.join(", ")),
            })
    };
    let label_index = label.map(find).transpose()?;
    let feature_indexes: Vec<usize> = if columns.is_empty() {
        (0..header.len())
            .filter(|i| Some(*i) != label_index)
            .collect()
    } else {
        columns
            .iter()
            .map(|c| find(c))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|i| Some(*i) != label_index)
            .collect()
    };
    let mut rows = Vec::new();
    let mut labels = label_index.map(|_| Vec::new());
    for record in csv.records() {
        let record = record.map_err(csv_error)?;
        let row_number = record.position().map_or(0, |p| p.line());
        if record.as_slice().len() > limits.max_line_bytes {
            return Err(DatasetError::Csv {
                location: format!("row {row_number}"),
                reason: format!("longer than the {}-byte limit", limits.max_line_bytes),
            });
        }
        if rows.len() == limits.max_samples {
            return Err(DatasetError::TooLarge(format!(
                "more than {} rows",
                limits.max_samples
            )));
        }
        let field = |i: usize| record.get(i).unwrap_or_default().to_string();
        rows.push(feature_indexes.iter().map(|i| field(*i)).collect());
        if let (Some(labels), Some(i)) = (labels.as_mut(), label_index) {
            labels.push(field(i));
        }
    }
    Ok(Table {
        columns: feature_indexes.iter().map(|i| header[*i].clone()).collect(),
        rows,
        labels,
    })
}

/// Lists the files under `dir` (recursively, sorted, symlinks not followed), keeping those
/// whose extension is in `extensions` (all when empty, compared case-insensitively). A file
/// below a subdirectory gets the first subdirectory's name as its label.
pub fn scan_directory(dir: &Path, extensions: &[&str], limits: &Limits) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let entries = std::fs::read_dir(&current).map_err(|source| DatasetError::Io {
            path: current.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| DatasetError::Io {
                path: current.clone(),
                source,
            })?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|source| DatasetError::Io {
                path: path.clone(),
                source,
            })?;
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let wanted = extensions.is_empty()
                || path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| extensions.iter().any(|x| x.eq_ignore_ascii_case(e)));
            if !wanted {
                continue;
            }
            if samples.len() == limits.max_samples {
                return Err(DatasetError::TooLarge(format!(
                    "more than {} files",
                    limits.max_samples
                )));
            }
            let relative = path.strip_prefix(dir).unwrap_or(&path);
            let label = (relative.components().count() > 1)
                .then(|| relative.components().next())
                .flatten()
                .map(|c| c.as_os_str().to_string_lossy().into_owned());
            samples.push(Sample { path, label });
        }
    }
    samples.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(samples)
}

/// The largest image accepted, in pixels.
pub const MAX_PIXELS: usize = 64 << 20;

/// A grey image: `rows × cols` bytes, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreyImage {
    /// Height.
    pub rows: usize,
    /// Width.
    pub cols: usize,
    /// The pixels, `rows × cols` of them.
    pub pixels: Vec<u8>,
}

fn format_error(what: &str, reason: impl Into<String>) -> DatasetError {
    DatasetError::Format {
        what: what.into(),
        reason: reason.into(),
    }
}

/// Decodes a binary PGM image (P5, maxval ≤ 255).
///
/// ```
/// let mut pgm = b"P5\n2 1\n255\n".to_vec();
/// pgm.extend_from_slice(&[0, 255]);
/// let image = sedna::dataset::decode_pgm(&pgm)?;
/// assert_eq!((image.rows, image.cols, image.pixels), (1, 2, vec![0, 255]));
/// # Ok::<(), sedna::dataset::DatasetError>(())
/// ```
pub fn decode_pgm(bytes: &[u8]) -> Result<GreyImage> {
    let bad = |reason: String| format_error("PGM image", reason);
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while at < bytes.len() && (bytes[at].is_ascii_whitespace() || bytes[at] == b'#') {
            if bytes[at] == b'#' {
                while at < bytes.len() && bytes[at] != b'\n' {
                    at += 1;
                }
            } else {
                at += 1;
            }
        }
        let start = at;
        while at < bytes.len() && !bytes[at].is_ascii_whitespace() && at - start < 32 {
            at += 1;
        }
        if start == at {
            return Err(bad("truncated PGM header".into()));
        }
        fields.push(
            std::str::from_utf8(&bytes[start..at])
                .map_err(|_| bad("PGM header is not ASCII".into()))?,
        );
    }
    if fields[0] != "P5" {
        return Err(bad(format!(
            "not a binary PGM (P5) image: magic {:?}",
            fields[0]
        )));
    }
    let number = |i: usize, what: &str| -> Result<usize> {
        fields[i]
            .parse::<usize>()
            .map_err(|_| bad(format!("PGM {what} {:?} is not a number", fields[i])))
    };
    let (cols, rows, max) = (
        number(1, "width")?,
        number(2, "height")?,
        number(3, "maxval")?,
    );
    if max == 0 || max > 255 {
        return Err(bad(format!(
            "PGM maxval {max}: only 8-bit images are supported"
        )));
    }
    let n = rows
        .checked_mul(cols)
        .filter(|n| *n <= MAX_PIXELS)
        .ok_or_else(|| {
            bad(format!(
                "PGM image too large ({cols}x{rows}; at most {MAX_PIXELS} pixels)"
            ))
        })?;
    let data = bytes
        .get(at + 1..at + 1 + n)
        .ok_or_else(|| bad("PGM pixel data truncated".into()))?;
    Ok(GreyImage {
        rows,
        cols,
        pixels: data.to_vec(),
    })
}

/// Reads a file, gunzipping it when its name ends in `.gz`, refusing more than `max` bytes
/// (after decompression).
fn read_maybe_gz(path: &Path, max: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let io = |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let mut bytes = Vec::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file)
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(io)?;
    } else {
        file.take(limit).read_to_end(&mut bytes).map_err(io)?;
    }
    if bytes.len() > max {
        return Err(DatasetError::TooLarge(format!(
            "{} holds more than {max} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The largest IDX file read, in bytes (after decompression).
pub const MAX_IDX_BYTES: usize = 4 << 30;

fn idx_header(bytes: &[u8], what: &str, magic: u32, words: usize) -> Result<Vec<usize>> {
    let word = |at: usize| -> Result<usize> {
        let b = bytes
            .get(at..at + 4)
            .ok_or_else(|| format_error(what, "IDX header truncated"))?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if word(0)? != magic as usize {
        return Err(format_error(
            what,
            format!("not an IDX file of the expected kind (magic 0x{magic:08x})"),
        ));
    }
    (1..=words).map(|i| word(4 * i)).collect()
}

/// Reads every image of an IDX `idx3-ubyte` file (MNIST's format; `.gz` is gunzipped).
pub fn read_idx_images(path: &Path, limits: &Limits) -> Result<Vec<GreyImage>> {
    let what = path.display().to_string();
    let bytes = read_maybe_gz(path, MAX_IDX_BYTES)?;
    let header = idx_header(&bytes, &what, 0x803, 3)?;
    let (count, rows, cols) = (header[0], header[1], header[2]);
    if count > limits.max_samples {
        return Err(DatasetError::TooLarge(format!(
            "{what}: {count} images; at most {}",
            limits.max_samples
        )));
    }
    let size = rows
        .checked_mul(cols)
        .filter(|n| *n <= MAX_PIXELS && *n > 0)
        .ok_or_else(|| {
            format_error(
                &what,
                format!("images of {rows}x{cols} pixels are not accepted"),
            )
        })?;
    let data = count
        .checked_mul(size)
        .and_then(|n| bytes.get(16..16 + n))
        .ok_or_else(|| {
            format_error(
                &what,
                format!("IDX data truncated ({count} images of {rows}x{cols} announced)"),
            )
        })?;
    Ok(data
        .chunks_exact(size)
        .map(|p| GreyImage {
            rows,
            cols,
            pixels: p.to_vec(),
        })
        .collect())
}

/// Reads the labels of an IDX `idx1-ubyte` file (`.gz` is gunzipped).
pub fn read_idx_labels(path: &Path, limits: &Limits) -> Result<Vec<u8>> {
    let what = path.display().to_string();
    let bytes = read_maybe_gz(path, MAX_IDX_BYTES)?;
    let count = idx_header(&bytes, &what, 0x801, 1)?[0];
    if count > limits.max_samples {
        return Err(DatasetError::TooLarge(format!(
            "{what}: {count} labels; at most {}",
            limits.max_samples
        )));
    }
    bytes.get(8..8 + count).map(<[u8]>::to_vec).ok_or_else(|| {
        format_error(
            &what,
            format!("IDX data truncated ({count} labels announced)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_indexes_resolve_paths_and_keep_labels() {
        let text = "# helmet set\nimg/a.jpg 1\n\n  img/b.jpg   0  \nimg/c.jpg\n";
        let s = parse_txt(text, Path::new("/data/set"), &Limits::default()).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].path, PathBuf::from("/data/set/img/a.jpg"));
        assert_eq!(s[1].path, PathBuf::from("/data/set/img/b.jpg"));
        assert_eq!(s[1].label.as_deref(), Some("0"));
        assert_eq!(s[2].label, None);
    }

    #[test]
    fn txt_problems_name_the_line() {
        let limits = Limits::default();
        let err = parse_txt("a.jpg 1\nb c.jpg 2\n", Path::new("/"), &limits).unwrap_err();
        assert!(err.to_string().starts_with("line 2: expected"), "{err}");
        let err = parse_txt("../../etc/passwd 0\n", Path::new("/d"), &limits).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 1: path ../../etc/passwd leaves"),
            "{err}"
        );
        let err = parse_txt("a.jpg 0\n/etc/shadow 1\n", Path::new("/d"), &limits).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 2: path /etc/shadow is absolute"),
            "{err}"
        );
        let small = Limits {
            max_samples: 2,
            ..limits
        };
        let err = parse_txt("a\nb\nc\n", Path::new("/"), &small).unwrap_err();
        assert!(err.to_string().contains("more than 2 samples"), "{err}");
        let short = Limits {
            max_line_bytes: 4,
            ..limits
        };
        let err = parse_txt("abcdef 1\n", Path::new("/"), &short).unwrap_err();
        assert!(err.to_string().contains("line 1: 8 bytes"), "{err}");
    }

    #[test]
    fn csv_splits_label_and_features_and_names_bad_cells() {
        let data = "temp,humidity,label\n21.5,40,ok\n35,90,alarm\n";
        let t = parse_csv(data.as_bytes(), Some("label"), &[], &Limits::default()).unwrap();
        assert_eq!(t.columns, vec!["temp", "humidity"]);
        assert_eq!(
            t.labels.as_deref(),
            Some(&["ok".to_string(), "alarm".to_string()][..])
        );
        let x = t.features_f32().unwrap();
        assert_eq!(x.shape(), &[2, 2]);
        assert_eq!(x[[1, 1]], 90.0);
        let only = parse_csv(data.as_bytes(), None, &["humidity"], &Limits::default()).unwrap();
        assert_eq!(only.columns, vec!["humidity"]);
        assert!(only.labels.is_none());
        let err = parse_csv(data.as_bytes(), Some("class"), &[], &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("no column \"class\""), "{err}");
        let bad = "temp,label\n21,ok\nwarm,ok\n";
        let t = parse_csv(bad.as_bytes(), Some("label"), &[], &Limits::default()).unwrap();
        let err = t.features_f32().unwrap_err().to_string();
        assert!(
            err.contains("row 3, column temp: \"warm\" is not a number"),
            "{err}"
        );
        let ragged = "a,b\n1,2\n3\n";
        let err = parse_csv(ragged.as_bytes(), None, &[], &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("row 3"), "{err}");
    }

    #[test]
    fn directories_list_files_with_labels_from_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "cats/2.JPG",
            "cats/1.jpg",
            "dogs/1.jpg",
            "top.jpg",
            "notes.txt",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let s = scan_directory(dir.path(), &["jpg"], &Limits::default()).unwrap();
        let names: Vec<_> = s
            .iter()
            .map(|s| {
                (
                    s.path
                        .strip_prefix(dir.path())
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_string(),
                    s.label.clone(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("cats/1.jpg".into(), Some("cats".into())),
                ("cats/2.JPG".into(), Some("cats".into())),
                ("dogs/1.jpg".into(), Some("dogs".into())),
                ("top.jpg".into(), None),
            ]
        );
        assert_eq!(
            scan_directory(dir.path(), &[], &Limits::default())
                .unwrap()
                .len(),
            5
        );
        let err = scan_directory(&dir.path().join("none"), &[], &Limits::default()).unwrap_err();
        assert!(err.is_retryable());
    }

    #[test]
    fn pgm_images_decode_and_bad_ones_are_refused() {
        let mut pgm = b"P5\n# a comment\n3 2\n255\n".to_vec();
        pgm.extend_from_slice(&[0, 1, 2, 3, 4, 255]);
        let image = decode_pgm(&pgm).unwrap();
        assert_eq!((image.rows, image.cols), (2, 3));
        assert_eq!(image.pixels, vec![0, 1, 2, 3, 4, 255]);
        for (bad, why) in [
            (&b"P2\n1 1\n255\n0"[..], "P5"),
            (b"P5\n3 2\n255\n\x00", "truncated"),
            (b"P5\n1 1\n65535\n\x00\x00", "8-bit"),
            (b"P5\n100000 100000\n255\n", "too large"),
        ] {
            let err = decode_pgm(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn idx_files_read_plain_and_gzipped_and_truncation_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2];
        images.extend_from_slice(&[1, 2, 3, 4]);
        let plain = dir.path().join("x.idx3-ubyte");
        std::fs::write(&plain, &images).unwrap();
        let read = read_idx_images(&plain, &Limits::default()).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].pixels, [3, 4]);

        let gz = dir.path().join("y.idx1-ubyte.gz");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &[0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]).unwrap();
        std::fs::write(&gz, encoder.finish().unwrap()).unwrap();
        assert_eq!(read_idx_labels(&gz, &Limits::default()).unwrap(), [7, 8, 9]);

        images.truncate(18);
        std::fs::write(&plain, &images).unwrap();
        let err = read_idx_images(&plain, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("truncated (2 images of 1x2 announced)"),
            "{err}"
        );
        let few = Limits {
            max_samples: 1,
            ..Limits::default()
        };
        assert!(matches!(
            read_idx_labels(&gz, &few),
            Err(DatasetError::TooLarge(_))
        ));
        let err = read_idx_labels(&plain, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("magic 0x00000801"), "{err}");
    }
}
