//! Connections to upstream endpoints: an HTTP/1.1 pool of idle keep-alive
//! connections and one multiplexed HTTP/2 connection per endpoint.
//!
//! Pools are keyed by endpoint address and protocol, shared by every cluster
//! that lists the endpoint, and survive config updates, so a reload does not
//! reconnect. An HTTP/1.1 connection goes back to its pool only once its
//! response body has been read to the end (see [`Returner`]); idle ones are
//! closed after the cluster's idle timeout. Connections to mTLS endpoints
//! do a TLS 1.3 handshake with the cluster's cached client config (ALPN h2
//! or http/1.1 by the cluster's protocol); pools are keyed by address,
//! protocol and TLS settings, so plaintext and mTLS never share a
//! connection. Non-goals: per-endpoint connection limits (circuit breaking
//! comes with TrafficPolicy).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::accesslog::ResponseFlag;
use crate::body::Body;
use crate::config::model::UpstreamTls;

/// Why an upstream request failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection to {addr} refused")]
    ConnectRefused { addr: SocketAddr },
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("connecting to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("upstream {addr} reset the request: {source}")]
    Reset {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("upstream {addr}: a fresh connection was not HTTP/1.1")]
    Protocol { addr: SocketAddr },
    #[error("mTLS handshake with {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: crate::tls::HandshakeError,
    },
}

impl UpstreamError {
    /// Envoy-style response flag.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Self::ConnectRefused { .. }
            | Self::ConnectTimeout { .. }
            | Self::Connect { .. }
            | Self::Tls { .. } => ResponseFlag::UpstreamConnectFailure,
            Self::Handshake { .. } | Self::Reset { .. } | Self::Protocol { .. } => {
                ResponseFlag::UpstreamReset
            }
        }
    }

    /// Nothing reached the upstream application, so a retry is safe.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            Self::ConnectRefused { .. }
                | Self::ConnectTimeout { .. }
                | Self::Connect { .. }
                | Self::Tls { .. }
        )
    }
}

/// How to reach one endpoint.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub http2: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// mTLS to this endpoint (the cluster's cached client config).
    pub tls: Option<Arc<UpstreamTls>>,
}

/// Pool key: address and TLS settings (`None`: plaintext).
type PoolKey = (SocketAddr, Option<Arc<str>>);

/// All upstream pools of a proxy.
#[derive(Debug, Default)]
pub struct Pools {
    h1: Mutex<HashMap<PoolKey, Arc<H1Pool>>>,
    h2: Mutex<HashMap<PoolKey, Arc<H2Slot>>>,
    /// Where failed mTLS handshakes are counted.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

#[derive(Debug, Default)]
struct H1Pool {
    idle: Mutex<Vec<IdleConn>>,
}

#[derive(Debug)]
struct IdleConn {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

#[derive(Debug, Default)]
struct H2Slot {
    conn: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
}

/// A connection lent for one request.
#[derive(Debug)]
pub enum Lease {
    Http1 {
        sender: Http1Sender,
        returner: Returner,
        /// Taken from the idle pool (it may have gone stale meanwhile).
        reused: bool,
    },
    Http2(http2::SendRequest<Body>),
}

/// The sending half of an upstream HTTP/1.1 connection.
pub type Http1Sender = http1::SendRequest<Body>;

/// Puts an HTTP/1.1 connection back into its pool once its response is done.
/// Holding the pool keeps the sweeper from forgetting it while connections
/// of it are lent out.
#[derive(Debug, Clone)]
pub struct Returner {
    pool: Arc<H1Pool>,
}

impl Returner {
    pub fn give_back(&self, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.pool.idle);
        // Bound idle connections per endpoint; beyond that, close.
        if idle.len() < 1024 {
            idle.push(IdleConn {
                sender,
                since: Instant::now(),
            });
        }
    }
}

impl Pools {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Pools that count failed mTLS handshakes in `metrics`.
    pub fn with_metrics(metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics: Some(metrics),
            ..Self::default()
        })
    }

    /// A connection ready to take one request: an idle pooled one if any
    /// is still usable, else a new one.
    pub async fn lease(&self, target: &Target) -> Result<Lease, UpstreamError> {
        if target.http2 {
            return self.lease_h2(target).await.map(Lease::Http2);
        }
        let pool = self.h1_pool(target);
        loop {
            let candidate = lock(&pool.idle).pop();
            let Some(mut conn) = candidate else { break };
            if conn.sender.is_closed() || expired(conn.since, target.idle_timeout) {
                continue;
            }
            if usable(&mut conn.sender).await {
                return Ok(Lease::Http1 {
                    sender: conn.sender,
                    returner: Returner { pool },
                    reused: true,
                });
            }
        }
        self.lease_fresh(target).await
    }

    /// A new connection for one request (upgrades, and the retry after a
    /// stale pooled connection); HTTP/1.1 ones join the pool afterwards.
    pub async fn lease_fresh(&self, target: &Target) -> Result<Lease, UpstreamError> {
        if target.http2 {
            return self.lease_h2(target).await.map(Lease::Http2);
        }
        let pool = self.h1_pool(target);
        let sender = self.connect_h1(target).await?;
        Ok(Lease::Http1 {
            sender,
            returner: Returner { pool },
            reused: false,
        })
    }

    fn h1_pool(&self, target: &Target) -> Arc<H1Pool> {
        lock(&self.h1).entry(key(target)).or_default().clone()
    }

    async fn lease_h2(&self, target: &Target) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let slot = lock(&self.h2).entry(key(target)).or_default().clone();
        let mut conn = slot.conn.lock().await;
        if let Some(sender) = conn.as_ref() {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        let sender = self.connect_h2(target).await?;
        *conn = Some(sender.clone());
        Ok(sender)
    }

    /// Closes idle HTTP/1.1 connections past their timeout and forgets empty
    /// pools. Called periodically.
    pub fn sweep(&self, idle_timeout: Duration) {
        let mut h1 = lock(&self.h1);
        h1.retain(|_, pool| {
            let mut idle = lock(&pool.idle);
            idle.retain(|c| !c.sender.is_closed() && !expired(c.since, Some(idle_timeout)));
            !idle.is_empty() || Arc::strong_count(pool) > 1
        });
        drop(h1);
        lock(&self.h2).retain(|_, slot| match slot.conn.try_lock() {
            Ok(conn) => conn.as_ref().is_some_and(|s| !s.is_closed()),
            Err(_) => true,
        });
    }
}

/// A TCP connection to `target` within its connect timeout.
pub(crate) async fn connect(target: &Target) -> Result<TcpStream, UpstreamError> {
    let addr = target.addr;
    let stream = match tokio::time::timeout(target.connect_timeout, TcpStream::connect(addr)).await
    {
        Err(_) => {
            return Err(UpstreamError::ConnectTimeout {
                addr,
                timeout: target.connect_timeout,
            })
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(UpstreamError::ConnectRefused { addr })
        }
        Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
        Ok(Ok(s)) => s,
    };
    // Latency matters more than packet count for proxied request/response.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

impl Pools {
    /// The transport to `target`: plain TCP, or mTLS for mTLS endpoints.
    async fn transport(&self, target: &Target) -> Result<Transport, UpstreamError> {
        let stream = connect(target).await?;
        let Some(tls) = &target.tls else {
            return Ok(Transport::Plain(stream));
        };
        match crate::tls::connect(
            tls.client.clone(),
            target.addr,
            stream,
            target.connect_timeout,
        )
        .await
        {
            Ok(s) => Ok(Transport::Tls(Box::new(s))),
            Err(source) => {
                tracing::debug!(addr = %target.addr, reason = source.reason, error = %source.detail, "upstream mTLS handshake failed");
                if let Some(m) = &self.metrics {
                    m.tls_handshake_failed(crate::metrics::Direction::Outbound, source.reason);
                }
                Err(UpstreamError::Tls {
                    addr: target.addr,
                    source,
                })
            }
        }
    }

    async fn connect_h1(&self, target: &Target) -> Result<http1::SendRequest<Body>, UpstreamError> {
        match self.transport(target).await? {
            Transport::Plain(s) => handshake_h1(target.addr, s).await,
            Transport::Tls(s) => handshake_h1(target.addr, *s).await,
        }
    }

    async fn connect_h2(&self, target: &Target) -> Result<http2::SendRequest<Body>, UpstreamError> {
        match self.transport(target).await? {
            Transport::Plain(s) => handshake_h2(target.addr, s).await,
            Transport::Tls(s) => handshake_h2(target.addr, *s).await,
        }
    }
}

/// A connected upstream stream.
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

fn key(target: &Target) -> PoolKey {
    (target.addr, target.tls.as_ref().map(|t| t.pool_key.clone()))
}

async fn handshake_h1<IO>(
    addr: SocketAddr,
    io: IO,
) -> Result<http1::SendRequest<Body>, UpstreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    // Flattened writes, as downstream (see listener.rs).
    let (sender, conn) = http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
        }
    });
    Ok(sender)
}

async fn handshake_h2<IO>(
    addr: SocketAddr,
    io: IO,
) -> Result<http2::SendRequest<Body>, UpstreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .keep_alive_interval(Duration::from_secs(30));
    let (sender, conn) = builder
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

/// Whether a pooled connection can take a request now. One yield lets its
/// connection task finish the previous exchange; a connection still busy
/// after that (its request body is still being written because the upstream
/// answered early) is dropped rather than waited for.
async fn usable(sender: &mut http1::SendRequest<Body>) -> bool {
    for attempt in 0..2 {
        let ready = std::future::poll_fn(|cx| std::task::Poll::Ready(sender.poll_ready(cx))).await;
        match ready {
            std::task::Poll::Ready(r) => return r.is_ok(),
            std::task::Poll::Pending if attempt == 0 => tokio::task::yield_now().await,
            std::task::Poll::Pending => {}
        }
    }
    false
}

fn expired(since: Instant, timeout: Option<Duration>) -> bool {
    timeout.is_some_and(|t| since.elapsed() >= t)
}

/// Locks a std mutex, recovering from poisoning: the data inside (idle
/// connection lists) stays valid even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
