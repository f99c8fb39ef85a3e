//! The trainer on real MNIST digits: models trained from their initialized ONNX files reach
//! the accuracy they should, the saved files score the same in ONNX Runtime, training is
//! reproducible, the weights API and FedProx behave, and bad input is refused with reasons.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use ndarray::{Array2, ArrayD, IxDyn};
use sedna::inference::{Model, SessionOptions, TensorView};
use sedna::train::{
    BackendKind, Device, Progress, TrainConfig, TrainData, TrainError, Trainer, TrainerOptions,
    parse_parameters,
};
use sedna::weights::Weights;

fn mnist() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/mnist"))
}

fn train_split() -> TrainData {
    TrainData::load(
        &mnist().join("train-images.idx3-ubyte.gz"),
        &Default::default(),
    )
    .unwrap()
}

fn test_split() -> TrainData {
    TrainData::load(&mnist().join("test-images.idx3-ubyte"), &Default::default()).unwrap()
}

fn candle() -> TrainerOptions {
    TrainerOptions {
        threads: 2,
        ..Default::default()
    }
}

fn config(pairs: &[(&str, &str)]) -> TrainConfig {
    parse_parameters(pairs.iter().copied()).unwrap().1
}

/// Trains `model` from its initialized file, checks the held-out accuracy, saves it and
/// checks that ONNX Runtime computes the trainer's logits (max |Δ| ≤ 1e-4).
fn train_to(model: &str, pairs: &[(&str, &str)], options: TrainerOptions, at_least: f64) {
    let mut trainer = Trainer::load(mnist().join(model).join("init.onnx"), &options).unwrap();
    let test = test_split();
    let before = trainer.evaluate(&test).unwrap().accuracy.unwrap();
    let mut epochs = Vec::new();
    let report = trainer
        .fit(&train_split(), &config(pairs), &mut |p| {
            if let Progress::Epoch(e) = p {
                epochs.push(e.train_loss);
            }
        })
        .unwrap();
    let evaluation = trainer.evaluate(&test).unwrap();
    let accuracy = evaluation.accuracy.unwrap();
    eprintln!(
        "{model} ({:?}): {before:.4} -> {accuracy:.4} in {} epochs, {:.0} samples/s, losses {epochs:?}",
        options.backend, report.epochs, report.samples_per_sec
    );
    assert!(
        accuracy >= at_least,
        "{model}: held-out accuracy {accuracy} < {at_least}"
    );
    assert!(
        before < 0.2,
        "the initialized model should be at chance level, got {before}"
    );
    assert!(
        epochs.first() > epochs.last(),
        "training loss should fall: {epochs:?}"
    );
    assert_eq!(evaluation.confusion.iter().flatten().sum::<u64>(), 2000);

    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("trained.onnx");
    trainer.save(&saved).unwrap();
    let original = std::fs::read(mnist().join(model).join("init.onnx")).unwrap();
    assert_eq!(
        std::fs::read(&saved).unwrap().len(),
        original.len(),
        "only values change"
    );

    let ours = trainer.predict(test.features()).unwrap();
    let session = Model::load(&saved, &SessionOptions::default()).unwrap();
    let (_, shape) = trainer.input();
    let mut dims = vec![test.len()];
    dims.extend_from_slice(shape);
    let x = test
        .features()
        .to_owned()
        .into_shape_with_order(IxDyn(&dims))
        .unwrap();
    let outputs = session
        .run(&[("input", TensorView::from(x.view()))])
        .unwrap();
    let theirs = outputs.f32("logits").unwrap();
    let delta = ours
        .iter()
        .zip(theirs.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        delta <= 1e-4,
        "{model}: ort differs from the trainer by {delta}"
    );
    // The probabilities output (the softmax the trainer left out) agrees with the labels too.
    let probabilities = outputs.f32("probabilities").unwrap();
    let ort_accuracy = probabilities
        .outer_iter()
        .zip(ours.outer_iter())
        .filter(|(p, l)| argmax(p.iter()) == argmax(l.iter()))
        .count() as f64
        / test.len() as f64;
    assert_eq!(ort_accuracy, 1.0);
}

fn argmax<'a>(values: impl Iterator<Item = &'a f32>) -> usize {
    values
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| {
            if *v > bv { (i, *v) } else { (bi, bv) }
        })
        .0
}

/// The recipes the tests (and the benchmark) use.
const MLP_RECIPE: &[(&str, &str)] = &[
    ("epochs", "30"),
    ("batch_size", "32"),
    ("optimizer", "sgd"),
    ("learning_rate", "0.1"),
    ("momentum", "0.9"),
    ("weight_decay", "0.001"),
    ("lr_schedule", "cosine"),
];
const CNN_RECIPE: &[(&str, &str)] = &[
    ("epochs", "12"),
    ("batch_size", "64"),
    ("optimizer", "sgd"),
    ("learning_rate", "0.05"),
    ("momentum", "0.9"),
    ("weight_decay", "0.0005"),
    ("lr_schedule", "cosine"),
];

#[test]
fn the_mlp_learns_mnist_to_95_percent_and_ort_scores_the_saved_file_the_same() {
    train_to("mlp", MLP_RECIPE, candle(), 0.95);
}

#[test]
fn the_cnn_learns_mnist_to_97_percent_and_ort_scores_the_saved_file_the_same() {
    train_to("cnn", CNN_RECIPE, candle(), 0.97);
}

#[cfg(feature = "tch")]
mod tch_backend {
    use super::*;

    fn tch() -> TrainerOptions {
        TrainerOptions {
            backend: BackendKind::Tch,
            threads: 2,
            ..Default::default()
        }
    }

    #[test]
    fn the_mlp_learns_mnist_to_95_percent_with_tch() {
        train_to("mlp", MLP_RECIPE, tch(), 0.95);
    }

    #[test]
    fn the_cnn_learns_mnist_to_97_percent_with_tch() {
        train_to("cnn", CNN_RECIPE, tch(), 0.97);
    }

    #[test]
    fn tch_is_deterministic_and_refuses_cuda_where_there_is_none() {
        let data = train_split().select(&(0..512).collect::<Vec<_>>());
        let run = || {
            let mut t = Trainer::load(mnist().join("cnn/init.onnx"), &tch()).unwrap();
            t.fit(
                &data,
                &config(&[("epochs", "1"), ("seed", "3")]),
                &mut |_| {},
            )
            .unwrap();
            t.weights().unwrap()
        };
        assert_eq!(run(), run());

        let cuda = TrainerOptions {
            device: Device::Cuda(0),
            ..tch()
        };
        match Trainer::load(mnist().join("cnn/init.onnx"), &cuda) {
            Err(TrainError::Unavailable(message)) => {
                assert!(message.contains("no fallback to CPU"), "{message}")
            }
            Err(other) => panic!("expected Unavailable, got {other}"),
            // A machine with a GPU: the trainer runs there.
            Ok(t) => assert_eq!(t.options().device, Device::Cuda(0)),
        }
    }

    #[test]
    fn a_twin_whose_names_do_not_match_is_refused_listing_both_sides() {
        // The MLP's twin against the CNN's ONNX file.
        let options = TrainerOptions {
            torchscript: Some(mnist().join("mlp/init.pt")),
            ..tch()
        };
        let err = Trainer::load(mnist().join("cnn/init.onnx"), &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fc1_weight") && err.contains("conv1.weight"),
            "{err}"
        );
    }
}

#[test]
fn the_same_seed_gives_bit_identical_weights_and_another_seed_does_not() {
    let data = train_split().select(&(0..1000).collect::<Vec<_>>());
    let run = |seed: &str| {
        let mut trainer = Trainer::load(mnist().join("cnn/init.onnx"), &candle()).unwrap();
        let c = config(&[
            ("epochs", "1"),
            ("batch_size", "50"),
            ("seed", seed),
            ("learning_rate", "0.01"),
        ]);
        trainer.fit(&data, &c, &mut |_| {}).unwrap();
        trainer.weights().unwrap()
    };
    let a = run("7");
    assert_eq!(a, run("7"));
    assert_ne!(a, run("8"));
}

#[test]
fn weights_round_trip_and_wrong_names_or_shapes_are_refused() {
    let mut trainer = Trainer::load(mnist().join("mlp/init.onnx"), &candle()).unwrap();
    let weights = trainer.weights().unwrap();
    let names: Vec<&str> = weights.tensors().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
    assert_eq!(weights.get("fc1.weight").unwrap().shape(), &[256, 784]);

    let halved = Weights::new(
        weights
            .tensors()
            .iter()
            .map(|(n, t)| (n.clone(), t.mapv(|v| v / 2.0)))
            .collect(),
    )
    .unwrap();
    trainer.set_weights(&halved).unwrap();
    assert_eq!(trainer.weights().unwrap(), halved);
    // Through the saved ONNX file as well.
    let dir = tempfile::tempdir().unwrap();
    trainer.save(dir.path().join("m.onnx")).unwrap();
    let reloaded = Trainer::load(dir.path().join("m.onnx"), &candle()).unwrap();
    assert_eq!(reloaded.weights().unwrap(), halved);

    let wrong_name = Weights::new(vec![("fc9.weight".into(), ArrayD::zeros(IxDyn(&[2])))]).unwrap();
    let err = trainer.set_weights(&wrong_name).unwrap_err().to_string();
    assert!(
        err.contains("no trainable tensor \"fc9.weight\"") && err.contains("fc1.weight"),
        "{err}"
    );
    let wrong_shape = Weights::new(vec![("fc2.bias".into(), ArrayD::zeros(IxDyn(&[11])))]).unwrap();
    let err = trainer.set_weights(&wrong_shape).unwrap_err().to_string();
    assert!(
        err.contains("\"fc2.bias\" has shape [11]; the model's is [10]"),
        "{err}"
    );
    assert_eq!(
        trainer.weights().unwrap(),
        halved,
        "a refused update changes nothing"
    );
}

#[test]
fn fedprox_keeps_the_weights_closer_to_where_training_started() {
    let data = train_split().select(&(0..2000).collect::<Vec<_>>());
    let moved = |mu: &str| {
        let mut trainer = Trainer::load(mnist().join("mlp/init.onnx"), &candle()).unwrap();
        let start = trainer.weights().unwrap();
        let c = config(&[
            ("epochs", "2"),
            ("optimizer", "sgd"),
            ("learning_rate", "0.1"),
            ("fedprox_mu", mu),
        ]);
        trainer.fit(&data, &c, &mut |_| {}).unwrap();
        start.squared_distance(&trainer.weights().unwrap()).sqrt()
    };
    let free = moved("0");
    let proximal = moved("1.0");
    eprintln!("distance from the start: mu=0 {free:.3}, mu=1 {proximal:.3}");
    assert!(
        proximal < free * 0.9,
        "mu=1 moved {proximal}, mu=0 moved {free}"
    );
}

#[test]
fn early_stopping_keeps_the_best_validation_epoch() {
    // 300 samples, a high learning rate and many epochs: the validation loss turns up.
    let data = train_split().select(&(0..8000).step_by(27).collect::<Vec<_>>());
    let mut trainer = Trainer::load(mnist().join("mlp/init.onnx"), &candle()).unwrap();
    let c = config(&[
        ("epochs", "60"),
        ("batch_size", "16"),
        ("learning_rate", "0.01"),
        ("validation_split", "0.3"),
        ("early_stop_patience", "3"),
    ]);
    let report = trainer.fit(&data, &c, &mut |_| {}).unwrap();
    assert!(report.stopped_early, "{report:?}");
    assert_eq!(report.epochs, report.best_epoch + 3);
    let best = report.history[report.best_epoch - 1]
        .validation_loss
        .unwrap();
    assert!(
        report
            .history
            .iter()
            .all(|e| e.validation_loss.unwrap() >= best)
    );
    // The trainer holds the best epoch's weights: re-evaluating the validation split gives its loss.
    let (_, validation) = data.split(0.3, c.seed);
    let now = trainer.evaluate(&validation).unwrap().loss;
    assert!((now - best).abs() < 1e-5, "{now} vs {best}");
}

#[test]
fn bad_models_data_and_settings_are_clear_errors() {
    // An operator candle cannot train: the logistic-regression edge model (ai.onnx.ml).
    let err = Trainer::load(mnist().join("edge/model.onnx"), &candle()).unwrap_err();
    assert!(matches!(err, TrainError::UnsupportedOp { .. }), "{err}");
    assert!(
        err.to_string().contains("ai.onnx.ml.LinearClassifier"),
        "{err}"
    );

    // Samples that do not fit the input: 8x8 digits into the 28x28 MLP.
    let digits = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits/test.csv");
    let small = TrainData::from_csv(digits.as_ref(), "label", &Default::default()).unwrap();
    let mut trainer = Trainer::load(mnist().join("mlp/init.onnx"), &candle()).unwrap();
    let err = trainer
        .fit(&small, &TrainConfig::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "bad training data: the samples have 64 values but the model's input `input` takes [N, 784] (784 values per sample)"
    );
    // Labels beyond the model's classes.
    let x = Array2::zeros((2, 784));
    let err = trainer
        .fit(
            &TrainData::classification(x, vec![3, 12]).unwrap(),
            &TrainConfig::default(),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("label 12 does not fit the model's output `logits` of 10 classes"),
        "{err}"
    );

    // An unknown hyperparameter.
    let err = parse_parameters([("learnig_rate", "0.1")])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("hyperparameter `learnig_rate`: unknown hyperparameter"),
        "{err}"
    );

    // A GPU for the candle backend, and the tch backend when it is not built in.
    let cuda = TrainerOptions {
        device: Device::Cuda(0),
        ..candle()
    };
    let err = Trainer::load(mnist().join("mlp/init.onnx"), &cuda).unwrap_err();
    assert!(matches!(err, TrainError::Unavailable(_)), "{err}");
    #[cfg(not(feature = "tch"))]
    {
        let tch = TrainerOptions {
            backend: BackendKind::Tch,
            ..candle()
        };
        let err = Trainer::load(mnist().join("mlp/init.onnx"), &tch)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cargo feature `tch`"), "{err}");
    }
    // A file that is not a model.
    let err = Trainer::load(mnist().join("cnn/MANIFEST.md"), &candle()).unwrap_err();
    assert!(matches!(err, TrainError::Model(_)), "{err}");
}
