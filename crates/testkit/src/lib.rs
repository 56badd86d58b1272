//! Test-only helpers: real backends on `127.0.0.1:0` that tests route to,
//! and small clients. Nothing here is a mock of software we can run: the
//! backends stand in for *applications*, which a mesh user brings.
//!
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
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running backend. Dropping it stops accepting.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

/// What a backend counts, shared with its connection tasks.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    conns: AtomicUsize,
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

impl Backend {
    /// Requests (or connections, for TCP backends) served so far.
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
                let _ = stream.set_nodelay(true);
                let mut preface = [0u8; 3];
                let is_h2 = matches!(stream.peek(&mut preface).await, Ok(3) if &preface == b"PRI");
                let svc = service_fn(move |req| {
                    let (n, c) = (n.clone(), c.clone());
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        echo(n, c, req).await
                    }
                });
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
        })
        .await
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

    /// Echoes every byte back.
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

    /// Binds `bind` and runs every accepted connection on its own task until
    /// the backend is dropped. `on_accept` runs in the accept loop (so what it
    /// counts is counted before the connection is served) and returns the
    /// connection's task.
    async fn serve<A, F>(bind: &str, name: &str, mut on_accept: A) -> Backend
    where
        A: FnMut(TcpStream, &Arc<Counters>) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(on_accept(stream, &c));
            }
        });
        Backend {
            name: name.to_owned(),
            addr,
            counters,
            task,
        }
    }
}

async fn echo(
    name: String,
    counters: Arc<Counters>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    counters.hits.fetch_add(1, Ordering::SeqCst);
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
    let resp = Response::builder()
        .status(status)
        .header("x-backend", name.as_str())
        .header("content-type", "application/json")
        .body(Full::new(payload))
        .unwrap();
    Ok(resp)
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
