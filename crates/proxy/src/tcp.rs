//! The opaque TCP path: pick a weighted cluster and an endpoint, connect,
//! replay the bytes detection read, then copy both ways until either side
//! closes or the connection has been idle too long.
//!
//! Transparent capture adds two cluster shapes: an ORIGINAL_DST cluster
//! (`PassthroughCluster`) connects to the connection's original destination
//! instead of an endpoint; a STATIC cluster without endpoints
//! (`BlackHoleCluster`) refuses the connection, counted as a TCP connection
//! to that destination and access-logged with `UH`, as Envoy does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::accesslog::{AccessLogEntry, Protocol, ResponseFlag};
use crate::balance::Outcome;
use crate::config::model::TcpProxy;
use crate::metrics::{Event, TcpSeries};
use crate::router;
use crate::shared::{Direction, Shared};
use crate::tls::IntoHalves;

/// Runs the chain's RBAC filters on a new connection (source identity and
/// port only: no HTTP attributes). Counts the decision; a denial is
/// access-logged with the `RBAC` flag. Returns whether to proceed.
pub fn authorize(
    shared: &Arc<Shared>,
    tcp: &TcpProxy,
    direction: Direction,
    peer: SocketAddr,
    peer_identity: Option<&str>,
) -> bool {
    let Some(authz) = &tcp.authz else {
        return true;
    };
    let decision = authz.evaluate(&crate::authz::Input {
        peer_identity,
        http: None,
    });
    let destination = match direction {
        Direction::Inbound => shared.local_service(),
        Direction::Outbound => Arc::new(tcp.stat_prefix.clone()),
    };
    shared.record_authz(direction, &destination, &decision);
    if decision.allowed {
        return true;
    }
    let reason = crate::http::denial_reason(&decision);
    tracing::debug!(%peer, %reason, "TCP connection denied by authorization policy");
    if shared.access_log_enabled() {
        let mut entry = AccessLogEntry::new(direction, Protocol::Tcp, std::time::SystemTime::now());
        entry.downstream_remote = Some(peer);
        entry.downstream_peer_principal = peer_identity.map(str::to_owned);
        entry.source_service = Some(shared.source_service(direction).to_string());
        entry.destination_service = Some(destination.to_string());
        entry.response_flags = vec![ResponseFlag::RbacDenied];
        entry.reason = Some(reason);
        shared.access_log(entry);
    }
    false
}

/// Proxies one downstream connection (plain TCP, or mTLS terminated by the
/// listener with the verified `principal`). `prefix` holds bytes already read.
/// `original_dst`: where a captured connection was going (what an
/// ORIGINAL_DST cluster connects to).
#[allow(clippy::too_many_arguments)]
pub async fn proxy<D: IntoHalves>(
    shared: Arc<Shared>,
    tcp: &TcpProxy,
    direction: Direction,
    prefix: Bytes,
    downstream: D,
    peer: SocketAddr,
    principal: Option<&str>,
    original_dst: Option<SocketAddr>,
) {
    let start = Instant::now();
    let wall = std::time::SystemTime::now();
    let rt = shared.runtime();
    let mut entry = AccessLogEntry::new(direction, Protocol::Tcp, wall);
    entry.downstream_remote = Some(peer);
    entry.downstream_peer_principal = principal.map(str::to_owned);
    entry.source_service = Some(shared.source_service(direction).to_string());
    let outcome = async {
        let wc = router::pick_cluster(&tcp.clusters, fastrand::u64(..)).ok_or_else(|| {
            (
                ResponseFlag::NoCluster,
                format!("{} has no backend with a non-zero weight", tcp.stat_prefix),
            )
        })?;
        entry.upstream_cluster = Some(wc.name.clone());
        let cluster = rt.cluster(&wc.name).ok_or_else(|| {
            (
                ResponseFlag::NoCluster,
                format!("cluster {:?} is not loaded", wc.name),
            )
        })?;
        entry.destination_service = cluster.config.service.clone().or(Some(wc.name.clone()));
        if cluster.config.original_dst {
            let Some(addr) = original_dst else {
                return Err((
                    ResponseFlag::NoHealthyUpstream,
                    format!(
                        "cluster {} (ORIGINAL_DST) needs the connection's original destination, and it has none",
                        wc.name
                    ),
                ));
            };
            return passthrough(
                &shared, cluster, tcp, direction, downstream, prefix, addr, principal,
                &mut entry,
            )
            .await;
        }
        if cluster.config.static_endpoints.is_some() && cluster.endpoints.localities.is_empty() {
            let dest = entry.destination_service.as_deref().unwrap_or(&wc.name);
            let series = shared.tcp_series(direction, dest, principal);
            series.opened();
            series.closed();
            return Err((
                ResponseFlag::NoHealthyUpstream,
                format!(
                    "cluster {} has no endpoints (a blackhole): connection refused{}",
                    wc.name,
                    match original_dst {
                        Some(a) => format!(" (original destination {a}, outside the mesh)"),
                        None => String::new(),
                    }
                ),
            ));
        }
        let pick = cluster.balancer.pick(None).ok_or_else(|| {
            (
                ResponseFlag::NoHealthyUpstream,
                format!(
                    "cluster {} has no healthy endpoint (none known, or all failing health checks or ejected)",
                    wc.name
                ),
            )
        })?;
        let addr = pick.address();
        entry.upstream_host = Some(addr);
        // `connectionPool.maxConnections` (Envoy's tcp_proxy checks the
        // cluster's connection limit too): one slot for the connection's life.
        let Some(_connection_slot) = cluster.breaker.try_connection(false) else {
            let dest = entry.destination_service.as_deref().unwrap_or(&wc.name);
            shared
                .metrics
                .event(Event::Overflow, dest, "connections")
                .inc();
            return Err((
                ResponseFlag::UpstreamOverflow,
                format!(
                    "upstream overflow: {} connections are open to cluster {} (limit connections); raise connectionPool.maxConnections in the destination's TrafficPolicy",
                    cluster.breaker.status().connections,
                    wc.name
                ),
            ));
        };
        let connect =
            tokio::time::timeout(cluster.config.connect_timeout, TcpStream::connect(addr)).await;
        let upstream = match connect {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                pick.failed();
                pick.report(Outcome::ConnectFailure);
                return Err((
                    ResponseFlag::UpstreamConnectFailure,
                    format!("connecting to {addr} failed: {e}"),
                ));
            }
            Err(_) => {
                pick.failed();
                pick.report(Outcome::ConnectFailure);
                return Err((
                    ResponseFlag::UpstreamConnectFailure,
                    format!("connecting to {addr} timed out"),
                ));
            }
        };
        let _ = upstream.set_nodelay(true);
        downstream.nodelay();
        let upstream = match cluster.upstream_tls(addr) {
            None => Upstream::Plain(upstream),
            Some(tls) => match crate::tls::connect(
                tls.client.clone(),
                addr,
                upstream,
                cluster.config.connect_timeout,
            )
            .await
            {
                Ok(s) => {
                    entry.upstream_peer_principal = tls.expected_ids.first().cloned();
                    Upstream::Tls(Box::new(s))
                }
                Err(e) => {
                    pick.failed();
                    pick.report(Outcome::ConnectFailure);
                    shared
                        .metrics
                        .tls_handshake_failed(Direction::Outbound, e.reason);
                    return Err((
                        ResponseFlag::UpstreamConnectFailure,
                        format!("mTLS handshake with {addr} failed: {e}"),
                    ));
                }
            },
        };
        pick.complete(start.elapsed());
        // A connection that opens is a success for outlier detection, as
        // Envoy's TCP proxy reports it.
        pick.report(Outcome::Status(200));
        let series = shared.tcp_series(
            direction,
            entry.destination_service.as_deref().unwrap_or("unknown"),
            principal,
        );
        series.opened();
        let (received, sent) = match upstream {
            Upstream::Plain(u) => copy_both(downstream, u, prefix, tcp.idle_timeout, &series).await,
            Upstream::Tls(u) => copy_both(downstream, *u, prefix, tcp.idle_timeout, &series).await,
        };
        series.closed();
        drop(pick);
        Ok((received, sent))
    }
    .await;
    match outcome {
        Ok((received, sent)) => {
            entry.bytes_received = received;
            entry.bytes_sent = sent;
        }
        Err((flag, reason)) => {
            tracing::debug!(%peer, flag = flag.code(), %reason, "TCP connection refused");
            entry.response_flags = vec![flag];
            entry.reason = Some(reason);
        }
    }
    entry.duration = start.elapsed();
    if shared.access_log_enabled() {
        shared.access_log(entry);
    }
}

/// An ORIGINAL_DST cluster: plain TCP to `addr`, the connection's original
/// destination, within the cluster's connection limit and connect timeout.
/// Metrics and access log name the cluster (`PassthroughCluster`) as the
/// destination.
#[allow(clippy::too_many_arguments)]
async fn passthrough<D: IntoHalves>(
    shared: &Arc<Shared>,
    cluster: &crate::runtime::ClusterState,
    tcp: &TcpProxy,
    direction: Direction,
    downstream: D,
    prefix: Bytes,
    addr: SocketAddr,
    principal: Option<&str>,
    entry: &mut AccessLogEntry,
) -> Result<(u64, u64), (ResponseFlag, String)> {
    entry.upstream_host = Some(addr);
    let dest = entry
        .destination_service
        .clone()
        .unwrap_or_else(|| cluster.config.name.clone());
    let Some(_connection_slot) = cluster.breaker.try_connection(false) else {
        shared
            .metrics
            .event(Event::Overflow, &dest, "connections")
            .inc();
        return Err((
            ResponseFlag::UpstreamOverflow,
            format!(
                "upstream overflow: {} connections are open to cluster {} (limit connections)",
                cluster.breaker.status().connections,
                cluster.config.name
            ),
        ));
    };
    let upstream = match tokio::time::timeout(
        cluster.config.connect_timeout,
        TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err((
                ResponseFlag::UpstreamConnectFailure,
                format!("passthrough to original destination {addr} failed: {e}"),
            ))
        }
        Err(_) => {
            return Err((
                ResponseFlag::UpstreamConnectFailure,
                format!("passthrough to original destination {addr} timed out"),
            ))
        }
    };
    let _ = upstream.set_nodelay(true);
    downstream.nodelay();
    let series = shared.tcp_series(direction, &dest, principal);
    series.opened();
    let counts = copy_both(downstream, upstream, prefix, tcp.idle_timeout, &series).await;
    series.closed();
    Ok(counts)
}

/// A connected upstream.
enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Copies until both directions have closed, or no byte moved for `idle`.
/// Returns (bytes downstream -> upstream, bytes upstream -> downstream).
async fn copy_both<D: IntoHalves, U: IntoHalves>(
    downstream: D,
    upstream: U,
    prefix: Bytes,
    idle: Option<Duration>,
    series: &Arc<TcpSeries>,
) -> (u64, u64) {
    let (down_r, down_w) = downstream.into_halves();
    let (up_r, mut up_w) = upstream.into_halves();
    if !prefix.is_empty() {
        if up_w.write_all(&prefix).await.is_err() {
            return (0, 0);
        }
        series.received(prefix.len() as u64);
    }
    let epoch = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let up_bytes = Arc::new(AtomicU64::new(prefix.len() as u64));
    let down_bytes = Arc::new(AtomicU64::new(0));
    // Counted as bytes move, so /metrics is current for long connections.
    let to_up = pipe(
        down_r,
        up_w,
        up_bytes.clone(),
        activity.clone(),
        epoch,
        |n| series.received(n),
    );
    let to_down = pipe(
        up_r,
        down_w,
        down_bytes.clone(),
        activity.clone(),
        epoch,
        |n| series.sent(n),
    );
    let both = async { tokio::join!(to_up, to_down) };
    let watchdog = async {
        let Some(idle) = idle.filter(|d| !d.is_zero()) else {
            return std::future::pending::<()>().await;
        };
        loop {
            let last = Duration::from_millis(activity.load(Ordering::Relaxed));
            let deadline = epoch + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        _ = both => {}
        () = watchdog => tracing::debug!("TCP connection idle timeout"),
    }
    (
        up_bytes.load(Ordering::Relaxed),
        down_bytes.load(Ordering::Relaxed),
    )
}

async fn pipe<R, W>(
    mut from: R,
    mut to: W,
    total: Arc<AtomicU64>,
    activity: Arc<AtomicU64>,
    epoch: Instant,
    count: impl Fn(u64),
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
        count(n as u64);
        activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}
