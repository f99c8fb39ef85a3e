//! Frames on a byte stream (TCP, or a tunnel through the edge node's connection to the hub):
//! an SDNF frame carries its own lengths, so the reader takes the 20-byte prefix, checks the
//! header and payload sizes against the limits, and only then allocates and reads the rest.
//! A peer that announces more than [`WireLimits::max_frame_bytes`] is refused before a byte of
//! it is buffered.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{FlError, MAGIC, MAX_HEADER_BYTES, Message, PREFIX_BYTES, VERSION};
use crate::weights::{Encoding, Limits};

/// Bounds on what a stream may carry.
#[derive(Debug, Clone, Copy)]
pub struct WireLimits {
    /// The largest frame accepted, in bytes.
    pub max_frame_bytes: u64,
    /// Bounds on the weights inside.
    pub weights: Limits,
}

impl Default for WireLimits {
    fn default() -> Self {
        WireLimits {
            max_frame_bytes: 512 << 20,
            weights: Limits::default(),
        }
    }
}

/// Reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed or ended. Retryable (reconnect).
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The frame is malformed or too large. Not retryable.
    #[error(transparent)]
    Frame(#[from] FlError),
}

impl WireError {
    /// Whether reconnecting can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WireError::Io(_))
    }
}

/// The bytes that open a connection to an aggregator that requires the job's token, before
/// any frame: `SDNA`, the token's length (u16, big endian), the token.
pub const TOKEN_MAGIC: [u8; 4] = *b"SDNA";

/// The longest token a connection may open with.
pub const MAX_TOKEN_BYTES: usize = 512;

/// Opens an authenticated connection: writes the token preamble.
pub async fn write_token<W: AsyncWrite + Unpin>(
    writer: &mut W,
    token: &str,
) -> std::io::Result<()> {
    let len = u16::try_from(token.len())
        .ok()
        .filter(|l| usize::from(*l) <= MAX_TOKEN_BYTES)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the job's token is longer than {MAX_TOKEN_BYTES} bytes"),
            )
        })?;
    let mut preamble = Vec::with_capacity(6 + token.len());
    preamble.extend_from_slice(&TOKEN_MAGIC);
    preamble.extend_from_slice(&len.to_be_bytes());
    preamble.extend_from_slice(token.as_bytes());
    writer.write_all(&preamble).await?;
    writer.flush().await
}

/// Reads a connection's token preamble; whether it carries `expected` (a stream that opens
/// with anything else, or a token over [`MAX_TOKEN_BYTES`], does not; nothing beyond the
/// announced length is read).
pub async fn read_token<R: AsyncRead + Unpin>(
    reader: &mut R,
    expected: &str,
) -> std::io::Result<bool> {
    let mut head = [0u8; 6];
    reader.read_exact(&mut head).await?;
    if head[..4] != TOKEN_MAGIC {
        return Ok(false);
    }
    let len = usize::from(u16::from_be_bytes([head[4], head[5]]));
    if len > MAX_TOKEN_BYTES {
        return Ok(false);
    }
    let mut token = vec![0u8; len];
    reader.read_exact(&mut token).await?;
    Ok(crate::cloud::constant_time_eq(&token, expected.as_bytes()))
}

/// Reads one frame; `Ok(None)` when the stream ends cleanly before a frame starts. Returns the
/// message and the frame's size.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: &WireLimits,
) -> Result<Option<(Message, usize)>, WireError> {
    let mut prefix = [0u8; PREFIX_BYTES];
    match reader.read_exact(&mut prefix[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    reader.read_exact(&mut prefix[1..]).await?;
    if &prefix[..4] != MAGIC {
        return Err(FlError::Frame("does not start with SDNF".into()).into());
    }
    if prefix[4] != VERSION {
        return Err(FlError::Frame(format!(
            "version {} (this library reads {VERSION})",
            prefix[4]
        ))
        .into());
    }
    let header_len = u64::from(u32::from_le_bytes([
        prefix[8], prefix[9], prefix[10], prefix[11],
    ]));
    let mut payload = [0u8; 8];
    payload.copy_from_slice(&prefix[12..20]);
    let payload_len = u64::from_le_bytes(payload);
    if header_len > MAX_HEADER_BYTES as u64 {
        return Err(FlError::Frame(format!(
            "header of {header_len} bytes exceeds {MAX_HEADER_BYTES}"
        ))
        .into());
    }
    let total = (PREFIX_BYTES as u64)
        .saturating_add(header_len)
        .saturating_add(payload_len);
    if total > limits.max_frame_bytes {
        return Err(FlError::Frame(format!(
            "a frame of {total} bytes exceeds the limit of {}",
            limits.max_frame_bytes
        ))
        .into());
    }
    let total = usize::try_from(total).map_err(|_| FlError::Frame("frame too large".into()))?;
    let mut frame = vec![0u8; total];
    frame[..PREFIX_BYTES].copy_from_slice(&prefix);
    reader.read_exact(&mut frame[PREFIX_BYTES..]).await?;
    let message = Message::decode(&frame, &limits.weights)?;
    Ok(Some((message, total)))
}

/// Writes one message (weights in `encoding`); returns the frame's size.
pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
    encoding: Encoding,
) -> Result<usize, WireError> {
    let frame = message.encode(encoding)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(frame.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Weights;
    use ndarray::{ArrayD, IxDyn};
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn a_connection_opens_with_the_jobs_token_and_anything_else_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        write_token(&mut a, "job-token").await.unwrap();
        assert!(read_token(&mut b, "job-token").await.unwrap());
        write_token(&mut a, "guess").await.unwrap();
        assert!(!read_token(&mut b, "job-token").await.unwrap());
        // A frame without a preamble (an old or hostile client) is not a token.
        a.write_all(b"SDNF\x01\x00\x00\x00").await.unwrap();
        assert!(!read_token(&mut b, "job-token").await.unwrap());
        // A length over the limit is refused without reading the rest.
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(b"SDNA\xff\xff").await.unwrap();
        assert!(!read_token(&mut b, "job-token").await.unwrap());
        assert!(
            write_token(&mut a, &"x".repeat(MAX_TOKEN_BYTES + 1))
                .await
                .is_err()
        );
        // A stream that ends early is an I/O error.
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(b"SDN").await.unwrap();
        drop(a);
        assert!(read_token(&mut b, "job-token").await.is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_on_a_stream_and_oversized_ones_are_refused_before_reading() {
        let weights = Weights::new(vec![(
            "w".into(),
            ArrayD::from_elem(IxDyn(&[1000]), 0.5f32),
        )])
        .unwrap();
        let message = Message::Train {
            round: 3,
            weights,
            settings: BTreeMap::new(),
        };
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let written = write_message(&mut a, &message, Encoding::F16)
            .await
            .unwrap();
        write_message(
            &mut a,
            &Message::Reject {
                reason: "bye".into(),
                retryable: false,
            },
            Encoding::F32,
        )
        .await
        .unwrap();
        drop(a);
        let (read, size) = read_message(&mut b, &WireLimits::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(size, written);
        assert_eq!(read, message);
        assert!(matches!(
            read_message(&mut b, &WireLimits::default()).await,
            Ok(Some((Message::Reject { .. }, _)))
        ));
        assert!(
            read_message(&mut b, &WireLimits::default())
                .await
                .unwrap()
                .is_none()
        );

        // A prefix announcing 1 TiB: refused from the prefix alone.
        let mut hostile = b"SDNF\x01\x00\x00\x00".to_vec();
        hostile.extend_from_slice(&16u32.to_le_bytes());
        hostile.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let err = read_message(&mut hostile.as_slice(), &WireLimits::default())
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.to_string().contains("exceeds the limit of 536870912"),
            "{err}"
        );
        // Garbage.
        let err = read_message(
            &mut &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &WireLimits::default(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("SDNF"), "{err}");
        // A stream cut inside a frame is an I/O error (reconnect).
        let frame = message.encode(Encoding::F32).unwrap();
        let err = read_message(&mut &frame[..100], &WireLimits::default())
            .await
            .unwrap_err();
        assert!(err.is_retryable());
    }
}
