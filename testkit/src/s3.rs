//! A real S3-compatible server for tests: `moto_server` from the project's `.venv`
//! (`scripts/setup` installs `moto[server]`), on a free port of 127.0.0.1, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `moto_server`.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    port: u16,
}

/// Why the server could not start.
#[derive(Debug)]
pub struct S3Error(pub String);

impl std::fmt::Display for S3Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for S3Error {}

impl S3Server {
    /// Starts `moto_server` and waits (up to 30 s) until it accepts connections.
    pub fn start() -> Result<S3Server, S3Error> {
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
        if !bin.exists() {
            return Err(S3Error(format!(
                "{} is missing: run scripts/setup",
                bin.display()
            )));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| S3Error(e.to_string()))?
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| S3Error(format!("starting moto_server: {e}")))?;
        let server = S3Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(S3Error("moto_server did not start within 30 s".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its endpoint URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts unsigned requests); returns the HTTP status.
    pub fn create_bucket(&self, bucket: &str) -> Result<u16, S3Error> {
        use std::io::{Read, Write};
        let io = |e: std::io::Error| S3Error(e.to_string());
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).map_err(io)?;
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .map_err(io)?;
        let mut response = String::new();
        s.read_to_string(&mut response).map_err(io)?;
        response
            .get(9..12)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| S3Error(format!("unexpected answer: {response:?}")))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
