//! ONNX inference sessions on ONNX Runtime (through `ort`).
//!
//! The runtime library is loaded at run time from the PyPI `onnxruntime` wheel that
//! `scripts/setup` installs: [`runtime`] looks at `ORT_DYLIB_PATH` first, then at the wheels of
//! the active Python environment (`VIRTUAL_ENV`) and of the project's `.venv`, and names every
//! place it looked when none holds the library.
//!
//! Execution providers are explicit: CPU unless you ask for another, and a provider you ask
//! for that cannot be registered is an error ([`InferenceError::Provider`]), never a silent
//! fallback to CPU.
//!
//! A [`Model`] checks inputs against the model's metadata before running (names, element
//! types, ranks, fixed dimensions), runs from any number of threads, splits large inputs into
//! batches ([`Model::run_batched`]) and reloads its file in place ([`Model::reload`]): requests
//! already running finish on the model they started with.
//!
//! ```no_run
//! use sedna::inference::{Model, SessionOptions, TensorView};
//! let model = Model::load("models/digits/model.onnx", &SessionOptions::default())?;
//! let pixels = ndarray::Array2::<f32>::zeros((1, 64));
//! let outputs = model.run(&[("input", TensorView::from(pixels.view().into_dyn()))])?;
//! let probabilities = outputs.f32("probabilities")?;
//! assert_eq!(probabilities.shape(), &[1, 10]);
//! # Ok::<(), sedna::inference::InferenceError>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::SystemTime;

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

/// The environment variable that names the ONNX Runtime library file.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Errors from loading the runtime, loading models and running them.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// No ONNX Runtime library was found. Not retryable: install it or point to it.
    #[error(
        "ONNX Runtime library not found: set {ORT_DYLIB_ENV} to libonnxruntime.so.1.* or run scripts/setup, which installs the PyPI onnxruntime wheel into .venv (looked in: {searched})"
    )]
    RuntimeNotFound {
        /// Every place that was searched.
        searched: String,
    },
    /// The library was found but could not be loaded (wrong file, too old). Not retryable.
    #[error("loading ONNX Runtime from {path}: {message}")]
    RuntimeLoad {
        /// The library file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A requested execution provider could not be registered. Not retryable; there is no
    /// fallback to CPU.
    #[error(
        "execution provider {provider} was requested but could not be registered (no fallback to CPU): {message}"
    )]
    Provider {
        /// The provider, as named in [`Provider::name`].
        provider: &'static str,
        /// ONNX Runtime's reason.
        message: String,
    },
    /// An invalid session option. Not retryable.
    #[error("invalid session option: {0}")]
    Options(String),
    /// The model file could not be read or is not a model ONNX Runtime accepts. Not retryable
    /// (until the file changes).
    #[error("loading model {path}: {message}")]
    Load {
        /// The model file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The inputs do not match the model. Not retryable.
    #[error("input: {0}")]
    Input(String),
    /// ONNX Runtime failed while running the model. Not retryable with the same input.
    #[error("running the model: {0}")]
    Run(String),
    /// An output is missing or of another type than asked for. Not retryable.
    #[error("output {name}: {message}")]
    Output {
        /// The output's name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

impl InferenceError {
    /// Whether trying again unchanged can succeed: never for these errors.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

type Result<T, E = InferenceError> = std::result::Result<T, E>;

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// The loaded ONNX Runtime library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// The library file it was loaded from.
    pub path: PathBuf,
}

/// Loads ONNX Runtime once per process, from the first place that has it: `ORT_DYLIB_PATH`,
/// then the `onnxruntime` wheel in `$VIRTUAL_ENV`, then in the project's `.venv` (next to the
/// running program or its parents, or the source tree this crate was built from).
pub fn runtime() -> Result<Runtime> {
    if let Some(runtime) = lock_runtime().as_ref() {
        return Ok(runtime.clone());
    }
    let (found, searched) = find_runtime(|name| std::env::var_os(name));
    match found {
        Some(path) => init_runtime_from(&path),
        None => Err(InferenceError::RuntimeNotFound {
            searched: searched.join(", "),
        }),
    }
}

/// Loads ONNX Runtime from `path` (a `libonnxruntime.so.1.*` file). Once a library is loaded,
/// later calls return it whatever path they name.
pub fn init_runtime_from(path: &Path) -> Result<Runtime> {
    let mut guard = lock_runtime();
    if let Some(runtime) = guard.as_ref() {
        return Ok(runtime.clone());
    }
    if !path.is_file() {
        return Err(InferenceError::RuntimeNotFound {
            searched: path.display().to_string(),
        });
    }
    let load_error = |message: String| InferenceError::RuntimeLoad {
        path: path.to_path_buf(),
        message,
    };
    let builder = ort::init_from(path).map_err(|e| load_error(e.to_string()))?;
    let environment = builder
        .with_name("sedna")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_error(e.to_string()))?;
    let _ = ENVIRONMENT.set(environment);
    let runtime = Runtime {
        path: path.to_path_buf(),
    };
    *guard = Some(runtime.clone());
    Ok(runtime)
}

/// The process's ONNX Runtime environment (loading the runtime first), for code that drives
/// `ort` directly next to this crate, such as the benchmarks' bare-`ort` baseline.
pub fn ort_environment() -> Result<ort::environment::Environment> {
    runtime()?;
    ENVIRONMENT
        .get()
        .cloned()
        .ok_or_else(|| InferenceError::RuntimeLoad {
            path: PathBuf::new(),
            message: "the ONNX Runtime environment was not created".into(),
        })
}

fn lock_runtime() -> std::sync::MutexGuard<'static, Option<Runtime>> {
    RUNTIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where the runtime library is looked for, in order; returns the first hit and every place
/// looked at. `env` reads an environment variable (a parameter so tests need not touch the
/// process environment).
fn find_runtime(
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> (Option<PathBuf>, Vec<String>) {
    let mut searched = Vec::new();
    if let Some(path) = env(ORT_DYLIB_ENV) {
        let path = PathBuf::from(path);
        searched.push(format!("{ORT_DYLIB_ENV}={}", path.display()));
        if path.is_file() {
            return (Some(path), searched);
        }
    } else {
        searched.push(format!("{ORT_DYLIB_ENV} (unset)"));
    }
    let mut venvs = Vec::new();
    if let Some(venv) = env("VIRTUAL_ENV") {
        venvs.push(PathBuf::from(venv));
    }
    if let Ok(exe) = std::env::current_exe() {
        venvs.extend(exe.ancestors().skip(1).map(|dir| dir.join(".venv")));
    }
    if let Ok(dir) = std::env::current_dir() {
        venvs.extend(dir.ancestors().map(|dir| dir.join(".venv")));
    }
    venvs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    let mut seen = std::collections::HashSet::new();
    for venv in venvs {
        if !venv.is_dir() || !seen.insert(venv.clone()) {
            continue;
        }
        searched.push(venv.display().to_string());
        if let Some(path) = wheel_library(&venv) {
            return (Some(path), searched);
        }
    }
    if searched.len() == 1 {
        searched
            .push("no .venv next to the program, the working directory or the source tree".into());
    }
    (None, searched)
}

/// `VENV/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.*`, newest first.
fn wheel_library(venv: &Path) -> Option<PathBuf> {
    let mut found = Vec::new();
    for python in std::fs::read_dir(venv.join("lib")).ok()?.flatten() {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("libonnxruntime.so.1.") || name == "libonnxruntime.dylib" {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    found.pop()
}

/// An execution provider: where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// ONNX Runtime's CPU provider (always available).
    Cpu,
    /// NVIDIA CUDA (needs the `onnxruntime-gpu` wheel and CUDA libraries).
    Cuda {
        /// GPU index.
        device_id: i32,
    },
    /// NVIDIA TensorRT (needs the `onnxruntime-gpu` wheel and TensorRT libraries).
    TensorRt {
        /// GPU index.
        device_id: i32,
    },
}

impl Provider {
    /// The provider's name: `cpu`, `cuda` or `tensorrt`.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda { .. } => "cuda",
            Provider::TensorRt { .. } => "tensorrt",
        }
    }

    /// Parses a comma-separated list (`cpu`, `cuda:0,cpu`, …), as workers take it from
    /// `SEDNA_PROVIDERS`; blanks are skipped.
    pub fn parse_list(text: &str) -> Result<Vec<Provider>> {
        text.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Provider::parse)
            .collect()
    }

    /// Parses `cpu`, `cuda`, `cuda:1`, `tensorrt`, `tensorrt:0` (case-insensitive).
    pub fn parse(text: &str) -> Result<Provider> {
        let lower = text.trim().to_ascii_lowercase();
        let (name, device) = match lower.split_once(':') {
            Some((name, device)) => (name, Some(device)),
            None => (lower.as_str(), None),
        };
        let device_id = match device {
            None => 0,
            Some(device) => device
                .parse::<i32>()
                .ok()
                .filter(|d| *d >= 0)
                .ok_or_else(|| {
                    InferenceError::Options(format!(
                        "provider {text:?}: device {device:?} is not a GPU index"
                    ))
                })?,
        };
        match name {
            "cpu" if device.is_none() => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda { device_id }),
            "tensorrt" | "trt" => Ok(Provider::TensorRt { device_id }),
            _ => Err(InferenceError::Options(format!(
                "unknown execution provider {text:?} (expected cpu, cuda[:N] or tensorrt[:N])"
            ))),
        }
    }

    fn dispatch(&self) -> Option<ort::ep::ExecutionProviderDispatch> {
        match *self {
            Provider::Cpu => None,
            Provider::Cuda { device_id } => Some(
                ort::ep::CUDA::default()
                    .with_device_id(device_id)
                    .build()
                    .error_on_failure(),
            ),
            Provider::TensorRt { device_id } => Some(
                ort::ep::TensorRT::default()
                    .with_device_id(device_id)
                    .build()
                    .error_on_failure(),
            ),
        }
    }
}

/// How a session is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    /// Providers in order of preference; CPU always serves what they do not. Every provider
    /// listed must register, or loading fails.
    pub providers: Vec<Provider>,
    /// Threads inside one operator (0: ONNX Runtime's default, one per core).
    pub intra_threads: usize,
    /// Threads across operators (0: ONNX Runtime's default).
    pub inter_threads: usize,
    /// Apply all graph optimisations (true) or none (false).
    pub optimize: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            providers: vec![Provider::Cpu],
            intra_threads: 0,
            inter_threads: 0,
            optimize: true,
        }
    }
}

/// A tensor's element type, as far as this crate exchanges tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 8-bit unsigned integer (images).
    U8,
    /// Any other element type (the model can still be described, not fed from here).
    Other,
}

impl DType {
    fn from_ort(ty: TensorElementType) -> DType {
        match ty {
            TensorElementType::Float32 => DType::F32,
            TensorElementType::Float64 => DType::F64,
            TensorElementType::Int64 => DType::I64,
            TensorElementType::Int32 => DType::I32,
            TensorElementType::Uint8 => DType::U8,
            _ => DType::Other,
        }
    }

    /// The numpy-style name: `float32`, `float64`, `int64`, `int32`, `uint8`, `other`.
    pub fn name(&self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::U8 => "uint8",
            DType::Other => "other",
        }
    }
}

/// A model input or output as the model declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; `None` where the model leaves a dimension free (e.g. the batch). Empty
    /// for values that are not tensors.
    pub shape: Vec<Option<usize>>,
}

impl TensorInfo {
    fn from_outlet(outlet: &ort::value::Outlet) -> TensorInfo {
        let (dtype, shape) = match outlet.dtype() {
            ValueType::Tensor { ty, shape, .. } => (
                DType::from_ort(*ty),
                shape
                    .iter()
                    .map(|d| usize::try_from(*d).ok())
                    .collect::<Vec<_>>(),
            ),
            _ => (DType::Other, Vec::new()),
        };
        TensorInfo {
            name: outlet.name().to_string(),
            dtype,
            shape,
        }
    }
}

/// A borrowed input tensor.
#[derive(Debug, Clone)]
pub enum TensorView<'a> {
    /// float32.
    F32(ArrayViewD<'a, f32>),
    /// float64.
    F64(ArrayViewD<'a, f64>),
    /// int64.
    I64(ArrayViewD<'a, i64>),
    /// int32.
    I32(ArrayViewD<'a, i32>),
    /// uint8.
    U8(ArrayViewD<'a, u8>),
}

macro_rules! tensor_view_from {
    ($($ty:ty => $variant:ident),*) => {$(
        impl<'a> From<ArrayViewD<'a, $ty>> for TensorView<'a> {
            fn from(view: ArrayViewD<'a, $ty>) -> Self {
                TensorView::$variant(view)
            }
        }
        impl From<ArrayD<$ty>> for Tensor {
            fn from(array: ArrayD<$ty>) -> Self {
                Tensor::$variant(array)
            }
        }
    )*};
}
tensor_view_from!(f32 => F32, f64 => F64, i64 => I64, i32 => I32, u8 => U8);

impl TensorView<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorView::F32(_) => DType::F32,
            TensorView::F64(_) => DType::F64,
            TensorView::I64(_) => DType::I64,
            TensorView::I32(_) => DType::I32,
            TensorView::U8(_) => DType::U8,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            TensorView::F32(v) => v.shape(),
            TensorView::F64(v) => v.shape(),
            TensorView::I64(v) => v.shape(),
            TensorView::I32(v) => v.shape(),
            TensorView::U8(v) => v.shape(),
        }
    }

    fn slice_rows(&self, start: usize, end: usize) -> TensorView<'_> {
        let range = ndarray::Slice::from(start..end);
        match self {
            TensorView::F32(v) => TensorView::F32(v.slice_axis(Axis(0), range)),
            TensorView::F64(v) => TensorView::F64(v.slice_axis(Axis(0), range)),
            TensorView::I64(v) => TensorView::I64(v.slice_axis(Axis(0), range)),
            TensorView::I32(v) => TensorView::I32(v.slice_axis(Axis(0), range)),
            TensorView::U8(v) => TensorView::U8(v.slice_axis(Axis(0), range)),
        }
    }
}

/// An owned output tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    /// float32.
    F32(ArrayD<f32>),
    /// float64.
    F64(ArrayD<f64>),
    /// int64.
    I64(ArrayD<i64>),
    /// int32.
    I32(ArrayD<i32>),
    /// uint8.
    U8(ArrayD<u8>),
}

impl Tensor {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F64(_) => DType::F64,
            Tensor::I64(_) => DType::I64,
            Tensor::I32(_) => DType::I32,
            Tensor::U8(_) => DType::U8,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(v) => v.shape(),
            Tensor::F64(v) => v.shape(),
            Tensor::I64(v) => v.shape(),
            Tensor::I32(v) => v.shape(),
            Tensor::U8(v) => v.shape(),
        }
    }

    /// A borrowed view of this tensor.
    pub fn view(&self) -> TensorView<'_> {
        match self {
            Tensor::F32(v) => TensorView::F32(v.view()),
            Tensor::F64(v) => TensorView::F64(v.view()),
            Tensor::I64(v) => TensorView::I64(v.view()),
            Tensor::I32(v) => TensorView::I32(v.view()),
            Tensor::U8(v) => TensorView::U8(v.view()),
        }
    }

    /// Rows `start..end` of the first axis, copied.
    pub fn rows(&self, start: usize, end: usize) -> Tensor {
        match self.view().slice_rows(start, end) {
            TensorView::F32(v) => Tensor::F32(v.to_owned()),
            TensorView::F64(v) => Tensor::F64(v.to_owned()),
            TensorView::I64(v) => Tensor::I64(v.to_owned()),
            TensorView::I32(v) => Tensor::I32(v.to_owned()),
            TensorView::U8(v) => Tensor::U8(v.to_owned()),
        }
    }

    /// Joins tensors of one type along the first axis.
    pub fn concat(name: &str, parts: &[Tensor]) -> Result<Tensor> {
        fn cat<'a, T: Clone + 'a>(
            name: &str,
            parts: impl Iterator<Item = Option<ArrayViewD<'a, T>>>,
        ) -> Result<ArrayD<T>> {
            let views: Option<Vec<_>> = parts.collect();
            let views = views.ok_or_else(|| InferenceError::Output {
                name: name.into(),
                message: "batches returned different element types".into(),
            })?;
            ndarray::concatenate(Axis(0), &views).map_err(|e| InferenceError::Output {
                name: name.into(),
                message: format!("batches cannot be joined along the first axis: {e}"),
            })
        }
        let first = parts.first().ok_or_else(|| InferenceError::Output {
            name: name.into(),
            message: "no batches".into(),
        })?;
        Ok(match first {
            Tensor::F32(_) => Tensor::F32(cat(
                name,
                parts.iter().map(|p| match p {
                    Tensor::F32(v) => Some(v.view()),
                    _ => None,
                }),
            )?),
            Tensor::F64(_) => Tensor::F64(cat(
                name,
                parts.iter().map(|p| match p {
                    Tensor::F64(v) => Some(v.view()),
                    _ => None,
                }),
            )?),
            Tensor::I64(_) => Tensor::I64(cat(
                name,
                parts.iter().map(|p| match p {
                    Tensor::I64(v) => Some(v.view()),
                    _ => None,
                }),
            )?),
            Tensor::I32(_) => Tensor::I32(cat(
                name,
                parts.iter().map(|p| match p {
                    Tensor::I32(v) => Some(v.view()),
                    _ => None,
                }),
            )?),
            Tensor::U8(_) => Tensor::U8(cat(
                name,
                parts.iter().map(|p| match p {
                    Tensor::U8(v) => Some(v.view()),
                    _ => None,
                }),
            )?),
        })
    }
}

/// The outputs of one run, in the model's output order.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    /// Which load of the model produced them (1 for the first, +1 per reload).
    pub model_version: u64,
    /// (name, tensor) pairs.
    pub values: Vec<(String, Tensor)>,
}

impl Outputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| InferenceError::Output {
                name: name.into(),
                message: format!(
                    "no such output (the model has {})",
                    self.values
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// The float32 output called `name`.
    pub fn f32(&self, name: &str) -> Result<ArrayViewD<'_, f32>> {
        match self.get(name)? {
            Tensor::F32(v) => Ok(v.view()),
            other => Err(InferenceError::Output {
                name: name.into(),
                message: format!("is {}, not float32", other.dtype().name()),
            }),
        }
    }

    /// The int64 output called `name`.
    pub fn i64(&self, name: &str) -> Result<ArrayViewD<'_, i64>> {
        match self.get(name)? {
            Tensor::I64(v) => Ok(v.view()),
            other => Err(InferenceError::Output {
                name: name.into(),
                message: format!("is {}, not int64", other.dtype().name()),
            }),
        }
    }
}

/// A run's outputs, borrowed from ONNX Runtime (see [`Model::run_with`]).
pub struct OutputViews<'s, 'r> {
    /// Which load of the model produced them.
    pub model_version: u64,
    outputs: &'s ort::session::SessionOutputs<'r>,
}

impl OutputViews<'_, '_> {
    /// Number of outputs.
    pub fn len(&self) -> usize {
        self.outputs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.outputs.len() == 0
    }

    fn value(&self, name: &str) -> Result<&DynValue> {
        self.outputs
            .get(name)
            .ok_or_else(|| InferenceError::Output {
                name: name.into(),
                message: "no such output".into(),
            })
    }

    /// The float32 output called `name`, in place.
    pub fn f32(&self, name: &str) -> Result<ArrayViewD<'_, f32>> {
        self.value(name)?
            .try_extract_array::<f32>()
            .map_err(|e| InferenceError::Output {
                name: name.into(),
                message: e.to_string(),
            })
    }

    /// The int64 output called `name`, in place.
    pub fn i64(&self, name: &str) -> Result<ArrayViewD<'_, i64>> {
        self.value(name)?
            .try_extract_array::<i64>()
            .map_err(|e| InferenceError::Output {
                name: name.into(),
                message: e.to_string(),
            })
    }
}

struct Loaded {
    session: Mutex<Session>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    version: u64,
    stamp: FileStamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// An ONNX model ready to run, reloadable in place.
pub struct Model {
    path: PathBuf,
    options: SessionOptions,
    current: RwLock<Arc<Loaded>>,
    versions: AtomicU64,
    reload_lock: Mutex<()>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("options", &self.options)
            .field("version", &self.version())
            .finish()
    }
}

impl Model {
    /// Loads the model file at `path` with `options` (loading ONNX Runtime first if needed).
    pub fn load(path: impl AsRef<Path>, options: &SessionOptions) -> Result<Model> {
        let path = path.as_ref().to_path_buf();
        let loaded = build(&path, options, 1)?;
        Ok(Model {
            path,
            options: options.clone(),
            current: RwLock::new(Arc::new(loaded)),
            versions: AtomicU64::new(1),
            reload_lock: Mutex::new(()),
        })
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which load is serving: 1 for the first, +1 per successful reload.
    pub fn version(&self) -> u64 {
        self.loaded().version
    }

    /// The inputs the model declares.
    pub fn inputs(&self) -> Vec<TensorInfo> {
        self.loaded().inputs.clone()
    }

    /// The outputs the model declares.
    pub fn outputs(&self) -> Vec<TensorInfo> {
        self.loaded().outputs.clone()
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reloads the model file. Requests running now finish on the old model; later ones use
    /// the new one. On error the old model keeps serving. Returns the new version.
    pub fn reload(&self) -> Result<u64> {
        let _one_at_a_time = self
            .reload_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let version = self.versions.load(Ordering::SeqCst) + 1;
        let loaded = build(&self.path, &self.options, version)?;
        self.versions.store(version, Ordering::SeqCst);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(loaded);
        tracing::info!(path = %self.path.display(), version, "model reloaded");
        Ok(version)
    }

    /// Reloads when the file's size or modification time changed since the last load;
    /// returns whether it did.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let stamp = FileStamp::of(&self.path);
        if stamp.is_none() || stamp.as_ref() == Some(&self.loaded().stamp) {
            return Ok(false);
        }
        self.reload().map(|_| true)
    }

    /// Runs the model on named inputs. Every input the model declares must be given once.
    pub fn run(&self, inputs: &[(&str, TensorView<'_>)]) -> Result<Outputs> {
        self.run_with(inputs, |views| {
            let mut values = Vec::with_capacity(views.len());
            for (name, value) in views.outputs.iter() {
                values.push((name.to_string(), extract(name, &value)?));
            }
            Ok(Outputs {
                model_version: views.model_version,
                values,
            })
        })
    }

    /// Runs the model and hands its outputs to `read` in place, without copying them out
    /// (the zero-copy form of [`Model::run`]: the views live only during `read`).
    pub fn run_with<R>(
        &self,
        inputs: &[(&str, TensorView<'_>)],
        read: impl FnOnce(&OutputViews<'_, '_>) -> Result<R>,
    ) -> Result<R> {
        let loaded = self.loaded();
        check_inputs(&loaded.inputs, inputs)?;
        if let ([(_, view)], [_]) = (inputs, loaded.inputs.as_slice()) {
            // One input (the common case): no allocation on the way in.
            let standard = StandardView::of(view);
            let value = standard.to_ort()?;
            let mut session = loaded
                .session
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let outputs = session
                .run([value])
                .map_err(|e| InferenceError::Run(e.to_string()))?;
            return read(&OutputViews {
                model_version: loaded.version,
                outputs: &outputs,
            });
        }
        // Checked above: every declared input is given exactly once. Passing them in the
        // model's order spares ONNX Runtime the name lookup.
        let standard: Vec<StandardView<'_>> = loaded
            .inputs
            .iter()
            .filter_map(|info| inputs.iter().find(|(name, _)| *name == info.name))
            .map(|(_, view)| StandardView::of(view))
            .collect();
        let values = standard
            .iter()
            .map(StandardView::to_ort)
            .collect::<Result<Vec<_>>>()?;
        let mut session = loaded
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let outputs = session
            .run(values.as_slice())
            .map_err(|e| InferenceError::Run(e.to_string()))?;
        read(&OutputViews {
            model_version: loaded.version,
            outputs: &outputs,
        })
    }

    /// Runs a model with one input.
    pub fn run_one(&self, input: TensorView<'_>) -> Result<Outputs> {
        let loaded = self.loaded();
        let name = match loaded.inputs.as_slice() {
            [only] => only.name.clone(),
            many => {
                return Err(InferenceError::Input(format!(
                    "the model has {} inputs; name them",
                    many.len()
                )));
            }
        };
        self.run(&[(name.as_str(), input)])
    }

    /// Runs inputs whose first axis is the batch in slices of at most `batch_size` rows and
    /// joins the outputs along the first axis, as if run at once (bounded memory for large
    /// inputs, or fixed-batch models).
    pub fn run_batched(
        &self,
        inputs: &[(&str, TensorView<'_>)],
        batch_size: usize,
    ) -> Result<Outputs> {
        if batch_size == 0 {
            return Err(InferenceError::Options(
                "batch size must be at least 1".into(),
            ));
        }
        let rows = match inputs.first() {
            Some((_, view)) => *view.shape().first().ok_or_else(|| {
                InferenceError::Input("batched inputs need a first (batch) axis".into())
            })?,
            None => return self.run(inputs),
        };
        for (name, view) in inputs {
            if view.shape().first() != Some(&rows) {
                return Err(InferenceError::Input(format!(
                    "input {name} has {:?} rows, the first input {rows}: batched inputs share the first axis",
                    view.shape().first()
                )));
            }
        }
        if rows <= batch_size {
            return self.run(inputs);
        }
        let mut parts: Vec<Outputs> = Vec::new();
        let mut start = 0;
        while start < rows {
            let end = (start + batch_size).min(rows);
            let slice: Vec<(&str, TensorView<'_>)> = inputs
                .iter()
                .map(|(name, view)| (*name, view.slice_rows(start, end)))
                .collect();
            parts.push(self.run(&slice)?);
            start = end;
        }
        let mut values = Vec::new();
        let model_version = parts.last().map(|p| p.model_version).unwrap_or_default();
        if let Some(first) = parts.first() {
            for (index, (name, _)) in first.values.iter().enumerate() {
                let pieces: Vec<Tensor> = parts
                    .iter()
                    .map(|p| p.values.get(index).map(|(_, t)| t.clone()))
                    .collect::<Option<_>>()
                    .ok_or_else(|| InferenceError::Output {
                        name: name.clone(),
                        message: "missing from a batch".into(),
                    })?;
                values.push((name.clone(), Tensor::concat(name, &pieces)?));
            }
        }
        Ok(Outputs {
            model_version,
            values,
        })
    }
}

fn build(path: &Path, options: &SessionOptions, version: u64) -> Result<Loaded> {
    runtime()?;
    let stamp = FileStamp::of(path).ok_or_else(|| InferenceError::Load {
        path: path.to_path_buf(),
        message: "no such file or not readable".into(),
    })?;
    let option_error = |e: ort::Error<ort::session::builder::SessionBuilder>| {
        InferenceError::Options(e.to_string())
    };
    let environment = ENVIRONMENT
        .get()
        .ok_or_else(|| InferenceError::RuntimeLoad {
            path: PathBuf::new(),
            message: "the ONNX Runtime environment was not created".into(),
        })?;
    let mut builder =
        Session::builder(environment).map_err(|e| InferenceError::Options(e.to_string()))?;
    builder = builder
        .with_optimization_level(if options.optimize {
            GraphOptimizationLevel::All
        } else {
            GraphOptimizationLevel::Disable
        })
        .map_err(option_error)?;
    if options.intra_threads > 0 {
        builder = builder
            .with_intra_threads(options.intra_threads)
            .map_err(option_error)?;
    }
    if options.inter_threads > 0 {
        builder = builder
            .with_inter_threads(options.inter_threads)
            .map_err(option_error)?;
    }
    for provider in &options.providers {
        if let Some(dispatch) = provider.dispatch() {
            builder = builder.with_execution_providers([dispatch]).map_err(|e| {
                InferenceError::Provider {
                    provider: provider.name(),
                    message: e.to_string(),
                }
            })?;
        }
    }
    let session = builder
        .commit_from_file(path)
        .map_err(|e| InferenceError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let inputs = session
        .inputs()
        .iter()
        .map(TensorInfo::from_outlet)
        .collect();
    let outputs = session
        .outputs()
        .iter()
        .map(TensorInfo::from_outlet)
        .collect();
    Ok(Loaded {
        session: Mutex::new(session),
        inputs,
        outputs,
        version,
        stamp,
    })
}

fn check_inputs(declared: &[TensorInfo], given: &[(&str, TensorView<'_>)]) -> Result<()> {
    let names = || {
        declared
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (index, (name, view)) in given.iter().enumerate() {
        if given[..index].iter().any(|(n, _)| n == name) {
            return Err(InferenceError::Input(format!("{name} is given twice")));
        }
        let info = declared.iter().find(|i| i.name == *name).ok_or_else(|| {
            InferenceError::Input(format!(
                "the model has no input {name:?} (its inputs: {})",
                names()
            ))
        })?;
        if info.dtype != view.dtype() {
            return Err(InferenceError::Input(format!(
                "{name} must be {}, got {}",
                info.dtype.name(),
                view.dtype().name()
            )));
        }
        let shape = view.shape();
        if !info.shape.is_empty() {
            if info.shape.len() != shape.len() {
                return Err(InferenceError::Input(format!(
                    "{name} must have {} dimensions {}, got {:?}",
                    info.shape.len(),
                    describe_shape(&info.shape),
                    shape
                )));
            }
            for (axis, (want, got)) in info.shape.iter().zip(shape).enumerate() {
                if let Some(want) = want
                    && want != got
                {
                    return Err(InferenceError::Input(format!(
                        "{name} dimension {axis} must be {want} {}, got {got}",
                        describe_shape(&info.shape)
                    )));
                }
            }
        }
    }
    if let Some(missing) = declared
        .iter()
        .find(|i| !given.iter().any(|(n, _)| *n == i.name))
    {
        return Err(InferenceError::Input(format!(
            "input {} is missing (the model's inputs: {})",
            missing.name,
            names()
        )));
    }
    Ok(())
}

fn describe_shape(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or_else(|| "N".to_string(), |d| d.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

/// An input in standard (C-contiguous) layout: borrowed when it already is, copied otherwise.
enum StandardView<'a> {
    F32(ndarray::CowArray<'a, f32, IxDyn>),
    F64(ndarray::CowArray<'a, f64, IxDyn>),
    I64(ndarray::CowArray<'a, i64, IxDyn>),
    I32(ndarray::CowArray<'a, i32, IxDyn>),
    U8(ndarray::CowArray<'a, u8, IxDyn>),
}

impl<'a> StandardView<'a> {
    fn of<'v: 'a>(view: &'a TensorView<'v>) -> StandardView<'a> {
        match view {
            TensorView::F32(v) => StandardView::F32(v.as_standard_layout()),
            TensorView::F64(v) => StandardView::F64(v.as_standard_layout()),
            TensorView::I64(v) => StandardView::I64(v.as_standard_layout()),
            TensorView::I32(v) => StandardView::I32(v.as_standard_layout()),
            TensorView::U8(v) => StandardView::U8(v.as_standard_layout()),
        }
    }

    fn to_ort(&self) -> Result<ort::session::SessionInputValue<'_>> {
        let input_error = |e: ort::Error| InferenceError::Input(e.to_string());
        Ok(match self {
            StandardView::F32(v) => TensorRef::from_array_view(v).map_err(input_error)?.into(),
            StandardView::F64(v) => TensorRef::from_array_view(v).map_err(input_error)?.into(),
            StandardView::I64(v) => TensorRef::from_array_view(v).map_err(input_error)?.into(),
            StandardView::I32(v) => TensorRef::from_array_view(v).map_err(input_error)?.into(),
            StandardView::U8(v) => TensorRef::from_array_view(v).map_err(input_error)?.into(),
        })
    }
}

fn extract(name: &str, value: &ort::value::ValueRef<'_>) -> Result<Tensor> {
    let value: &DynValue = value;
    let output_error = |e: ort::Error| InferenceError::Output {
        name: name.into(),
        message: e.to_string(),
    };
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(InferenceError::Output {
                name: name.into(),
                message: format!(
                    "is a {other:?}, not a tensor (export classifiers without ZipMap)"
                ),
            });
        }
    };
    Ok(match ty {
        TensorElementType::Float32 => Tensor::F32(
            value
                .try_extract_array::<f32>()
                .map_err(output_error)?
                .to_owned(),
        ),
        TensorElementType::Float64 => Tensor::F64(
            value
                .try_extract_array::<f64>()
                .map_err(output_error)?
                .to_owned(),
        ),
        TensorElementType::Int64 => Tensor::I64(
            value
                .try_extract_array::<i64>()
                .map_err(output_error)?
                .to_owned(),
        ),
        TensorElementType::Int32 => Tensor::I32(
            value
                .try_extract_array::<i32>()
                .map_err(output_error)?
                .to_owned(),
        ),
        TensorElementType::Uint8 => Tensor::U8(
            value
                .try_extract_array::<u8>()
                .map_err(output_error)?
                .to_owned(),
        ),
        other => {
            return Err(InferenceError::Output {
                name: name.into(),
                message: format!("element type {other:?} is not supported"),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_parse_and_bad_ones_are_refused() {
        assert_eq!(Provider::parse("CPU").unwrap(), Provider::Cpu);
        assert_eq!(
            Provider::parse("cuda:1").unwrap(),
            Provider::Cuda { device_id: 1 }
        );
        assert_eq!(
            Provider::parse("tensorrt").unwrap(),
            Provider::TensorRt { device_id: 0 }
        );
        let err = Provider::parse("tpu").unwrap_err().to_string();
        assert!(err.contains("unknown execution provider \"tpu\""), "{err}");
        let err = Provider::parse("cuda:x").unwrap_err().to_string();
        assert!(err.contains("not a GPU index"), "{err}");
    }

    #[test]
    fn a_missing_runtime_error_names_the_variable_and_every_place_looked() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("libonnxruntime.so.1.99.0");
        let (found, searched) =
            find_runtime(|name| (name == ORT_DYLIB_ENV).then(|| missing.clone().into_os_string()));
        // The project's own .venv may still be found after the variable: only the order
        // and the report are asserted here.
        assert!(searched[0].starts_with("ORT_DYLIB_PATH="), "{searched:?}");
        if let Some(found) = found {
            assert_ne!(found, missing);
        }
        let err = InferenceError::RuntimeNotFound {
            searched: searched.join(", "),
        }
        .to_string();
        assert!(
            err.contains("ORT_DYLIB_PATH") && err.contains("scripts/setup"),
            "{err}"
        );
    }

    #[test]
    fn the_wheel_layout_is_found_in_a_virtual_environment() {
        let venv = tempfile::tempdir().unwrap();
        let capi = venv
            .path()
            .join("lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.30.0"), b"").unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.32.0"), b"").unwrap();
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        let (found, _) = find_runtime(|name| {
            (name == "VIRTUAL_ENV").then(|| venv.path().as_os_str().to_owned())
        });
        assert_eq!(found.unwrap(), capi.join("libonnxruntime.so.1.32.0"));
    }

    #[test]
    fn inputs_are_checked_against_the_declared_shape_and_type() {
        let declared = vec![TensorInfo {
            name: "input".into(),
            dtype: DType::F32,
            shape: vec![None, Some(64)],
        }];
        let ok = ndarray::Array2::<f32>::zeros((3, 64)).into_dyn();
        check_inputs(&declared, &[("input", TensorView::from(ok.view()))]).unwrap();
        let narrow = ndarray::Array2::<f32>::zeros((3, 63)).into_dyn();
        let err = check_inputs(&declared, &[("input", TensorView::from(narrow.view()))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dimension 1 must be 64 [N, 64], got 63"),
            "{err}"
        );
        let ints = ndarray::Array2::<i64>::zeros((3, 64)).into_dyn();
        let err = check_inputs(&declared, &[("input", TensorView::from(ints.view()))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be float32, got int64"), "{err}");
        let err = check_inputs(&declared, &[("image", TensorView::from(ok.view()))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no input \"image\" (its inputs: input)"),
            "{err}"
        );
        let err = check_inputs(&declared, &[]).unwrap_err().to_string();
        assert!(err.contains("input input is missing"), "{err}");
        let flat = ndarray::Array1::<f32>::zeros(64).into_dyn();
        let err = check_inputs(&declared, &[("input", TensorView::from(flat.view()))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("must have 2 dimensions"), "{err}");
    }
}
