//! Test-only helpers: real backends on `127.0.0.1:0` that tests route to,
//! and small clients. Nothing here is a mock of software we can run: the
//! backends stand in for *applications*, which a mesh user brings.
//!
//! Well-behaved backends:
//! - [`Backend::http`]: HTTP/1.1 + h2c echo server. Every response carries
//!   `x-backend: <name>` and a JSON body describing the request it saw
//!   (method, path, query, host, headers), so tests can assert routing,
//!   rewrites and header filters. Paths: `/delay/<ms>` waits first,
//!   `/status/<code>` answers that code, `/bytes/<n>` sends n bytes.
//!   [`Backend::http_slow`] is the same server, slow on every request.
//!   [`Backend::connections`] counts accepted connections (pooling tests).
//! - [`Backend::slow_body`] answers HTTP/1.1 headers and half the body at
//!   once, the rest after a delay (a response that streams slowly).
//! - [`Backend::tcp_echo`] echoes bytes; [`Backend::server_first`] greets
//!   first and then echoes (like SMTP or MySQL).
//!
//! Misbehaving backends (resilience tests). [`Backend::controlled`] is the
//! echo server (HTTP/1.1 + h2c) whose answer to each request the test
//! decides, and may change while traffic flows:
//! - a [`Behavior`] per request: [`Behavior::Ok`] (echo), `Status(code)`,
//!   `StatusAfter(code, d)` (a slow failure),
//!   `Reset` (close the connection, or reset the HTTP/2 stream, without
//!   answering), `BlackHole` (read the request, never answer), `Delay(d)`
//!   (echo after `d`), `Hold` (echo when the test calls
//!   [`Backend::release`]: slowness without timing);
//! - a [`Pattern`] picks the behavior from the request's index since the
//!   pattern was set: `Always(b)`, `First(n, b)` (a transient failure that
//!   heals), `EveryNth(k, b)` (a flapping backend), `Cycle(list)`;
//!   [`Backend::set`] / [`Backend::set_pattern`] switch at runtime.
//!   Shorthands: [`Backend::status`] (always `code`), [`Backend::flapping`].
//! - Load is measured, not guessed: [`Backend::hits`] counts requests that
//!   reached the application (health probes excluded),
//!   [`Backend::in_flight`] and [`Backend::peak_in_flight`] the concurrency
//!   it saw.
//! - Health endpoints, answered from a separate switch
//!   ([`Backend::set_healthy`]) and counted in [`Backend::health_checks`]:
//!   `GET` [`HEALTH_PATH`] (200 healthy, 503 not) and the gRPC health
//!   protocol `grpc.health.v1.Health/Check` over h2c (`SERVING` /
//!   `NOT_SERVING`, hand-encoded protobuf). [`Backend::grpc_health`] is the
//!   same server, named for what a test uses it for.
//!
//! Every backend (also the well-behaved ones and [`Backend::tcp_echo`], the
//! TCP health check target) can die and come back: [`Backend::kill`] closes
//! the listener and every open connection, so new connections are refused;
//! [`Backend::revive`] listens on the same port again.
//! [`Backend::resetter`] accepts, reads and closes (an application that
//! crashes on every request).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// The path of a [`Backend::controlled`] server's HTTP health endpoint.
pub const HEALTH_PATH: &str = "/healthz";

/// The gRPC health checking protocol's method path.
pub const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// A running backend. Dropping it stops accepting.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    commands: mpsc::UnboundedSender<(Command, oneshot::Sender<()>)>,
    task: tokio::task::JoinHandle<()>,
}

/// What a [`Backend::controlled`] server does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// Answer like [`Backend::http`] (echo; `/status/<code>` etc. work).
    Ok,
    /// Answer this status (with `x-backend`, a short body).
    Status(u16),
    /// Answer this status after this delay (a slow failure: an overloaded
    /// application timing out internally).
    StatusAfter(u16, Duration),
    /// Close the connection (HTTP/1.1) or reset the stream (HTTP/2)
    /// without answering.
    Reset,
    /// Read the request and never answer (until the client gives up or the
    /// backend is killed).
    BlackHole,
    /// Answer like `Ok`, after this delay.
    Delay(Duration),
    /// Answer like `Ok` when the test calls [`Backend::release`] (a slow
    /// backend whose slowness the test controls, so nothing depends on
    /// timing).
    Hold,
}

/// How a [`Backend::controlled`] server picks each request's [`Behavior`],
/// from the request's index (0-based) since the pattern was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Every request.
    Always(Behavior),
    /// The first `n` requests, then [`Behavior::Ok`] (a transient outage).
    First(usize, Behavior),
    /// Every `k`-th request (indices `k-1`, `2k-1`, ...), the others
    /// [`Behavior::Ok`] (a flapping backend). `k` of 0 is treated as 1.
    EveryNth(usize, Behavior),
    /// Requests take the listed behaviors in turn, round and round.
    Cycle(Vec<Behavior>),
}

impl Pattern {
    fn pick(&self, i: usize) -> Behavior {
        match self {
            Pattern::Always(b) => b.clone(),
            Pattern::First(n, b) if i < *n => b.clone(),
            Pattern::First(..) => Behavior::Ok,
            Pattern::EveryNth(k, b) if (i + 1).is_multiple_of((*k).max(1)) => b.clone(),
            Pattern::EveryNth(..) => Behavior::Ok,
            Pattern::Cycle(list) if list.is_empty() => Behavior::Ok,
            Pattern::Cycle(list) => list[i % list.len()].clone(),
        }
    }
}

/// What a backend counts, shared with its connection tasks.
#[derive(Debug)]
struct Counters {
    hits: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    conns: AtomicUsize,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    health_checks: AtomicUsize,
    healthy: AtomicBool,
    /// Bumped by [`Backend::release`]: held requests answer.
    release: watch::Sender<u64>,
    /// The pattern and the number of requests it has decided so far.
    pattern: Mutex<(Pattern, usize)>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            hits: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            conns: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            release: watch::channel(0).0,
            pattern: Mutex::new((Pattern::Always(Behavior::Ok), 0)),
        }
    }
}

impl Counters {
    fn next_behavior(&self) -> Behavior {
        let mut p = self.pattern.lock().unwrap();
        let b = p.0.pick(p.1);
        p.1 += 1;
        b
    }
}

/// Counts a request in flight for as long as it lives.
struct InFlight(Arc<Counters>);

impl InFlight {
    fn new(c: &Arc<Counters>) -> Self {
        let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accept-loop commands.
#[derive(Debug, Clone, Copy)]
enum Command {
    Kill,
    Revive,
}

/// A request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub host: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ConnFn = Box<
    dyn FnMut(TcpStream, &Arc<Counters>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
        + Send,
>;

impl Backend {
    /// Requests (or connections, for TCP backends) served so far. Health
    /// probes to [`HEALTH_PATH`] and the gRPC health service are not counted
    /// here but in [`Backend::health_checks`].
    pub fn hits(&self) -> usize {
        self.counters.hits.load(Ordering::SeqCst)
    }

    pub fn reset_hits(&self) {
        self.counters.hits.store(0, Ordering::SeqCst);
    }

    /// Connections accepted so far (HTTP backends; TCP backends count them
    /// in [`Backend::hits`]).
    pub fn connections(&self) -> usize {
        self.counters.conns.load(Ordering::SeqCst)
    }

    /// Requests seen so far (HTTP backends).
    pub fn seen(&self) -> Vec<Seen> {
        self.counters.seen.lock().unwrap().clone()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Application requests being served right now (HTTP backends).
    pub fn in_flight(&self) -> usize {
        self.counters.in_flight.load(Ordering::SeqCst)
    }

    /// The most application requests ever served at once (HTTP backends).
    pub fn peak_in_flight(&self) -> usize {
        self.counters.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Health probes answered so far ([`HEALTH_PATH`] and gRPC `Check`).
    pub fn health_checks(&self) -> usize {
        self.counters.health_checks.load(Ordering::SeqCst)
    }

    /// Every later request behaves like `b` ([`Backend::controlled`]
    /// servers; the others ignore it).
    pub fn set(&self, b: Behavior) {
        self.set_pattern(Pattern::Always(b));
    }

    /// Later requests follow `p`, counting from 0 again.
    pub fn set_pattern(&self, p: Pattern) {
        *self.counters.pattern.lock().unwrap() = (p, 0);
    }

    /// What the health endpoints say from now on: 200 / `SERVING` when
    /// `healthy`, else 503 / `NOT_SERVING` (default healthy).
    pub fn set_healthy(&self, healthy: bool) {
        self.counters.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Lets every request held by [`Behavior::Hold`] answer.
    pub fn release(&self) {
        self.counters.release.send_modify(|g| *g += 1);
    }

    /// Stops listening and closes every open connection: from the moment
    /// this returns, connections to [`Backend::addr`] are refused (a dead
    /// process). Counters are kept.
    pub async fn kill(&self) {
        self.command(Command::Kill).await;
    }

    /// Listens on the same address again after [`Backend::kill`] (a
    /// restarted process), with the same behavior and counters.
    pub async fn revive(&self) {
        self.command(Command::Revive).await;
    }

    async fn command(&self, cmd: Command) {
        let (tx, rx) = oneshot::channel();
        self.commands.send((cmd, tx)).unwrap();
        rx.await.unwrap();
    }

    /// HTTP/1.1 and h2c (prior knowledge) echo server.
    pub async fn http(name: &str) -> Backend {
        Self::http_on("127.0.0.1:0", name).await
    }

    pub async fn http_on(bind: &str, name: &str) -> Backend {
        Self::http_with(bind, name, Duration::ZERO).await
    }

    /// The echo server, waiting `delay` before answering every request (an
    /// endpoint that is consistently slower than its peers).
    pub async fn http_slow(name: &str, delay: Duration) -> Backend {
        Self::http_with("127.0.0.1:0", name, delay).await
    }

    async fn http_with(bind: &str, name: &str, delay: Duration) -> Backend {
        let n = name.to_owned();
        Self::serve(bind, name, move |stream, c| {
            c.conns.fetch_add(1, Ordering::SeqCst);
            let (n, c) = (n.clone(), c.clone());
            async move {
                let svc = service_fn(move |req| {
                    let (n, c) = (n.clone(), c.clone());
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        echo(n, c, req).await
                    }
                });
                serve_http(stream, svc).await;
            }
        })
        .await
    }

    /// The echo server whose answer to each request follows a [`Pattern`]
    /// the test can switch at runtime ([`Backend::set`],
    /// [`Backend::set_pattern`]), with HTTP and gRPC health endpoints
    /// ([`Backend::set_healthy`]). See the crate docs.
    pub async fn controlled(name: &str, pattern: Pattern) -> Backend {
        let n = name.to_owned();
        let b = Self::serve("127.0.0.1:0", name, move |stream, c| {
            c.conns.fetch_add(1, Ordering::SeqCst);
            let (n, c) = (n.clone(), c.clone());
            async move {
                let svc = service_fn(move |req| controlled(n.clone(), c.clone(), req));
                serve_http(stream, svc).await;
            }
        })
        .await;
        b.set_pattern(pattern);
        b
    }

    /// A server that answers every request with `code` (until told
    /// otherwise with [`Backend::set`]).
    pub async fn status(name: &str, code: u16) -> Backend {
        Self::controlled(name, Pattern::Always(Behavior::Status(code))).await
    }

    /// A server whose failures follow `pattern`, e.g.
    /// `Pattern::First(3, Behavior::Status(503))` (three failures, then
    /// healthy) or `Pattern::EveryNth(2, Behavior::Reset)`.
    pub async fn flapping(name: &str, pattern: Pattern) -> Backend {
        Self::controlled(name, pattern).await
    }

    /// A server for gRPC health checks: `grpc.health.v1.Health/Check`
    /// answers `SERVING` until [`Backend::set_healthy`]`(false)`, then
    /// `NOT_SERVING`. It is a [`Backend::controlled`] server, so other
    /// requests are echoed and counted in [`Backend::hits`].
    pub async fn grpc_health(name: &str) -> Backend {
        Self::controlled(name, Pattern::Always(Behavior::Ok)).await
    }

    /// Accepts, reads the start of a request, then closes without answering
    /// (an application that crashes mid-request).
    pub async fn resetter(name: &str) -> Backend {
        Self::serve("127.0.0.1:0", name, |mut stream, c| {
            c.hits.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
            }
        })
        .await
    }

    /// Sends status line, headers and `hello` at once, then ` world` after
    /// `delay` (content-length 11), for every request on its connections.
    pub async fn slow_body(name: &str, delay: Duration) -> Backend {
        Self::serve("127.0.0.1:0", name, move |mut stream, c| {
            let c = c.clone();
            async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    c.hits.fetch_add(1, Ordering::SeqCst);
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello";
                    if stream.write_all(head).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    if stream.write_all(b" world").await.is_err() {
                        return;
                    }
                }
            }
        })
        .await
    }

    /// Echoes every byte back. [`Backend::kill`] / [`Backend::revive`] make
    /// it a target for TCP health checks.
    pub async fn tcp_echo(name: &str) -> Backend {
        Self::tcp(name, None).await
    }

    /// Sends `greeting` as soon as a client connects, then echoes.
    pub async fn server_first(name: &str, greeting: &'static [u8]) -> Backend {
        Self::tcp(name, Some(greeting)).await
    }

    async fn tcp(name: &str, greeting: Option<&'static [u8]>) -> Backend {
        Self::serve("127.0.0.1:0", name, move |mut stream, c| {
            c.hits.fetch_add(1, Ordering::SeqCst);
            async move {
                if let Some(g) = greeting {
                    if stream.write_all(g).await.is_err() {
                        return;
                    }
                }
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        })
        .await
    }

    /// Binds `bind` and runs every accepted connection on its own task.
    /// `on_accept` runs in the accept loop (so what it counts is counted
    /// before the connection is served) and returns the connection's task.
    /// Dropping the backend stops accepting (open connections finish);
    /// [`Backend::kill`] also closes them.
    async fn serve<A, F>(bind: &str, name: &str, mut on_accept: A) -> Backend
    where
        A: FnMut(TcpStream, &Arc<Counters>) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let (commands, rx) = mpsc::unbounded_channel();
        let on_accept: ConnFn = Box::new(move |s, c| Box::pin(on_accept(s, c)));
        let task = tokio::spawn(accept_loop(listener, addr, counters.clone(), rx, on_accept));
        Backend {
            name: name.to_owned(),
            addr,
            counters,
            commands,
            task,
        }
    }
}

/// The accept loop of every backend: serves connections, and obeys
/// [`Command`]s (kill closes the listener and the open connections,
/// revive binds the same address again).
async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    counters: Arc<Counters>,
    mut commands: mpsc::UnboundedReceiver<(Command, oneshot::Sender<()>)>,
    mut on_accept: ConnFn,
) {
    let mut listener = Some(listener);
    // Bumped on every kill: open connections end when it changes. Kept
    // here so that dropping the backend (which aborts this task) closes
    // the channel, and open connections then just run to completion.
    let (generation, _) = watch::channel(0u64);
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some((cmd, done)) = cmd else {
                    // The Backend is gone; it aborts this task on drop.
                    std::future::pending::<()>().await;
                    return;
                };
                match cmd {
                    Command::Kill => {
                        listener = None;
                        generation.send_modify(|g| *g += 1);
                    }
                    Command::Revive => {
                        if listener.is_none() {
                            listener = Some(TcpListener::bind(addr).await.unwrap_or_else(|e| {
                                panic!("cannot listen on {addr} again: {e}")
                            }));
                        }
                    }
                }
                let _ = done.send(());
            }
            accepted = async { listener.as_ref().unwrap().accept().await }, if listener.is_some() => {
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = on_accept(stream, &counters);
                let mut killed = generation.subscribe();
                tokio::spawn(async move {
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = &mut conn => {}
                        changed = killed.changed() => {
                            if changed.is_err() {
                                conn.await;
                            }
                        }
                    }
                });
            }
        }
    }
}

/// Serves one connection as HTTP/1.1, or h2c when it starts with the
/// HTTP/2 preface.
async fn serve_http<S, B>(stream: TcpStream, svc: S)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut preface = [0u8; 3];
    let is_h2 = matches!(stream.peek(&mut preface).await, Ok(3) if &preface == b"PRI");
    let io = TokioIo::new(stream);
    if is_h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades()
            .await;
    }
}

/// Why a [`Backend::controlled`] server did not answer (the connection is
/// closed, or the HTTP/2 stream reset).
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the test told this backend to reset")
    }
}

impl std::error::Error for Dropped {}

type AnyBody = BoxBody<Bytes, Infallible>;

/// One request to a [`Backend::controlled`] server.
async fn controlled(
    name: String,
    c: Arc<Counters>,
    req: Request<Incoming>,
) -> Result<Response<AnyBody>, Dropped> {
    let path = req.uri().path();
    if path == GRPC_HEALTH_CHECK {
        c.health_checks.fetch_add(1, Ordering::SeqCst);
        let _ = req.into_body().collect().await;
        return Ok(grpc_health_reply(c.healthy.load(Ordering::SeqCst)));
    }
    if path == HEALTH_PATH {
        c.health_checks.fetch_add(1, Ordering::SeqCst);
        let _ = req.into_body().collect().await;
        let healthy = c.healthy.load(Ordering::SeqCst);
        let status = if healthy { 200 } else { 503 };
        return Ok(short_reply(
            &name,
            status,
            if healthy { "ok" } else { "unhealthy" },
        ));
    }
    // Counted on arrival, whatever happens next.
    c.hits.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::new(&c);
    match c.next_behavior() {
        Behavior::Ok => Ok(echo_reply(&name, &c, req).await.map(|b| b.boxed())),
        Behavior::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(echo_reply(&name, &c, req).await.map(|b| b.boxed()))
        }
        Behavior::Hold => {
            let mut released = c.release.subscribe();
            let _ = released.changed().await;
            Ok(echo_reply(&name, &c, req).await.map(|b| b.boxed()))
        }
        Behavior::Status(code) => {
            let _ = req.into_body().collect().await;
            Ok(short_reply(&name, code, "injected by the test backend"))
        }
        Behavior::StatusAfter(code, d) => {
            let _ = req.into_body().collect().await;
            tokio::time::sleep(d).await;
            Ok(short_reply(&name, code, "injected by the test backend"))
        }
        Behavior::Reset => Err(Dropped),
        Behavior::BlackHole => {
            let _ = req.into_body().collect().await;
            std::future::pending::<()>().await;
            Err(Dropped)
        }
    }
}

/// A small text response with `x-backend`.
fn short_reply(name: &str, status: u16, text: &str) -> Response<AnyBody> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("x-backend", name)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(format!("{name}: {status} {text}\n"))).boxed())
        .unwrap()
}

/// A `grpc.health.v1.HealthCheckResponse`: field 1 (`status`, varint),
/// 1 = SERVING, 2 = NOT_SERVING, in one uncompressed gRPC message (1-byte
/// flag, 4-byte big-endian length), then `grpc-status: 0` trailers.
fn grpc_health_reply(serving: bool) -> Response<AnyBody> {
    let status: u8 = if serving { 1 } else { 2 };
    let message = [0x08, status];
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = Full::new(Bytes::from(frame))
        .with_trailers(std::future::ready(Some(Ok(trailers))))
        .boxed();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap()
}

async fn echo(
    name: String,
    counters: Arc<Counters>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    counters.hits.fetch_add(1, Ordering::SeqCst);
    Ok(echo_reply(&name, &counters, req).await)
}

/// The echo server's answer (without counting the hit).
async fn echo_reply(
    name: &str,
    counters: &Counters,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let host = parts
        .headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    counters.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        host: host.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });
    let path = parts.uri.path();
    let mut status = StatusCode::OK;
    let mut payload: Option<Bytes> = None;
    if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|s| s.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
    {
        status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    } else if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|s| s.parse::<usize>().ok())
    {
        payload = Some(Bytes::from(vec![b'x'; n]));
    }
    let payload = payload.unwrap_or_else(|| {
        let desc = serde_json::json!({
            "backend": name,
            "method": parts.method.as_str(),
            "path": path,
            "query": parts.uri.query().unwrap_or(""),
            "host": host,
            "version": format!("{:?}", parts.version),
            "headers": headers.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "body_len": body.len(),
        });
        Bytes::from(desc.to_string())
    });
    Response::builder()
        .status(status)
        .header("x-backend", name)
        .header("content-type", "application/json")
        .body(Full::new(payload))
        .unwrap()
}

/// The Python interpreter of the interop venv (grpcio, websockets), which
/// `scripts/test.sh` exports as `MESHWORK_PYTHON`. Tests that talk to real
/// Python peers fail (rather than skip) without it.
pub fn python() -> std::path::PathBuf {
    match std::env::var_os("MESHWORK_PYTHON") {
        Some(p) if !p.is_empty() => p.into(),
        _ => panic!("run ./scripts/test.sh (MESHWORK_PYTHON is not set)"),
    }
}

/// A free port on 127.0.0.1 (bound then released: racy, only for configs that
/// must name a port before the listener exists).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Minimal HTTP/1.1 client over one keep-alive connection.
pub struct H1Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl H1Client {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    /// Sends a request; returns status, headers and body.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        Reply::read(resp).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<Reply> {
        self.send(get(host, path)).await
    }

    /// Connects from a chosen local address (any of 127.0.0.0/8 works on
    /// Linux), so tests can act as several client hosts.
    pub async fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> anyhow::Result<Self> {
        let socket = match local {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(local, 0))?;
        let stream = socket.connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }
}

/// HTTP/2 prior-knowledge client over one connection.
pub struct H2Client {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl H2Client {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        Reply::read(resp).await
    }
}

/// A GET with a Host header (HTTP/1.1) or authority (HTTP/2 uses the URI).
pub fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A response, read to the end.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl Reply {
    async fn read(resp: Response<Incoming>) -> anyhow::Result<Self> {
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(Self {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The backend that answered (`x-backend`).
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend")
    }

    /// The echo backend's JSON description of the request it saw.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn patterns_pick_each_requests_behavior_and_hits_count_them() {
        let b = Backend::flapping("f", Pattern::First(2, Behavior::Status(503))).await;
        let mut c = H1Client::connect(b.addr).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(c.get("x", "/").await.unwrap().status.as_u16());
        }
        assert_eq!(got, [503, 503, 200, 200]);
        b.set_pattern(Pattern::EveryNth(3, Behavior::Status(500)));
        let mut got = Vec::new();
        for _ in 0..6 {
            got.push(c.get("x", "/").await.unwrap().status.as_u16());
        }
        assert_eq!(got, [200, 200, 500, 200, 200, 500]);
        assert_eq!(b.hits(), 10);
        assert_eq!(b.peak_in_flight(), 1);
        assert_eq!(b.in_flight(), 0);
    }

    #[tokio::test]
    async fn reset_closes_without_an_answer_and_black_hole_never_answers() {
        let b = Backend::status("r", 503).await;
        b.set(Behavior::Reset);
        let mut c = H1Client::connect(b.addr).await.unwrap();
        assert!(c.get("x", "/").await.is_err());
        let mut h2 = H2Client::connect(b.addr).await.unwrap();
        assert!(h2.send(get("x", "http://x/")).await.is_err());

        b.set(Behavior::BlackHole);
        let mut c = H1Client::connect(b.addr).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(200), c.get("x", "/")).await;
        assert!(r.is_err(), "a black hole answered: {r:?}");
        assert_eq!(b.hits(), 3);
    }

    #[tokio::test]
    async fn held_requests_answer_when_released() {
        let b = Backend::controlled("h", Pattern::First(2, Behavior::Hold)).await;
        let addr = b.addr;
        let held: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(async move {
                    let mut c = H1Client::connect(addr).await.unwrap();
                    c.get("x", "/").await.unwrap().status.as_u16()
                })
            })
            .collect();
        wait(|| b.in_flight() == 2).await;
        let r = H1Client::connect(addr)
            .await
            .unwrap()
            .get("x", "/")
            .await
            .unwrap();
        assert_eq!((r.status.as_u16(), b.in_flight()), (200, 2));
        b.release();
        for h in held {
            assert_eq!(h.await.unwrap(), 200);
        }
        assert_eq!((b.hits(), b.peak_in_flight(), b.in_flight()), (3, 3, 0));
    }

    #[tokio::test]
    async fn kill_refuses_and_closes_then_revive_listens_on_the_same_port() {
        let b = Backend::controlled("k", Pattern::Always(Behavior::BlackHole)).await;
        let mut open = H1Client::connect(b.addr).await.unwrap();
        let pending = tokio::spawn(async move { open.get("x", "/").await });
        wait(|| b.hits() == 1).await;
        b.kill().await;
        assert!(
            pending.await.unwrap().is_err(),
            "the open request survived kill"
        );
        assert!(TcpStream::connect(b.addr).await.is_err());
        b.revive().await;
        b.set(Behavior::Ok);
        let r = H1Client::connect(b.addr)
            .await
            .unwrap()
            .get("x", "/")
            .await
            .unwrap();
        assert_eq!((r.status.as_u16(), r.backend()), (200, Some("k")));

        let t = Backend::tcp_echo("t").await;
        t.kill().await;
        assert!(TcpStream::connect(t.addr).await.is_err());
        t.revive().await;
        assert!(TcpStream::connect(t.addr).await.is_ok());
    }

    #[tokio::test]
    async fn health_endpoints_follow_the_switch_and_are_not_hits() {
        let b = Backend::grpc_health("g").await;
        let mut c = H2Client::connect(b.addr).await.unwrap();
        let check = || {
            Request::post(format!("http://g{GRPC_HEALTH_CHECK}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
                .unwrap()
        };
        let r = c.send(check()).await.unwrap();
        assert_eq!(&r.body[..], &[0, 0, 0, 0, 2, 0x08, 1]);
        assert_eq!(r.trailers.unwrap()["grpc-status"], "0");
        b.set_healthy(false);
        let r = c.send(check()).await.unwrap();
        assert_eq!(&r.body[..], &[0, 0, 0, 0, 2, 0x08, 2]);
        let r = c
            .send(get("g", &format!("http://g{HEALTH_PATH}")))
            .await
            .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!((b.health_checks(), b.hits()), (3, 0));
    }

    async fn wait(mut cond: impl FnMut() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition never held");
    }
}
