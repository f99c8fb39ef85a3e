//! The channel without HTTP/2: the same envelopes as `Hub.Attach`, framed directly over TLS.
//!
//! A hub holds one mostly idle connection per edge node. Under tonic each costs HTTP/2's fixed
//! buffers (h2 keeps a 16 KiB write buffer and an 8 KiB read buffer per connection for its
//! lifetime), its stream state and its tasks: about 40 KB before the node's session, the
//! largest part of an idle node's cost to the hub. An edge that offers the TLS ALPN protocol
//! [`ALPN`] and a hub that accepts it speak this instead: each frame is a 4-byte big-endian
//! length and a protobuf message, nothing else.
//!
//! 1. The edge sends an [`AttachRequest`] (what `Attach` carries as metadata).
//! 2. The hub answers with an [`AttachAnswer`]: code 0 attaches the node; any other code is
//!    the refusal `Attach` would have returned ([`answer_of`] and [`status_of`] convert).
//! 3. [`Envelope`](crate::channel::Envelope)s flow both ways until either side closes.
//!
//! Neither side keeps a buffer while the connection is idle: [`FrameReader`] lets go of its
//! buffer once every frame in it is decoded, and [`write_frames`] encodes what is queued into
//! one buffer per write. Every frame is checked against a size limit before its body is read.
//! The node's identity is its TLS client certificate, as for `Attach`.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::Stream;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

pub use crate::channel::{AttachAnswer, AttachRequest};

/// The TLS ALPN protocol of the framed channel.
pub const ALPN: &[u8] = b"sedna-channel/1";

/// Largest [`AttachRequest`] a hub reads: it carries one hub address.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Bytes of a frame's length prefix.
const HEADER: usize = 4;

/// Bytes read at a time while no frame's length asks for more.
const READ_CHUNK: usize = 4096;

/// Most bytes read at a time.
const MAX_READ: usize = 64 * 1024;

/// Encoded bytes [`write_frames`] gathers from its queue into one write.
const WRITE_BATCH: usize = 64 * 1024;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame over the limit; the connection cannot be read further.
    #[error("a frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame's bytes are not the expected message.
    #[error("a frame does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The connection ended inside a frame.
    #[error("the connection ended inside a frame ({have} of {want} bytes read)")]
    Truncated {
        /// Bytes of the frame (with its header) that arrived.
        have: usize,
        /// Bytes it announced (with its header).
        want: usize,
    },
    /// Reading the connection failed.
    #[error("reading the connection: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether connecting again may help: a broken connection may; a peer that sends frames
    /// over the limit or undecodable ones will again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, FrameError::Io(_) | FrameError::Truncated { .. })
    }
}

/// Appends `message` to `out` as one frame.
pub fn encode_frame<M: Message>(message: &M, out: &mut Vec<u8>) {
    let len = message.encoded_len();
    out.reserve(HEADER + len);
    // Lengths above u32::MAX cannot be sent; the caller's limits are far below.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    message.encode_raw(out);
}

/// Reads frames from `io`, each at most `max` bytes long (without its header).
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: Vec<u8>,
    start: usize,
    max: usize,
    ended: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of `io` with a limit of `max` bytes per frame.
    pub fn new(io: R, max: usize) -> Self {
        Self {
            io,
            buf: Vec::new(),
            start: 0,
            max,
            ended: false,
        }
    }

    /// Changes the limit for the frames still to come.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Bytes of buffer held now: zero while no frame is partly read.
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next frame as an `M`; `None` when the connection ended between frames.
    pub async fn read<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    /// The frames still to come, as a stream of `M`s.
    pub fn into_stream<M: Message + Default>(self) -> Frames<R, M> {
        Frames {
            reader: self,
            _message: PhantomData,
        }
    }

    /// The length of the frame at the start of the buffer, if its header has arrived.
    fn next_len(&self) -> Result<Option<usize>, FrameError> {
        let pending = &self.buf[self.start..];
        let Some(header) = pending.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let len = usize::try_from(u32::from_be_bytes(*header)).unwrap_or(usize::MAX);
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(Some(len))
    }

    fn poll_message<M: Message + Default>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<M>, FrameError>> {
        loop {
            let len = self.next_len()?;
            let pending = self.buf.len() - self.start;
            if let Some(len) = len
                && pending >= HEADER + len
            {
                let body = &self.buf[self.start + HEADER..self.start + HEADER + len];
                let decoded = M::decode(body);
                self.start += HEADER + len;
                if self.start == self.buf.len() {
                    // Nothing partly read: an idle connection holds no buffer.
                    self.buf = Vec::new();
                    self.start = 0;
                }
                return Poll::Ready(decoded.map(Some).map_err(FrameError::from));
            }
            if self.ended {
                return Poll::Ready(if pending == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated {
                        have: pending,
                        want: len.map_or(HEADER, |l| HEADER + l),
                    })
                });
            }
            // Room for more of this frame (its length is checked), or for a chunk; a large
            // frame's buffer grows with what arrives, not with what its header announces (a
            // peer must send the bytes it makes the reader hold).
            let want = match len {
                Some(len) => (HEADER + len - pending).min(MAX_READ),
                None => READ_CHUNK,
            };
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let filled = self.buf.len();
            self.buf.resize(filled + want.max(READ_CHUNK), 0);
            let mut read = ReadBuf::new(&mut self.buf[filled..]);
            let polled = Pin::new(&mut self.io).poll_read(cx, &mut read);
            let n = match polled {
                Poll::Ready(Ok(())) => read.filled().len(),
                Poll::Ready(Err(e)) => {
                    self.buf.truncate(filled);
                    return Poll::Ready(Err(e.into()));
                }
                Poll::Pending => {
                    self.buf.truncate(filled);
                    if filled == 0 {
                        self.buf = Vec::new();
                    }
                    return Poll::Pending;
                }
            };
            self.buf.truncate(filled + n);
            if n == 0 {
                self.ended = true;
            }
        }
    }
}

/// The frames of a [`FrameReader`] as a stream of `M`s; it ends when the connection ends
/// between frames, and after its first error.
#[derive(Debug)]
pub struct Frames<R, M> {
    reader: FrameReader<R>,
    _message: PhantomData<fn() -> M>,
}

impl<R, M> Frames<R, M> {
    /// The reader underneath.
    pub fn reader(&self) -> &FrameReader<R> {
        &self.reader
    }
}

impl<R: AsyncRead + Unpin, M: Message + Default> Stream for Frames<R, M> {
    type Item = Result<M, FrameError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.reader.ended && this.reader.buf.len() == this.reader.start {
            return Poll::Ready(None);
        }
        let item = ready!(this.reader.poll_message::<M>(cx));
        if item.is_err() {
            // Nothing after an error can be trusted to start at a frame boundary.
            this.reader.ended = true;
            this.reader.buf = Vec::new();
            this.reader.start = 0;
        }
        Poll::Ready(item.transpose())
    }
}

/// Writes one message as a frame and flushes it.
pub async fn write_frame<W, M>(io: &mut W, message: &M) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    let mut out = Vec::new();
    encode_frame(message, &mut out);
    io.write_all(&out).await?;
    io.flush().await
}

/// Writes what `queue` yields as frames until it closes, then shuts `io` down. What is queued
/// together (up to 64 KiB) goes out in one write; between writes no buffer is kept.
pub async fn write_frames<W, M>(mut io: W, mut queue: mpsc::Receiver<M>) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    while let Some(first) = queue.recv().await {
        let mut out = Vec::new();
        encode_frame(&first, &mut out);
        drop(first);
        while out.len() < WRITE_BATCH {
            match queue.try_recv() {
                Ok(m) => encode_frame(&m, &mut out),
                Err(_) => break,
            }
        }
        io.write_all(&out).await?;
        io.flush().await?;
    }
    io.shutdown().await
}

/// The [`AttachAnswer`] for the outcome of an attach: `Ok` attaches; a refusal carries its code,
/// message and ASCII metadata.
pub fn answer_of(outcome: Result<(), &tonic::Status>) -> AttachAnswer {
    match outcome {
        Ok(()) => AttachAnswer::default(),
        Err(status) => AttachAnswer {
            code: status.code() as i32,
            message: status.message().to_owned(),
            metadata: status
                .metadata()
                .iter()
                .filter_map(|kv| match kv {
                    tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                        Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
                    }
                    tonic::metadata::KeyAndValueRef::Binary(..) => None,
                })
                .collect(),
        },
    }
}

/// The refusal an [`AttachAnswer`] carries, as the status `Attach` would have returned;
/// `None` when it attaches the node. Metadata that is not a valid gRPC key and value is left
/// out.
pub fn status_of(answer: &AttachAnswer) -> Option<tonic::Status> {
    if answer.code == 0 {
        return None;
    }
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (k, v) in &answer.metadata {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes()),
            v.parse(),
        ) {
            metadata.insert(key, value);
        }
    }
    Some(tonic::Status::with_metadata(
        tonic::Code::from_i32(answer.code),
        answer.message.clone(),
        metadata,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{Envelope, Op};
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;

    fn envelope(id: u64, payload: usize) -> Envelope {
        Envelope {
            id,
            op: Op::Upsert as i32,
            payload: vec![7; payload],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn queued_envelopes_arrive_in_order_and_whole_then_the_stream_ends() {
        let (a, b) = tokio::io::duplex(1024);
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(write_frames(a, rx));
        let sent: Vec<Envelope> = (1..=200)
            .map(|i| envelope(i, (i as usize * 97) % 5000))
            .collect();
        let feeder = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for e in sent {
                    tx.send(e).await.unwrap();
                }
            })
        };
        let got: Vec<Envelope> = FrameReader::new(b, 1 << 20)
            .into_stream::<Envelope>()
            .map(|r| r.unwrap())
            .collect()
            .await;
        feeder.await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_from_its_header_naming_both_sizes() {
        let (mut a, b) = tokio::io::duplex(64);
        // Only the header is sent: the reader must not wait for (or allocate) the body.
        a.write_all(&(10_000u32).to_be_bytes()).await.unwrap();
        let mut reader = FrameReader::new(b, 1_000);
        let err = reader.read::<Envelope>().await.unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    len: 10_000,
                    max: 1_000
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("10000 bytes is over the limit of 1000")
        );
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn a_connection_that_ends_inside_a_frame_is_an_error_and_between_frames_an_end() {
        let mut whole = Vec::new();
        encode_frame(&envelope(1, 10), &mut whole);
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&whole).await.unwrap();
        a.write_all(&whole[..whole.len() - 3]).await.unwrap();
        drop(a);
        let mut frames = FrameReader::new(b, 1024).into_stream::<Envelope>();
        assert_eq!(frames.next().await.unwrap().unwrap(), envelope(1, 10));
        let err = frames.next().await.unwrap().unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { have, want } if want == whole.len() && have == whole.len() - 3),
            "{err}"
        );
        assert!(err.is_retryable());
        assert!(frames.next().await.is_none(), "nothing after an error");

        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&whole).await.unwrap();
        drop(a);
        let mut reader = FrameReader::new(b, 1024);
        assert!(reader.read::<Envelope>().await.unwrap().is_some());
        assert!(reader.read::<Envelope>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_large_frame_is_held_only_as_far_as_its_bytes_arrived() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut whole = Vec::new();
        encode_frame(&envelope(1, 4 << 20), &mut whole);
        // The header announces 4 MiB; only 100 bytes follow for now.
        a.write_all(&whole[..HEADER + 100]).await.unwrap();
        let mut reader = FrameReader::new(b, 8 << 20);
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            reader.read::<Envelope>(),
        )
        .await;
        assert!(waiting.is_err(), "the frame is not complete");
        assert!(
            reader.buffered_capacity() <= 2 * MAX_READ,
            "{} bytes held for 104 received",
            reader.buffered_capacity()
        );
        let rest = whole[HEADER + 100..].to_vec();
        let writer = tokio::spawn(async move { a.write_all(&rest).await });
        let got = reader.read::<Envelope>().await.unwrap().unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got.payload.len(), 4 << 20);
    }

    #[tokio::test]
    async fn an_undecodable_frame_is_an_error_that_retrying_does_not_fix() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
        let err = FrameReader::new(b, 64)
            .read::<Envelope>()
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer_even_after_a_large_frame() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(b, 1 << 20);
        write_frame(&mut a, &envelope(1, 300_000)).await.unwrap();
        assert_eq!(
            reader
                .read::<Envelope>()
                .await
                .unwrap()
                .unwrap()
                .payload
                .len(),
            300_000
        );
        assert_eq!(reader.buffered_capacity(), 0);
        // Waiting for the next frame (nothing arrives) keeps nothing either.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            reader.read::<Envelope>(),
        )
        .await;
        assert!(waiting.is_err());
        assert_eq!(reader.buffered_capacity(), 0);
        // A frame arriving in pieces is put together.
        let mut whole = Vec::new();
        encode_frame(&envelope(2, 9_000), &mut whole);
        let (first, rest) = whole.split_at(3);
        a.write_all(first).await.unwrap();
        let next = tokio::spawn(async move { reader.read::<Envelope>().await });
        tokio::task::yield_now().await;
        a.write_all(rest).await.unwrap();
        assert_eq!(next.await.unwrap().unwrap().unwrap(), envelope(2, 9_000));
    }

    #[test]
    fn a_refusal_survives_the_answer_with_its_code_message_and_metadata() {
        let mut status = tonic::Status::failed_precondition("served by hub b");
        status
            .metadata_mut()
            .insert(crate::REDIRECT_METADATA, "127.0.0.1:7000".parse().unwrap());
        let answer = answer_of(Err(&status));
        let back = status_of(&answer).expect("a refusal");
        assert_eq!(back.code(), tonic::Code::FailedPrecondition);
        assert_eq!(back.message(), "served by hub b");
        assert_eq!(
            back.metadata().get(crate::REDIRECT_METADATA).unwrap(),
            "127.0.0.1:7000"
        );
        assert!(status_of(&answer_of(Ok(()))).is_none());
        // A hostile answer's bad metadata is dropped, not a panic.
        let odd = AttachAnswer {
            code: 14,
            message: "x".into(),
            metadata: [("bad key\n".to_owned(), "v".to_owned())].into(),
        };
        assert!(status_of(&odd).unwrap().metadata().is_empty());
    }
}
