//! The camera mapper: ffmpeg reads the camera (RTSP, HTTP-MJPEG, or a video file) and hands
//! over frames at the configured rate and size, as JPEG, or as 8-bit grey PGM sized for a
//! model; the manager records them into the device's Dataset (a directory an edge worker can
//! read with `--input dir:<path>`).

use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::spec::{CameraFormat, MapperSpec, Protocol};
use super::{MapperError, MapperIo, Reading};

/// The largest frame accepted from ffmpeg.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// How long ffmpeg may take to deliver the first frame.
const FIRST_FRAME: Duration = Duration::from_secs(30);

/// ffmpeg's arguments for a camera.
pub fn ffmpeg_args(
    url: &str,
    fps: f64,
    size: Option<(u32, u32)>,
    format: CameraFormat,
    looped: bool,
) -> Vec<String> {
    let mut args: Vec<String> = ["-nostdin", "-loglevel", "error"]
        .map(String::from)
        .to_vec();
    if url.starts_with("rtsp://") {
        args.extend(["-rtsp_transport", "tcp"].map(String::from));
    }
    let file = !url.contains("://");
    if file {
        // A file plays at its own pace, like a camera; looped when asked.
        args.push("-re".into());
        if looped {
            args.extend(["-stream_loop", "-1"].map(String::from));
        }
    }
    args.extend(["-i".to_owned(), url.to_owned()]);
    let mut filter = format!("fps={fps}");
    if let Some((w, h)) = size {
        filter.push_str(&format!(",scale={w}:{h}"));
    }
    match format {
        CameraFormat::Jpeg => {
            args.extend(["-vf".to_owned(), filter]);
            args.extend(
                [
                    "-an",
                    "-f",
                    "image2pipe",
                    "-c:v",
                    "mjpeg",
                    "-q:v",
                    "4",
                    "pipe:1",
                ]
                .map(String::from),
            );
        }
        CameraFormat::Pgm => {
            args.extend(["-vf".to_owned(), format!("{filter},format=gray")]);
            args.extend(["-an", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"].map(String::from));
        }
    }
    args
}

/// Splits JPEG frames off the front of `buffer` (each from its start-of-image to its
/// end-of-image marker); the rest stays for the next read.
pub fn take_jpegs(buffer: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    loop {
        let Some(start) = buffer.windows(2).position(|w| w == [0xFF, 0xD8]) else {
            buffer.clear();
            return frames;
        };
        let Some(end) = buffer[start + 2..]
            .windows(2)
            .position(|w| w == [0xFF, 0xD9])
            .map(|i| start + 2 + i + 2)
        else {
            buffer.drain(..start);
            return frames;
        };
        frames.push(buffer[start..end].to_vec());
        buffer.drain(..end);
    }
}

/// The whole frames at the front of `buffer`: grey frames of `raw` (width, height) as PGM, or
/// JPEG frames. Refuses a JPEG frame growing past [`MAX_FRAME_BYTES`] (the stream is cut and
/// restarted), so a hostile stream cannot grow the agent's memory.
pub fn cut_frames(
    buffer: &mut Vec<u8>,
    raw: Option<(usize, usize)>,
) -> Result<Vec<Vec<u8>>, String> {
    match raw {
        Some((w, h)) => {
            let size = w * h;
            let mut frames = Vec::new();
            while buffer.len() >= size {
                let mut pgm = format!("P5\n{w} {h}\n255\n").into_bytes();
                pgm.extend(buffer.drain(..size));
                frames.push(pgm);
            }
            Ok(frames)
        }
        None => {
            let frames = take_jpegs(buffer);
            if buffer.len() > MAX_FRAME_BYTES {
                return Err(format!("a frame is larger than {MAX_FRAME_BYTES} bytes"));
            }
            Ok(frames)
        }
    }
}

/// Runs ffmpeg until it fails or the stream ends (the manager restarts it) or the manager
/// stops.
pub(crate) async fn run(spec: &MapperSpec, io: &mut MapperIo) -> Result<(), MapperError> {
    let Protocol::Camera {
        url,
        fps,
        size,
        format,
        looped,
    } = &spec.protocol
    else {
        return Err(MapperError::Unreachable("not a camera".into()));
    };
    let mut child = tokio::process::Command::new("ffmpeg")
        .args(ffmpeg_args(url, *fps, *size, *format, *looped))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| MapperError::Unreachable(format!("starting ffmpeg: {e}")))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| MapperError::Unreachable("ffmpeg has no output".into()))?;
    let mut stderr = child.stderr.take();
    let raw = match (format, size) {
        (CameraFormat::Pgm, Some((w, h))) => Some((*w as usize, *h as usize)),
        _ => None,
    };
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut online = false;
    loop {
        let wait = if online {
            // A live camera delivers a frame per 1/fps; ten missed frames (at least 10 s)
            // mean it is gone.
            Duration::from_secs_f64((10.0 / fps).max(10.0))
        } else {
            FIRST_FRAME
        };
        let read = tokio::select! {
            read = tokio::time::timeout(wait, stdout.read(&mut chunk)) => read,
            changed = io.desired.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        let n = match read {
            Err(_) => {
                return Err(MapperError::Unreachable(format!(
                    "no frame from {url} in {wait:?}"
                )));
            }
            Ok(Err(e)) => return Err(MapperError::Unreachable(format!("reading ffmpeg: {e}"))),
            Ok(Ok(0)) => {
                let mut said = String::new();
                if let Some(err) = stderr.as_mut() {
                    let mut bytes = Vec::new();
                    let _ = err.take(4096).read_to_end(&mut bytes).await;
                    said = String::from_utf8_lossy(&bytes).trim().to_owned();
                }
                let _ = child.wait().await;
                return Err(MapperError::Unreachable(if said.is_empty() {
                    format!("the stream {url} ended")
                } else {
                    format!("ffmpeg on {url}: {said}")
                }));
            }
            Ok(Ok(n)) => n,
        };
        buffer.extend_from_slice(&chunk[..n]);
        let frames = cut_frames(&mut buffer, raw)
            .map_err(|why| MapperError::Unreachable(format!("{url}: {why}")))?;
        for frame in frames {
            if !online {
                online = true;
                io.send(Reading::State("online")).await?;
            }
            io.send(Reading::Frame(frame)).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_frames_are_cut_at_their_markers_across_reads() {
        let frame = |fill: u8| {
            let mut f = vec![0xFF, 0xD8];
            f.extend([fill; 5]);
            f.extend([0xFF, 0x00, 0xFF, 0xD9]);
            f
        };
        let mut stream = [frame(1), frame(2), frame(3)].concat();
        let tail = stream.split_off(20);
        let mut buffer = stream;
        let first = take_jpegs(&mut buffer);
        assert_eq!(first, vec![frame(1)]);
        buffer.extend(tail);
        assert_eq!(take_jpegs(&mut buffer), vec![frame(2), frame(3)]);
        assert!(buffer.is_empty());
        let mut junk = vec![1, 2, 3];
        assert!(take_jpegs(&mut junk).is_empty());
        assert!(junk.is_empty(), "bytes before any frame are dropped");
    }

    #[test]
    fn grey_frames_are_cut_whole_and_an_endless_jpeg_is_refused() {
        let mut buffer = vec![7u8; 2 * 4 * 3 + 5];
        let frames = cut_frames(&mut buffer, Some((4, 3))).unwrap();
        assert_eq!(frames.len(), 2);
        assert!(frames[0].starts_with(b"P5\n4 3\n255\n") && frames[0].len() == 11 + 12);
        assert_eq!(buffer.len(), 5, "the partial frame waits");
        // A start-of-image marker and then no end: refused once past the bound, not buffered on.
        let mut endless = vec![0xFF, 0xD8];
        endless.resize(MAX_FRAME_BYTES + 10, 0);
        let e = cut_frames(&mut endless, None).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
        // Ordinary frames after it are cut as before.
        let mut fine = vec![0xFF, 0xD8, 1, 2, 0xFF, 0xD9];
        assert_eq!(cut_frames(&mut fine, None).unwrap().len(), 1);
    }

    #[test]
    fn ffmpeg_reads_files_at_their_pace_and_streams_as_they_come() {
        let file = ffmpeg_args("/v/bikes.mp4", 2.0, Some((28, 28)), CameraFormat::Pgm, true);
        let text = file.join(" ");
        assert!(
            text.contains("-re -stream_loop -1 -i /v/bikes.mp4"),
            "{text}"
        );
        assert!(text.contains("fps=2,scale=28:28,format=gray"), "{text}");
        let rtsp = ffmpeg_args("rtsp://cam/1", 1.0, None, CameraFormat::Jpeg, false).join(" ");
        assert!(
            rtsp.contains("-rtsp_transport tcp -i rtsp://cam/1"),
            "{rtsp}"
        );
        assert!(!rtsp.contains("-re "), "{rtsp}");
        assert!(rtsp.contains("-c:v mjpeg"), "{rtsp}");
    }
}
