//! The node's end of `kubectl logs`, `exec`, `attach` and `port-forward` (KubeEdge's
//! EdgeStream): the hub asks for a stream over the node's channel, the node opens it back
//! through `Hub.Tunnel` (outbound, mutually authenticated: no port is opened on the node),
//! and serves on it the kubelet's HTTP paths, which the API server proxies unchanged:
//!
//! - `GET /containerLogs/{ns}/{pod}/{container}` — see [`logs`];
//! - `/exec/{ns}/{pod}/{container}?command=…&stdin&stdout&stderr&tty` and
//!   `/attach/{ns}/{pod}/{container}` — upgraded to websocket (`v5.channel.k8s.io`,
//!   `v4.channel.k8s.io`) or SPDY/3.1 (see [`spdy`]), as kubectl 1.27–1.33 ask;
//! - `/portForward/{ns}/{pod}` — SPDY (`portforward.k8s.io`), also tunnelled in websocket
//!   messages (`SPDY/3.1+portforward.k8s.io`, kubectl ≥ 1.30's default).
//!
//! Who may do what is decided by the API server (RBAC on `pods/log`, `pods/exec`,
//! `pods/attach`, `pods/portforward`) and the hub (which node, how many streams, how fast);
//! the node checks only that the pod and container are its own, and lets a port-forward reach
//! only ports the pod declares (pods share the node's network: any other port would reach
//! another pod's or the agent's own servers).
//!
//! `exec` runs the command as the container runs: its environment, working directory and
//! user (see [`ExecContext`]); with `tty` the output is merged but no terminal is allocated.
//! `attach` streams the container's output from now on (containers have no stdin).

pub mod logs;
pub mod spdy;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::runtime::spec::Launch;
use crate::store::EdgeStore;

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// How long a SPDY client has to open the streams it asked for.
const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest websocket message accepted.
const MAX_WS_MESSAGE: usize = 1 << 20;
/// Exec protocols offered over SPDY and websocket, most preferred first.
const EXEC_PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// Port-forward over SPDY.
const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";
/// Port-forward's SPDY inside websocket messages.
const TUNNELED_PORT_FORWARD: &str = "SPDY/3.1+portforward.k8s.io";

/// What the stream server needs from the agent.
#[derive(Clone, Debug)]
pub struct StreamContext {
    /// The node's objects (its pods).
    pub store: EdgeStore,
    /// Where pods live (`<data_dir>/pods`).
    pub pods_dir: PathBuf,
    /// Directories searched for an exec'd program before `PATH`.
    pub program_dirs: Vec<PathBuf>,
}

/// How a container runs, kept by the runtime beside the pod (`<container>.exec.json`, 0600)
/// so that `exec` runs in the same context.
pub type ExecContext = Launch;

/// The file the runtime keeps a container's [`ExecContext`] in.
pub fn exec_context_path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.exec.json"))
}

/// The most streams a node serves at once (the hub bounds them per node too).
pub const MAX_STREAMS: usize = 32;

/// Answers the hub's stream requests (see [`crate::EdgeHub::take_stream_requests`]): each
/// token becomes a `Hub.Tunnel` back to the hub, served by [`serve_connection`].
pub async fn answer(
    mut requests: mpsc::Receiver<String>,
    hub: tokio::sync::watch::Receiver<String>,
    data_dir: PathBuf,
    ctx: Arc<StreamContext>,
) {
    // One cached channel per hub address (the node may move between hubs of a tier).
    let mut dialed = String::new();
    let channel: Arc<tokio::sync::Mutex<Option<tonic::transport::Channel>>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS));
    while let Some(token) = requests.recv().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("{MAX_STREAMS} streams are open; a stream request is dropped");
            continue;
        };
        let hub = hub.borrow().clone();
        if hub != dialed {
            *channel.lock().await = None;
            dialed = hub.clone();
        }
        let (data_dir, ctx, channel) = (data_dir.clone(), ctx.clone(), channel.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let target = format!("stream:{token}");
            match crate::tunnel::open(&hub, &data_dir, &channel, target).await {
                Ok(io) => serve_connection(io, ctx).await,
                Err(status) => {
                    tracing::warn!(error = %status.message(), "could not open a stream to the hub")
                }
            }
        });
    }
}

/// Serves kubelet-style stream requests on one byte stream (HTTP/1.1, with upgrades).
pub async fn serve_connection<IO>(io: IO, ctx: Arc<StreamContext>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(ctx, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, "stream connection ended");
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// Why a stream request is refused; answered as a Kubernetes Status, as the API server would.
#[derive(Debug)]
struct Refusal {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn into_response(self) -> Response<Body> {
        let body = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason,
            "code": self.code.as_u16(),
        });
        let mut r = Response::new(full(body.to_string()));
        *r.status_mut() = self.code;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// A pod of this node, found by namespace and name.
struct Target {
    pod: Pod,
    dir: PathBuf,
    container: Option<String>,
}

fn find(
    ctx: &StreamContext,
    ns: &str,
    name: &str,
    container: Option<&str>,
) -> Result<Target, Refusal> {
    let not_found = || {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pod {ns}/{name} is not on this node"),
        )
    };
    let stored = ctx
        .store
        .get("Pod", ns, name)
        .ok()
        .flatten()
        .ok_or_else(not_found)?;
    let pod: Pod = serde_json::from_slice(&stored.value).map_err(|_| not_found())?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let dir = ctx.pods_dir.join(format!("{ns}_{name}_{uid}"));
    let container = match container {
        None => None,
        Some(c) => {
            let declared = pod
                .spec
                .as_ref()
                .is_some_and(|s| s.containers.iter().any(|x| x.name == c));
            if !declared {
                return Err(Refusal::bad_request(format!(
                    "container {c} is not valid for pod {name}"
                )));
            }
            Some(c.to_owned())
        }
    };
    Ok(Target {
        pod,
        dir,
        container,
    })
}

/// Whether the container's process (from its pid file) is alive.
fn running(pod_dir: &Path, container: &str) -> bool {
    crate::runtime::process::live_pid(&pod_dir.join(format!("{container}.pid"))).is_some()
}

async fn handle(ctx: Arc<StreamContext>, req: Request<Incoming>) -> Response<Body> {
    route(ctx, req).await.unwrap_or_else(Refusal::into_response)
}

async fn route(ctx: Arc<StreamContext>, req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let query = req.uri().query().unwrap_or_default().to_owned();
    match parts.as_slice() {
        ["containerLogs", ns, pod, container] => {
            container_logs(find(&ctx, ns, pod, Some(container))?, &query)
        }
        [verb @ ("exec" | "attach"), ns, pod, container] => {
            let t = find(&ctx, ns, pod, Some(container))?;
            let c = t.container.clone().unwrap_or_default();
            if !running(&t.dir, &c) {
                return Err(Refusal::bad_request(format!(
                    "container {c} in pod {pod} is not running"
                )));
            }
            let options =
                StreamOptions::parse(&query, *verb == "exec").map_err(Refusal::bad_request)?;
            let job = if *verb == "exec" {
                let launch: Launch = std::fs::read(exec_context_path(&t.dir, &c))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| {
                        Refusal::bad_request(format!(
                            "container {c} in pod {pod} has no exec context yet"
                        ))
                    })?;
                Job::Exec {
                    launch,
                    program_dirs: ctx.program_dirs.clone(),
                }
            } else {
                Job::Attach { dir: t.dir.clone() }
            };
            upgrade_remote_command(req, c, options, job)
        }
        ["portForward", ns, pod] => {
            let t = find(&ctx, ns, pod, None)?;
            upgrade_port_forward(req, declared_ports(&t.pod))
        }
        _ => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no stream handler for {path}"),
        )),
    }
}

fn container_logs(t: Target, query: &str) -> Result<Response<Body>, Refusal> {
    let options =
        logs::LogOptions::parse(query, jiff::Timestamp::now()).map_err(Refusal::bad_request)?;
    let container = t.container.unwrap_or_default();
    let name = t.pod.metadata.name.clone().unwrap_or_default();
    if !logs::log_path(&t.dir, &container, options.previous).exists() {
        return Err(Refusal::bad_request(if options.previous {
            format!("previous terminated container \"{container}\" in pod \"{name}\" not found")
        } else {
            format!("container \"{container}\" in pod \"{name}\" is waiting to start")
        }));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let dir = t.dir.clone();
        let c = container.clone();
        let result = logs::stream(
            &t.dir,
            &container,
            &options,
            move || running(&dir, &c),
            |chunk| {
                let tx = tx.clone();
                async move { tx.send(Bytes::from(chunk)).await.is_ok() }
            },
        )
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "log stream ended");
        }
    });
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
    }));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(r)
}

/// Which standard streams a remote command uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct StreamOptions {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

/// The options and argv of an exec/attach request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Parsed {
    streams: StreamOptions,
    command: Vec<String>,
}

impl StreamOptions {
    fn parse(query: &str, exec: bool) -> Result<Parsed, String> {
        let mut p = Parsed::default();
        for (k, v) in logs::url_pairs(query) {
            let on = v == "1" || v == "true";
            match k.as_str() {
                "stdin" | "input" => p.streams.stdin = on,
                "stdout" | "output" => p.streams.stdout = on,
                "stderr" | "error" => p.streams.stderr = on,
                "tty" => p.streams.tty = on,
                "command" => p.command.push(v),
                _ => {}
            }
        }
        if p.streams.tty {
            p.streams.stderr = false;
        }
        if !(p.streams.stdin || p.streams.stdout || p.streams.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        if exec && p.command.is_empty() {
            return Err("you must specify a command".into());
        }
        if exec && p.command.len() > 256 {
            return Err("a command has at most 256 arguments".into());
        }
        Ok(p)
    }
}

enum Job {
    Exec {
        launch: Launch,
        program_dirs: Vec<PathBuf>,
    },
    Attach {
        dir: PathBuf,
    },
}

/// Offered protocols from repeated or comma-separated header values.
fn offered(req: &Request<Incoming>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn is_upgrade(req: &Request<Incoming>, to: &str) -> bool {
    req.headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(to))
}

enum Transport {
    WebSocket { protocol: String, accept: String },
    Spdy { protocol: String },
}

/// Picks the transport and protocol for an upgrade, or the answer refusing it.
fn negotiate(req: &Request<Incoming>, protocols: &[&str]) -> Result<Transport, Refusal> {
    let pick = |offers: Vec<String>| {
        protocols
            .iter()
            .find(|p| offers.iter().any(|o| o == *p))
            .map(|p| p.to_string())
    };
    if is_upgrade(req, "websocket") {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
            .ok_or_else(|| Refusal::bad_request("a websocket upgrade without Sec-WebSocket-Key"))?;
        let protocol = pick(offered(req, "sec-websocket-protocol")).ok_or_else(|| {
            Refusal::bad_request(format!(
                "none of the websocket subprotocols offered is supported (supported: {})",
                protocols.join(", ")
            ))
        })?;
        return Ok(Transport::WebSocket {
            protocol,
            accept: key,
        });
    }
    if is_upgrade(req, "SPDY/3.1") {
        let protocol = pick(offered(req, "x-stream-protocol-version")).ok_or_else(|| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "unable to upgrade: unable to negotiate protocol: client supports none of \
                     the server's protocols ({})",
                    protocols.join(", ")
                ),
            )
        })?;
        return Ok(Transport::Spdy { protocol });
    }
    Err(Refusal::bad_request(
        "upgrade request required (websocket or SPDY/3.1)",
    ))
}

fn switching(transport: &Transport) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    match transport {
        Transport::WebSocket { protocol, accept } => {
            h.insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("websocket"),
            );
            if let Ok(v) = http::HeaderValue::from_str(accept) {
                h.insert("sec-websocket-accept", v);
            }
            if let Ok(v) = http::HeaderValue::from_str(protocol) {
                h.insert("sec-websocket-protocol", v);
            }
        }
        Transport::Spdy { protocol } => {
            h.insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("SPDY/3.1"),
            );
            if let Ok(v) = http::HeaderValue::from_str(protocol) {
                h.insert("x-stream-protocol-version", v);
            }
        }
    }
    r
}

async fn websocket(
    upgraded: hyper::upgrade::Upgraded,
) -> WebSocketStream<TokioIo<hyper::upgrade::Upgraded>> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE));
    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await
}

fn upgrade_remote_command(
    mut req: Request<Incoming>,
    container: String,
    options: Parsed,
    job: Job,
) -> Result<Response<Body>, Refusal> {
    let transport = negotiate(&req, &EXEC_PROTOCOLS)?;
    let answer = switching(&transport);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let io = match transport {
            Transport::WebSocket { protocol, .. } => {
                ws_channels(websocket(upgraded).await, protocol == EXEC_PROTOCOLS[0])
            }
            Transport::Spdy { .. } => {
                match spdy_channels(spdy::serve(TokioIo::new(upgraded)), options.streams).await {
                    Some(io) => io,
                    None => return,
                }
            }
        };
        let result = match job {
            Job::Exec {
                launch,
                program_dirs,
            } => run_exec(&launch, &program_dirs, &options, io.stdin, io.out.clone()).await,
            Job::Attach { dir } => run_attach(&dir, &container, &options, io.out.clone()).await,
        };
        let _ = io.out.send((3, Bytes::from(result.to_string()))).await;
        drop(io.out);
        let _ = io.done.await;
    });
    Ok(answer)
}

/// A remote command's connection to its client: stdin in, `(channel, bytes)` out (1 stdout,
/// 2 stderr, 3 the final status); `done` resolves once everything is sent and closed.
struct ChannelIo {
    stdin: Option<mpsc::Receiver<Bytes>>,
    out: mpsc::Sender<(u8, Bytes)>,
    done: tokio::sync::oneshot::Receiver<()>,
}

/// The websocket channel protocol: each binary message starts with its channel byte; v5
/// lets the client close stdin with `[255, 0]`.
fn ws_channels(ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, v5: bool) -> ChannelIo {
    let (mut sink, mut source) = ws.split();
    let (stdin_tx, stdin) = mpsc::channel::<Bytes>(16);
    let (out, mut out_rx) = mpsc::channel::<(u8, Bytes)>(16);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut stdin_tx = Some(stdin_tx);
        while let Some(Ok(message)) = source.next().await {
            match message {
                Message::Binary(data) if !data.is_empty() => match data[0] {
                    0 => {
                        if let Some(tx) = &stdin_tx
                            && tx.send(data.slice(1..)).await.is_err()
                        {
                            stdin_tx = None;
                        }
                    }
                    255 if v5 && data.get(1) == Some(&0) => stdin_tx = None,
                    _ => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
    });
    tokio::spawn(async move {
        while let Some((channel, bytes)) = out_rx.recv().await {
            let mut message = Vec::with_capacity(bytes.len() + 1);
            message.push(channel);
            message.extend_from_slice(&bytes);
            if sink.send(Message::Binary(message.into())).await.is_err() {
                break;
            }
        }
        // kubectl reads the end of the error channel from a normal closure (1000).
        let _ = sink.send(normal_close()).await;
        let _ = sink.close().await;
        reader.abort();
        let _ = done_tx.send(());
    });
    ChannelIo {
        stdin: Some(stdin),
        out,
        done,
    }
}

fn normal_close() -> Message {
    Message::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }))
}

/// The SPDY form: one stream per channel, told apart by their `streamtype` header; waits
/// until the client has opened the ones its options need.
async fn spdy_channels(mut session: spdy::Session, want: StreamOptions) -> Option<ChannelIo> {
    let mut error = None;
    let mut stdin = None;
    let mut stdout = None;
    let mut stderr = None;
    let mut extra = Vec::new();
    let ready = |e: &Option<spdy::Stream>,
                 i: &Option<spdy::Stream>,
                 o: &Option<spdy::Stream>,
                 r: &Option<spdy::Stream>| {
        e.is_some()
            && (i.is_some() || !want.stdin)
            && (o.is_some() || !want.stdout)
            && (r.is_some() || !want.stderr)
    };
    let setup = tokio::time::timeout(STREAM_SETUP_TIMEOUT, async {
        while !ready(&error, &stdin, &stdout, &stderr) {
            let stream = session.streams.recv().await?;
            match stream.header("streamtype") {
                Some("error") => error = Some(stream),
                Some("stdin") => stdin = Some(stream),
                Some("stdout") => stdout = Some(stream),
                Some("stderr") => stderr = Some(stream),
                _ => extra.push(stream),
            }
        }
        Some(())
    })
    .await;
    if !matches!(setup, Ok(Some(()))) {
        tracing::debug!("the client did not open its streams in time");
        session.writer.close().await;
        return None;
    }
    let error = error?;
    let (out, mut out_rx) = mpsc::channel::<(u8, Bytes)>(16);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let senders = [
        stdout.as_ref().map(spdy::Stream::sender),
        stderr.as_ref().map(spdy::Stream::sender),
        Some(error.sender()),
    ];
    let writer = session.writer.clone();
    tokio::spawn(async move {
        // Streams opened later (a terminal's resize stream) are held, not read.
        let mut held = extra;
        let mut streams = session.streams;
        loop {
            tokio::select! {
                s = streams.recv() => match s {
                    Some(s) => held.push(s),
                    None => break,
                },
                m = out_rx.recv() => match m {
                    Some((channel, bytes)) => {
                        if let Some(Some(sender)) = senders.get(usize::from(channel).wrapping_sub(1))
                            && sender.write(&bytes).await.is_err()
                        {
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
        for sender in senders.iter().flatten() {
            sender.finish().await;
        }
        writer.close().await;
        drop(held);
        let _ = done_tx.send(());
    });
    Some(ChannelIo {
        stdin: stdin.map(|s| s.data),
        out,
        done,
    })
}

fn success() -> Value {
    json!({"metadata": {}, "status": "Success"})
}

fn failure(reason: &str, message: &str) -> Value {
    json!({"metadata": {}, "status": "Failure", "reason": reason, "message": message})
}

/// Runs `options.command` as the container runs; its output goes to `out`.
async fn run_exec(
    launch: &Launch,
    program_dirs: &[PathBuf],
    options: &Parsed,
    stdin: Option<mpsc::Receiver<Bytes>>,
    out: mpsc::Sender<(u8, Bytes)>,
) -> Value {
    let argv = &options.command;
    let program = match crate::runtime::spec::resolve_program(&argv[0], program_dirs) {
        Ok(p) => p,
        Err(e) => {
            return failure(
                "InternalError",
                &format!("exec failed: unable to start {:?}: {e}", argv[0]),
            );
        }
    };
    let want = options.streams;
    let pipe = |on: bool| {
        if on {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        }
    };
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&argv[1..])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .envs(&launch.env)
        .current_dir(&launch.working_dir)
        .stdin(pipe(want.stdin))
        .stdout(pipe(want.stdout))
        .stderr(pipe(want.stderr || (want.tty && want.stdout)))
        .process_group(0)
        .kill_on_drop(true);
    if let Some(uid) = launch.run_as {
        command.uid(uid).gid(uid);
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return failure(
                "InternalError",
                &format!("exec failed: unable to start {}: {e}", program.display()),
            );
        }
    };
    if let (Some(mut pipe), Some(mut rx)) = (child.stdin.take(), stdin) {
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if pipe.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = pipe.shutdown().await;
        });
    }
    let pump = |reader: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>, channel: u8| {
        let out = out.clone();
        tokio::spawn(async move {
            let Some(mut reader) = reader else {
                return true;
            };
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(n) => {
                        if out
                            .send((channel, Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            return false;
                        }
                    }
                }
            }
        })
    };
    let stdout = pump(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        1,
    );
    let stderr = pump(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        if want.tty { 1 } else { 2 },
    );
    let pid = child.id();
    let exit = tokio::select! {
        exit = child.wait() => exit,
        _ = out.closed() => {
            // The client left: the command goes with it.
            if let Some(pid) = pid {
                crate::runtime::process::signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
            child.wait().await
        }
    };
    let _ = stdout.await;
    let _ = stderr.await;
    match exit.map(|s| s.code()) {
        Ok(Some(0)) => success(),
        Ok(Some(code)) => json!({
            "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Ok(None) => failure("InternalError", "the command was killed by a signal"),
        Err(e) => failure("InternalError", &format!("waiting for the command: {e}")),
    }
}

/// Streams the container's output from now on until it stops or the client leaves.
async fn run_attach(
    dir: &Path,
    container: &str,
    options: &Parsed,
    out: mpsc::Sender<(u8, Bytes)>,
) -> Value {
    if options.streams.stdin {
        return failure(
            "BadRequest",
            &format!(
                "container {container} takes no input: the process runtime starts containers \
                 without stdin"
            ),
        );
    }
    let follow = logs::LogOptions {
        follow: true,
        tail_lines: Some(0),
        ..Default::default()
    };
    let (d, c) = (dir.to_path_buf(), container.to_owned());
    let result = logs::stream(
        dir,
        container,
        &follow,
        move || running(&d, &c),
        |chunk| {
            let out = out.clone();
            async move { out.send((1, Bytes::from(chunk))).await.is_ok() }
        },
    )
    .await;
    match result {
        Ok(()) => success(),
        Err(e) => failure("InternalError", &format!("reading the output: {e}")),
    }
}

/// The container ports a pod declares (port-forward reaches only these).
fn declared_ports(pod: &Pod) -> Vec<u16> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect()
}

fn upgrade_port_forward(
    mut req: Request<Incoming>,
    ports: Vec<u16>,
) -> Result<Response<Body>, Refusal> {
    let protocols: &[&str] = if is_upgrade(&req, "websocket") {
        &[TUNNELED_PORT_FORWARD]
    } else {
        &[PORT_FORWARD_PROTOCOL]
    };
    let transport = negotiate(&req, protocols)?;
    let answer = switching(&transport);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let session = match transport {
            Transport::Spdy { .. } => spdy::serve(TokioIo::new(upgraded)),
            Transport::WebSocket { .. } => spdy::serve(ws_bytes(websocket(upgraded).await)),
        };
        port_forward(session, ports).await;
    });
    Ok(answer)
}

/// A websocket as a byte stream: binary messages in, each write a binary message out.
fn ws_bytes(ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>) -> tokio::io::DuplexStream {
    let (near, far) = tokio::io::duplex(64 * 1024);
    let (mut sink, mut source) = ws.split();
    let (mut far_read, mut far_write) = tokio::io::split(far);
    tokio::spawn(async move {
        while let Some(Ok(m)) = source.next().await {
            match m {
                Message::Binary(data) if far_write.write_all(&data).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = far_write.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match far_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = sink.send(normal_close()).await;
        let _ = sink.close().await;
    });
    near
}

/// Pairs each request's data and error streams and forwards the data stream to the port.
async fn port_forward(mut session: spdy::Session, ports: Vec<u16>) {
    let mut half: std::collections::HashMap<String, spdy::Stream> = Default::default();
    while let Some(stream) = session.streams.recv().await {
        let id = stream.header("requestid").unwrap_or_default().to_owned();
        let Some(other) = half.remove(&id) else {
            if half.len() >= spdy::MAX_STREAMS {
                stream.sender().reset().await;
                continue;
            }
            half.insert(id, stream);
            continue;
        };
        let (data, error) = if stream.header("streamtype") == Some("data") {
            (stream, other)
        } else {
            (other, stream)
        };
        let ports = ports.clone();
        tokio::spawn(forward(data, error, ports));
    }
}

async fn forward(data: spdy::Stream, error: spdy::Stream, ports: Vec<u16>) {
    let (data_out, error_out) = (data.sender(), error.sender());
    let port = data.header("port").and_then(|p| p.parse::<u16>().ok());
    let fail = |message: String| {
        let (data_out, error_out) = (data_out.clone(), error_out.clone());
        async move {
            let _ = error_out.write(message.as_bytes()).await;
            error_out.finish().await;
            data_out.finish().await;
        }
    };
    let Some(port) = port.filter(|p| ports.contains(p)) else {
        let declared: Vec<String> = ports.iter().map(u16::to_string).collect();
        fail(format!(
            "port {} is not a port the pod declares (declared: {}); pods share the node's \
             network, so only declared container ports can be forwarded",
            data.header("port").unwrap_or("?"),
            if declared.is_empty() {
                "none".into()
            } else {
                declared.join(", ")
            }
        ))
        .await;
        return;
    };
    let tcp = match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return fail(format!(
                "failed to connect to localhost:{port} inside the pod: {e}"
            ))
            .await;
        }
        Err(_) => {
            return fail(format!(
                "connecting to localhost:{port} inside the pod timed out"
            ))
            .await;
        }
    };
    let (mut read, mut write) = tcp.into_split();
    let mut incoming = data.data;
    let upstream = tokio::spawn(async move {
        while let Some(chunk) = incoming.recv().await {
            if write.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if data_out.write(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    data_out.finish().await;
    let _ = upstream.await;
    error_out.finish().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_command_options_need_a_stream_and_a_command() {
        let p = StreamOptions::parse(
            "command=sh&command=-c&command=echo%20hi&stdout=1&stderr=1",
            true,
        )
        .unwrap();
        assert_eq!(p.command, ["sh", "-c", "echo hi"]);
        assert!(p.streams.stdout && p.streams.stderr && !p.streams.stdin);
        let tty = StreamOptions::parse(
            "command=sh&stdin=true&stdout=true&stderr=true&tty=true",
            true,
        )
        .unwrap();
        assert!(
            tty.streams.tty && !tty.streams.stderr,
            "a terminal merges stderr"
        );
        assert!(
            StreamOptions::parse("command=sh", true)
                .unwrap_err()
                .contains("at least 1 of stdin, stdout, stderr")
        );
        assert!(
            StreamOptions::parse("stdout=1", true)
                .unwrap_err()
                .contains("must specify a command")
        );
        assert!(
            StreamOptions::parse("stdout=1", false).is_ok(),
            "attach has no command"
        );
        let long = vec!["command=x"; 257].join("&") + "&stdout=1";
        assert!(
            StreamOptions::parse(&long, true)
                .unwrap_err()
                .contains("256")
        );
    }
}
