//! Training data: samples as rows of `f32` features with class labels or target values, loaded
//! from lib-sedna's dataset formats (IDX, csv, Sedna `txt` indexes of images, directories of
//! images), shuffled and split with a seed.

use std::collections::BTreeSet;
use std::path::Path;

use ndarray::{Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::TrainError;
use crate::dataset::{self, Limits};

/// What each sample should produce.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// A class index per sample (cross-entropy).
    Classes(Vec<u32>),
    /// Target values per sample, `[N, K]` (mean squared error).
    Values(Array2<f32>),
}

/// Borrowed targets of a batch or a dataset.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TargetsRef<'a> {
    Classes(&'a [u32]),
    Values(ArrayView2<'a, f32>),
}

impl Targets {
    /// A borrowed view.
    pub(crate) fn as_ref(&self) -> TargetsRef<'_> {
        match self {
            Targets::Classes(c) => TargetsRef::Classes(c),
            Targets::Values(v) => TargetsRef::Values(v.view()),
        }
    }

    /// The targets of the samples at `indices`.
    pub(crate) fn gather(&self, indices: &[usize]) -> Targets {
        match self {
            Targets::Classes(c) => Targets::Classes(indices.iter().map(|i| c[*i]).collect()),
            Targets::Values(v) => Targets::Values(v.select(Axis(0), indices)),
        }
    }
}

/// Samples for training or evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainData {
    features: Array2<f32>,
    targets: Targets,
    /// Class names, when labels were names rather than indices (index = position).
    classes: Option<Vec<String>>,
}

fn data_error(reason: impl Into<String>) -> TrainError {
    TrainError::Data(reason.into())
}

impl TrainData {
    /// Classification data: one row of features and one class index per sample.
    pub fn classification(features: Array2<f32>, labels: Vec<u32>) -> Result<Self, TrainError> {
        if features.nrows() != labels.len() {
            return Err(data_error(format!(
                "{} samples but {} labels",
                features.nrows(),
                labels.len()
            )));
        }
        Self::checked(features, Targets::Classes(labels), None)
    }

    /// Regression data: one row of features and one row of targets per sample.
    pub fn regression(features: Array2<f32>, targets: Array2<f32>) -> Result<Self, TrainError> {
        if features.nrows() != targets.nrows() {
            return Err(data_error(format!(
                "{} samples but {} target rows",
                features.nrows(),
                targets.nrows()
            )));
        }
        if targets.iter().any(|v| !v.is_finite()) {
            return Err(data_error("a target value is not finite"));
        }
        Self::checked(features, Targets::Values(targets), None)
    }

    fn checked(
        features: Array2<f32>,
        targets: Targets,
        classes: Option<Vec<String>>,
    ) -> Result<Self, TrainError> {
        if features.nrows() == 0 {
            return Err(data_error("the dataset has no samples"));
        }
        if features.ncols() == 0 {
            return Err(data_error("the samples have no features"));
        }
        if let Some((at, _)) = features.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(data_error(format!(
                "sample {} has a value that is not finite",
                at / features.ncols()
            )));
        }
        Ok(TrainData {
            features: features.as_standard_layout().into_owned(),
            targets,
            classes,
        })
    }

    /// Classification data from labels given as text: all whole numbers → those indices;
    /// otherwise class names, indexed in sorted order.
    pub fn from_labelled(features: Array2<f32>, labels: &[String]) -> Result<Self, TrainError> {
        if features.nrows() != labels.len() {
            return Err(data_error(format!(
                "{} samples but {} labels",
                features.nrows(),
                labels.len()
            )));
        }
        let numeric: Option<Vec<u32>> = labels.iter().map(|l| l.trim().parse().ok()).collect();
        let (indices, classes) = match numeric {
            Some(indices) => (indices, None),
            None => {
                let names: Vec<String> = labels
                    .iter()
                    .map(|l| l.trim().to_string())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let indices = labels
                    .iter()
                    .map(|l| names.iter().position(|n| n == l.trim()).unwrap_or(0) as u32)
                    .collect();
                (indices, Some(names))
            }
        };
        Self::checked(features, Targets::Classes(indices), classes)
    }

    /// MNIST-style IDX files: images (`idx3-ubyte`) and labels (`idx1-ubyte`), plain or
    /// gzipped; pixels are multiplied by `scale` (1/255 gives 0..1).
    pub fn from_idx(
        images: &Path,
        labels: &Path,
        scale: f32,
        limits: &Limits,
    ) -> Result<Self, TrainError> {
        let images = dataset::read_idx_images(images, limits)?;
        let labels = dataset::read_idx_labels(labels, limits)?;
        if images.len() != labels.len() {
            return Err(data_error(format!(
                "{} images but {} labels",
                images.len(),
                labels.len()
            )));
        }
        let width = images.first().map(|i| i.pixels.len()).unwrap_or(0);
        let values: Vec<f32> = images
            .iter()
            .flat_map(|i| i.pixels.iter().map(|p| f32::from(*p) * scale))
            .collect();
        let features = Array2::from_shape_vec((images.len(), width), values)
            .map_err(|e| data_error(e.to_string()))?;
        Self::classification(features, labels.into_iter().map(u32::from).collect())
    }

    /// A csv file with a header; `label` names the label column (class labels, as text or
    /// indices), every other column is a feature.
    pub fn from_csv(path: &Path, label: &str, limits: &Limits) -> Result<Self, TrainError> {
        let file = std::fs::File::open(path).map_err(|source| dataset::DatasetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let table = dataset::parse_csv(file, Some(label), &[], limits)?;
        let features = table.features_f32()?;
        let labels = table
            .labels
            .ok_or_else(|| data_error(format!("{}: no label column {label:?}", path.display())))?;
        Self::from_labelled(features, &labels)
    }

    /// Grey images (binary PGM) listed with their labels — a Sedna `txt` index or a directory
    /// scan ([`crate::dataset`]); every image must have the same size and a label.
    pub fn from_images(samples: &[dataset::Sample], scale: f32) -> Result<Self, TrainError> {
        let mut values = Vec::new();
        let mut labels = Vec::with_capacity(samples.len());
        let mut size = None;
        for sample in samples {
            let bytes =
                std::fs::read(&sample.path).map_err(|source| dataset::DatasetError::Io {
                    path: sample.path.clone(),
                    source,
                })?;
            let image = dataset::decode_pgm(&bytes)
                .map_err(|e| data_error(format!("{}: {e}", sample.path.display())))?;
            match size {
                None => size = Some((image.rows, image.cols)),
                Some(s) if s != (image.rows, image.cols) => {
                    return Err(data_error(format!(
                        "{} is {}x{}; the first image is {}x{}",
                        sample.path.display(),
                        image.cols,
                        image.rows,
                        s.1,
                        s.0
                    )));
                }
                Some(_) => {}
            }
            values.extend(image.pixels.iter().map(|p| f32::from(*p) * scale));
            labels.push(
                sample
                    .label
                    .clone()
                    .ok_or_else(|| data_error(format!("{} has no label", sample.path.display())))?,
            );
        }
        let (rows, cols) = size.ok_or_else(|| data_error("the dataset has no samples"))?;
        let features = Array2::from_shape_vec((samples.len(), rows * cols), values)
            .map_err(|e| data_error(e.to_string()))?;
        Self::from_labelled(features, &labels)
    }

    /// Loads a dataset by its path: `images.idx3-ubyte[.gz]` (labels: the same name with
    /// `labels.idx1-ubyte`), a `.csv` file (label column `label`), a Sedna `.txt` index of PGM
    /// images, or a directory of PGM images in one subdirectory per class. Images are scaled
    /// by 1/255.
    pub fn load(path: &Path, limits: &Limits) -> Result<Self, TrainError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() {
            let samples = dataset::scan_directory(path, &["pgm"], limits)?;
            return Self::from_images(&samples, 1.0 / 255.0);
        }
        if name.contains("idx3-ubyte") {
            let labels_name =
                name.replacen("images", "labels", 1)
                    .replacen("idx3-ubyte", "idx1-ubyte", 1);
            if !name.contains("images") {
                return Err(data_error(format!(
                    "{}: cannot tell the labels file (name the images file `…images….idx3-ubyte`)",
                    path.display()
                )));
            }
            return Self::from_idx(path, &path.with_file_name(labels_name), 1.0 / 255.0, limits);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("csv") => Self::from_csv(path, "label", limits),
            Some("txt") => {
                let samples = dataset::load_txt(path, limits)?;
                Self::from_images(&samples, 1.0 / 255.0)
            }
            _ => Err(data_error(format!(
                "{}: not a dataset the trainer reads (IDX images, .csv, a .txt index or a directory of PGM images)",
                path.display()
            ))),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.features.nrows()
    }

    /// Whether there are no samples (never true for a constructed dataset).
    pub fn is_empty(&self) -> bool {
        self.features.nrows() == 0
    }

    /// Values per sample.
    pub fn sample_len(&self) -> usize {
        self.features.ncols()
    }

    /// The features, `[N, F]`.
    pub fn features(&self) -> ArrayView2<'_, f32> {
        self.features.view()
    }

    /// The targets.
    pub fn targets(&self) -> &Targets {
        &self.targets
    }

    /// Class names, when the labels were names.
    pub fn classes(&self) -> Option<&[String]> {
        self.classes.as_deref()
    }

    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> TrainData {
        TrainData {
            features: self.features.select(Axis(0), indices),
            targets: self.targets.gather(indices),
            classes: self.classes.clone(),
        }
    }

    /// This dataset followed by `other`'s samples (the same kind of targets, sample size and
    /// class names are required).
    pub fn concat(&self, other: &TrainData) -> Result<TrainData, TrainError> {
        if self.sample_len() != other.sample_len() {
            return Err(data_error(format!(
                "cannot join samples of {} values with samples of {}",
                self.sample_len(),
                other.sample_len()
            )));
        }
        if self.classes != other.classes {
            return Err(data_error(
                "cannot join datasets with different class names",
            ));
        }
        let features =
            ndarray::concatenate(Axis(0), &[self.features.view(), other.features.view()])
                .map_err(|e| data_error(e.to_string()))?;
        let targets = match (&self.targets, &other.targets) {
            (Targets::Classes(a), Targets::Classes(b)) => {
                Targets::Classes([a.as_slice(), b].concat())
            }
            (Targets::Values(a), Targets::Values(b)) => Targets::Values(
                ndarray::concatenate(Axis(0), &[a.view(), b.view()])
                    .map_err(|e| data_error(e.to_string()))?,
            ),
            _ => {
                return Err(data_error(
                    "cannot join class labels with regression targets",
                ));
            }
        };
        Self::checked(features, targets, self.classes.clone())
    }

    /// Splits by a stable rule per sample: sample `i` goes to the first set when
    /// [`in_first_split`]`(key(i), fraction)`. Unlike [`TrainData::split`], a sample stays on its
    /// side as the dataset grows (incremental learning's train/test split by `trainProb`).
    pub fn split_by_key(
        &self,
        fraction: f64,
        key: impl Fn(usize) -> String,
    ) -> (TrainData, TrainData) {
        let (first, second): (Vec<usize>, Vec<usize>) =
            (0..self.len()).partition(|i| in_first_split(&key(*i), fraction));
        (self.select(&first), self.select(&second))
    }

    /// Splits off a seeded random share `fraction` as a second set (validation).
    pub fn split(&self, fraction: f64, seed: u64) -> (TrainData, TrainData) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let held = ((self.len() as f64) * fraction).round() as usize;
        let held = held.min(self.len().saturating_sub(1));
        let (val, train) = order.split_at(held);
        let (mut train, mut val) = (train.to_vec(), val.to_vec());
        train.sort_unstable();
        val.sort_unstable();
        (self.select(&train), self.select(&val))
    }
}

/// Whether the sample named `key` falls in the first `fraction` of a split: a hash of the key
/// (SHA-256) read as a number in [0, 1), so the answer never changes for a key.
pub fn in_first_split(key: &str, fraction: f64) -> bool {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(head) as f64 / 2f64.powi(64)) < fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_labels_become_sorted_class_indices() {
        let x = Array2::zeros((3, 2));
        let data = TrainData::from_labelled(x.clone(), &["cat".into(), "ant".into(), "cat".into()])
            .unwrap();
        assert_eq!(data.targets(), &Targets::Classes(vec![1, 0, 1]));
        assert_eq!(
            data.classes(),
            Some(&["ant".to_string(), "cat".to_string()][..])
        );
        let numeric = TrainData::from_labelled(x, &["2".into(), "0".into(), "7".into()]).unwrap();
        assert_eq!(numeric.targets(), &Targets::Classes(vec![2, 0, 7]));
    }

    #[test]
    fn bad_data_is_refused_with_a_reason() {
        let err = TrainData::classification(Array2::zeros((2, 2)), vec![0]).unwrap_err();
        assert_eq!(err.to_string(), "bad training data: 2 samples but 1 labels");
        let mut x = Array2::zeros((2, 2));
        x[[1, 0]] = f32::NAN;
        let err = TrainData::classification(x, vec![0, 1]).unwrap_err();
        assert!(err.to_string().contains("sample 1"), "{err}");
        let err = TrainData::load(Path::new("/nonexistent/x.bin"), &Limits::default()).unwrap_err();
        assert!(
            err.to_string().contains("not a dataset the trainer reads"),
            "{err}"
        );
    }

    #[test]
    fn the_mnist_train_split_loads_and_splits_reproducibly() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/mnist");
        let data = TrainData::load(
            &Path::new(dir).join("train-images.idx3-ubyte.gz"),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!((data.len(), data.sample_len()), (8000, 784));
        assert!(data.features().iter().all(|v| (0.0..=1.0).contains(v)));
        let (train, val) = data.split(0.1, 3);
        assert_eq!((train.len(), val.len()), (7200, 800));
        assert_eq!(data.split(0.1, 3).1, val);
        assert_ne!(data.split(0.1, 4).1, val);
    }

    #[test]
    fn datasets_join_and_a_keyed_split_keeps_each_sample_on_its_side() {
        let a = TrainData::classification(Array2::zeros((3, 4)), vec![0, 1, 2]).unwrap();
        let b = TrainData::classification(Array2::ones((2, 4)), vec![3, 4]).unwrap();
        let joined = a.concat(&b).unwrap();
        assert_eq!(joined.len(), 5);
        assert_eq!(joined.targets(), &Targets::Classes(vec![0, 1, 2, 3, 4]));
        assert_eq!(joined.features()[[4, 0]], 1.0);
        let narrow = TrainData::classification(Array2::zeros((1, 3)), vec![0]).unwrap();
        assert!(a.concat(&narrow).unwrap_err().to_string().contains("4"));
        // The same key lands on the same side whatever else is in the dataset.
        let keys: Vec<String> = (0..200)
            .map(|i| format!("hard-examples/s-{i}.pgm"))
            .collect();
        let first: Vec<bool> = keys.iter().map(|k| in_first_split(k, 0.8)).collect();
        let share = first.iter().filter(|f| **f).count();
        assert!(
            (140..=180).contains(&share),
            "{share} of 200 in an 0.8 split"
        );
        assert_eq!(
            first,
            keys.iter()
                .map(|k| in_first_split(k, 0.8))
                .collect::<Vec<_>>()
        );
        assert!(
            keys.iter()
                .all(|k| !in_first_split(k, 0.0) && in_first_split(k, 1.0))
        );
    }
}
