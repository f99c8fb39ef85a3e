//! Where samples come from and how they become model inputs: a directory of image files
//! (as they arrive) or an IDX file (MNIST's format) replayed; PGM (P5) images.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::ArrayD;
use sedna::inference::{DType, TensorInfo};

/// A source of samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// New `.pgm` files in a directory, in name order, as they arrive.
    Dir(PathBuf),
    /// Every image of an IDX `idx3-ubyte` file, in order.
    Idx(PathBuf),
}

impl Source {
    /// Parses `dir:/path` or `idx:/path/images.idx3-ubyte`.
    pub(crate) fn parse(text: &str) -> Result<Source> {
        match text.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(Source::Dir(path.into())),
            Some(("idx", path)) if !path.is_empty() => Ok(Source::Idx(path.into())),
            _ => bail!("input {text:?}: expected dir:/path or idx:/path/file.idx3-ubyte"),
        }
    }
}

/// A grey image: rows × cols bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Image {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) pixels: Vec<u8>,
}

/// The largest image accepted (pixels).
pub(crate) const MAX_PIXELS: usize = 64 << 20;

/// Decodes a binary PGM (P5, maxval ≤ 255).
pub(crate) fn decode_pgm(bytes: &[u8]) -> Result<Image> {
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
        while at < bytes.len() && !bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if start == at {
            bail!("truncated PGM header");
        }
        fields.push(std::str::from_utf8(&bytes[start..at]).context("PGM header is not ASCII")?);
    }
    if fields[0] != "P5" {
        bail!("not a binary PGM (P5) image: magic {:?}", fields[0]);
    }
    let number = |i: usize, what: &str| -> Result<usize> {
        fields[i]
            .parse::<usize>()
            .with_context(|| format!("PGM {what} {:?} is not a number", fields[i]))
    };
    let (cols, rows, max) = (
        number(1, "width")?,
        number(2, "height")?,
        number(3, "maxval")?,
    );
    if max == 0 || max > 255 {
        bail!("PGM maxval {max}: only 8-bit images are supported");
    }
    let n = rows
        .checked_mul(cols)
        .filter(|n| *n <= MAX_PIXELS)
        .context("PGM image too large")?;
    let data = bytes
        .get(at + 1..at + 1 + n)
        .context("PGM pixel data truncated")?;
    Ok(Image {
        rows,
        cols,
        pixels: data.to_vec(),
    })
}

/// Reads every image of an IDX `idx3-ubyte` file.
pub(crate) fn read_idx(path: &Path) -> Result<Vec<Image>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let word = |at: usize| -> Result<usize> {
        let b = bytes.get(at..at + 4).context("IDX header truncated")?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if word(0)? != 0x803 {
        bail!(
            "{}: not an IDX file of 8-bit images (magic 0x00000803)",
            path.display()
        );
    }
    let (count, rows, cols) = (word(4)?, word(8)?, word(12)?);
    let size = rows
        .checked_mul(cols)
        .filter(|n| *n <= MAX_PIXELS)
        .context("IDX images too large")?;
    let data = bytes
        .get(16..16 + count.checked_mul(size).context("IDX too large")?)
        .context("IDX data truncated")?;
    Ok(data
        .chunks_exact(size)
        .map(|p| Image {
            rows,
            cols,
            pixels: p.to_vec(),
        })
        .collect())
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
    fn pgm_images_decode_and_bad_ones_are_refused() {
        let mut pgm = b"P5\n# a comment\n3 2\n255\n".to_vec();
        pgm.extend_from_slice(&[0, 1, 2, 3, 4, 255]);
        let image = decode_pgm(&pgm).unwrap();
        assert_eq!((image.rows, image.cols), (2, 3));
        assert_eq!(image.pixels, vec![0, 1, 2, 3, 4, 255]);
        assert!(
            decode_pgm(b"P2\n1 1\n255\n0")
                .unwrap_err()
                .to_string()
                .contains("P5")
        );
        assert!(
            decode_pgm(b"P5\n3 2\n255\n\x00")
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        assert!(
            decode_pgm(b"P5\n1 1\n65535\n\x00\x00")
                .unwrap_err()
                .to_string()
                .contains("8-bit")
        );
    }

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
            Source::parse("dir:/data").unwrap(),
            Source::Dir("/data".into())
        );
    }
}
