//! Where samples come from and how they become model inputs: a directory of image files
//! (as they arrive), an IDX file (MNIST's format) replayed, video, a camera Device of the node
//! (its stream, found through the node's local API), an HTTP request API; images are decoded by
//! `sedna::dataset` (PGM, IDX).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ndarray::ArrayD;
pub(crate) use sedna::dataset::{GreyImage as Image, decode_pgm};
use sedna::inference::{DType, TensorInfo};

/// A source of samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// New `.pgm` files in a directory, in name order, as they arrive.
    Dir(PathBuf),
    /// Every image of an IDX `idx3-ubyte` file, in order.
    Idx(PathBuf),
    /// Frames of a video file or stream, decoded by ffmpeg.
    Video(String),
    /// Images POSTed by apps to `http://<address>/infer`.
    Http(std::net::SocketAddr),
    /// The stream of a camera Device of the node, by name (resolved into `Video` by
    /// [`resolve`]).
    Device(String),
}

impl Source {
    /// Parses `dir:/path`, `idx:/path/images.idx3-ubyte`, `video:<file or URL>`,
    /// `device:<name>` or `http:<host:port>`.
    pub(crate) fn parse(text: &str) -> Result<Source> {
        match text.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(Source::Dir(path.into())),
            Some(("idx", path)) if !path.is_empty() => Ok(Source::Idx(path.into())),
            Some(("video", url)) if !url.is_empty() => Ok(Source::Video(url.into())),
            Some(("device", name)) if !name.is_empty() => Ok(Source::Device(name.into())),
            Some(("http", address)) => {
                Ok(Source::Http(address.parse().with_context(|| {
                    format!("input {text:?}: {address:?} is not host:port")
                })?))
            }
            _ => bail!(
                "input {text:?}: expected dir:/path, idx:/path/file.idx3-ubyte, video:<file or URL>, device:<name> or http:<host:port>"
            ),
        }
    }
}

/// One sample from a source: its id, the image (or why it could not be read), and where to
/// send the answer when an app waits for it.
pub(crate) struct Sample {
    pub(crate) id: String,
    pub(crate) image: Result<Image, String>,
    pub(crate) reply: Option<tokio::sync::oneshot::Sender<serde_json::Value>>,
}

/// The stream a camera Device is read from: its protocol must be `camera` (or `rtsp`) and its
/// `configData.url` (the DeviceModel's, overridden by the Device's) says where.
pub(crate) fn camera_url(
    device: &sedna_api::devices::Device,
    model: Option<&sedna_api::devices::DeviceModel>,
) -> std::result::Result<String, String> {
    let name = device.metadata.name.clone().unwrap_or_default();
    let protocol = device
        .spec
        .protocol
        .protocol_name
        .clone()
        .or_else(|| model.and_then(|m| m.spec.protocol.clone()))
        .unwrap_or_default();
    if protocol != "camera" && protocol != "rtsp" {
        return Err(format!(
            "device {name} speaks {protocol:?}, not camera: only a camera's stream is an input"
        ));
    }
    let mut config = model
        .and_then(|m| m.spec.protocol_config_data.clone())
        .unwrap_or_default();
    config.extend(device.spec.protocol.config_data.clone().unwrap_or_default());
    match config.get("url").and_then(serde_json::Value::as_str) {
        Some(url) if !url.is_empty() => Ok(url.to_owned()),
        _ => Err(format!("device {name} has no protocol configData.url")),
    }
}

/// Turns `device:<name>` into the camera's stream, read from the node's local API (which
/// answers while the cloud is away); other sources are returned as they are.
pub(crate) async fn resolve(source: Source, namespace: &str) -> Result<Source> {
    let Source::Device(name) = source else {
        return Ok(source);
    };
    let client = sedna::report::local_client().await.with_context(|| {
        format!(
            "input device:{name}: finding a Device needs the node's local API \
             (SEDNA_LOCAL_KUBECONFIG, which the edge agent gives its pods)"
        )
    })?;
    let devices: kube::Api<sedna_api::devices::Device> =
        kube::Api::namespaced(client.clone(), namespace);
    let device = devices
        .get(&name)
        .await
        .with_context(|| format!("input device:{name}: reading Device {namespace}/{name}"))?;
    let models: kube::Api<sedna_api::devices::DeviceModel> =
        kube::Api::namespaced(client, namespace);
    let model = models
        .get_opt(&device.spec.device_model_ref.name)
        .await
        .ok()
        .flatten();
    let url = camera_url(&device, model.as_ref())
        .map_err(|e| anyhow::anyhow!("input device:{name}: {e}"))?;
    tracing::info!(device = %name, %url, "reading the camera's stream");
    Ok(Source::Video(url))
}

/// The image size the model takes (rows, cols), when its input says: `[N, rows, cols]`,
/// `[N, 1, rows, cols]`, or `[N, k·k]` (a square image flattened).
pub(crate) fn frame_size(input: &TensorInfo) -> Option<(usize, usize)> {
    match input.shape.as_slice() {
        [_, Some(n)] => {
            let side = (*n as f64).sqrt().round() as usize;
            (side * side == *n).then_some((side, side))
        }
        [_, Some(r), Some(c)] | [_, Some(1), Some(r), Some(c)] => Some((*r, *c)),
        _ => None,
    }
}

/// Hands a sample to the worker; false once the worker has stopped listening.
async fn send(
    tx: &tokio::sync::mpsc::Sender<Sample>,
    id: String,
    image: Result<Image, String>,
) -> bool {
    tx.send(Sample {
        id,
        image,
        reply: None,
    })
    .await
    .is_ok()
}

/// Starts the producer of `source`'s samples; ids in `done` are skipped (already answered).
pub(crate) fn spawn_source(
    source: Source,
    done: std::collections::HashSet<String>,
    frame: Option<(usize, usize)>,
) -> Result<tokio::sync::mpsc::Receiver<Sample>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Sample>(64);
    match source {
        Source::Idx(path) => {
            let images = sedna::dataset::read_idx_images(&path, &Default::default())?;
            tokio::spawn(async move {
                for (i, image) in images.into_iter().enumerate() {
                    let id = format!("{i:06}");
                    if done.contains(&id) {
                        continue;
                    }
                    if !send(&tx, id, Ok(image)).await {
                        return;
                    }
                }
            });
        }
        Source::Dir(dir) => {
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
            tokio::spawn(async move {
                let mut seen = done;
                loop {
                    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                        .map(|entries| entries.flatten().map(|e| e.path()).collect())
                        .unwrap_or_default();
                    files.retain(|p| {
                        p.extension().is_some_and(|e| e.eq_ignore_ascii_case("pgm"))
                            && p.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| !n.starts_with('.') && !seen.contains(n))
                    });
                    files.sort();
                    for path in files {
                        let id = path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .unwrap_or_default()
                            .to_string();
                        let image = std::fs::read(&path)
                            .map_err(anyhow::Error::from)
                            .and_then(|b| decode_pgm(&b).map_err(anyhow::Error::from))
                            .map_err(|e| format!("{}: {e}", path.display()));
                        seen.insert(id.clone());
                        if !send(&tx, id, image).await {
                            return;
                        }
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            });
        }
        Source::Device(name) => bail!("input device:{name} was not resolved to its stream"),
        Source::Video(url) => {
            let (rows, cols) = frame.context(
                "a video input needs a model whose input has a known image size ([N, k·k], [N, rows, cols] or [N, 1, rows, cols])",
            )?;
            let mut child = tokio::process::Command::new("ffmpeg")
                .args(["-nostdin", "-loglevel", "error", "-i", &url, "-vf"])
                .arg(format!("scale={cols}:{rows}"))
                .args(["-pix_fmt", "gray", "-f", "rawvideo", "-"])
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting ffmpeg (install it: Debian package ffmpeg)")?;
            let mut stdout = child.stdout.take().context("ffmpeg has no output")?;
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let _child = child;
                let mut n = 0u64;
                loop {
                    let mut pixels = vec![0u8; rows * cols];
                    if stdout.read_exact(&mut pixels).await.is_err() {
                        return;
                    }
                    let id = format!("frame-{n:08}");
                    n += 1;
                    if done.contains(&id) {
                        continue;
                    }
                    let image = Ok(Image { rows, cols, pixels });
                    if !send(&tx, id, image).await {
                        return;
                    }
                }
            });
        }
        Source::Http(address) => {
            let listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("listening on {address}"))?;
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tokio::spawn(crate::http::serve(listener, tx));
        }
    }
    Ok(rx)
}

/// Turns an image into the model's (single) float input: `[1, rows·cols]`, `[1, rows, cols]`
/// or `[1, 1, rows, cols]`, pixels times `scale`.
pub(crate) fn to_input(image: &Image, input: &TensorInfo, scale: f32) -> Result<ArrayD<f32>> {
    if input.dtype != DType::F32 {
        bail!(
            "the model's input {} is {}, the worker feeds float32",
            input.name,
            input.dtype.name()
        );
    }
    let n = image.rows * image.cols;
    let shape: Vec<usize> = match input.shape.len() {
        2 => vec![1, n],
        3 => vec![1, image.rows, image.cols],
        4 => vec![1, 1, image.rows, image.cols],
        r => bail!(
            "the model's input {} has rank {r}; the worker feeds grey images as rank 2, 3 or 4",
            input.name
        ),
    };
    for (axis, (want, got)) in input.shape.iter().zip(&shape).enumerate().skip(1) {
        if let Some(want) = want
            && want != got
        {
            bail!(
                "a {}x{} image does not fit the model's input {} (dimension {axis} must be {want})",
                image.rows,
                image.cols,
                input.name
            );
        }
    }
    let values = image.pixels.iter().map(|p| f32::from(*p) * scale).collect();
    Ok(ArrayD::from_shape_vec(shape, values)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_fit_the_model_input_or_say_why() {
        let image = Image {
            rows: 2,
            cols: 2,
            pixels: vec![0, 255, 51, 102],
        };
        let flat = TensorInfo {
            name: "input".into(),
            dtype: DType::F32,
            shape: vec![None, Some(4)],
        };
        let x = to_input(&image, &flat, 1.0 / 255.0).unwrap();
        assert_eq!(x.shape(), &[1, 4]);
        assert!((x[[0, 1]] - 1.0).abs() < 1e-6);
        let nchw = TensorInfo {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![None, Some(1), Some(2), Some(2)],
        };
        assert_eq!(to_input(&image, &nchw, 1.0).unwrap().shape(), &[1, 1, 2, 2]);
        let wrong = TensorInfo {
            name: "input".into(),
            dtype: DType::F32,
            shape: vec![None, Some(784)],
        };
        assert!(
            to_input(&image, &wrong, 1.0)
                .unwrap_err()
                .to_string()
                .contains("must be 784")
        );
        assert!(Source::parse("rtsp://cam").is_err());
        assert_eq!(
            Source::parse("video:rtsp://cam/1").unwrap(),
            Source::Video("rtsp://cam/1".into())
        );
        assert!(
            Source::parse("http:localhost")
                .unwrap_err()
                .to_string()
                .contains("host:port")
        );
        let flat = TensorInfo {
            name: "input".into(),
            dtype: DType::F32,
            shape: vec![None, Some(784)],
        };
        assert_eq!(frame_size(&flat), Some((28, 28)));
        let odd = TensorInfo {
            name: "input".into(),
            dtype: DType::F32,
            shape: vec![None, Some(10)],
        };
        assert_eq!(frame_size(&odd), None);
        assert_eq!(
            Source::parse("dir:/data").unwrap(),
            Source::Dir("/data".into())
        );
        assert_eq!(
            Source::parse("device:site-camera").unwrap(),
            Source::Device("site-camera".into())
        );
        assert!(Source::parse("device:").is_err());
    }

    #[test]
    fn a_camera_device_gives_its_stream_and_other_devices_say_why_not() {
        let model: sedna_api::devices::DeviceModel = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "cam" },
            "spec": { "protocol": "camera", "protocolConfigData": { "url": "rtsp://model/1", "fps": 2 } }
        }))
        .unwrap();
        let device = |protocol: serde_json::Value| -> sedna_api::devices::Device {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "north" },
                "spec": { "deviceModelRef": { "name": "cam" }, "protocol": protocol }
            }))
            .unwrap()
        };
        assert_eq!(
            camera_url(&device(serde_json::json!({})), Some(&model)).unwrap(),
            "rtsp://model/1"
        );
        assert_eq!(
            camera_url(
                &device(serde_json::json!({ "configData": { "url": "http://h/cam.mjpg" } })),
                Some(&model)
            )
            .unwrap(),
            "http://h/cam.mjpg",
            "the device's url overrides the model's"
        );
        let e = camera_url(
            &device(
                serde_json::json!({ "protocolName": "modbus", "configData": { "ip": "1.2.3.4" } }),
            ),
            Some(&model),
        )
        .unwrap_err();
        assert!(e.contains("speaks \"modbus\", not camera"), "{e}");
        let e = camera_url(
            &device(serde_json::json!({ "protocolName": "camera" })),
            None,
        )
        .unwrap_err();
        assert!(e.contains("no protocol configData.url"), "{e}");
    }
}
