//! The session wrapper on the real ONNX Runtime (from the PyPI wheel setup installs) and the
//! real digits model in `models/digits`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{held_out, model_path};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ndarray::{Array2, Axis};
use sedna::inference::{DType, InferenceError, Model, Provider, SessionOptions, TensorView};

fn options() -> SessionOptions {
    SessionOptions {
        intra_threads: 1,
        ..SessionOptions::default()
    }
}

#[test]
fn the_digits_model_reports_its_metadata_and_scores_the_held_out_split() {
    let model = Model::load(model_path(), &options()).unwrap();
    let inputs = model.inputs();
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0].name, "input");
    assert_eq!(inputs[0].dtype, DType::F32);
    assert_eq!(inputs[0].shape, vec![None, Some(64)]);
    let outputs: Vec<_> = model
        .outputs()
        .into_iter()
        .map(|o| (o.name, o.dtype))
        .collect();
    assert!(
        outputs.contains(&("label".into(), DType::I64)),
        "{outputs:?}"
    );
    assert!(
        outputs.contains(&("probabilities".into(), DType::F32)),
        "{outputs:?}"
    );

    let (x, y) = held_out();
    let out = model
        .run(&[("input", TensorView::from(x.view().into_dyn()))])
        .unwrap();
    let labels = out.i64("label").unwrap();
    let probabilities = out.f32("probabilities").unwrap();
    assert_eq!(probabilities.shape(), &[y.len(), 10]);
    let correct = labels.iter().zip(&y).filter(|(a, b)| a == b).count();
    let accuracy = correct as f64 / y.len() as f64;
    // MANIFEST.md records 0.9733 on this split.
    assert!((accuracy - 0.9733).abs() < 0.001, "accuracy {accuracy}");
    for (row, label) in probabilities.axis_iter(Axis(0)).zip(labels.iter()) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "row sums to {sum}");
        let argmax = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(argmax as i64, *label);
    }
    assert_eq!(out.model_version, 1);
}

#[test]
fn batched_runs_give_the_same_outputs_as_one_run() {
    let model = Model::load(model_path(), &options()).unwrap();
    let (x, _) = held_out();
    let input = [("input", TensorView::from(x.view().into_dyn()))];
    let whole = model.run(&input).unwrap();
    let batched = model.run_batched(&input, 64).unwrap();
    assert_eq!(whole.i64("label").unwrap(), batched.i64("label").unwrap());
    let (a, b) = (
        whole.f32("probabilities").unwrap(),
        batched.f32("probabilities").unwrap(),
    );
    assert_eq!(a.shape(), b.shape());
    assert!(a.iter().zip(b.iter()).all(|(p, q)| (p - q).abs() < 1e-6));
    let err = model.run_batched(&input, 0).unwrap_err().to_string();
    assert!(err.contains("batch size must be at least 1"), "{err}");
}

#[test]
fn non_contiguous_inputs_are_accepted() {
    let model = Model::load(model_path(), &options()).unwrap();
    let (x, _) = held_out();
    let every_other_row = x.slice_axis(Axis(0), ndarray::Slice::new(0, None, 2));
    assert!(!every_other_row.is_standard_layout());
    let copied = every_other_row.to_owned();
    assert!(copied.is_standard_layout());
    let a = model
        .run_one(TensorView::from(every_other_row.into_dyn()))
        .unwrap();
    let b = model
        .run_one(TensorView::from(copied.view().into_dyn()))
        .unwrap();
    assert_eq!(a.i64("label").unwrap(), b.i64("label").unwrap());
}

#[test]
fn wrong_inputs_get_errors_naming_the_problem() {
    let model = Model::load(model_path(), &options()).unwrap();
    let wrong = Array2::<f32>::zeros((2, 65)).into_dyn();
    let err = model.run_one(TensorView::from(wrong.view())).unwrap_err();
    assert!(matches!(err, InferenceError::Input(_)));
    assert!(err.to_string().contains("dimension 1 must be 64"), "{err}");
    let out = model.run_one(TensorView::from(
        Array2::<f32>::zeros((1, 64)).into_dyn().view(),
    ));
    let err = out.unwrap().f32("label").unwrap_err().to_string();
    assert!(err.contains("output label: is int64, not float32"), "{err}");
}

#[test]
fn a_missing_or_corrupt_model_file_is_a_load_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.onnx");
    let err = Model::load(&missing, &options()).unwrap_err();
    assert!(matches!(err, InferenceError::Load { .. }));
    assert!(err.to_string().contains("nope.onnx"), "{err}");
    let corrupt = dir.path().join("corrupt.onnx");
    std::fs::write(&corrupt, b"this is not a protobuf").unwrap();
    let err = Model::load(&corrupt, &options()).unwrap_err().to_string();
    assert!(err.contains("corrupt.onnx"), "{err}");
}

#[test]
fn asking_for_cuda_without_it_is_an_error_not_a_silent_cpu_fallback() {
    // The wheel setup installs is the CPU build: CUDA cannot register.
    for provider in [
        Provider::Cuda { device_id: 0 },
        Provider::TensorRt { device_id: 0 },
    ] {
        let options = SessionOptions {
            providers: vec![provider],
            ..SessionOptions::default()
        };
        let err = Model::load(model_path(), &options).unwrap_err();
        match &err {
            InferenceError::Provider { provider: name, .. } => assert_eq!(*name, provider.name()),
            other => panic!("expected a provider error, got {other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("was requested but could not be registered"),
            "{text}"
        );
        assert!(text.contains("no fallback to CPU"), "{text}");
    }
}

#[test]
fn reloading_under_load_drops_no_request_and_a_bad_file_keeps_the_old_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::copy(model_path(), &path).unwrap();
    let model = Arc::new(Model::load(&path, &options()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let (x, y) = held_out();
    let x = Arc::new(x);
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (model, stop, served, x) = (model.clone(), stop.clone(), served.clone(), x.clone());
            let expected = y.clone();
            std::thread::spawn(move || {
                let mut versions = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    let out = model
                        .run_one(TensorView::from(x.view().into_dyn()))
                        .unwrap();
                    let correct = out
                        .i64("label")
                        .unwrap()
                        .iter()
                        .zip(&expected)
                        .filter(|(a, b)| a == b)
                        .count();
                    assert!(correct > 430, "a reload served a wrong model: {correct}");
                    versions.insert(out.model_version);
                    served.fetch_add(1, Ordering::Relaxed);
                }
                versions
            })
        })
        .collect();
    // Waits until the workers served `n` more requests: each has at most one in flight, so
    // of six served after a reload returned, at least three ran wholly on the new version.
    let serve = |n: usize| {
        let before = served.load(Ordering::Relaxed);
        while served.load(Ordering::Relaxed) < before + n {
            std::thread::yield_now();
        }
    };
    serve(3);
    for expected_version in 2..=6 {
        assert_eq!(model.reload().unwrap(), expected_version);
    }
    // Unchanged file: nothing to do.
    assert!(!model.reload_if_changed().unwrap());
    // A truncated upload: the error names the file and version 6 keeps serving.
    std::fs::write(&path, b"partial").unwrap();
    let err = model.reload_if_changed().unwrap_err().to_string();
    assert!(err.contains("model.onnx"), "{err}");
    assert_eq!(model.version(), 6);
    serve(6);
    // The complete file arrives: picked up.
    std::fs::copy(model_path(), &path).unwrap();
    assert!(model.reload_if_changed().unwrap());
    assert_eq!(model.version(), 7);
    serve(6);
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    for worker in workers {
        seen.extend(worker.join().unwrap());
    }
    // The first model, the last good one before the truncated file, and the new one all
    // served (the reloads in between may come faster than any request finishes).
    assert!(
        [1, 6, 7].iter().all(|v| seen.contains(v)),
        "requests ran on versions {seen:?}"
    );
}
