//! The demo's sample application: three services that know nothing about
//! the mesh except where to send their calls ([`Target`]): the local address
//! of their own sidecar (explicit demo), or the callee's name and port
//! (transparent demo: resolved and connected to as is, the capture does the
//! rest).
//!
//! - `frontend` (HTTP/1.1): `GET /` or `GET /product/<n>` calls `catalog`
//!   over gRPC through its sidecar and answers with what the catalog said,
//!   plus `x-catalog-version` / `x-catalog-instance` headers. A request
//!   header `x-catalog-version` is passed on as gRPC metadata (the
//!   GRPCRoute pins a version on it).
//! - `catalog` (gRPC over h2c, method [`GET_ITEM`]): answers with its
//!   version and instance name, after asking `inventory` for the stock over
//!   TCP through its sidecar.
//! - `inventory` (TCP, one line per request): `STOCK <sku>\n` is answered
//!   `<sku> <count>\n`; anything else `ERR <reason>\n`.
//!
//! Contract: real protocols end to end. gRPC messages are length-prefixed
//! protobuf (`prost` derive, no codegen); status travels in trailers. Every
//! failure becomes an error value or an error answer; nothing here panics on
//! what a peer sends.
//!
//! Non-goals: TLS (the sidecars will do it), gRPC compression, streaming.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use super::mesh::CATALOG_PORT;

/// The catalog's one RPC.
pub(super) const GET_ITEM: &str = "/demo.catalog.v1.Catalog/GetItem";
/// Header (and gRPC metadata) that pins a catalog version.
pub(super) const PIN_HEADER: &str = "x-catalog-version";
/// How long any hop of the sample app waits.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest gRPC or HTTP body the apps read.
const MAX_BODY: usize = 64 * 1024;
/// Longest inventory line.
const MAX_LINE: u64 = 256;

const PRODUCTS: [&str; 8] = [
    "espresso",
    "ristretto",
    "lungo",
    "cortado",
    "flat white",
    "macchiato",
    "mocha",
    "affogato",
];

/// `GetItem` request.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct GetItemRequest {
    #[prost(uint32, tag = "1")]
    pub(super) sku: u32,
}

/// `GetItem` response.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Item {
    #[prost(uint32, tag = "1")]
    pub(super) sku: u32,
    #[prost(string, tag = "2")]
    pub(super) name: String,
    #[prost(uint32, tag = "3")]
    pub(super) stock: u32,
    /// `v1` or `v2`.
    #[prost(string, tag = "4")]
    pub(super) version: String,
    /// The instance that answered, e.g. `catalog-v1-0`.
    #[prost(string, tag = "5")]
    pub(super) instance: String,
}

/// Where an app sends its calls.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// A fixed address: the caller's sidecar (explicit mode).
    Sidecar(SocketAddr),
    /// `host:port`, resolved by the system resolver for every new
    /// connection (transparent mode: mesh DNS answers, capture routes).
    Name(String),
}

impl Target {
    /// A new TCP connection to the target (no timeout of its own).
    pub(super) async fn connect(&self) -> Result<TcpStream, String> {
        match self {
            Target::Sidecar(addr) => TcpStream::connect(addr)
                .await
                .map_err(|e| format!("cannot connect to the sidecar {addr}: {e}")),
            Target::Name(name) => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host(name.as_str())
                    .await
                    .map_err(|e| format!("cannot resolve {name}: {e}"))?
                    .collect();
                let mut last = format!("{name} resolved to no address");
                for addr in addrs {
                    match TcpStream::connect(addr).await {
                        Ok(s) => return Ok(s),
                        Err(e) => last = format!("cannot connect to {name} ({addr}): {e}"),
                    }
                }
                Err(last)
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Sidecar(addr) => write!(f, "the sidecar {addr}"),
            Target::Name(name) => f.write_str(name),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `host:port` (a name is kept to be resolved per connection).
    fn from_str(s: &str) -> Result<Target, String> {
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Target::Name(s.to_owned()))
            }
            _ => Err(format!("{s:?}: expected host:port, e.g. catalog:50051")),
        }
    }
}

type GrpcBody =
    WithTrailers<Full<Bytes>, std::future::Ready<Option<Result<HeaderMap, Infallible>>>>;

// ------------------------------------------------------------------ frontend

/// Serves `frontend` on `listener`; catalog calls go to `catalog` (its
/// sidecar's outbound HTTP listener, or `catalog:50051`).
pub(super) fn frontend(listener: TcpListener, catalog: Target) {
    let client = Arc::new(GrpcClient::new(catalog, format!("catalog:{CATALOG_PORT}")));
    serve(listener, move |stream| {
        let client = client.clone();
        async move {
            let svc = service_fn(move |req| {
                let client = client.clone();
                async move { Ok::<_, Infallible>(frontend_request(req, &client).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    });
}

async fn frontend_request(
    req: Request<hyper::body::Incoming>,
    client: &GrpcClient,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let sku = match path.strip_prefix("/product/") {
        Some(n) => match n.parse::<u32>() {
            Ok(n) => n,
            Err(_) => return text(StatusCode::NOT_FOUND, format!("no product {n:?}\n")),
        },
        None if path == "/" => client.next_sku(),
        None => {
            return text(
                StatusCode::NOT_FOUND,
                "try / or /product/<number>\n".to_owned(),
            )
        }
    };
    let pin = req.headers().get(PIN_HEADER).cloned();
    match client.get_item(sku, pin).await {
        Ok(item) => {
            let mut r = text(
                StatusCode::OK,
                format!(
                    "frontend: {} ({}) says product {} is {:?}, {} in stock\n",
                    catalog_name(&item.version),
                    item.instance,
                    item.sku,
                    item.name,
                    item.stock
                ),
            );
            for (name, value) in [
                (PIN_HEADER, item.version.as_str()),
                ("x-catalog-instance", item.instance.as_str()),
            ] {
                if let Ok(v) = HeaderValue::from_str(value) {
                    r.headers_mut().insert(name, v);
                }
            }
            r
        }
        Err(e) => text(
            StatusCode::BAD_GATEWAY,
            format!("frontend: catalog call failed: {e}\n"),
        ),
    }
}

fn catalog_name(version: &str) -> String {
    format!("catalog-{version}")
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// A gRPC client over one HTTP/2 connection to its target, reconnected
/// when it breaks.
pub(super) struct GrpcClient {
    target: Target,
    authority: String,
    conn: Mutex<Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>>,
    skus: std::sync::atomic::AtomicU32,
}

impl GrpcClient {
    pub(super) fn new(target: Target, authority: String) -> GrpcClient {
        GrpcClient {
            target,
            authority,
            conn: Mutex::new(None),
            skus: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn next_sku(&self) -> u32 {
        self.skus.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PRODUCTS.len() as u32
    }

    async fn sender(&self) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
        let mut conn = self.conn.lock().await;
        if let Some(s) = conn.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let stream = tokio::time::timeout(CALL_TIMEOUT, self.target.connect())
            .await
            .map_err(|_| format!("connecting to {} timed out", self.target))??;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP/2 handshake with {} failed: {e}", self.target))?;
        tokio::spawn(connection);
        *conn = Some(sender.clone());
        Ok(sender)
    }

    /// Calls `GetItem`; `pin` goes along as `x-catalog-version` metadata.
    pub(super) async fn get_item(
        &self,
        sku: u32,
        pin: Option<HeaderValue>,
    ) -> Result<Item, String> {
        let result = self.call(sku, pin).await;
        if result.is_err() {
            // Start afresh next time: the connection may be what failed.
            *self.conn.lock().await = None;
        }
        result
    }

    async fn call(&self, sku: u32, pin: Option<HeaderValue>) -> Result<Item, String> {
        let mut sender = self.sender().await?;
        let mut req = Request::post(format!("http://{}{GET_ITEM}", self.authority))
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers");
        if let Some(v) = pin {
            req = req.header(PIN_HEADER, v);
        }
        let req = req
            .body(Full::new(frame(&GetItemRequest { sku })?))
            .map_err(|e| format!("building the request: {e}"))?;
        let exchange = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the response: {e}"))?;
            Ok::<_, String>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {}s", CALL_TIMEOUT.as_secs()))??;
        if parts.status != StatusCode::OK {
            let why = parts
                .headers
                .get("x-meshwork-error")
                .and_then(|v| v.to_str().ok())
                .map(|v| format!(" ({v})"))
                .unwrap_or_default();
            return Err(format!("HTTP {}{why}", parts.status));
        }
        // Trailers, or headers for a trailers-only answer.
        let trailers = body.trailers().cloned().unwrap_or_default();
        let status_of = |h: &HeaderMap| {
            h.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = status_of(&trailers).or_else(|| status_of(&parts.headers));
        match status.as_deref() {
            Some("0") => {}
            Some(code) => {
                let msg = trailers
                    .get("grpc-message")
                    .or_else(|| parts.headers.get("grpc-message"))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                return Err(format!("grpc-status {code}: {msg}"));
            }
            None => return Err("the answer carried no grpc-status".to_owned()),
        }
        let bytes = body.to_bytes();
        Item::decode(unframe(&bytes)?).map_err(|e| format!("undecodable Item: {e}"))
    }
}

// ------------------------------------------------------------------- catalog

/// What one catalog instance is.
#[derive(Debug, Clone)]
pub(super) struct Catalog {
    /// `v1` or `v2`.
    pub(super) version: &'static str,
    pub(super) instance: String,
    /// Its sidecar's TCP listener for `inventory`, or `inventory:7000`.
    pub(super) inventory: Target,
}

/// Serves the catalog's gRPC service (h2c) on `listener`.
pub(super) fn catalog(listener: TcpListener, me: Catalog) {
    let me = Arc::new(me);
    serve(listener, move |stream| {
        let me = me.clone();
        async move {
            let svc = service_fn(move |req| {
                let me = me.clone();
                async move { Ok::<_, Infallible>(catalog_request(req, &me).await) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    });
}

async fn catalog_request(req: Request<hyper::body::Incoming>, me: &Catalog) -> Response<GrpcBody> {
    if req.uri().path() != GET_ITEM {
        return grpc_answer(None, 12, &format!("unknown method {}", req.uri().path()));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return grpc_answer(None, 3, &format!("unreadable request: {e}")),
    };
    let sku = match unframe(&body).and_then(|m| {
        GetItemRequest::decode(m).map_err(|e| format!("undecodable GetItemRequest: {e}"))
    }) {
        Ok(r) => r.sku,
        Err(e) => return grpc_answer(None, 3, &e),
    };
    let stock = match stock(&me.inventory, sku).await {
        Ok(n) => n,
        Err(e) => return grpc_answer(None, 14, &format!("inventory: {e}")),
    };
    let name = PRODUCTS
        .get(sku as usize % PRODUCTS.len())
        .copied()
        .unwrap_or("mystery");
    let item = Item {
        sku,
        // v2 is the new release: it says so in the name.
        name: if me.version == "v2" {
            format!("{name} (new recipe)")
        } else {
            name.to_owned()
        },
        stock,
        version: me.version.to_owned(),
        instance: me.instance.clone(),
    };
    match frame(&item) {
        Ok(bytes) => grpc_answer(Some(bytes), 0, ""),
        Err(e) => grpc_answer(None, 13, &e),
    }
}

/// A gRPC answer: HTTP 200, the message (if any), status in trailers.
fn grpc_answer(message: Option<Bytes>, code: u8, text: &str) -> Response<GrpcBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if !text.is_empty() {
        // grpc-message is percent-encoded; keep it to safe characters.
        let safe: String = text
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&safe) {
            trailers.insert("grpc-message", v);
        }
    }
    let body = Full::new(message.unwrap_or_default())
        .with_trailers(std::future::ready(Some(Ok(trailers))));
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    r
}

/// Asks inventory (at `target`) how many of `sku` are left.
async fn stock(target: &Target, sku: u32) -> Result<u32, String> {
    let exchange = async {
        let mut s = target.connect().await?;
        s.write_all(format!("STOCK {sku}\n").as_bytes())
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let mut line = String::new();
        BufReader::new(s)
            .take(MAX_LINE)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        let answer = line.trim_end();
        match answer.split_once(' ') {
            Some((got, n)) if got == sku.to_string() => n
                .parse::<u32>()
                .map_err(|_| format!("bad answer {answer:?}")),
            _ if answer.is_empty() => Err("connection closed without an answer".to_owned()),
            _ => Err(format!("bad answer {answer:?}")),
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {}s", CALL_TIMEOUT.as_secs()))?
}

// ----------------------------------------------------------------- inventory

/// Serves the inventory line protocol on `listener`.
pub(super) fn inventory(listener: TcpListener) {
    serve(listener, |stream| async move {
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        loop {
            let mut line = String::new();
            match (&mut read).take(MAX_LINE).read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let answer = match line.trim_end().split_once(' ') {
                Some(("STOCK", sku)) => match sku.parse::<u32>() {
                    // A made-up, stable stock level per product.
                    Ok(n) => format!("{n} {}\n", (n * 7 + 3) % 40),
                    Err(_) => "ERR sku must be a number\n".to_owned(),
                },
                _ => "ERR expected: STOCK <sku>\n".to_owned(),
            };
            if write.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    });
}

// -------------------------------------------------------------------- common

/// Accepts connections on `listener` forever, one task each.
fn serve<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream));
                }
                // Out of descriptors and the like: wait, do not spin.
                Err(e) => {
                    tracing::warn!(error = %e, "demo app: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

/// One length-prefixed gRPC message (uncompressed).
fn frame(msg: &impl prost::Message) -> Result<Bytes, String> {
    let body = msg.encode_to_vec();
    let len = u32::try_from(body.len()).map_err(|_| "message too large".to_owned())?;
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(Bytes::from(out))
}

/// The one message of a unary gRPC body.
fn unframe(buf: &[u8]) -> Result<&[u8], String> {
    let Some((head, rest)) = buf.split_first_chunk::<5>() else {
        return Err(format!("gRPC body of {} bytes is too short", buf.len()));
    };
    if head[0] != 0 {
        return Err("compressed gRPC messages are not supported".to_owned());
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if rest.len() != len {
        return Err(format!(
            "gRPC message says {len} bytes, body has {}",
            rest.len()
        ));
    }
    Ok(rest)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_frames_are_errors() {
        let item = Item {
            sku: 3,
            name: "cortado".into(),
            stock: 24,
            version: "v2".into(),
            instance: "catalog-v2-0".into(),
        };
        let f = frame(&item).unwrap();
        assert_eq!(Item::decode(unframe(&f).unwrap()).unwrap(), item);
        assert!(unframe(&f[..3]).is_err());
        assert!(unframe(&f[..f.len() - 1]).is_err());
        let mut compressed = f.to_vec();
        compressed[0] = 1;
        assert!(unframe(&compressed).is_err());
    }
}
