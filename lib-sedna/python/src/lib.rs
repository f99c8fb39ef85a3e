//! Python bindings of `lib-sedna`: the native module `sedna._sedna`, re-exported by the
//! pure-Python package `sedna` (see `python/sedna/__init__.py`).
//!
//! numpy arrays come in as borrowed views (no copy when C-contiguous) and go out as arrays
//! that take over the Rust buffers (no copy). Rust errors become Python exceptions derived
//! from `sedna.SednaError`, carrying the Rust error's message. Calls that wait (cloud
//! requests, storage) release the GIL.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use numpy::{IntoPyArray, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use sedna::aggregate::{self, Update};
use sedna::fl::{self, Estimator, EstimatorError, TrainReport};
use sedna::hem::{self, HardExampleMining, Input};
use sedna::inference::{self, Provider, SessionOptions, Tensor, TensorView};
use sedna::joint;
use sedna::train;
use sedna::weights::{Encoding, Limits, Weights};

create_exception!(
    _sedna,
    SednaError,
    PyException,
    "Base of every sedna error."
);
create_exception!(
    _sedna,
    InferenceError,
    SednaError,
    "Loading or running a model failed."
);
create_exception!(
    _sedna,
    HemError,
    SednaError,
    "Hard-example mining is misconfigured."
);
create_exception!(
    _sedna,
    JointInferenceError,
    SednaError,
    "Joint inference failed."
);
create_exception!(
    _sedna,
    FederatedLearningError,
    SednaError,
    "Federated learning failed."
);
create_exception!(
    _sedna,
    WeightsError,
    SednaError,
    "Weights cannot be encoded or decoded."
);
create_exception!(_sedna, AggregationError, SednaError, "Aggregation failed.");
create_exception!(
    _sedna,
    ConfigError,
    SednaError,
    "The worker configuration is invalid."
);
create_exception!(_sedna, StorageError, SednaError, "Object storage failed.");
create_exception!(
    _sedna,
    TrainError,
    SednaError,
    "Training failed, or the model, data or a hyperparameter is unfit for it."
);
create_exception!(
    _sedna,
    DatasetError,
    SednaError,
    "A dataset index is invalid."
);

fn err<E: std::fmt::Display>(kind: fn(String) -> PyErr) -> impl Fn(E) -> PyErr {
    move |e| kind(e.to_string())
}

fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::io::Result<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("sedna")
                .enable_all()
                .build()
        })
        .as_ref()
        .map_err(|e| SednaError::new_err(format!("starting the I/O runtime: {e}")))
}

// ----- tensors ----------------------------------------------------------------------------------

/// A numpy array borrowed for the duration of a call.
enum Borrowed<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    I64(PyReadonlyArrayDyn<'py, i64>),
    I32(PyReadonlyArrayDyn<'py, i32>),
    U8(PyReadonlyArrayDyn<'py, u8>),
}

impl<'py> Borrowed<'py> {
    fn extract(name: &str, value: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'py, f32>>() {
            return Ok(Borrowed::F32(a));
        }
        if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'py, f64>>() {
            return Ok(Borrowed::F64(a));
        }
        if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'py, i64>>() {
            return Ok(Borrowed::I64(a));
        }
        if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'py, i32>>() {
            return Ok(Borrowed::I32(a));
        }
        if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'py, u8>>() {
            return Ok(Borrowed::U8(a));
        }
        let described = value
            .getattr("dtype")
            .map(|d| d.to_string())
            .unwrap_or_else(|_| value.get_type().to_string());
        Err(InferenceError::new_err(format!(
            "input {name}: expected a numpy array of float32, float64, int64, int32 or uint8, got {described}"
        )))
    }

    fn view(&self) -> TensorView<'_> {
        match self {
            Borrowed::F32(a) => TensorView::F32(a.as_array()),
            Borrowed::F64(a) => TensorView::F64(a.as_array()),
            Borrowed::I64(a) => TensorView::I64(a.as_array()),
            Borrowed::I32(a) => TensorView::I32(a.as_array()),
            Borrowed::U8(a) => TensorView::U8(a.as_array()),
        }
    }

    fn owned(&self) -> Tensor {
        match self {
            Borrowed::F32(a) => Tensor::F32(a.as_array().to_owned()),
            Borrowed::F64(a) => Tensor::F64(a.as_array().to_owned()),
            Borrowed::I64(a) => Tensor::I64(a.as_array().to_owned()),
            Borrowed::I32(a) => Tensor::I32(a.as_array().to_owned()),
            Borrowed::U8(a) => Tensor::U8(a.as_array().to_owned()),
        }
    }
}

/// Named inputs from a dict `{name: array}`, or a single array for a one-input model.
fn borrowed_inputs<'py>(
    inputs: &Bound<'py, PyAny>,
    single_name: impl FnOnce() -> PyResult<String>,
) -> PyResult<Vec<(String, Borrowed<'py>)>> {
    if let Ok(dict) = inputs.cast::<PyDict>() {
        let mut out = Vec::with_capacity(dict.len());
        for (key, value) in dict.iter() {
            let name: String = key
                .extract()
                .map_err(|_| InferenceError::new_err("input names must be strings"))?;
            let borrowed = Borrowed::extract(&name, &value)?;
            out.push((name, borrowed));
        }
        Ok(out)
    } else {
        let name = single_name()?;
        let borrowed = Borrowed::extract(&name, inputs)?;
        Ok(vec![(name, borrowed)])
    }
}

fn tensor_to_py(py: Python<'_>, tensor: Tensor) -> Bound<'_, PyAny> {
    match tensor {
        Tensor::F32(a) => a.into_pyarray(py).into_any(),
        Tensor::F64(a) => a.into_pyarray(py).into_any(),
        Tensor::I64(a) => a.into_pyarray(py).into_any(),
        Tensor::I32(a) => a.into_pyarray(py).into_any(),
        Tensor::U8(a) => a.into_pyarray(py).into_any(),
    }
}

fn tensors_to_dict(py: Python<'_>, tensors: Vec<(String, Tensor)>) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    for (name, tensor) in tensors {
        dict.set_item(name, tensor_to_py(py, tensor))?;
    }
    Ok(dict)
}

// ----- weights ----------------------------------------------------------------------------------

fn weights_from_py(value: &Bound<'_, PyAny>) -> PyResult<Weights> {
    let dict = value.cast::<PyDict>().map_err(|_| {
        WeightsError::new_err("weights must be a dict of name -> numpy float32 array")
    })?;
    let mut tensors = Vec::with_capacity(dict.len());
    for (key, array) in dict.iter() {
        let name: String = key
            .extract()
            .map_err(|_| WeightsError::new_err("weight names must be strings"))?;
        let array: PyReadonlyArrayDyn<'_, f32> = match array.extract() {
            Ok(a) => a,
            Err(_) => {
                // Accept other float arrays by converting (a copy), like numpy would.
                let converted = array.call_method1("astype", ("float32",)).map_err(|_| {
                    WeightsError::new_err(format!("weight {name}: not a numeric array"))
                })?;
                converted
                    .extract::<PyReadonlyArrayDyn<'_, f32>>()
                    .map_err(|_| {
                        WeightsError::new_err(format!("weight {name}: not a numeric array"))
                    })?
                    .as_array()
                    .to_owned()
                    .into_pyarray(value.py())
                    .readonly()
            }
        };
        tensors.push((name, array.as_array().to_owned()));
    }
    Weights::new(tensors).map_err(err(WeightsError::new_err))
}

fn weights_to_py(py: Python<'_>, weights: Weights) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    for (name, array) in weights.into_tensors() {
        dict.set_item(name, array.into_pyarray(py))?;
    }
    Ok(dict)
}

fn parse_encoding(encoding: &str) -> PyResult<Encoding> {
    Encoding::parse(encoding).map_err(err(WeightsError::new_err))
}

/// encode_weights(weights: dict[str, ndarray], encoding="f32") -> bytes
///
/// Encodes named float tensors in the binary SDNW format (f32, fp16 or int8).
#[pyfunction]
#[pyo3(signature = (weights, encoding = "f32"))]
fn encode_weights<'py>(
    py: Python<'py>,
    weights: &Bound<'py, PyAny>,
    encoding: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let weights = weights_from_py(weights)?;
    let bytes = weights
        .encode(parse_encoding(encoding)?)
        .map_err(err(WeightsError::new_err))?;
    Ok(PyBytes::new(py, &bytes))
}

/// decode_weights(data: bytes) -> dict[str, ndarray]
#[pyfunction]
fn decode_weights<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let weights = Weights::decode(data, &Limits::default()).map_err(err(WeightsError::new_err))?;
    weights_to_py(py, weights)
}

// ----- inference --------------------------------------------------------------------------------

/// init_runtime(path: str) -> str
///
/// Loads ONNX Runtime from `path` (done automatically from the `onnxruntime` wheel).
#[pyfunction]
fn init_runtime(path: PathBuf) -> PyResult<String> {
    let runtime = inference::init_runtime_from(&path).map_err(err(InferenceError::new_err))?;
    Ok(runtime.path.display().to_string())
}

fn describe(info: &inference::TensorInfo) -> (String, String, Vec<Option<usize>>) {
    (
        info.name.clone(),
        info.dtype.name().to_string(),
        info.shape.clone(),
    )
}

/// Model(path, providers=["cpu"], intra_threads=0, inter_threads=0, optimize=True)
///
/// An ONNX model on ONNX Runtime. `providers` lists execution providers ("cpu", "cuda",
/// "cuda:1", "tensorrt"); one that cannot be registered is an error, never a silent CPU
/// fallback.
#[pyclass(frozen, module = "sedna._sedna")]
struct Model {
    inner: Arc<inference::Model>,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, providers = vec!["cpu".to_string()], intra_threads = 0, inter_threads = 0, optimize = true))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        providers: Vec<String>,
        intra_threads: usize,
        inter_threads: usize,
        optimize: bool,
    ) -> PyResult<Self> {
        let providers = providers
            .iter()
            .map(|p| Provider::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err(InferenceError::new_err))?;
        let options = SessionOptions {
            providers,
            intra_threads,
            inter_threads,
            optimize,
        };
        let model = py
            .detach(|| inference::Model::load(&path, &options))
            .map_err(err(InferenceError::new_err))?;
        Ok(Model {
            inner: Arc::new(model),
        })
    }

    /// Inputs as (name, dtype, shape) with None for free dimensions.
    #[getter]
    fn inputs(&self) -> Vec<(String, String, Vec<Option<usize>>)> {
        self.inner.inputs().iter().map(describe).collect()
    }

    /// Outputs as (name, dtype, shape).
    #[getter]
    fn outputs(&self) -> Vec<(String, String, Vec<Option<usize>>)> {
        self.inner.outputs().iter().map(describe).collect()
    }

    /// Which load serves: 1, then +1 per reload.
    #[getter]
    fn version(&self) -> u64 {
        self.inner.version()
    }

    /// run(inputs) -> dict[str, ndarray]; `inputs` is {name: array} or one array.
    fn run<'py>(
        &self,
        py: Python<'py>,
        inputs: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.run_inner(py, inputs, None)
    }

    /// run_batched(inputs, batch_size) -> dict; runs in slices of `batch_size` rows.
    fn run_batched<'py>(
        &self,
        py: Python<'py>,
        inputs: &Bound<'py, PyAny>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.run_inner(py, inputs, Some(batch_size))
    }

    /// Reloads the model file; returns the new version. Running calls finish on the old one.
    fn reload(&self, py: Python<'_>) -> PyResult<u64> {
        let inner = self.inner.clone();
        py.detach(move || inner.reload())
            .map_err(err(InferenceError::new_err))
    }

    /// Reloads if the file changed; returns whether it did.
    fn reload_if_changed(&self, py: Python<'_>) -> PyResult<bool> {
        let inner = self.inner.clone();
        py.detach(move || inner.reload_if_changed())
            .map_err(err(InferenceError::new_err))
    }

    fn __repr__(&self) -> String {
        format!(
            "Model(path={:?}, version={})",
            self.inner.path().display().to_string(),
            self.inner.version()
        )
    }
}

impl Model {
    fn single_input_name(&self) -> PyResult<String> {
        match self.inner.inputs().as_slice() {
            [only] => Ok(only.name.clone()),
            many => Err(InferenceError::new_err(format!(
                "the model has {} inputs; pass a dict {{name: array}}",
                many.len()
            ))),
        }
    }

    fn run_inner<'py>(
        &self,
        py: Python<'py>,
        inputs: &Bound<'py, PyAny>,
        batch: Option<usize>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let borrowed = borrowed_inputs(inputs, || self.single_input_name())?;
        let views: Vec<(&str, TensorView<'_>)> = borrowed
            .iter()
            .map(|(name, b)| (name.as_str(), b.view()))
            .collect();
        // Views borrow numpy memory, so the GIL stays held (other threads may not free it).
        let outputs = match batch {
            None => self.inner.run(&views),
            Some(size) => self.inner.run_batched(&views, size),
        }
        .map_err(err(InferenceError::new_err))?;
        tensors_to_dict(py, outputs.values)
    }
}

// ----- hard-example mining ----------------------------------------------------------------------

fn parameters_from_py(parameters: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(String, String)>> {
    let Some(parameters) = parameters else {
        return Ok(Vec::new());
    };
    if parameters.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(text) = parameters.extract::<String>() {
        return hem::parse_parameters(&text).map_err(err(HemError::new_err));
    }
    if let Ok(dict) = parameters.cast::<PyDict>() {
        return dict
            .iter()
            .map(|(k, v)| Ok((k.str()?.to_string(), v.str()?.to_string())))
            .collect();
    }
    Err(HemError::new_err(
        "parameters must be a dict, or Sedna's HEM_PARAMETERS JSON string",
    ))
}

/// A Python object with `is_hard(data) -> bool`, used as a mining algorithm.
struct PyHem {
    name: String,
    object: Py<PyAny>,
}

impl std::fmt::Debug for PyHem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PyHem({})", self.name)
    }
}

impl HardExampleMining for PyHem {
    fn name(&self) -> &str {
        &self.name
    }

    fn is_hard(&self, input: &Input<'_>) -> bool {
        Python::attach(|py| {
            let data = match input {
                Input::Probabilities(p) => p.to_owned().into_pyarray(py).into_any(),
                Input::Boxes(b) => b.to_owned().into_pyarray(py).into_any(),
                Input::Opaque => py.None().into_bound(py),
            };
            match self
                .object
                .bind(py)
                .call_method1("is_hard", (data,))
                .and_then(|r| r.is_truthy())
            {
                Ok(hard) => hard,
                Err(e) => {
                    // A failing custom algorithm must not lose the input: treat as hard so
                    // the cloud sees it, and report.
                    e.print(py);
                    true
                }
            }
        })
    }
}

/// register_hem(name, factory)
///
/// Registers a Python hard-example mining algorithm: `factory(parameters: dict[str, str])`
/// returns an object with `is_hard(data) -> bool` (data: probabilities, boxes or None).
#[pyfunction]
fn register_hem(name: String, factory: Py<PyAny>) {
    let registered = name.clone();
    hem::registry().register(&name, move |parameters| {
        Python::attach(|py| {
            let dict = PyDict::new(py);
            for (k, v) in parameters {
                dict.set_item(*k, *v)
                    .map_err(|e| hem::HemError::Parameters(e.to_string()))?;
            }
            let object = factory
                .bind(py)
                .call1((dict,))
                .map_err(|e| hem::HemError::Parameters(format!("{registered}: {e}")))?;
            Ok(Box::new(PyHem {
                name: registered.clone(),
                object: object.unbind(),
            }) as Box<dyn HardExampleMining>)
        })
    });
}

/// hem_names() -> list[str]: the registered algorithms.
#[pyfunction]
fn hem_names() -> Vec<String> {
    hem::registry().names()
}

/// HardExampleMining(name, parameters=None)
///
/// A mining algorithm from the registry (Threshold, CrossEntropy, IBT, Random, CloudOnly,
/// EdgeOnly, or one registered with `register_hem`). `parameters` is a dict or Sedna's
/// HEM_PARAMETERS JSON.
#[pyclass(frozen, name = "HardExampleMining", module = "sedna._sedna")]
struct HardExampleMiningAlgorithm {
    inner: Arc<dyn HardExampleMining>,
}

fn build_hem(
    name: &str,
    parameters: Option<&Bound<'_, PyAny>>,
) -> PyResult<Box<dyn HardExampleMining>> {
    let pairs = parameters_from_py(parameters)?;
    let borrowed: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    hem::registry()
        .build(name, &borrowed)
        .map_err(err(HemError::new_err))
}

#[pymethods]
impl HardExampleMiningAlgorithm {
    #[new]
    #[pyo3(signature = (name, parameters = None))]
    fn new(name: &str, parameters: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        Ok(HardExampleMiningAlgorithm {
            inner: Arc::from(build_hem(name, parameters)?),
        })
    }

    /// The algorithm's name.
    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_string()
    }

    /// is_hard(data) -> bool; data: 1-D probabilities, 2-D boxes [x1,y1,x2,y2,score,…], or None.
    #[pyo3(signature = (data = None))]
    fn is_hard(&self, data: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let Some(data) = data.filter(|d| !d.is_none()) else {
            return Ok(self.inner.is_hard(&Input::Opaque));
        };
        let array: PyReadonlyArrayDyn<'_, f32> = match data.extract() {
            Ok(a) => a,
            Err(_) => data
                .call_method1("astype", ("float32",))?
                .extract()
                .map_err(|_| HemError::new_err("data must be a numeric numpy array"))?,
        };
        let view = array.as_array();
        match view.ndim() {
            1 => Ok(self.inner.is_hard(&Input::Probabilities(
                view.into_dimensionality().map_err(err(HemError::new_err))?,
            ))),
            2 => Ok(self.inner.is_hard(&Input::Boxes(
                view.into_dimensionality().map_err(err(HemError::new_err))?,
            ))),
            n => Err(HemError::new_err(format!(
                "data must be 1-D probabilities or 2-D boxes, got {n} dimensions"
            ))),
        }
    }

    fn __repr__(&self) -> String {
        format!("HardExampleMining({:?})", self.inner.name())
    }
}

/// Lets the Rust registry hand a shared algorithm to joint inference.
#[derive(Debug)]
struct SharedHem(Arc<dyn HardExampleMining>);

impl HardExampleMining for SharedHem {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn is_hard(&self, input: &Input<'_>) -> bool {
        self.0.is_hard(input)
    }
}

// ----- joint inference --------------------------------------------------------------------------

/// JointInference(model, hem, cloud_url, queue_dir, timeout=2.0, queue_max_items=10000,
///                queue_max_bytes=1 GiB)
///
/// `model` is a Model (or a path), `hem` a HardExampleMining (or a name), `cloud_url`
/// `grpc://host:port` (a cloud worker) or `http://host:port` (Sedna-style HTTP). `inference(data)`
/// returns Sedna's tuple (is_hard, result, edge_result, cloud_result).
#[pyclass(frozen, module = "sedna._sedna")]
struct JointInference {
    inner: Arc<joint::JointInference>,
    model: Arc<inference::Model>,
    counter: std::sync::atomic::AtomicU64,
}

#[pymethods]
impl JointInference {
    #[new]
    #[pyo3(signature = (model, hem, cloud_url, queue_dir, timeout = 2.0, queue_max_items = 10_000, queue_max_bytes = 1u64 << 30, hem_output = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &Bound<'_, PyAny>,
        hem: &Bound<'_, PyAny>,
        cloud_url: &str,
        queue_dir: PathBuf,
        timeout: f64,
        queue_max_items: usize,
        queue_max_bytes: u64,
        hem_output: Option<String>,
    ) -> PyResult<Self> {
        let model: Arc<inference::Model> = match model.cast::<Model>() {
            Ok(m) => m.get().inner.clone(),
            Err(_) => {
                let path: PathBuf = model.extract().map_err(|_| {
                    JointInferenceError::new_err("model must be a sedna.Model or a path")
                })?;
                Arc::new(
                    inference::Model::load(&path, &SessionOptions::default())
                        .map_err(err(InferenceError::new_err))?,
                )
            }
        };
        let hem: Box<dyn HardExampleMining> = match hem.cast::<HardExampleMiningAlgorithm>() {
            Ok(h) => Box::new(SharedHem(h.get().inner.clone())),
            Err(_) => {
                let name: String = hem.extract().map_err(|_| {
                    JointInferenceError::new_err("hem must be a sedna.HardExampleMining or a name")
                })?;
                build_hem(&name, None)?
            }
        };
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(JointInferenceError::new_err(
                "timeout must be a positive number of seconds",
            ));
        }
        let timeout = Duration::from_secs_f64(timeout);
        // grpc://host:port: a cloud worker (sedna-cloud-worker, or serve_cloud(protocol="grpc"));
        // http(s)://: Sedna-style POST /sedna/predict.
        let cloud: Box<dyn joint::Cloud> = runtime()?
            .block_on(async {
                match cloud_url.strip_prefix("grpc://") {
                    // The service's token, when its controller mounted one.
                    Some(rest) => sedna::cloud::GrpcCloud::new(&format!("http://{rest}"), timeout)
                        .and_then(|c| match sedna::cloud::service_token_from_env() {
                            Ok(Some(token)) => c.with_token(&token),
                            Ok(None) => Ok(c),
                            Err(e) => Err(joint::JointError::Config(e.to_string())),
                        })
                        .map(|c| Box::new(c) as Box<dyn joint::Cloud>),
                    None => joint::HttpCloud::new(cloud_url, timeout)
                        .map(|c| Box::new(c) as Box<dyn joint::Cloud>),
                }
            })
            .map_err(err(JointInferenceError::new_err))?;
        let queue = joint::HardExampleQueue::open(
            &queue_dir,
            joint::QueueLimits {
                max_items: queue_max_items,
                max_bytes: queue_max_bytes,
            },
        )
        .map_err(err(JointInferenceError::new_err))?;
        let mut ji = joint::JointInference::new(model.clone(), hem, cloud, queue);
        if let Some(output) = hem_output {
            ji = ji
                .with_hem_source(joint::HemSource::Output(output))
                .map_err(err(JointInferenceError::new_err))?;
        }
        Ok(JointInference {
            inner: Arc::new(ji),
            model,
            counter: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// inference(data, id=None) -> (is_hard, result, edge_result, cloud_result)
    ///
    /// `data` is one sample ({name: array} or one array, with a batch axis of 1). Results
    /// are dicts of arrays; cloud_result is None unless the cloud answered.
    #[pyo3(signature = (data, id = None))]
    fn inference<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        id: Option<String>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let borrowed = borrowed_inputs(data, || match self.model.inputs().as_slice() {
            [only] => Ok(only.name.clone()),
            many => Err(InferenceError::new_err(format!(
                "the model has {} inputs; pass a dict {{name: array}}",
                many.len()
            ))),
        })?;
        // The request outlives the borrow (it may be queued): own the inputs.
        let inputs: Vec<(String, Tensor)> = borrowed
            .iter()
            .map(|(name, b)| (name.clone(), b.owned()))
            .collect();
        let id = id.unwrap_or_else(|| {
            format!(
                "{}",
                self.counter
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        });
        let inner = self.inner.clone();
        let rt = runtime()?;
        let result = py
            .detach(move || rt.block_on(async move { inner.inference(&id, &inputs).await }))
            .map_err(err(JointInferenceError::new_err))?;
        // Sedna's tuple: the final result is the same dict as the cloud's (or the edge's).
        let edge = tensors_to_dict(py, result.edge.values)?.into_any();
        let (final_result, cloud) = match result.cloud {
            Some(reply) => {
                let cloud = tensors_to_dict(py, reply.outputs)?.into_any();
                (cloud.clone(), cloud)
            }
            None => (edge.clone(), py.None().into_bound(py)),
        };
        let items: Vec<Bound<'py, PyAny>> = vec![
            result.is_hard.into_pyobject(py)?.to_owned().into_any(),
            final_result,
            edge,
            cloud,
        ];
        PyTuple::new(py, items)
    }

    /// resend() -> list[(id, cloud_result)]: sends queued hard examples (oldest first)
    /// until the queue is empty or the cloud fails again.
    fn resend<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let inner = self.inner.clone();
        let rt = runtime()?;
        let (answers, _error) = py.detach(move || rt.block_on(async move { inner.resend().await }));
        let list = PyList::empty(py);
        for answer in answers {
            let outputs = tensors_to_dict(py, answer.cloud.outputs)?;
            list.append((answer.id, outputs))?;
        }
        Ok(list)
    }

    /// Hard examples waiting for the cloud.
    #[getter]
    fn queued(&self) -> usize {
        self.inner.queued()
    }

    /// Counters: inferences, hard_examples, cloud_answers, queued, refused, cloud_failures,
    /// uplink_bytes, downlink_bytes, upload_ratio.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("inferences", s.inferences)?;
        d.set_item("hard_examples", s.hard_examples)?;
        d.set_item("cloud_answers", s.cloud_answers)?;
        d.set_item("queued", s.queued)?;
        d.set_item("refused", s.refused)?;
        d.set_item("cloud_failures", s.cloud_failures)?;
        d.set_item("uplink_bytes", s.uplink_bytes)?;
        d.set_item("downlink_bytes", s.downlink_bytes)?;
        d.set_item("upload_ratio", s.upload_ratio())?;
        Ok(d)
    }
}

/// serve_cloud(model, host="127.0.0.1", port=5000, protocol="http") -> CloudServer
///
/// Serves `model` for JointInference in the background: `protocol="http"` on POST
/// /sedna/predict (reach it as `http://host:port`), `"grpc"` as the cloud worker's gRPC
/// service with dynamic batching (reach it as `grpc://host:port`).
#[pyclass(module = "sedna._sedna")]
struct CloudServer {
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    port: u16,
}

#[pymethods]
impl CloudServer {
    /// The port it listens on.
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// Stops serving (open connections are closed).
    fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stop.send(());
        }
    }
}

#[pyfunction]
#[pyo3(signature = (model, host = "127.0.0.1", port = 5000, protocol = "http"))]
fn serve_cloud(
    model: &Bound<'_, Model>,
    host: &str,
    port: u16,
    protocol: &str,
) -> PyResult<CloudServer> {
    if !matches!(protocol, "http" | "grpc") {
        return Err(JointInferenceError::new_err(format!(
            "protocol {protocol:?}: use \"http\" or \"grpc\""
        )));
    }
    let rt = runtime()?;
    let (listener, port) = listen(rt, host, port)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let model = model.get().inner.clone();
    if protocol == "grpc" {
        let options = serve_options()?;
        rt.spawn(async move {
            let batcher =
                sedna::cloud::Batcher::spawn(model, sedna::cloud::BatchOptions::default());
            let _ = sedna::cloud::serve(
                listener,
                batcher,
                sedna::cloud::Protocols::Grpc,
                options,
                async move {
                    let _ = stopped.await;
                },
            )
            .await;
        });
    } else {
        rt.spawn(async move {
            let _ = joint::serve_http(listener, model, async move {
                let _ = stopped.await;
            })
            .await;
        });
    }
    Ok(CloudServer {
        stop: Mutex::new(Some(stop)),
        port,
    })
}

/// Binds a cloud worker's port (0: any free one); the listener and the port it got.
fn listen(
    rt: &tokio::runtime::Runtime,
    host: &str,
    port: u16,
) -> PyResult<(tokio::net::TcpListener, u16)> {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((host, port)))
        .map_err(|e| JointInferenceError::new_err(format!("listening on {host}:{port}: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| JointInferenceError::new_err(e.to_string()))?
        .port();
    Ok((listener, port))
}

/// A cloud worker's limits, with the service's token when `SEDNA_SERVICE_TOKEN_FILE` names one.
fn serve_options() -> PyResult<sedna::cloud::ServeOptions> {
    let token = sedna::cloud::service_token_from_env()
        .map_err(|e| JointInferenceError::new_err(e.to_string()))?;
    Ok(sedna::cloud::ServeOptions {
        token,
        ..sedna::cloud::ServeOptions::default()
    })
}

/// serve_estimator(predict, host="127.0.0.1", port=5000) -> CloudServer
///
/// Serves a Python function as a cloud worker, in the background: on one port the gRPC service
/// `sedna-edge-worker` and `sedna.JointInference` speak, and Sedna's HTTP JSON protocol
/// (`POST /<service>/predict`, `{"data": …}` → `{"result": …}`). `predict(inputs)` gets one
/// numpy array (one input; JSON data as float32) or a dict name → array, and returns an array
/// (named `output`; floats as float32) or a dict name → array. Its exceptions become the
/// request's error.
#[pyfunction]
#[pyo3(signature = (predict, host = "127.0.0.1", port = 5000))]
fn serve_estimator(predict: Py<PyAny>, host: &str, port: u16) -> PyResult<CloudServer> {
    let rt = runtime()?;
    let (listener, port) = listen(rt, host, port)?;
    let predict = Arc::new(predict);
    let function: sedna::cloud::InferFn = Arc::new(move |inputs: Vec<(String, Tensor)>| {
        Python::attach(|py| -> PyResult<Vec<(String, Tensor)>> {
            let argument = if inputs.len() == 1 {
                match inputs.into_iter().next() {
                    Some((_, tensor)) => tensor_to_py(py, tensor),
                    None => py.None().into_bound(py),
                }
            } else {
                tensors_to_dict(py, inputs)?.into_any()
            };
            let answer = predict.call1(py, (argument,))?;
            let answer = answer.bind(py);
            let numpy = py.import("numpy")?;
            let as_array = |value: &Bound<'_, PyAny>| -> PyResult<Tensor> {
                let mut array = numpy.call_method1("asarray", (value,))?;
                if array
                    .getattr("dtype")?
                    .getattr("kind")?
                    .extract::<String>()?
                    == "f"
                {
                    array = array.call_method1("astype", ("float32",))?;
                }
                Ok(Borrowed::extract("output", &array)?.owned())
            };
            if let Ok(dict) = answer.cast::<PyDict>() {
                let mut outputs = Vec::with_capacity(dict.len());
                for (key, value) in dict.iter() {
                    outputs.push((key.extract::<String>()?, as_array(&value)?));
                }
                Ok(outputs)
            } else {
                Ok(vec![("output".to_string(), as_array(answer)?)])
            }
        })
        .map_err(|e| e.to_string())
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = serve_options()?;
    rt.spawn(async move {
        let _ = sedna::cloud::serve(
            listener,
            sedna::cloud::Backend::Function(function),
            sedna::cloud::Protocols::GrpcAndJson { input: None },
            options,
            async move {
                let _ = stopped.await;
            },
        )
        .await;
    });
    Ok(CloudServer {
        stop: Mutex::new(Some(stop)),
        port,
    })
}

// ----- federated learning -----------------------------------------------------------------------

/// A Python estimator: get_weights() -> dict, set_weights(dict), train(settings: dict) ->
/// (num_samples, metrics) or num_samples, evaluate() -> dict, num_samples (attribute or
/// method).
struct PyEstimator {
    object: Py<PyAny>,
}

fn estimator_error(py: Python<'_>, e: PyErr) -> EstimatorError {
    let traceback = e
        .traceback(py)
        .and_then(|t| t.format().ok())
        .unwrap_or_default();
    EstimatorError::new(format!(
        "{e}{}",
        if traceback.is_empty() {
            String::new()
        } else {
            format!("\n{traceback}")
        }
    ))
}

fn metrics_from_py(value: &Bound<'_, PyAny>) -> PyResult<BTreeMap<String, f64>> {
    if value.is_none() {
        return Ok(BTreeMap::new());
    }
    value.extract::<BTreeMap<String, f64>>()
}

impl Estimator for PyEstimator {
    fn get_weights(&self) -> Weights {
        Python::attach(|py| {
            self.object
                .bind(py)
                .call_method0("get_weights")
                .and_then(|w| weights_from_py(&w))
                .unwrap_or_else(|e| {
                    e.print(py);
                    Weights::default()
                })
        })
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<(), EstimatorError> {
        Python::attach(|py| {
            let dict = weights_to_py(py, weights.clone()).map_err(|e| estimator_error(py, e))?;
            self.object
                .bind(py)
                .call_method1("set_weights", (dict,))
                .map_err(|e| estimator_error(py, e))?;
            Ok(())
        })
    }

    fn train(
        &mut self,
        settings: &BTreeMap<String, String>,
    ) -> Result<TrainReport, EstimatorError> {
        Python::attach(|py| {
            let result = self
                .object
                .bind(py)
                .call_method1("train", (settings.clone(),))
                .map_err(|e| estimator_error(py, e))?;
            let (num_samples, metrics) = if let Ok(n) = result.extract::<u64>() {
                (n, BTreeMap::new())
            } else {
                let (n, m): (u64, Bound<'_, PyAny>) = result.extract().map_err(|_| {
                    EstimatorError::new("train() must return num_samples or (num_samples, metrics)")
                })?;
                (n, metrics_from_py(&m).map_err(|e| estimator_error(py, e))?)
            };
            Ok(TrainReport {
                num_samples,
                metrics,
            })
        })
    }

    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>, EstimatorError> {
        Python::attach(|py| {
            let result = self
                .object
                .bind(py)
                .call_method0("evaluate")
                .map_err(|e| estimator_error(py, e))?;
            metrics_from_py(&result).map_err(|e| estimator_error(py, e))
        })
    }

    fn num_samples(&self) -> u64 {
        Python::attach(|py| {
            let object = self.object.bind(py);
            let value = match object.getattr("num_samples") {
                Ok(v) if v.is_callable() => v.call0(),
                other => other,
            };
            value.and_then(|v| v.extract::<u64>()).unwrap_or(0)
        })
    }
}

/// FederatedLearning(job, worker, estimator, encoding="f32")
///
/// The client of a federated-learning job. `join()` gives the first frame to send;
/// `handle(frame)` answers each frame from the aggregator (training or evaluating with
/// the estimator) and returns the reply frame, or None.
#[pyclass(module = "sedna._sedna")]
struct FederatedLearning {
    inner: Mutex<fl::FederatedLearning<PyEstimator>>,
}

#[pymethods]
impl FederatedLearning {
    #[new]
    #[pyo3(signature = (job, worker, estimator, encoding = "f32"))]
    fn new(job: &str, worker: &str, estimator: Py<PyAny>, encoding: &str) -> PyResult<Self> {
        let encoding = parse_encoding(encoding)?;
        Ok(FederatedLearning {
            inner: Mutex::new(fl::FederatedLearning::new(
                job,
                worker,
                PyEstimator { object: estimator },
                encoding,
            )),
        })
    }

    /// join() -> bytes: the frame that joins the job.
    fn join<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let encoding = inner.encoding();
        let frame = inner
            .join()
            .encode(encoding)
            .map_err(err(FederatedLearningError::new_err))?;
        Ok(PyBytes::new(py, &frame))
    }

    /// handle(frame: bytes) -> bytes | None
    fn handle<'py>(&self, py: Python<'py>, frame: &[u8]) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let message = fl::Message::decode(frame, &Limits::default())
            .map_err(err(FederatedLearningError::new_err))?;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let encoding = inner.encoding();
        let reply = inner
            .handle(message)
            .map_err(err(FederatedLearningError::new_err))?;
        match reply {
            None => Ok(None),
            Some(reply) => {
                let bytes = reply
                    .encode(encoding)
                    .map_err(err(FederatedLearningError::new_err))?;
                Ok(Some(PyBytes::new(py, &bytes)))
            }
        }
    }

    /// The client's state: "new", "waiting", "finished" or "rejected".
    #[getter]
    fn state(&self) -> &'static str {
        match self.inner.lock().unwrap_or_else(|p| p.into_inner()).state() {
            fl::ClientState::New => "new",
            fl::ClientState::Waiting { .. } => "waiting",
            fl::ClientState::Finished { .. } => "finished",
            fl::ClientState::Rejected { .. } => "rejected",
        }
    }

    /// Training metrics per answered round: list of (round, metrics).
    #[getter]
    fn history(&self) -> Vec<(u32, BTreeMap<String, f64>)> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .history()
            .to_vec()
    }
}

/// run_federated_client(job, worker, estimator, encoding="f32", address=None, proxy=None,
/// target=None) -> list[(round, metrics)]
///
/// Runs a federated-learning client to the end of the job with lib-sedna's transport (the
/// same loop as the Rust training worker: joins, answers each round with `estimator`,
/// reconnects with jittered backoff): to the aggregator at `address` (`host:port`), or
/// through the node's cloud proxy `proxy` to tunnel `target`. The estimator is as for
/// `FederatedLearning`. Returns the training metrics of every round answered; the estimator
/// then holds the final weights. Raises FederatedLearningError when the job fails for good.
#[pyfunction]
#[pyo3(signature = (job, worker, estimator, encoding = "f32", address = None, proxy = None, target = None))]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments
fn run_federated_client(
    py: Python<'_>,
    job: &str,
    worker: &str,
    estimator: Py<PyAny>,
    encoding: &str,
    address: Option<String>,
    proxy: Option<String>,
    target: Option<String>,
) -> PyResult<Vec<(u32, BTreeMap<String, f64>)>> {
    let encoding = parse_encoding(encoding)?;
    enum Route {
        Direct(String),
        Tunnel(String, String),
    }
    let route = match (address, proxy, target) {
        (Some(address), _, _) => Route::Direct(address),
        (None, Some(proxy), Some(target)) => Route::Tunnel(proxy, target),
        _ => {
            return Err(FederatedLearningError::new_err(
                "no aggregator: give address=host:port, or proxy= and target=",
            ));
        }
    };
    let route = Arc::new(route);
    let client =
        fl::FederatedLearning::new(job, worker, PyEstimator { object: estimator }, encoding);
    let rt = runtime()?;
    // The job's token, when its controller mounted one (its aggregator requires it).
    let token: Option<Arc<str>> = sedna::cloud::service_token_from_env()
        .map_err(|e| FederatedLearningError::new_err(e.to_string()))?
        .map(Arc::from);
    let connect = move || {
        let (route, token) = (route.clone(), token.clone());
        async move {
            let mut stream = match &*route {
                Route::Direct(address) => {
                    let stream = tokio::net::TcpStream::connect(address).await?;
                    stream.set_nodelay(true)?;
                    stream
                }
                Route::Tunnel(proxy, target) => sedna::cloud::proxy_connect(proxy, target).await?,
            };
            if let Some(token) = &token {
                fl::wire::write_token(&mut stream, token).await?;
            }
            Ok(stream)
        }
    };
    let done = py
        .detach(move || {
            rt.block_on(fl::client::run(
                client,
                connect,
                fl::client::ClientOptions::default(),
            ))
        })
        .map_err(err(FederatedLearningError::new_err))?;
    Ok(done.history().to_vec())
}

/// A user's aggregation (a Python callable) as the aggregation worker's algorithm: called with
/// the round's updates as `[(num_samples, [arrays in the model's order])]`, it returns the new
/// global weights as a list of arrays in that order.
struct PyAggregation {
    name: String,
    callable: Py<PyAny>,
}

impl std::fmt::Debug for PyAggregation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyAggregation")
            .field("name", &self.name)
            .finish()
    }
}

impl sedna::aggregate::Aggregator for PyAggregation {
    fn name(&self) -> &str {
        &self.name
    }

    fn aggregate(
        &mut self,
        global: &sedna::weights::Weights,
        updates: &[sedna::aggregate::Update],
    ) -> Result<sedna::weights::Weights, sedna::aggregate::AggregateError> {
        let failed = |reason: String| sedna::aggregate::AggregateError::Custom {
            algorithm: self.name.clone(),
            reason,
        };
        Python::attach(|py| -> PyResult<Result<sedna::weights::Weights, String>> {
            let clients = PyList::empty(py);
            for update in updates {
                let arrays = PyList::empty(py);
                for (_, array) in update.weights.tensors() {
                    arrays.append(array.clone().into_pyarray(py))?;
                }
                clients.append((update.num_samples, arrays))?;
            }
            let answer = self.callable.call1(py, (clients,))?;
            let answer = answer.bind(py);
            let items: Vec<Bound<'_, PyAny>> = answer.try_iter()?.collect::<PyResult<_>>()?;
            if items.len() != global.tensors().len() {
                return Ok(Err(format!(
                    "it returned {} arrays; the model has {} tensors",
                    items.len(),
                    global.tensors().len()
                )));
            }
            let mut tensors = Vec::with_capacity(items.len());
            for (item, (name, old)) in items.iter().zip(global.tensors()) {
                let converted = py
                    .import("numpy")?
                    .call_method1("asarray", (item, "float32"))?;
                let array: PyReadonlyArrayDyn<'_, f32> = converted.extract()?;
                let array = array.as_array().to_owned();
                if array.shape() != old.shape() {
                    return Ok(Err(format!(
                        "tensor {name}: shape {:?}, the model's is {:?}",
                        array.shape(),
                        old.shape()
                    )));
                }
                tensors.push((name.clone(), array));
            }
            Ok(sedna::weights::Weights::new(tensors).map_err(|e| e.to_string()))
        })
        .map_err(|e| failed(e.to_string()))?
        .map_err(failed)
    }
}

/// run_aggregation_server(aggregation=None, name="custom", args=None)
///
/// Runs the platform's aggregation worker (what `sedna-cloud-worker aggregate` runs: the round
/// protocol, checkpoints, evaluation, status reports) in this process until the job finishes,
/// configured by `args` (its flags) and the environment the controller sets. With
/// `aggregation`, a callable `(clients: [(num_samples, [arrays])]) -> [arrays]`, rounds are
/// aggregated by it instead of the built-in algorithm. Raises FederatedLearningError when the
/// job fails.
#[pyfunction]
#[pyo3(signature = (aggregation = None, name = "custom", args = None))]
fn run_aggregation_server(
    py: Python<'_>,
    aggregation: Option<Py<PyAny>>,
    name: &str,
    args: Option<Vec<String>>,
) -> PyResult<()> {
    let custom: Option<Box<dyn sedna::aggregate::Aggregator>> = aggregation.map(|callable| {
        Box::new(PyAggregation {
            name: name.to_string(),
            callable,
        }) as Box<dyn sedna::aggregate::Aggregator>
    });
    let argv = args.unwrap_or_default();
    let rt = runtime()?;
    py.detach(move || rt.block_on(sedna_cloud_worker::aggregate_with(&argv, custom)))
        .map_err(|e| FederatedLearningError::new_err(format!("{e:#}")))
}

/// report_status(api_version, kind, namespace, name, status_json) -> bool
///
/// Merges `status_json` (the fields a worker owns, as a JSON object) into the status of
/// `kind` `namespace/name` through the node's local API (`SEDNA_LOCAL_KUBECONFIG`); the node
/// relays it to the cloud, later if the cloud is unreachable. Returns False when the pod has
/// no local API (nothing is reported); a refused write is logged, not raised.
#[pyfunction]
fn report_status(
    py: Python<'_>,
    api_version: &str,
    kind: &str,
    namespace: &str,
    name: &str,
    status_json: &str,
) -> PyResult<bool> {
    let status: serde_json::Value = serde_json::from_str(status_json)
        .map_err(|e| PyValueError::new_err(format!("status_json: {e}")))?;
    if !status.is_object() {
        return Err(PyValueError::new_err("status_json must be a JSON object"));
    }
    let rt = runtime()?;
    let (api_version, kind, namespace, name) = (
        api_version.to_string(),
        kind.to_string(),
        namespace.to_string(),
        name.to_string(),
    );
    Ok(py.detach(move || {
        rt.block_on(async move {
            match sedna::report::StatusReporter::connect(&api_version, &kind, &namespace, &name)
                .await
            {
                Some(reporter) => {
                    reporter.report(status).await;
                    true
                }
                None => false,
            }
        })
    }))
}

/// train_frame(round, weights, settings=None, encoding="f32") -> bytes
///
/// The aggregator's "train" frame (for tests and simple servers).
#[pyfunction]
#[pyo3(signature = (round, weights, settings = None, encoding = "f32"))]
fn train_frame<'py>(
    py: Python<'py>,
    round: u32,
    weights: &Bound<'py, PyAny>,
    settings: Option<BTreeMap<String, String>>,
    encoding: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let message = fl::Message::Train {
        round,
        weights: weights_from_py(weights)?,
        settings: settings.unwrap_or_default(),
    };
    let frame = message
        .encode(parse_encoding(encoding)?)
        .map_err(err(FederatedLearningError::new_err))?;
    Ok(PyBytes::new(py, &frame))
}

/// decode_frame(frame: bytes) -> dict: a protocol frame as {"type": ..., fields...}
#[pyfunction]
fn decode_frame<'py>(py: Python<'py>, frame: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let message = fl::Message::decode(frame, &Limits::default())
        .map_err(err(FederatedLearningError::new_err))?;
    let d = PyDict::new(py);
    d.set_item("type", message.kind())?;
    match message {
        fl::Message::Join {
            job,
            worker,
            num_samples,
            encodings,
        } => {
            d.set_item("job", job)?;
            d.set_item("worker", worker)?;
            d.set_item("num_samples", num_samples)?;
            d.set_item(
                "encodings",
                encodings.iter().map(|e| e.name()).collect::<Vec<_>>(),
            )?;
        }
        fl::Message::Train {
            round,
            weights,
            settings,
        } => {
            d.set_item("round", round)?;
            d.set_item("weights", weights_to_py(py, weights)?)?;
            d.set_item("settings", settings)?;
        }
        fl::Message::Update {
            round,
            num_samples,
            metrics,
            weights,
        } => {
            d.set_item("round", round)?;
            d.set_item("num_samples", num_samples)?;
            d.set_item("metrics", metrics)?;
            d.set_item("weights", weights_to_py(py, weights)?)?;
        }
        fl::Message::Evaluate { round, weights } | fl::Message::Finish { round, weights } => {
            d.set_item("round", round)?;
            d.set_item("weights", weights_to_py(py, weights)?)?;
        }
        fl::Message::Evaluation { round, metrics } => {
            d.set_item("round", round)?;
            d.set_item("metrics", metrics)?;
        }
        fl::Message::Reject { reason, retryable } => {
            d.set_item("reason", reason)?;
            d.set_item("retryable", retryable)?;
        }
    }
    Ok(d)
}

/// Aggregator(name="FedAvg", parameters=None)
///
/// A server-side aggregation strategy (stateful across rounds for FedAvgM/FedAdam/FedYogi).
#[pyclass(module = "sedna._sedna")]
struct Aggregator {
    inner: Mutex<Box<dyn aggregate::Aggregator>>,
}

#[pymethods]
impl Aggregator {
    #[new]
    #[pyo3(signature = (name = "FedAvg", parameters = None))]
    fn new(name: &str, parameters: Option<BTreeMap<String, String>>) -> PyResult<Self> {
        let parameters = parameters.unwrap_or_default();
        let pairs: Vec<(&str, &str)> = parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let inner = aggregate::build(name, &pairs).map_err(err(AggregationError::new_err))?;
        Ok(Aggregator {
            inner: Mutex::new(inner),
        })
    }

    /// aggregate(global_weights, updates: list[(weights, num_samples)]) -> dict
    fn aggregate<'py>(
        &self,
        py: Python<'py>,
        global_weights: &Bound<'py, PyAny>,
        updates: Vec<(Bound<'py, PyAny>, u64)>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let global = weights_from_py(global_weights)?;
        let updates = updates
            .iter()
            .map(|(w, n)| {
                Ok(Update {
                    weights: weights_from_py(w)?,
                    num_samples: *n,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        // The lock is taken without the GIL, so a second Python thread waiting for it
        // cannot hold the GIL this thread needs back.
        let result = py
            .detach(|| {
                self.inner
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .aggregate(&global, &updates)
            })
            .map_err(err(AggregationError::new_err))?;
        weights_to_py(py, result)
    }
}

// ----- config, storage, datasets ----------------------------------------------------------------

/// config_from_env() -> dict: the worker configuration from Sedna's environment names.
#[pyfunction]
fn config_from_env<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let c = sedna::config::Config::from_env().map_err(err(ConfigError::new_err))?;
    for name in &c.ignored_secret_variables {
        let warnings = py.import("warnings")?;
        warnings.call_method1(
            "warn",
            (format!(
                "{name} is set in the environment and ignored: mount credentials as files in {}",
                c.credentials_dir.display()
            ),),
        )?;
    }
    let d = PyDict::new(py);
    d.set_item("namespace", &c.namespace)?;
    d.set_item("worker_name", &c.worker_name)?;
    d.set_item("service_name", &c.service_name)?;
    d.set_item("job_name", &c.job_name)?;
    d.set_item("lc_server", &c.lc_server)?;
    d.set_item("model_url", &c.model_url)?;
    d.set_item("model_name", &c.model_name)?;
    d.set_item("model_urls", &c.model_urls)?;
    d.set_item("base_model_url", &c.base_model_url)?;
    d.set_item(
        "big_model",
        c.big_model.as_ref().map(|e| (e.host.clone(), e.port)),
    )?;
    d.set_item("hem_name", c.hem.as_ref().map(|h| h.name.clone()))?;
    d.set_item(
        "hem_parameters",
        c.hem
            .as_ref()
            .map(|h| h.parameters.iter().cloned().collect::<BTreeMap<_, _>>()),
    )?;
    d.set_item("dataset_url", &c.dataset_url)?;
    d.set_item("train_dataset_url", &c.train_dataset_url)?;
    d.set_item("test_dataset_url", &c.test_dataset_url)?;
    d.set_item("data_path_prefix", c.data_path_prefix.display().to_string())?;
    d.set_item(
        "aggregator",
        c.aggregator.as_ref().map(|e| (e.host.clone(), e.port)),
    )?;
    d.set_item("participants_count", c.participants_count)?;
    d.set_item(
        "transmitter",
        match c.transmitter {
            sedna::config::Transmitter::Ws => "ws",
            sedna::config::Transmitter::S3 => "s3",
        },
    )?;
    d.set_item("model_hot_update", c.model_hot_update)?;
    d.set_item("model_poll_period_seconds", c.model_poll_period.as_secs())?;
    d.set_item("parameters", &c.parameters)?;
    d.set_item("credentials_dir", c.credentials_dir.display().to_string())?;
    Ok(d)
}

/// Storage(cache_dir, s3_endpoint=None, allow_http=False, credentials_dir=None, region="us-east-1")
///
/// Models and datasets from s3:// or file:// URLs with a local cache by content hash.
/// Credentials are read from files ACCESS_KEY_ID / SECRET_ACCESS_KEY in `credentials_dir`.
#[pyclass(frozen, module = "sedna._sedna")]
struct Storage {
    inner: sedna::storage::Storage,
}

#[pymethods]
impl Storage {
    #[new]
    #[pyo3(signature = (cache_dir, s3_endpoint = None, allow_http = false, credentials_dir = None, region = "us-east-1"))]
    fn new(
        cache_dir: PathBuf,
        s3_endpoint: Option<String>,
        allow_http: bool,
        credentials_dir: Option<PathBuf>,
        region: &str,
    ) -> PyResult<Self> {
        let mut options = sedna::storage::StorageOptions::new(cache_dir);
        options.s3_endpoint = s3_endpoint;
        options.allow_http = allow_http;
        options.s3_region = region.to_string();
        if let Some(dir) = credentials_dir {
            options.credentials =
                sedna::config::Credentials::load(&dir).map_err(err(ConfigError::new_err))?;
        }
        Ok(Storage {
            inner: sedna::storage::Storage::new(options).map_err(err(StorageError::new_err))?,
        })
    }

    /// fetch(url) -> (path, sha256, size, cached)
    fn fetch(&self, py: Python<'_>, url: &str) -> PyResult<(String, String, u64, bool)> {
        let inner = self.inner.clone();
        let rt = runtime()?;
        let url = url.to_string();
        let fetched = py
            .detach(move || rt.block_on(async move { inner.fetch(&url).await }))
            .map_err(err(StorageError::new_err))?;
        Ok((
            fetched.path.display().to_string(),
            fetched.sha256,
            fetched.size,
            fetched.cached,
        ))
    }

    /// upload(url, data: bytes)
    fn upload(&self, py: Python<'_>, url: &str, data: Vec<u8>) -> PyResult<()> {
        let inner = self.inner.clone();
        let rt = runtime()?;
        let url = url.to_string();
        py.detach(move || rt.block_on(async move { inner.upload(&url, data.into()).await }))
            .map_err(err(StorageError::new_err))
    }
}

/// parse_txt_index(path) -> list[(path, label | None)]: a Sedna txt dataset index.
#[pyfunction]
fn parse_txt_index(path: PathBuf) -> PyResult<Vec<(String, Option<String>)>> {
    let samples = sedna::dataset::load_txt(&path, &sedna::dataset::Limits::default())
        .map_err(|e| DatasetError::new_err(format!("{}: {e}", path.display())))?;
    Ok(samples
        .into_iter()
        .map(|s| (s.path.display().to_string(), s.label))
        .collect())
}

/// Columns, features, labels.
type CsvTable<'py> = (Vec<String>, Bound<'py, PyAny>, Option<Vec<String>>);

/// parse_csv(path, label=None, columns=None) -> (columns, features float32 [N, C], labels | None)
#[pyfunction]
#[pyo3(signature = (path, label = None, columns = None))]
fn parse_csv<'py>(
    py: Python<'py>,
    path: PathBuf,
    label: Option<String>,
    columns: Option<Vec<String>>,
) -> PyResult<CsvTable<'py>> {
    let file = std::fs::File::open(&path)
        .map_err(|e| DatasetError::new_err(format!("{}: {e}", path.display())))?;
    let columns = columns.unwrap_or_default();
    let column_refs: Vec<&str> = columns.iter().map(String::as_str).collect();
    let table = sedna::dataset::parse_csv(
        std::io::BufReader::new(file),
        label.as_deref(),
        &column_refs,
        &sedna::dataset::Limits::default(),
    )
    .map_err(|e| DatasetError::new_err(format!("{}: {e}", path.display())))?;
    let features = table
        .features_f32()
        .map_err(|e| DatasetError::new_err(format!("{}: {e}", path.display())))?;
    Ok((
        table.columns,
        features.into_dyn().into_pyarray(py).into_any(),
        table.labels,
    ))
}

/// scan_directory(path, extensions=None) -> list[(path, label | None)]
#[pyfunction]
#[pyo3(signature = (path, extensions = None))]
fn scan_directory(
    path: PathBuf,
    extensions: Option<Vec<String>>,
) -> PyResult<Vec<(String, Option<String>)>> {
    let extensions = extensions.unwrap_or_default();
    let refs: Vec<&str> = extensions.iter().map(String::as_str).collect();
    let samples = sedna::dataset::scan_directory(&path, &refs, &sedna::dataset::Limits::default())
        .map_err(err(DatasetError::new_err))?;
    Ok(samples
        .into_iter()
        .map(|s| (s.path.display().to_string(), s.label))
        .collect())
}

// ----- training ---------------------------------------------------------------------------------

/// A hyperparameter value from Python: strings as they are, booleans as true/false, numbers
/// as written.
fn parameter_text(value: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(b) = value.extract::<bool>() {
        return Ok(b.to_string());
    }
    if let Ok(s) = value.extract::<String>() {
        return Ok(s);
    }
    Ok(value.str()?.to_string())
}

/// Features as rows: any float array whose first axis is the samples.
fn features_from_py(x: &Bound<'_, PyAny>) -> PyResult<ndarray::Array2<f32>> {
    let array: PyReadonlyArrayDyn<'_, f32> = match x.extract() {
        Ok(a) => a,
        Err(_) => x
            .call_method1("astype", ("float32",))
            .and_then(|c| c.extract())
            .map_err(|_| TrainError::new_err("x must be a numeric numpy array [N, ...]"))?,
    };
    let view = array.as_array();
    let n = view.shape().first().copied().unwrap_or(0);
    let width = view.len().checked_div(n).unwrap_or(0);
    let values: Vec<f32> = view.iter().copied().collect();
    ndarray::Array2::from_shape_vec((n, width), values).map_err(err(TrainError::new_err))
}

/// Training data from numpy: integer labels [N] (classification) or float targets [N] or
/// [N, K] (regression).
fn data_from_py(x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>) -> PyResult<train::TrainData> {
    let features = features_from_py(x)?;
    let kind: String = y.getattr("dtype")?.getattr("kind")?.extract()?;
    if kind == "i" || kind == "u" {
        let labels: PyReadonlyArrayDyn<'_, i64> =
            y.call_method1("astype", ("int64",))?.extract()?;
        let labels = labels
            .as_array()
            .iter()
            .map(|l| {
                u32::try_from(*l)
                    .map_err(|_| TrainError::new_err(format!("label {l} is not a class index")))
            })
            .collect::<PyResult<Vec<u32>>>()?;
        train::TrainData::classification(features, labels).map_err(err(TrainError::new_err))
    } else {
        let targets: PyReadonlyArrayDyn<'_, f32> =
            y.call_method1("astype", ("float32",))?.extract()?;
        let targets = targets.as_array();
        let n = targets.shape().first().copied().unwrap_or(0);
        let width = targets.len().checked_div(n).unwrap_or(0);
        let values = ndarray::Array2::from_shape_vec((n, width), targets.iter().copied().collect())
            .map_err(err(TrainError::new_err))?;
        train::TrainData::regression(features, values).map_err(err(TrainError::new_err))
    }
}

fn progress_to_py<'py>(
    py: Python<'py>,
    progress: &train::Progress,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match progress {
        train::Progress::Step {
            epoch,
            step,
            total_steps,
            loss,
            learning_rate,
            samples_per_sec,
        } => {
            d.set_item("event", "step")?;
            d.set_item("epoch", epoch)?;
            d.set_item("step", step)?;
            d.set_item("total_steps", total_steps)?;
            d.set_item("loss", loss)?;
            d.set_item("learning_rate", learning_rate)?;
            d.set_item("samples_per_sec", samples_per_sec)?;
        }
        train::Progress::Epoch(e) => {
            d.set_item("event", "epoch")?;
            d.set_item("epoch", e.epoch)?;
            d.set_item("train_loss", e.train_loss)?;
            d.set_item("validation_loss", e.validation_loss)?;
            d.set_item("validation_accuracy", e.validation_accuracy)?;
            d.set_item("samples_per_sec", e.samples_per_sec)?;
            d.set_item("seconds", e.seconds)?;
        }
    }
    Ok(d)
}

fn evaluation_to_py<'py>(py: Python<'py>, e: &train::Evaluation) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in e.metrics() {
        d.set_item(k, v)?;
    }
    d.set_item("confusion", e.confusion.clone())?;
    Ok(d)
}

/// Trains an ONNX model: Trainer(path, backend="candle", device="cpu", threads=0,
/// output=None, torchscript=None). Arrays in and out are numpy; hyperparameters are keyword
/// arguments with lib-sedna's keys (epochs=3, batch_size=64, learning_rate=1e-3,
/// optimizer="sgd", …) or Sedna's `parameters=[{"key": …, "value": …}]`.
#[pyclass(module = "sedna._sedna")]
struct Trainer {
    inner: Mutex<train::Trainer>,
}

impl Trainer {
    fn config(
        parameters: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<train::TrainConfig> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        if let Some(list) = parameters {
            for item in list.try_iter()? {
                let item = item?;
                let key: String = item.get_item("key")?.extract()?;
                pairs.push((key, parameter_text(&item.get_item("value")?)?));
            }
        }
        if let Some(kwargs) = kwargs {
            for (key, value) in kwargs.iter() {
                pairs.push((key.extract()?, parameter_text(&value)?));
            }
        }
        for (key, _) in &pairs {
            if ["backend", "device", "threads", "output"].contains(&key.as_str()) {
                return Err(TrainError::new_err(format!(
                    "hyperparameter `{key}`: set it when creating the Trainer"
                )));
            }
        }
        let (_, config) =
            train::parse_parameters(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(err(TrainError::new_err))?;
        Ok(config)
    }
}

#[pymethods]
impl Trainer {
    #[new]
    #[pyo3(signature = (path, backend = "candle", device = "cpu", threads = 0, output = None, torchscript = None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        backend: &str,
        device: &str,
        threads: usize,
        output: Option<String>,
        torchscript: Option<PathBuf>,
    ) -> PyResult<Self> {
        let threads = threads.to_string();
        let mut pairs = vec![
            ("backend", backend),
            ("device", device),
            ("threads", threads.as_str()),
        ];
        if let Some(output) = output.as_deref() {
            pairs.push(("output", output));
        }
        let (mut options, _) = train::parse_parameters(pairs).map_err(err(TrainError::new_err))?;
        options.torchscript = torchscript;
        let trainer = py
            .detach(|| train::Trainer::load(&path, &options))
            .map_err(err(TrainError::new_err))?;
        Ok(Trainer {
            inner: Mutex::new(trainer),
        })
    }

    /// fit(x, y, validation=None, callback=None, parameters=None, **hyperparameters) -> dict
    ///
    /// Trains on x (float [N, ...]) and y (int labels [N], or float targets [N, K]);
    /// `validation=(x, y)` is evaluated after every epoch; `callback(event: dict)` sees every
    /// step and epoch. Returns the report (epochs, steps, history, …).
    #[pyo3(signature = (x, y, validation = None, callback = None, parameters = None, **hyperparameters))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments
    fn fit<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
        validation: Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)>,
        callback: Option<Py<PyAny>>,
        parameters: Option<&Bound<'py, PyAny>>,
        hyperparameters: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let config = Self::config(parameters, hyperparameters)?;
        let data = data_from_py(x, y)?;
        let validation = validation
            .map(|(vx, vy)| data_from_py(&vx, &vy))
            .transpose()?;
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let trainer: &mut train::Trainer = &mut guard;
        let failed: Mutex<Option<PyErr>> = Mutex::new(None);
        let report = py.detach(|| {
            trainer.fit_validated(&data, validation.as_ref(), &config, &mut |p| {
                if let Some(cb) = &callback {
                    Python::attach(|py| {
                        let result = progress_to_py(py, p).and_then(|d| cb.call1(py, (d,)));
                        if let Err(e) = result {
                            failed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    });
                }
            })
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let report = report.map_err(err(TrainError::new_err))?;
        let d = PyDict::new(py);
        d.set_item("epochs", report.epochs)?;
        d.set_item("steps", report.steps)?;
        d.set_item("num_samples", report.num_samples)?;
        d.set_item("stopped_early", report.stopped_early)?;
        d.set_item("best_epoch", report.best_epoch)?;
        d.set_item("samples_per_sec", report.samples_per_sec)?;
        let history = PyList::empty(py);
        for e in &report.history {
            history.append(progress_to_py(py, &train::Progress::Epoch(e.clone()))?)?;
        }
        d.set_item("history", history)?;
        Ok(d)
    }

    /// evaluate(x, y) -> dict: loss, accuracy, precision, recall, f1 (macro), per-class
    /// figures (`precision_3`, …) and the confusion matrix.
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let data = data_from_py(x, y)?;
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let trainer: &mut train::Trainer = &mut guard;
        let evaluation = py
            .detach(|| trainer.evaluate(&data))
            .map_err(err(TrainError::new_err))?;
        evaluation_to_py(py, &evaluation)
    }

    /// predict(x) -> ndarray [N, outputs]: the trained output (logits for a classifier).
    fn predict<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let features = features_from_py(x)?;
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let trainer: &mut train::Trainer = &mut guard;
        let out = py
            .detach(|| trainer.predict(features.view()))
            .map_err(err(TrainError::new_err))?;
        Ok(out.into_pyarray(py).into_any())
    }

    /// weights() -> dict[str, ndarray]: the trainable tensors by ONNX initializer name.
    fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let weights = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .weights()
            .map_err(err(TrainError::new_err))?;
        weights_to_py(py, weights)
    }

    /// set_weights(weights: dict[str, ndarray]): replaces tensors by name (names and shapes
    /// must match the model's).
    fn set_weights(&self, weights: &Bound<'_, PyAny>) -> PyResult<()> {
        let weights = weights_from_py(weights)?;
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_weights(&weights)
            .map_err(err(TrainError::new_err))
    }

    /// save(path): writes the trained model (the original file with new weights), atomically.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let trainer: &mut train::Trainer = &mut guard;
        py.detach(move || trainer.save(&path))
            .map_err(err(TrainError::new_err))
    }

    /// to_onnx() -> bytes: the trained model.
    fn to_onnx<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_onnx()
            .map_err(err(TrainError::new_err))?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// (name, per-sample shape) of the data input.
    #[getter]
    fn input(&self) -> (String, Vec<usize>) {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (name, shape) = guard.input();
        (name.to_string(), shape.to_vec())
    }

    /// (name, width) of the trained output.
    #[getter]
    fn output(&self) -> (String, usize) {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (name, width) = guard.output();
        (name.to_string(), width)
    }

    /// The backend: "candle" or "tch".
    #[getter]
    fn backend(&self) -> &'static str {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .backend()
            .name()
    }
}

/// load_training_data(path) -> (x float32 [N, F], y int64 [N]): a dataset the trainer reads
/// (IDX images with their labels file, a csv with a `label` column, a Sedna txt index of PGM
/// images, a directory of PGM images per class); images scaled to 0..1.
#[pyfunction]
fn load_training_data<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let data = py
        .detach(|| train::TrainData::load(&path, &sedna::dataset::Limits::default()))
        .map_err(|e| TrainError::new_err(format!("{}: {e}", path.display())))?;
    let x = data.features().to_owned().into_pyarray(py).into_any();
    let y = match data.targets() {
        train::Targets::Classes(c) => ndarray::Array1::from_iter(c.iter().map(|v| i64::from(*v)))
            .into_pyarray(py)
            .into_any(),
        train::Targets::Values(v) => v.clone().into_pyarray(py).into_any(),
    };
    Ok((x, y))
}

/// The native module.
#[pymodule]
fn _sedna(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SednaError", py.get_type::<SednaError>())?;
    m.add("InferenceError", py.get_type::<InferenceError>())?;
    m.add("HemError", py.get_type::<HemError>())?;
    m.add("JointInferenceError", py.get_type::<JointInferenceError>())?;
    m.add(
        "FederatedLearningError",
        py.get_type::<FederatedLearningError>(),
    )?;
    m.add("WeightsError", py.get_type::<WeightsError>())?;
    m.add("AggregationError", py.get_type::<AggregationError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("StorageError", py.get_type::<StorageError>())?;
    m.add("DatasetError", py.get_type::<DatasetError>())?;
    m.add("TrainError", py.get_type::<TrainError>())?;
    m.add_class::<Trainer>()?;
    m.add_function(wrap_pyfunction!(load_training_data, m)?)?;
    m.add_class::<Model>()?;
    m.add_class::<HardExampleMiningAlgorithm>()?;
    m.add_class::<JointInference>()?;
    m.add_class::<CloudServer>()?;
    m.add_class::<FederatedLearning>()?;
    m.add_class::<Aggregator>()?;
    m.add_class::<Storage>()?;
    m.add_function(wrap_pyfunction!(init_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(encode_weights, m)?)?;
    m.add_function(wrap_pyfunction!(decode_weights, m)?)?;
    m.add_function(wrap_pyfunction!(register_hem, m)?)?;
    m.add_function(wrap_pyfunction!(hem_names, m)?)?;
    m.add_function(wrap_pyfunction!(report_status, m)?)?;
    m.add_function(wrap_pyfunction!(run_aggregation_server, m)?)?;
    m.add_function(wrap_pyfunction!(serve_cloud, m)?)?;
    m.add_function(wrap_pyfunction!(serve_estimator, m)?)?;
    m.add_function(wrap_pyfunction!(train_frame, m)?)?;
    m.add_function(wrap_pyfunction!(run_federated_client, m)?)?;
    m.add_function(wrap_pyfunction!(decode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(config_from_env, m)?)?;
    m.add_function(wrap_pyfunction!(parse_txt_index, m)?)?;
    m.add_function(wrap_pyfunction!(parse_csv, m)?)?;
    m.add_function(wrap_pyfunction!(scan_directory, m)?)?;
    m.add("aggregators", aggregate::NAMES.to_vec())?;
    Ok(())
}
