//! Listeners: bind, accept, detect the protocol, and hand each connection to
//! the HTTP connection manager or the TCP proxy.
//!
//! A [`ListenerSet`] follows the config: a listener whose address is
//! unchanged keeps its socket and only swaps its filter chains (new
//! connections see them; open ones finish with what they had); a new address
//! is bound before anything else changes, so a config that cannot be bound is
//! refused as a whole; a removed listener stops accepting and drains.
//! A listener with `additional_addresses` has one socket (and accept loop)
//! per address, all serving the same chains; each address is kept, bound or
//! drained on its own. An additional `[::1]` or `[::]` (a capture listener's
//! IPv6 twin) that the host cannot bind because it has no IPv6 is skipped
//! with a warning instead of refusing the config; any other address that
//! cannot be bound refuses it, as Envoy does.
//!
//! Transparent capture: a `use_original_dst` listener reads each accepted
//! connection's original destination (`SO_ORIGINAL_DST`, set by an iptables
//! REDIRECT). Addressed to the listener itself (explicit mode, or no
//! redirect): its own chains. Addressed elsewhere: the chains of the
//! `bind_to_port: false` listener at that address (exact ip:port, then
//! `0.0.0.0:port` or `[::]:port`), served exactly as if it had accepted the connection;
//! no such listener: the listener's captured default chain (passthrough to
//! the original destination, or a blackhole).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::config::model::{Listener, ListenerTls};
use crate::detect::{self, Protocol};
use crate::drain;
use crate::http::{self as proxy_http, ConnCtx};
use crate::metrics::ListenerSeries;
use crate::rewind::Rewind;
use crate::shared::{Direction, Shared};
use crate::tcp;

/// How long detection waits when a listener has an HTTP chain but no
/// `http_inspector` bound (the connection manager must still tell HTTP/1.1
/// from HTTP/2).
const SNIFF_WITHOUT_INSPECTOR: Duration = Duration::from_secs(60);
/// How long a removed listener's connections get to finish.
const LISTENER_DRAIN: Duration = Duration::from_secs(30);

/// Why a set of listeners could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("listener {name:?}: cannot bind {address}: {source}; pick a free address or stop whatever uses it")]
pub struct BindError {
    pub name: String,
    pub address: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// The running listeners of one proxy.
#[derive(Debug)]
pub struct ListenerSet {
    shared: Arc<Shared>,
    global: drain::Watch,
    running: HashMap<String, Running>,
    /// The `bind_to_port: false` listeners, by address: where
    /// `use_original_dst` listeners hand captured connections.
    unbound: Arc<ArcSwap<Unbound>>,
}

/// The `bind_to_port: false` listeners of the current config, by address.
type Unbound = HashMap<SocketAddr, Handoff>;

/// A listener that takes connections handed over by a `use_original_dst` one.
#[derive(Debug)]
struct Handoff {
    name: String,
    config: Arc<Listener>,
    series: Arc<ListenerSeries>,
}

/// Sockets bound for an update that is not committed yet.
#[derive(Debug)]
pub struct Bound {
    fresh: Vec<Fresh>,
}

/// The new sockets of one listener.
#[derive(Debug)]
struct Fresh {
    name: String,
    config: Arc<Listener>,
    /// Configured address and its socket.
    sockets: Vec<(SocketAddr, TcpListener)>,
    /// Additional addresses that cannot be bound here (no IPv6).
    skipped: Vec<SocketAddr>,
}

/// A bound listener: one accept loop per address, sharing the chains.
#[derive(Debug)]
struct Running {
    config: Arc<ArcSwap<Listener>>,
    sockets: Vec<Socket>,
    /// Additional addresses skipped when they were bound (no IPv6): not
    /// retried, and not warned about again, while the config keeps them.
    skipped: Vec<SocketAddr>,
}

#[derive(Debug)]
struct Socket {
    configured: SocketAddr,
    bound: SocketAddr,
    stop: drain::Trigger,
}

impl Running {
    /// Whether `addr` has a socket here.
    fn listens(&self, addr: SocketAddr) -> bool {
        self.sockets.iter().any(|s| s.configured == addr)
    }

    /// Whether `addr`, as an additional address, needs no new socket: it
    /// has one, or it was skipped (no IPv6).
    fn has_additional(&self, addr: SocketAddr) -> bool {
        self.listens(addr) || self.skipped.contains(&addr)
    }
}

impl ListenerSet {
    pub fn new(shared: Arc<Shared>, global: drain::Watch) -> Self {
        Self {
            shared,
            global,
            running: HashMap::new(),
            unbound: Default::default(),
        }
    }

    /// Step one of an update: binds every new address of `wanted`'s bound
    /// listeners. On error nothing has changed; on success nothing has
    /// changed yet either, until [`ListenerSet::commit`].
    ///
    /// An additional `[::1]` or `[::]` that cannot be bound because the
    /// host has no IPv6 is skipped with a warning (a capture listener's IPv6
    /// twin must not keep an IPv4-only host from starting); every other
    /// failure refuses the update, a specific IPv6 address that is not here
    /// included. A primary `address` is bound unless it has a socket
    /// already, even if it was skipped as an additional address before.
    pub fn bind_new(&self, wanted: &HashMap<String, Arc<Listener>>) -> Result<Bound, BindError> {
        let mut fresh = Vec::new();
        for (name, l) in wanted.iter().filter(|(_, l)| l.bind_to_port) {
            let running = self.running.get(name);
            let mut f = Fresh {
                name: name.clone(),
                config: l.clone(),
                sockets: Vec::new(),
                skipped: Vec::new(),
            };
            let error = |address, source| BindError {
                name: name.clone(),
                address,
                source,
            };
            if !running.is_some_and(|r| r.listens(l.address)) {
                // Beside an IPv4 address of its own, `[::]` must leave IPv4 to it.
                let v6_only =
                    l.address.is_ipv6() && l.additional_addresses.iter().any(SocketAddr::is_ipv4);
                let socket = bind(l.address, v6_only).map_err(|e| error(l.address, e))?;
                f.sockets.push((l.address, socket));
            }
            let new = |a: &&SocketAddr| !running.is_some_and(|r| r.has_additional(**a));
            for &addr in l.additional_addresses.iter().filter(new) {
                match bind(addr, addr.is_ipv6()) {
                    Ok(socket) => f.sockets.push((addr, socket)),
                    Err(e) if skippable(addr, &e) => {
                        tracing::warn!(listener = %name, address = %addr, error = %e, "IPv6 is not available on this host: not listening on this additional address (IPv6 connections redirected to it are refused)");
                        f.skipped.push(addr);
                    }
                    Err(e) => return Err(error(addr, e)),
                }
            }
            if !f.sockets.is_empty() || !f.skipped.is_empty() {
                fresh.push(f);
            }
        }
        Ok(Bound { fresh })
    }

    /// Step two: makes the running listeners match `wanted`, starting the
    /// sockets `bound` holds, swapping the chains of listeners that stay and
    /// draining the ones (and the addresses) that are gone.
    pub fn commit(&mut self, wanted: &HashMap<String, Arc<Listener>>, bound: Bound) {
        let Bound { fresh } = bound;
        // Stop listeners that are gone or no longer bound.
        let stale: Vec<String> = self
            .running
            .keys()
            .filter(|name| wanted.get(*name).is_none_or(|l| !l.bind_to_port))
            .cloned()
            .collect();
        for name in stale {
            if let Some(r) = self.running.remove(&name) {
                for s in r.sockets {
                    tracing::info!(listener = %name, address = %s.bound, "listener removed; draining");
                    tokio::spawn(s.stop.drain(LISTENER_DRAIN));
                }
            }
        }
        // Hand-over targets first, so a capture listener started below
        // already sees them.
        let unbound: Unbound = wanted
            .iter()
            .filter(|(_, l)| !l.bind_to_port)
            .flat_map(|(name, l)| l.addresses().map(move |a| (a, name, l)))
            .map(|(address, name, l)| {
                (
                    address,
                    Handoff {
                        name: name.clone(),
                        config: l.clone(),
                        series: self.shared.metrics.listener(name),
                    },
                )
            })
            .collect();
        self.unbound.store(Arc::new(unbound));
        // Update the chains of the ones that stay; drain their moved addresses.
        for (name, l) in wanted.iter().filter(|(_, l)| l.bind_to_port) {
            if let Some(r) = self.running.get_mut(name) {
                r.config.store(l.clone());
                let (keep, gone): (Vec<Socket>, Vec<Socket>) = std::mem::take(&mut r.sockets)
                    .into_iter()
                    .partition(|s| l.addresses().any(|a| a == s.configured));
                r.sockets = keep;
                r.skipped.retain(|a| l.additional_addresses.contains(a));
                for s in gone {
                    tracing::info!(listener = %name, address = %s.bound, "address removed; draining");
                    tokio::spawn(s.stop.drain(LISTENER_DRAIN));
                }
            }
        }
        for f in fresh {
            let series = self.shared.metrics.listener(&f.name);
            let r = self
                .running
                .entry(f.name.clone())
                .or_insert_with(|| Running {
                    config: Arc::new(ArcSwap::new(f.config.clone())),
                    sockets: Vec::new(),
                    skipped: Vec::new(),
                });
            r.skipped.extend(f.skipped);
            for (configured, socket) in f.sockets {
                let bound = socket.local_addr().unwrap_or(configured);
                tracing::info!(listener = %f.name, address = %bound, "listening");
                let (stop, watch) = drain::channel();
                tokio::spawn(accept_loop(
                    self.shared.clone(),
                    f.name.clone(),
                    socket,
                    r.config.clone(),
                    Stops {
                        stop: watch,
                        global: self.global.clone(),
                    },
                    series.clone(),
                    self.unbound.clone(),
                ));
                r.sockets.push(Socket {
                    configured,
                    bound,
                    stop,
                });
            }
        }
    }

    /// Name and bound address of every listener (of its `address`; the
    /// additional addresses are logged when bound).
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<_> = self
            .running
            .iter()
            .filter_map(|(n, r)| {
                let primary = r.config.load().address;
                r.sockets
                    .iter()
                    .find(|s| s.configured == primary)
                    .map(|s| (n.clone(), s.bound))
            })
            .collect();
        v.sort();
        v
    }

    /// Stops accepting everywhere (the global drain tells connections).
    pub fn stop_accepting(&mut self) {
        for (_, r) in self.running.drain() {
            for s in r.sockets {
                s.stop.signal();
            }
        }
    }
}

/// Binds a listening socket; `v6_only`: IPv6 connections only, so an IPv4
/// socket of the same port can sit beside it (`[::]` next to `0.0.0.0`).
fn bind(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    let std = if v6_only {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        s.set_only_v6(true)?;
        // As std's bind does: restarting must not wait for TIME_WAIT.
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        std::net::TcpListener::from(s)
    } else {
        std::net::TcpListener::bind(addr)?
    };
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

/// Whether an additional address that failed to bind with `e` is skipped
/// rather than refusing the config: only the IPv6 twins `[::1]` and `[::]`
/// (which every capture listener gets), and only because the host has no
/// IPv6. Any other IPv6 address was asked for explicitly: if it is not
/// here, the config is wrong for this host.
fn skippable(addr: SocketAddr, e: &io::Error) -> bool {
    let twin = match addr.ip() {
        std::net::IpAddr::V6(ip) => ip.is_loopback() || ip.is_unspecified(),
        std::net::IpAddr::V4(_) => false,
    };
    twin && no_ipv6(e)
}

/// Whether a bind failed because the host has no IPv6: no IPv6 in the
/// kernel (EAFNOSUPPORT), or disabled / no such address here
/// (EADDRNOTAVAIL: `::1` is gone when `disable_ipv6` is set). Mesh DNS
/// binds its IPv6 twin by the same rule.
pub(crate) fn no_ipv6(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(EAFNOSUPPORT)
}

/// Linux's EAFNOSUPPORT (std has no `ErrorKind` for it).
const EAFNOSUPPORT: i32 = 97;

/// The drain signals of a listener: its own and the proxy's.
struct Stops {
    stop: drain::Watch,
    global: drain::Watch,
}

async fn accept_loop(
    shared: Arc<Shared>,
    name: String,
    socket: TcpListener,
    config: Arc<ArcSwap<Listener>>,
    stops: Stops,
    series: Arc<ListenerSeries>,
    unbound: Arc<ArcSwap<Unbound>>,
) {
    let Stops { stop, global } = stops;
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.signaled() => break,
            () = global.signaled() => break,
            a = socket.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, don't spin.
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let mut conn = Connection {
            shared: shared.clone(),
            name: name.clone(),
            config: config.load_full(),
            stop: stop.clone(),
            global: global.clone(),
            series: series.clone(),
        };
        // One span per connection: every log line of it names the listener
        // and the peer (free when debug logging is off).
        let span = tracing::debug_span!("conn", listener = %name, %peer);
        if conn.config.use_original_dst {
            if let Some(dst) = captured_destination(&stream) {
                let span =
                    tracing::debug_span!("conn", listener = %name, %peer, original_dst = %dst);
                match find_handoff(&unbound.load(), dst) {
                    Some(h) => {
                        conn.name = h.name.clone();
                        conn.config = h.config.clone();
                        conn.series = h.series.clone();
                        tokio::spawn(conn.serve(stream, peer).instrument(span));
                    }
                    None => {
                        tokio::spawn(conn.serve_captured(stream, peer, dst).instrument(span));
                    }
                }
                continue;
            }
        }
        tokio::spawn(conn.serve(stream, peer).instrument(span));
    }
    tracing::debug!(listener = %name, "stopped accepting");
}

/// The original destination of a connection redirected to this listener,
/// or `None` when it was addressed to the listener itself (explicit mode) or
/// the kernel knows no redirect (no `SO_ORIGINAL_DST`).
fn captured_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    // An IPv4 client on a dual-stack socket reports mapped addresses; its
    // connection is IPv4 to netfilter, so the IPv4 query (SOL_IP) finds its
    // redirect and the IPv6 one does not.
    let local = unmap(stream.local_addr().ok()?);
    let dst = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let dst = unmap(dst.ok()?.as_socket()?);
    (dst != local).then_some(dst)
}

/// `::ffff:a.b.c.d` as `a.b.c.d`.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The unbound listener for `dst`: exact address, then the wildcard address
/// of its family with the same port.
fn find_handoff(unbound: &Unbound, dst: SocketAddr) -> Option<&Handoff> {
    unbound.get(&dst).or_else(|| {
        let any: std::net::IpAddr = if dst.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        unbound.get(&SocketAddr::new(any, dst.port()))
    })
}

struct Connection {
    shared: Arc<Shared>,
    name: String,
    config: Arc<Listener>,
    stop: drain::Watch,
    global: drain::Watch,
    series: Arc<ListenerSeries>,
}

impl Connection {
    /// A captured connection that no listener claims: the captured default
    /// chain (passthrough or blackhole), else closed.
    async fn serve_captured(self, stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let _active = self.series.connection();
        let _ = stream.set_nodelay(true);
        let Some(tcp_proxy) = &self.config.captured_default else {
            tracing::debug!(listener = %self.name, %peer, %dst, "captured connection to a destination outside the mesh and no default chain: closing");
            return;
        };
        if !tcp::authorize(&self.shared, tcp_proxy, Direction::Outbound, peer, None) {
            return;
        }
        tcp::proxy(
            self.shared.clone(),
            tcp_proxy,
            Direction::Outbound,
            bytes::Bytes::new(),
            stream,
            peer,
            None,
            Some(dst),
        )
        .await;
    }

    async fn serve(self, mut stream: TcpStream, peer: SocketAddr) {
        let _active = self.series.connection();
        let _ = stream.set_nodelay(true);
        let direction = if self.name == "inbound" || self.name.starts_with("inbound|") {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let l = self.config.clone();
        let detect_for = match (&l.http, &l.tls, l.detect_timeout) {
            (None, None, _) => None,
            (_, _, Some(t)) => Some(t),
            (_, _, None) => Some(SNIFF_WITHOUT_INSPECTOR),
        };
        let (mut protocol, prefix) = match detect_for {
            Some(t) => detect::detect(&mut stream, t).await,
            None => (Protocol::Opaque, bytes::Bytes::new()),
        };
        if protocol == Protocol::Tls {
            match &l.tls {
                Some(tls) => {
                    return self
                        .serve_tls(tls, Rewind::new(prefix, stream), peer, direction)
                        .await
                }
                // No TLS chain: a ClientHello is just bytes (TCP passthrough).
                None => protocol = Protocol::Opaque,
            }
        }
        if l.is_strict_mtls() {
            if protocol != Protocol::Closed {
                self.shared
                    .metrics
                    .tls_handshake_failed(direction, "plaintext_refused");
                tracing::debug!(listener = %self.name, %peer, protocol = ?protocol, "plaintext connection refused: this listener accepts mTLS only (strict)");
            }
            return;
        }
        if protocol == Protocol::Timeout {
            self.series.detection_timeout();
        }
        match (protocol, &l.http, &l.tcp) {
            (Protocol::Http1 | Protocol::Http2, Some(hcm), _) => {
                let io = TokioIo::new(Rewind::new(prefix, stream));
                self.serve_http(protocol, io, self.conn_ctx(direction, hcm, peer, None))
                    .await;
            }
            (Protocol::Closed, _, _) => {}
            (_, _, Some(tcp_proxy)) => {
                // Plaintext has no verified identity.
                if !tcp::authorize(&self.shared, tcp_proxy, direction, peer, None) {
                    // Closed right away (dropping the stream), as Envoy's
                    // network RBAC filter does.
                    return;
                }
                tcp::proxy(
                    self.shared.clone(),
                    tcp_proxy,
                    direction,
                    prefix,
                    stream,
                    peer,
                    None,
                    None,
                )
                .await;
            }
            (p, _, None) => {
                tracing::debug!(listener = %self.name, %peer, protocol = ?p, "not HTTP and no TCP chain: closing");
            }
        }
    }

    /// Terminates mTLS, then takes the chain the negotiated ALPN selects
    /// (h2, http/1.1: HTTP; anything else: the TLS TCP chain, as Envoy's
    /// `application_protocols` match on the ClientHello).
    async fn serve_tls(
        &self,
        tls: &ListenerTls,
        io: Rewind<TcpStream>,
        peer: SocketAddr,
        direction: Direction,
    ) {
        let stream = match crate::tls::accept(tls.server.clone(), io).await {
            Ok(s) => s,
            Err(e) => {
                self.shared
                    .metrics
                    .tls_handshake_failed(direction, e.reason);
                tracing::debug!(listener = %self.name, %peer, reason = e.reason, error = %e.detail, "inbound mTLS handshake failed");
                return;
            }
        };
        let (_, session) = stream.get_ref();
        // The SPIFFE id of the peer, which authorization rules on sources
        // match. The one place it is set: from the certificate the handshake
        // verified (plaintext has none).
        let peer_identity: Option<Arc<str>> =
            identity::peer_identity(session).map(|id| Arc::from(id.to_string()));
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        tracing::debug!(listener = %self.name, %peer, identity = ?peer_identity, alpn = ?alpn.as_deref().map(String::from_utf8_lossy), "mTLS established");
        let http_alpn = alpn
            .as_deref()
            .filter(|a| tls.http_alpn.iter().any(|m| m.as_bytes() == *a));
        match (http_alpn, &tls.http, &tls.tcp) {
            (Some(a), Some(hcm), _) => {
                let protocol = if a == identity::ALPN_H2 {
                    Protocol::Http2
                } else {
                    Protocol::Http1
                };
                let ctx = self.conn_ctx(direction, hcm, peer, peer_identity);
                self.serve_http(protocol, TokioIo::new(stream), ctx).await;
            }
            (_, _, Some(tcp_proxy)) => {
                if !tcp::authorize(
                    &self.shared,
                    tcp_proxy,
                    direction,
                    peer,
                    peer_identity.as_deref(),
                ) {
                    return;
                }
                tcp::proxy(
                    self.shared.clone(),
                    tcp_proxy,
                    direction,
                    bytes::Bytes::new(),
                    stream,
                    peer,
                    peer_identity.as_deref(),
                    None,
                )
                .await;
            }
            _ => {
                tracing::debug!(listener = %self.name, %peer, "mTLS connection matches no TLS chain: closing");
            }
        }
    }

    fn conn_ctx(
        &self,
        direction: Direction,
        hcm: &crate::config::model::HttpConnectionManager,
        peer: SocketAddr,
        peer_identity: Option<Arc<str>>,
    ) -> Arc<ConnCtx> {
        Arc::new(ConnCtx {
            shared: self.shared.clone(),
            direction,
            drain: self.global.clone(),
            hcm: Arc::new(hcm.clone()),
            peer,
            peer_identity,
            series: Default::default(),
        })
    }

    async fn serve_http<IO>(&self, protocol: Protocol, io: TokioIo<IO>, ctx: Arc<ConnCtx>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let svc = service_fn(move |req| proxy_http::handle(ctx.clone(), req));
        let draining = async {
            tokio::select! {
                () = self.stop.signaled() => {}
                () = self.global.signaled() => {}
            }
        };
        tokio::pin!(draining);
        if protocol == Protocol::Http2 {
            let mut b = http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new()).adaptive_window(true);
            let conn = b.serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => return log_end(&self.name, r),
                () = &mut draining => conn.as_mut().graceful_shutdown(),
            }
            log_end(&self.name, conn.await);
        } else {
            // One flattened write per response: measured less CPU per request
            // than vectored writes for typical small proxied responses.
            let conn = http1::Builder::new()
                .writev(false)
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => return log_end(&self.name, r),
                () = &mut draining => conn.as_mut().graceful_shutdown(),
            }
            log_end(&self.name, conn.await);
        }
    }
}

fn log_end(listener: &str, r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(listener, error = %e, "downstream connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `[::]` bound IPv6-only sits beside `0.0.0.0` on the same port (the
    /// inbound listener and its IPv6 twin); each takes its own family.
    #[tokio::test]
    async fn an_ipv6_only_twin_binds_beside_ipv4() {
        let v4 = bind("0.0.0.0:0".parse().unwrap(), false).unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = match bind(SocketAddr::new("::".parse().unwrap(), port), true) {
            Ok(s) => s,
            Err(e) if no_ipv6(&e) => {
                eprintln!("skipped: no IPv6 here ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let c6 = TcpStream::connect(SocketAddr::new("::1".parse().unwrap(), port));
        let (c6, a6) = tokio::join!(c6, v6.accept());
        let (s6, peer6) = a6.unwrap();
        assert!(peer6.is_ipv6() && s6.local_addr().unwrap().is_ipv6());
        drop(c6.unwrap());
        let c4 = TcpStream::connect(SocketAddr::new("127.0.0.1".parse().unwrap(), port));
        let (c4, a4) = tokio::join!(c4, v4.accept());
        assert!(a4.unwrap().1.is_ipv4());
        drop(c4.unwrap());
    }

    #[test]
    fn no_ipv6_means_address_not_available_or_family_not_supported() {
        assert!(no_ipv6(&io::Error::from(io::ErrorKind::AddrNotAvailable)));
        assert!(no_ipv6(&io::Error::from_raw_os_error(EAFNOSUPPORT)));
        assert!(!no_ipv6(&io::Error::from(io::ErrorKind::AddrInUse)));
        assert!(!no_ipv6(&io::Error::from(io::ErrorKind::PermissionDenied)));
    }

    #[test]
    fn only_the_ipv6_twins_are_skipped_and_only_for_lack_of_ipv6() {
        let not_here = io::Error::from(io::ErrorKind::AddrNotAvailable);
        let no_family = io::Error::from_raw_os_error(EAFNOSUPPORT);
        let in_use = io::Error::from(io::ErrorKind::AddrInUse);
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        for twin in ["[::1]:15001", "[::]:15006"] {
            assert!(skippable(at(twin), &not_here), "{twin}");
            assert!(skippable(at(twin), &no_family), "{twin}");
            assert!(!skippable(at(twin), &in_use), "{twin}");
        }
        for other in [
            "[2001:db8::1]:80",
            "[fe80::1]:80",
            "[fd00::5]:80",
            "127.0.0.1:80",
        ] {
            assert!(!skippable(at(other), &not_here), "{other}");
            assert!(!skippable(at(other), &no_family), "{other}");
        }
    }

    fn set() -> (ListenerSet, drain::Trigger) {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let log = crate::accesslog::AccessLog::new(crate::accesslog::Target::Off).unwrap();
        let (trigger, watch) = drain::channel();
        (ListenerSet::new(Shared::new(metrics, log), watch), trigger)
    }

    fn listener(
        address: SocketAddr,
        additional: Vec<SocketAddr>,
    ) -> HashMap<String, Arc<Listener>> {
        let l = Listener {
            name: "l".to_owned(),
            address,
            additional_addresses: additional,
            detect_timeout: None,
            http: None,
            tcp: None,
            tls: None,
            use_original_dst: false,
            captured_default: None,
            bind_to_port: true,
            service: None,
        };
        HashMap::from([("l".to_owned(), Arc::new(l))])
    }

    fn free_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// An IPv6 address that is not on this host (a documentation prefix) is
    /// an error like any other, not "no IPv6 here".
    #[tokio::test]
    async fn an_ipv6_additional_address_not_on_this_host_refuses_the_config() {
        let (set, _trigger) = set();
        let missing: SocketAddr = "[2001:db8::77]:15001".parse().unwrap();
        let wanted = listener("127.0.0.1:0".parse().unwrap(), vec![missing]);
        let e = set.bind_new(&wanted).unwrap_err();
        assert_eq!(e.address, missing, "{e}");
        assert_eq!(e.name, "l");
    }

    /// A previously skipped additional address that becomes the primary
    /// address is bound: the listener does not end up with no socket.
    #[tokio::test]
    async fn a_skipped_address_promoted_to_primary_is_bound() {
        let (mut set, _trigger) = set();
        let (first, second) = (free_port(), free_port());
        let v1 = listener(first, vec![second]);
        let bound = set.bind_new(&v1).unwrap();
        // As if `second` had been skipped when v1 was bound (no IPv6).
        let bound = Bound {
            fresh: bound
                .fresh
                .into_iter()
                .map(|mut f| {
                    f.sockets.retain(|(a, _)| *a != second);
                    f.skipped.push(second);
                    f
                })
                .collect(),
        };
        set.commit(&v1, bound);
        assert_eq!(set.bound(), vec![("l".to_owned(), first)]);

        let v2 = listener(second, vec![]);
        let bound = set.bind_new(&v2).unwrap();
        set.commit(&v2, bound);
        assert_eq!(set.bound(), vec![("l".to_owned(), second)]);
        let r = &set.running["l"];
        assert_eq!(r.sockets.len(), 1);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        TcpStream::connect(second).await.unwrap();
    }
}
