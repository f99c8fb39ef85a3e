//! `sedna train`: trains an ONNX model on a dataset with lib-sedna's trainer and writes the
//! trained model (the same graph with new weights), with a progress bar and the final metrics.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sedna::train::{Device, Evaluation, Progress, TrainData, Trainer, parse_parameters};

/// Arguments of `sedna train`.
#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// The ONNX model to train; its float initializers are the weights.
    #[arg(long, value_name = "MODEL.onnx")]
    model: PathBuf,
    /// Training data: MNIST-style IDX images (`…images….idx3-ubyte[.gz]`, the labels file
    /// beside it), a `.csv` with a `label` column, a Sedna `.txt` index of PGM images, or a
    /// directory of PGM images with one subdirectory per class.
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    /// Where to write the trained model; nothing is written when anything fails.
    #[arg(long, value_name = "OUT.onnx")]
    out: PathBuf,
    /// Held-out data (same formats) evaluated after every epoch and at the end.
    #[arg(long, value_name = "PATH")]
    test: Option<PathBuf>,
    /// Epochs (the hyperparameter `epochs`).
    #[arg(long)]
    epochs: Option<usize>,
    /// Samples per step (the hyperparameter `batch_size`).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate (the hyperparameter `learning_rate`).
    #[arg(long)]
    lr: Option<f64>,
    /// Any hyperparameter as KEY=VALUE, repeatable: optimizer, momentum, weight_decay,
    /// lr_schedule, seed, validation_split, early_stop_patience, fedprox_mu, loss, backend,
    /// device, threads, … (an unknown key is refused with the list of known ones).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Hyperparameters from a file in Sedna's form: `[{"key": "epochs", "value": "3"}, …]`.
    #[arg(long, value_name = "FILE.json")]
    params_file: Option<PathBuf>,
    /// The TorchScript twin for `--param backend=tch` (default: MODEL.pt).
    #[arg(long, value_name = "MODEL.pt")]
    torchscript: Option<PathBuf>,
    /// Print the final metrics as one JSON object on standard output.
    #[arg(long)]
    json: bool,
}

/// Runs `sedna train`.
pub(crate) fn train(args: TrainArgs) -> Result<ExitCode> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(file) = &args.params_file {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        #[derive(serde::Deserialize)]
        struct Pair {
            key: String,
            value: serde_json::Value,
        }
        let list: Vec<Pair> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a list of {{key, value}}", file.display()))?;
        for p in list {
            let value = match p.value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            pairs.push((p.key, value));
        }
    }
    for param in &args.params {
        let Some((key, value)) = param.split_once('=') else {
            bail!("--param {param:?}: expected KEY=VALUE");
        };
        pairs.push((key.trim().to_string(), value.trim().to_string()));
    }
    for (key, value) in [
        ("epochs", args.epochs.map(|v| v.to_string())),
        ("batch_size", args.batch_size.map(|v| v.to_string())),
        ("learning_rate", args.lr.map(|v| v.to_string())),
    ] {
        if let Some(value) = value {
            pairs.push((key.to_string(), value));
        }
    }
    let (mut options, config) =
        parse_parameters(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    options.torchscript = args.torchscript.clone();

    let limits = Default::default();
    let data = TrainData::load(&args.data, &limits)
        .with_context(|| format!("training data {}", args.data.display()))?;
    let test = args
        .test
        .as_ref()
        .map(|t| TrainData::load(t, &limits).with_context(|| format!("test data {}", t.display())))
        .transpose()?;
    let mut trainer = Trainer::load(&args.model, &options)
        .with_context(|| format!("model {}", args.model.display()))?;
    let (input, shape) = trainer.input();
    let (output, width) = trainer.output();
    eprintln!(
        "training {} ({} backend on {}, {} threads): input `{input}` {shape:?}, output `{output}` ({width}), {} samples{}",
        args.model.display(),
        trainer.backend().name(),
        if options.device == Device::Cpu {
            "cpu".to_string()
        } else {
            options.device.to_string()
        },
        trainer.options().threads,
        data.len(),
        test.as_ref()
            .map(|t| format!(", {} held out", t.len()))
            .unwrap_or_default()
    );

    let interactive = std::io::stderr().is_terminal();
    let bar = if interactive {
        ProgressBar::new(1)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} steps  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let report = trainer.fit_validated(&data, test.as_ref(), &config, &mut |p| match p {
        Progress::Step {
            epoch,
            step,
            total_steps,
            loss,
            samples_per_sec,
            ..
        } => {
            bar.set_length(*total_steps as u64);
            bar.set_position(*step as u64);
            bar.set_message(format!(
                "epoch {epoch}  loss {loss:.4}  {samples_per_sec:.0} samples/s"
            ));
        }
        Progress::Epoch(e) => {
            let held_out = match (e.validation_loss, e.validation_accuracy) {
                (Some(loss), Some(acc)) => format!("  held-out loss {loss:.4} accuracy {acc:.4}"),
                (Some(loss), None) => format!("  held-out loss {loss:.4}"),
                _ => String::new(),
            };
            let line = format!(
                "epoch {:>3}: train loss {:.4}{held_out}  {:.0} samples/s, {:.1} s",
                e.epoch, e.train_loss, e.samples_per_sec, e.seconds
            );
            if interactive {
                bar.println(line);
            } else {
                eprintln!("{line}");
            }
        }
    });
    bar.finish_and_clear();
    let report = report?;
    let evaluation = trainer.evaluate(test.as_ref().unwrap_or(&data))?;
    trainer
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let on = if test.is_some() {
        "held-out"
    } else {
        "training"
    };
    print_metrics(&evaluation, on, &report, &args)?;
    Ok(ExitCode::SUCCESS)
}

fn print_metrics(
    e: &Evaluation,
    on: &str,
    report: &sedna::train::FitReport,
    args: &TrainArgs,
) -> Result<()> {
    if args.json {
        let metrics: serde_json::Map<String, serde_json::Value> = e
            .metrics()
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "model": args.out, "evaluated_on": on, "epochs": report.epochs, "steps": report.steps,
                "samples_per_sec": report.samples_per_sec, "stopped_early": report.stopped_early,
                "best_epoch": report.best_epoch, "metrics": metrics, "confusion": e.confusion,
            })
        );
        return Ok(());
    }
    let m = e.metrics();
    eprintln!(
        "wrote {} after {} epochs ({} steps, {:.0} samples/s{})",
        args.out.display(),
        report.epochs,
        report.steps,
        report.samples_per_sec,
        if report.stopped_early {
            format!(", stopped early; weights of epoch {}", report.best_epoch)
        } else {
            String::new()
        }
    );
    match e.accuracy {
        Some(accuracy) => {
            println!(
                "{on} ({} samples): loss {:.4}  accuracy {accuracy:.4}  precision {:.4}  recall {:.4}  f1 {:.4}",
                e.samples, e.loss, m["precision"], m["recall"], m["f1"]
            );
            println!("class  precision  recall  f1      support");
            for (c, k) in e.per_class.iter().enumerate() {
                println!(
                    "{c:>5}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}",
                    k.precision, k.recall, k.f1, k.support
                );
            }
        }
        None => println!(
            "{on} ({} samples): mean squared error {:.6}",
            e.samples, e.loss
        ),
    }
    Ok(())
}
