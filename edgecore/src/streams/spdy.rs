//! SPDY/3.1 framing and a server session, as `kubectl exec` and `kubectl port-forward` speak
//! it (the client is Go's `moby/spdystream`: streams opened by the client, header blocks
//! compressed with zlib and the SPDY/3 dictionary, no flow control).
//!
//! [`Decoder`] and [`Encoder`] are pure (bytes in, frames out and back); [`serve`] runs a
//! session over any byte stream: it answers every stream the client opens at once (the
//! client waits for that), echoes pings, and hands each new stream to the caller.
//!
//! Limits: a frame is at most [`MAX_FRAME_BYTES`], a decompressed header block at most
//! [`MAX_HEADER_BYTES`] with at most [`MAX_HEADERS`] pairs, a session at most
//! [`MAX_STREAMS`] open streams (more are refused with `RST_STREAM`); anything else is a
//! protocol error that ends the session.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};

/// The largest frame accepted (the format allows 16 MiB).
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// The largest decompressed header block accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most header pairs in one block.
pub const MAX_HEADERS: usize = 64;
/// The most streams open at once in one session.
pub const MAX_STREAMS: usize = 128;
/// The largest data frame sent.
const SEND_CHUNK: usize = 32 * 1024;

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;
const FLAG_FIN: u8 = 0x01;

/// `RST_STREAM` status: the stream was refused (too many open).
pub const REFUSED_STREAM: u32 = 3;
/// `RST_STREAM` status: the stream was cancelled.
pub const CANCEL: u32 = 5;

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00, 2.6.10.1):
/// these names, each preceded by its length as a big-endian u32, then [`DICTIONARY_TAIL`].
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

const DICTIONARY_TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412\
413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved Permanently\
400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error\
501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec \
00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,\
image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivate\
max-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

fn dictionary() -> Vec<u8> {
    let mut d = Vec::with_capacity(1423);
    for w in DICTIONARY_WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    d
}

/// Header pairs of a stream (names lowercase; several values of one name NUL-separated).
pub type Headers = Vec<(String, String)>;

/// Looks a header up by (lowercase) name.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// One SPDY frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The peer opens a stream.
    SynStream {
        /// Stream id (odd: client-initiated).
        id: u32,
        /// No data follows from the opener.
        fin: bool,
        /// The stream's headers.
        headers: Headers,
    },
    /// The answer to a `SynStream`.
    SynReply {
        /// Stream id.
        id: u32,
        /// No data follows from the answerer.
        fin: bool,
        /// Reply headers.
        headers: Headers,
    },
    /// The stream ends abnormally.
    RstStream {
        /// Stream id.
        id: u32,
        /// Why.
        status: u32,
    },
    /// A ping to echo.
    Ping(u32),
    /// The session ends.
    GoAway {
        /// The last stream the sender processed.
        last: u32,
    },
    /// Bytes of a stream.
    Data {
        /// Stream id.
        id: u32,
        /// The sender's half of the stream ends.
        fin: bool,
        /// The bytes.
        data: Bytes,
    },
    /// A frame this server has no use for (settings, window updates, headers).
    Ignored,
}

/// A violation of the protocol or of a limit; it ends the session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpdyError {
    /// A frame is larger than [`MAX_FRAME_BYTES`].
    #[error("SPDY frame of {0} bytes is over the limit of {MAX_FRAME_BYTES}")]
    FrameTooLarge(usize),
    /// A header block is over a limit or does not decompress.
    #[error("bad SPDY header block: {0}")]
    Headers(String),
    /// Anything else the protocol forbids.
    #[error("SPDY protocol error: {0}")]
    Protocol(String),
}

impl SpdyError {
    /// Never: the session is over.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Reads frames; keeps the peer's header decompression context.
pub struct Decoder {
    inflate: Decompress,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            inflate: Decompress::new(true),
        }
    }
}

impl Decoder {
    /// Takes one whole frame off the front of `buf`; `None` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let first = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let flags = buf[4];
        let length = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(SpdyError::FrameTooLarge(length));
        }
        if buf.len() < 8 + length {
            buf.reserve(8 + length - buf.len());
            return Ok(None);
        }
        buf.advance(8);
        let mut body = buf.split_to(length).freeze();
        let fin = flags & FLAG_FIN != 0;
        if first & 0x8000_0000 == 0 {
            let id = first & 0x7fff_ffff;
            if id == 0 {
                return Err(SpdyError::Protocol("data frame on stream 0".into()));
            }
            return Ok(Some(Frame::Data {
                id,
                fin,
                data: body,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(SpdyError::Protocol(format!(
                "version {version}, not {VERSION}"
            )));
        }
        let need = |n: usize, body: &Bytes| -> Result<(), SpdyError> {
            if body.len() < n {
                Err(SpdyError::Protocol(format!(
                    "control frame of {} bytes is too short",
                    body.len()
                )))
            } else {
                Ok(())
            }
        };
        let frame = match (first & 0xffff) as u16 {
            SYN_STREAM => {
                need(10, &body)?;
                let id = body.get_u32() & 0x7fff_ffff;
                body.advance(6);
                if id == 0 {
                    return Err(SpdyError::Protocol("stream id 0".into()));
                }
                let headers = self.headers(&body)?;
                Frame::SynStream { id, fin, headers }
            }
            SYN_REPLY => {
                need(4, &body)?;
                let id = body.get_u32() & 0x7fff_ffff;
                let headers = self.headers(&body)?;
                Frame::SynReply { id, fin, headers }
            }
            HEADERS => {
                need(4, &body)?;
                body.advance(4);
                // Keeps the decompression context in step.
                self.headers(&body)?;
                Frame::Ignored
            }
            RST_STREAM => {
                need(8, &body)?;
                Frame::RstStream {
                    id: body.get_u32() & 0x7fff_ffff,
                    status: body.get_u32(),
                }
            }
            PING => {
                need(4, &body)?;
                Frame::Ping(body.get_u32())
            }
            GOAWAY => {
                need(4, &body)?;
                Frame::GoAway {
                    last: body.get_u32() & 0x7fff_ffff,
                }
            }
            SETTINGS | WINDOW_UPDATE => Frame::Ignored,
            other => {
                return Err(SpdyError::Protocol(format!(
                    "unknown control frame type {other}"
                )));
            }
        };
        Ok(Some(frame))
    }

    fn headers(&mut self, compressed: &[u8]) -> Result<Headers, SpdyError> {
        let block = self.inflate_block(compressed)?;
        parse_headers(&block)
    }

    fn inflate_block(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let bad = |e: &dyn std::fmt::Display| SpdyError::Headers(e.to_string());
        let mut out = Vec::with_capacity(1024);
        let mut pos = 0;
        for _ in 0..1024 {
            let before = self.inflate.total_in();
            match self
                .inflate
                .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
            {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&dictionary())
                        .map_err(|e| bad(&e))?;
                }
                Err(e) => return Err(bad(&e)),
            }
            pos += (self.inflate.total_in() - before) as usize;
            if out.len() < out.capacity() && pos >= input.len() {
                return Ok(out);
            }
            if out.len() == out.capacity() {
                if out.capacity() >= MAX_HEADER_BYTES {
                    return Err(SpdyError::Headers(format!(
                        "more than {MAX_HEADER_BYTES} bytes decompressed"
                    )));
                }
                out.reserve(out.capacity());
            }
        }
        Err(SpdyError::Headers("the block does not end".into()))
    }
}

fn parse_headers(mut block: &[u8]) -> Result<Headers, SpdyError> {
    let short = || SpdyError::Headers("truncated header block".into());
    if block.len() < 4 {
        return Err(short());
    }
    let count = block.get_u32() as usize;
    if count > MAX_HEADERS {
        return Err(SpdyError::Headers(format!(
            "{count} headers; the limit is {MAX_HEADERS}"
        )));
    }
    let take = |block: &mut &[u8]| -> Result<String, SpdyError> {
        if block.len() < 4 {
            return Err(short());
        }
        let n = block.get_u32() as usize;
        if block.len() < n {
            return Err(short());
        }
        let s = String::from_utf8_lossy(&block[..n]).into_owned();
        block.advance(n);
        Ok(s)
    };
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take(&mut block)?.to_ascii_lowercase();
        let value = take(&mut block)?;
        headers.push((name, value));
    }
    Ok(headers)
}

/// Writes frames; keeps this side's header compression context.
pub struct Encoder {
    deflate: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Only fails on a stream already started.
        let _ = deflate.set_dictionary(&dictionary());
        Self { deflate }
    }
}

impl Encoder {
    /// Appends `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) {
        let control = |out: &mut Vec<u8>, kind: u16, flags: u8, body: &[u8]| {
            out.put_u32(0x8000_0000 | (u32::from(VERSION) << 16) | u32::from(kind));
            out.put_u32((u32::from(flags) << 24) | body.len() as u32);
            out.extend_from_slice(body);
        };
        let fin_flag = |fin: bool| if fin { FLAG_FIN } else { 0 };
        match frame {
            Frame::SynStream { id, fin, headers } => {
                let mut body = Vec::new();
                body.put_u32(*id);
                body.put_u32(0);
                body.put_u16(0);
                body.extend_from_slice(&self.compress(headers));
                control(out, SYN_STREAM, fin_flag(*fin), &body);
            }
            Frame::SynReply { id, fin, headers } => {
                let mut body = Vec::new();
                body.put_u32(*id);
                body.extend_from_slice(&self.compress(headers));
                control(out, SYN_REPLY, fin_flag(*fin), &body);
            }
            Frame::RstStream { id, status } => {
                let mut body = Vec::new();
                body.put_u32(*id);
                body.put_u32(*status);
                control(out, RST_STREAM, 0, &body);
            }
            Frame::Ping(id) => control(out, PING, 0, &id.to_be_bytes()),
            Frame::GoAway { last } => {
                let mut body = Vec::new();
                body.put_u32(*last);
                body.put_u32(0);
                control(out, GOAWAY, 0, &body);
            }
            Frame::Data { id, fin, data } => {
                out.put_u32(*id & 0x7fff_ffff);
                out.put_u32((u32::from(fin_flag(*fin)) << 24) | data.len() as u32);
                out.extend_from_slice(data);
            }
            Frame::Ignored => {}
        }
    }

    fn compress(&mut self, headers: &Headers) -> Vec<u8> {
        let mut block = Vec::new();
        block.put_u32(headers.len() as u32);
        for (name, value) in headers {
            block.put_u32(name.len() as u32);
            block.extend_from_slice(name.as_bytes());
            block.put_u32(value.len() as u32);
            block.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut pos = 0;
        loop {
            let before = self.deflate.total_in();
            // The stream is ours and well-formed: compression cannot fail.
            let _ = self
                .deflate
                .compress_vec(&block[pos..], &mut out, FlushCompress::Sync);
            pos += (self.deflate.total_in() - before) as usize;
            if pos >= block.len() && out.len() < out.capacity() {
                return out;
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

struct WriterInner {
    io: Box<dyn AsyncWrite + Send + Unpin>,
    encoder: Encoder,
    buf: Vec<u8>,
}

/// The session's sending side, shared by its streams.
#[derive(Clone)]
pub struct Writer(Arc<Mutex<WriterInner>>);

impl Writer {
    /// Sends one frame.
    pub async fn send(&self, frame: &Frame) -> std::io::Result<()> {
        let mut w = self.0.lock().await;
        let w = &mut *w;
        w.buf.clear();
        w.encoder.encode(frame, &mut w.buf);
        w.io.write_all(&w.buf).await?;
        w.io.flush().await
    }

    /// Ends the session: `GOAWAY`, then closes the byte stream.
    pub async fn close(&self) {
        let _ = self.send(&Frame::GoAway { last: 0 }).await;
        let _ = self.0.lock().await.io.shutdown().await;
    }
}

/// One stream the client opened.
pub struct Stream {
    /// Its id.
    pub id: u32,
    /// Its headers.
    pub headers: Headers,
    /// What the client sends on it; ends when the client half-closes or resets it.
    pub data: mpsc::Receiver<Bytes>,
    writer: Writer,
}

impl Stream {
    /// The value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// A handle to send on this stream.
    pub fn sender(&self) -> StreamSender {
        StreamSender {
            id: self.id,
            writer: self.writer.clone(),
        }
    }
}

/// Sends on one stream.
#[derive(Clone)]
pub struct StreamSender {
    id: u32,
    writer: Writer,
}

impl StreamSender {
    /// Sends bytes (in frames of at most 32 KiB).
    pub async fn write(&self, data: &[u8]) -> std::io::Result<()> {
        for chunk in data.chunks(SEND_CHUNK) {
            self.writer
                .send(&Frame::Data {
                    id: self.id,
                    fin: false,
                    data: Bytes::copy_from_slice(chunk),
                })
                .await?;
        }
        Ok(())
    }

    /// Ends this side of the stream.
    pub async fn finish(&self) {
        let _ = self
            .writer
            .send(&Frame::Data {
                id: self.id,
                fin: true,
                data: Bytes::new(),
            })
            .await;
    }

    /// Resets the stream.
    pub async fn reset(&self) {
        let _ = self
            .writer
            .send(&Frame::RstStream {
                id: self.id,
                status: CANCEL,
            })
            .await;
    }
}

/// A running session: the streams the client opens, and the writer to end it.
pub struct Session {
    /// New streams, answered already; ends with the session.
    pub streams: mpsc::Receiver<Stream>,
    /// The session's writer.
    pub writer: Writer,
}

/// Serves a SPDY session on `io`.
pub fn serve<IO>(io: IO) -> Session
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut read, write) = tokio::io::split(io);
    let writer = Writer(Arc::new(Mutex::new(WriterInner {
        io: Box::new(write),
        encoder: Encoder::default(),
        buf: Vec::new(),
    })));
    let (accept, streams) = mpsc::channel(16);
    let w = writer.clone();
    tokio::spawn(async move {
        if let Err(e) = read_loop(&mut read, &w, accept).await {
            tracing::debug!(error = %e, "SPDY session ended");
            let _ = w.send(&Frame::GoAway { last: 0 }).await;
        }
    });
    Session { streams, writer }
}

async fn read_loop<R: AsyncRead + Unpin>(
    read: &mut R,
    writer: &Writer,
    accept: mpsc::Sender<Stream>,
) -> Result<(), SpdyError> {
    let mut decoder = Decoder::default();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut open: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut last_id = 0u32;
    let io = |e: std::io::Error| SpdyError::Protocol(e.to_string());
    loop {
        while let Some(frame) = decoder.decode(&mut buf)? {
            match frame {
                Frame::SynStream { id, fin, headers } => {
                    if id % 2 == 0 || id <= last_id {
                        return Err(SpdyError::Protocol(format!(
                            "stream id {id} after {last_id}"
                        )));
                    }
                    last_id = id;
                    open.retain(|_, tx| !tx.is_closed());
                    if open.len() >= MAX_STREAMS {
                        writer
                            .send(&Frame::RstStream {
                                id,
                                status: REFUSED_STREAM,
                            })
                            .await
                            .map_err(io)?;
                        continue;
                    }
                    writer
                        .send(&Frame::SynReply {
                            id,
                            fin: false,
                            headers: Vec::new(),
                        })
                        .await
                        .map_err(io)?;
                    let (tx, data) = mpsc::channel(16);
                    if !fin {
                        open.insert(id, tx);
                    }
                    let stream = Stream {
                        id,
                        headers,
                        data,
                        writer: writer.clone(),
                    };
                    if accept.send(stream).await.is_err() {
                        return Ok(());
                    }
                }
                Frame::Data { id, fin, data } => {
                    if let Some(tx) = open.get(&id) {
                        if !data.is_empty() && tx.send(data).await.is_err() {
                            open.remove(&id);
                        }
                        if fin {
                            open.remove(&id);
                        }
                    }
                }
                Frame::RstStream { id, .. } => {
                    open.remove(&id);
                }
                Frame::Ping(id) => writer.send(&Frame::Ping(id)).await.map_err(io)?,
                Frame::GoAway { .. } => return Ok(()),
                Frame::SynReply { .. } | Frame::Ignored => {}
            }
        }
        if read.read_buf(&mut buf).await.map_err(io)? == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn the_dictionary_is_the_spdy3_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(
            hex(&sha2::Sha256::digest(&d)),
            "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn frames_round_trip_with_one_compression_context_across_blocks() {
        let mut enc = Encoder::default();
        let mut dec = Decoder::default();
        let frames = vec![
            Frame::SynStream {
                id: 1,
                fin: false,
                headers: headers(&[("streamtype", "error"), ("port", "8080")]),
            },
            Frame::SynStream {
                id: 3,
                fin: true,
                headers: headers(&[("streamtype", "data"), ("requestid", "0")]),
            },
            Frame::SynReply {
                id: 1,
                fin: false,
                headers: vec![],
            },
            Frame::Data {
                id: 3,
                fin: true,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Ping(7),
            Frame::RstStream { id: 3, status: 5 },
            Frame::GoAway { last: 3 },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            enc.encode(f, &mut wire);
        }
        // Fed a byte at a time: partial frames wait for the rest.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.put_u8(b);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn the_first_header_block_names_the_dictionary() {
        let mut wire = Vec::new();
        Encoder::default().encode(
            &Frame::SynReply {
                id: 1,
                fin: false,
                headers: vec![],
            },
            &mut wire,
        );
        // zlib header with FDICT set, then the dictionary's Adler-32.
        let block = &wire[12..];
        assert_eq!(block[1] & 0x20, 0x20);
        let mut a = 1u32;
        let mut b = 0u32;
        for x in dictionary() {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(&block[2..6], &((b << 16) | a).to_be_bytes());
    }

    #[test]
    fn oversized_or_malformed_input_is_refused_with_a_reason() {
        let mut dec = Decoder::default();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 1, 0, 0x20, 0, 0][..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap_err(),
            SpdyError::FrameTooLarge(0x20_0000)
        );
        let mut buf = BytesMut::from(&[0x80u8, 2, 0, 1, 0, 0, 0, 0][..]);
        assert!(matches!(
            dec.decode(&mut buf).unwrap_err(),
            SpdyError::Protocol(m) if m.contains("version 2")
        ));
        let many: Vec<(String, String)> = (0..MAX_HEADERS + 1)
            .map(|i| (format!("h{i}"), "v".into()))
            .collect();
        let mut wire = Vec::new();
        Encoder::default().encode(
            &Frame::SynStream {
                id: 1,
                fin: false,
                headers: many,
            },
            &mut wire,
        );
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(
            Decoder::default().decode(&mut buf).unwrap_err(),
            SpdyError::Headers(m) if m.contains("65 headers")
        ));
        // A header block that expands past the limit (a "zip bomb").
        let big = vec![("x".to_string(), "a".repeat(MAX_HEADER_BYTES))];
        let mut wire = Vec::new();
        Encoder::default().encode(
            &Frame::SynStream {
                id: 1,
                fin: false,
                headers: big,
            },
            &mut wire,
        );
        assert!(wire.len() < 2048, "compressed to {}", wire.len());
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(
            Decoder::default().decode(&mut buf).unwrap_err(),
            SpdyError::Headers(m) if m.contains("decompressed")
        ));
    }

    #[tokio::test]
    async fn a_session_answers_streams_echoes_pings_and_carries_data_both_ways() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let mut session = serve(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let mut enc = Encoder::default();
        let mut wire = Vec::new();
        enc.encode(
            &Frame::SynStream {
                id: 1,
                fin: false,
                headers: headers(&[("streamtype", "stdin")]),
            },
            &mut wire,
        );
        enc.encode(&Frame::Ping(9), &mut wire);
        enc.encode(
            &Frame::Data {
                id: 1,
                fin: true,
                data: Bytes::from_static(b"abc"),
            },
            &mut wire,
        );
        cw.write_all(&wire).await.unwrap();
        let mut stream = session.streams.recv().await.unwrap();
        assert_eq!(stream.header("streamtype"), Some("stdin"));
        assert_eq!(
            stream.data.recv().await.unwrap(),
            Bytes::from_static(b"abc")
        );
        assert!(stream.data.recv().await.is_none(), "FIN ends the data");
        stream.sender().write(b"out").await.unwrap();
        stream.sender().finish().await;
        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        while got.len() < 4 {
            cr.read_buf(&mut buf).await.unwrap();
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![
                Frame::SynReply {
                    id: 1,
                    fin: false,
                    headers: vec![]
                },
                Frame::Ping(9),
                Frame::Data {
                    id: 1,
                    fin: false,
                    data: Bytes::from_static(b"out")
                },
                Frame::Data {
                    id: 1,
                    fin: true,
                    data: Bytes::new()
                },
            ]
        );
    }

    #[tokio::test]
    async fn streams_beyond_the_limit_are_refused() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let mut session = serve(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let mut enc = Encoder::default();
        let mut wire = Vec::new();
        for i in 0..=MAX_STREAMS as u32 {
            enc.encode(
                &Frame::SynStream {
                    id: 2 * i + 1,
                    fin: false,
                    headers: vec![],
                },
                &mut wire,
            );
        }
        let keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(s) = session.streams.recv().await {
                held.push(s);
            }
            held.len()
        });
        cw.write_all(&wire).await.unwrap();
        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let refused = loop {
            cr.read_buf(&mut buf).await.unwrap();
            let mut found = None;
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                if let Frame::RstStream { id, status } = f {
                    found = Some((id, status));
                }
            }
            if let Some(f) = found {
                break f;
            }
        };
        assert_eq!(refused, (2 * MAX_STREAMS as u32 + 1, REFUSED_STREAM));
        drop(cw);
        drop(cr);
        assert_eq!(keep.await.unwrap(), MAX_STREAMS);
    }
}
