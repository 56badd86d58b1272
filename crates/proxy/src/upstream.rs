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
//! connection.
//!
//! Circuit breaking: [`Pools::lease_for`] takes the cluster's
//! [`Breaker`] and applies its `connections` and
//! `pending_requests` limits (the exact counting rules are in the
//! `breaker` module doc). Every connection's task holds a
//! [`ConnToken`] for as long as the connection is
//! open, so the counts follow real sockets. Non-goals: per-endpoint
//! connection limits.

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
use crate::breaker::{Breaker, ConnToken, Guard, Overflow, PoolCounters};
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
    /// A circuit breaker limit of the cluster (nothing was sent).
    #[error(transparent)]
    Overflow(Overflow),
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
            Self::Overflow(_) => ResponseFlag::UpstreamOverflow,
        }
    }

    /// The HTTP/2 stream was refused (`REFUSED_STREAM`): the upstream did
    /// not process the request.
    pub fn is_refused_stream(&self) -> bool {
        let Self::Reset { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(e) = cause {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            cause = e.source();
        }
        false
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
    /// Open connections of the endpoint; woken when one comes free.
    counters: Arc<PoolCounters>,
}

#[derive(Debug)]
struct IdleConn {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

#[derive(Debug, Default)]
struct H2Slot {
    /// The endpoint's connection, while it is open.
    ready: Mutex<Option<http2::SendRequest<Body>>>,
    /// Held by the one request that establishes the connection.
    connecting: tokio::sync::Mutex<()>,
    counters: Arc<PoolCounters>,
}

impl H2Slot {
    fn ready(&self) -> Option<http2::SendRequest<Body>> {
        lock(&self.ready)
            .as_ref()
            .filter(|s| !s.is_closed())
            .cloned()
    }
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
#[derive(Debug)]
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
        drop(idle);
        // Requests waiting for a connection of this endpoint may take it.
        self.pool.counters.changed.notify_waiters();
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
    /// is still usable, else a new one. No circuit breaking.
    pub async fn lease(&self, target: &Target) -> Result<Lease, UpstreamError> {
        self.lease_for(target, None).await
    }

    /// A new connection for one request (upgrades, and the retry after a
    /// stale pooled connection); HTTP/1.1 ones join the pool afterwards.
    pub async fn lease_fresh(&self, target: &Target) -> Result<Lease, UpstreamError> {
        self.lease_fresh_for(target, None).await
    }

    /// Like [`Pools::lease`], within the `connections` and
    /// `pending_requests` limits of `breaker` (the cluster's): at the
    /// connection limit an HTTP/1.1 request waits for a connection of its
    /// endpoint to come free or for a slot; a full pending queue fails with
    /// [`UpstreamError::Overflow`]. Callers bound the wait with their
    /// timeouts.
    pub async fn lease_for(
        &self,
        target: &Target,
        breaker: Option<&Arc<Breaker>>,
    ) -> Result<Lease, UpstreamError> {
        if target.http2 {
            return self.lease_h2(target, breaker).await.map(Lease::Http2);
        }
        self.lease_h1(target, breaker, true).await
    }

    /// Like [`Pools::lease_fresh`], within the limits of `breaker`.
    pub async fn lease_fresh_for(
        &self,
        target: &Target,
        breaker: Option<&Arc<Breaker>>,
    ) -> Result<Lease, UpstreamError> {
        if target.http2 {
            return self.lease_h2(target, breaker).await.map(Lease::Http2);
        }
        self.lease_h1(target, breaker, false).await
    }

    async fn lease_h1(
        &self,
        target: &Target,
        breaker: Option<&Arc<Breaker>>,
        reuse: bool,
    ) -> Result<Lease, UpstreamError> {
        let pool = self.h1_pool(target);
        // Held while this request waits for a connection (connecting
        // included, as Envoy counts it).
        let mut pending: Option<Guard> = None;
        loop {
            // Created before looking, so a connection freed in between still
            // wakes this request: both are only ever signalled with
            // `notify_waiters`, which a `Notified` receives from its
            // creation on. Not `enable`d: that would take both locks (one
            // shared by the whole cluster) on every request, waiting or not.
            let changed = pool.counters.changed.notified();
            tokio::pin!(changed);
            let mut freed = std::pin::pin!(breaker.map(|b| b.freed()));

            if reuse {
                if let Some(lease) = take_idle(&pool, target).await {
                    return Ok(lease);
                }
            }
            let slot = match breaker {
                None => Some(None),
                // An endpoint without any connection may always open one.
                Some(b) => b.try_connection(pool.counters.open() == 0).map(Some),
            };
            if pending.is_none() {
                if let Some(b) = breaker {
                    pending = Some(b.try_pending().map_err(UpstreamError::Overflow)?);
                }
            }
            if let Some(slot) = slot {
                let token = pool.counters.token(slot);
                let sender = self.connect_h1(target, token).await?;
                return Ok(Lease::Http1 {
                    sender,
                    returner: Returner { pool: pool.clone() },
                    reused: false,
                });
            }
            tracing::debug!(addr = %target.addr, "at the cluster's connection limit: waiting for a connection");
            match freed.as_mut().as_pin_mut() {
                Some(f) => {
                    tokio::select! {
                        () = &mut changed => {}
                        () = f => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    fn h1_pool(&self, target: &Target) -> Arc<H1Pool> {
        lock(&self.h1).entry(key(target)).or_default().clone()
    }

    async fn lease_h2(
        &self,
        target: &Target,
        breaker: Option<&Arc<Breaker>>,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let slot = lock(&self.h2).entry(key(target)).or_default().clone();
        if let Some(sender) = slot.ready() {
            return Ok(sender);
        }
        // No open connection: this request waits while one is established
        // (by it, or by another request that got there first).
        let _pending = breaker
            .map(|b| b.try_pending())
            .transpose()
            .map_err(UpstreamError::Overflow)?;
        let _connecting = slot.connecting.lock().await;
        if let Some(sender) = slot.ready() {
            return Ok(sender);
        }
        // One connection per endpoint: the endpoint has none, so it may
        // always open one (it still counts).
        let token = slot
            .counters
            .token(breaker.and_then(|b| b.try_connection(true)));
        let sender = self.connect_h2(target, token).await?;
        *lock(&slot.ready) = Some(sender.clone());
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
        lock(&self.h2)
            .retain(|_, slot| slot.ready().is_some() || slot.connecting.try_lock().is_err());
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

    async fn connect_h1(
        &self,
        target: &Target,
        token: ConnToken,
    ) -> Result<http1::SendRequest<Body>, UpstreamError> {
        match self.transport(target).await? {
            Transport::Plain(s) => handshake_h1(target.addr, s, token).await,
            Transport::Tls(s) => handshake_h1(target.addr, *s, token).await,
        }
    }

    async fn connect_h2(
        &self,
        target: &Target,
        token: ConnToken,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        match self.transport(target).await? {
            Transport::Plain(s) => handshake_h2(target.addr, s, token).await,
            Transport::Tls(s) => handshake_h2(target.addr, *s, token).await,
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

/// The connection's task holds `token` until the connection closes.
async fn handshake_h1<IO>(
    addr: SocketAddr,
    io: IO,
    token: ConnToken,
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
        drop(token);
    });
    Ok(sender)
}

async fn handshake_h2<IO>(
    addr: SocketAddr,
    io: IO,
    token: ConnToken,
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
        drop(token);
    });
    Ok(sender)
}

/// The most recently pooled connection of `pool` that is still usable.
async fn take_idle(pool: &Arc<H1Pool>, target: &Target) -> Option<Lease> {
    loop {
        let candidate = lock(&pool.idle).pop();
        let mut conn = candidate?;
        if conn.sender.is_closed() || expired(conn.since, target.idle_timeout) {
            continue;
        }
        if usable(&mut conn.sender).await {
            return Some(Lease::Http1 {
                sender: conn.sender,
                returner: Returner { pool: pool.clone() },
                reused: true,
            });
        }
    }
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
