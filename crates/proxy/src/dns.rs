//! The proxy's DNS server: mesh names answered with their service VIPs,
//! everything else forwarded to the system resolver.
//!
//! Purpose: in transparent mode an unmodified application calls
//! `http://catalog/items`. Its resolver's queries (UDP and TCP port 53) are
//! redirected here; `catalog` resolves to the Service's VIP
//! (`240.240.x.y`, see `api::vip`), the application connects to it, and the
//! outbound capture listener routes the connection by that original
//! destination.
//!
//! Contract:
//! - UDP and TCP on one address (`--dns-addr`), and on its IPv6 twin
//!   ([`api::capture::ipv6_twin`]: `[::1]` for `127.0.0.1`, `[::]` for
//!   `0.0.0.0`) at the same port, bound IPv6-only: ip6tables REDIRECT
//!   delivers queries sent to an IPv6 nameserver (`nameserver ::1`,
//!   `fd00::53`) to `[::1]`. A host without IPv6 (the bind fails with
//!   EADDRNOTAVAIL or EAFNOSUPPORT) gets one warning naming the address and
//!   IPv4 only, as the capture listeners' twins do. Answers go back over the
//!   family and socket the query came in on.
//! - Names come from the VIP listeners of the active config (their
//!   `metadata.filter_metadata.meshwork` `{service: "name.namespace",
//!   hostnames: [...]}`), via [`DnsServer::set_names`] on every config
//!   change. Service `catalog.shop` answers as `catalog.shop`,
//!   `catalog.shop.svc` and `catalog.shop.svc.<domain>`, plus bare `catalog`
//!   when `shop` is the proxy's own namespace (`--namespace`), plus its
//!   listed hostnames that have a dot.
//!   Matching ignores ASCII case; a final dot is irrelevant; a name that
//!   is a mesh name followed by one of the resolver's search domains (which
//!   stub resolvers append before trying the name alone) matches too.
//! - A mesh name: A gets the VIP (authoritative, TTL [`TTL`]); AAAA and
//!   every other type get NOERROR with no answer (VIPs are IPv4), so the
//!   client falls back to A instead of failing.
//! - Anything else is forwarded verbatim to the upstream resolver: a UDP
//!   query over UDP, retried over TCP when the answer comes back truncated
//!   (and relayed when it fits the client's UDP size, else the truncated
//!   answer is passed on so the client retries over TCP); a TCP query over
//!   TCP. No answer within the timeout, or an error: SERVFAIL.
//! - Malformed queries get FORMERR (or nothing, when not even the header can
//!   be read); opcodes other than QUERY get NOTIMP. The parser ([`wire`]) is
//!   bounded and never panics.
//! - Counted in `meshwork_dns_queries_total{result="mesh|forwarded|error"}`.
//!
//! Non-goals: caching (the system resolver caches), DNSSEC, recursion of our
//! own, IPv6 VIPs, zone transfers.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::model::Snapshot;
use crate::listener::no_ipv6;
use crate::metrics::{DnsResult, Metrics};

pub mod wire;

use wire::Query;

/// TTL of mesh answers. VIPs are stable, but a Service pinned or removed
/// should not linger in caches for long.
pub const TTL: u32 = 30;
/// Default listen address (`--dns-addr`).
pub const DEFAULT_ADDR: &str = "127.0.0.1:15053";
/// Default cluster domain (`--dns-domain`).
pub const DEFAULT_DOMAIN: &str = "cluster.local";

/// Forwarded queries in flight at once; beyond it, SERVFAIL at once (a
/// client retrying in a loop must not make the proxy open unbounded
/// sockets).
const MAX_FORWARDS: usize = 256;
/// TCP clients served at once; beyond it, new connections are closed.
const MAX_TCP_CLIENTS: usize = 128;
/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Search domains taken from resolv.conf (glibc reads at most 6).
const MAX_SEARCH: usize = 6;

/// How the DNS server runs (`meshwork proxy --dns-*`).
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// UDP and TCP listen address.
    pub addr: SocketAddr,
    /// The cluster domain of `name.ns.svc.<domain>`.
    pub domain: String,
    /// The proxy's own namespace: its Services also answer by bare name.
    pub namespace: String,
    /// Where other names go.
    pub upstream: SocketAddr,
    /// Search domains the client's stub resolver appends (resolv.conf
    /// `search`), stripped when the rest is a mesh name.
    pub search: Vec<String>,
    /// How long a forwarded query may take before SERVFAIL.
    pub timeout: Duration,
}

/// The resolver settings of a resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// The first usable `nameserver`, port 53.
    pub nameserver: Option<SocketAddr>,
    /// The `search` (or `domain`) list; the last such line wins, as in glibc.
    pub search: Vec<String>,
}

impl ResolvConf {
    /// Parses resolv.conf text. Link-local IPv6 nameservers with a zone
    /// (`fe80::1%eth0`) are skipped; the next one is used.
    pub fn parse(text: &str) -> ResolvConf {
        let mut out = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") if out.nameserver.is_none() => {
                    out.nameserver = words
                        .next()
                        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                        .map(|ip| SocketAddr::new(ip, 53));
                }
                Some("search" | "domain") => {
                    out.search = words
                        .map(|w| w.trim_end_matches('.').to_ascii_lowercase())
                        .filter(|w| !w.is_empty())
                        .take(MAX_SEARCH)
                        .collect();
                }
                _ => {}
            }
        }
        out
    }

    /// Reads and parses `path` (normally `/etc/resolv.conf`).
    pub fn read(path: &Path) -> io::Result<ResolvConf> {
        Ok(ResolvConf::parse(&std::fs::read_to_string(path)?))
    }
}

/// One mesh Service as a VIP listener describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshName {
    /// `name.namespace`.
    pub service: String,
    pub vip: Ipv4Addr,
    /// Extra names (route hostnames); `host:port` is taken as `host`;
    /// wildcards and single labels are ignored.
    pub hostnames: Vec<String>,
}

/// Mesh names (lower case, no final dot) to VIPs.
#[derive(Debug, Clone, Default)]
pub struct NameTable {
    names: HashMap<String, Ipv4Addr>,
}

impl NameTable {
    /// The names of `entries` (see the module docs), for a proxy in
    /// `namespace` with cluster domain `domain`. When two Services claim one
    /// name, the derived forms (`name.ns...`) win over listed hostnames, and
    /// otherwise the first Service by `name.namespace` wins.
    pub fn build(
        domain: &str,
        namespace: &str,
        entries: impl IntoIterator<Item = MeshName>,
    ) -> Self {
        let mut entries: Vec<MeshName> = entries.into_iter().collect();
        entries.sort_by(|a, b| a.service.cmp(&b.service));
        let domain = domain.trim_matches('.').to_ascii_lowercase();
        let namespace = namespace.to_ascii_lowercase();
        let mut names = HashMap::new();
        for e in &entries {
            let service = e.service.to_ascii_lowercase();
            let Some((name, ns)) = service.split_once('.') else {
                continue;
            };
            let mut derived = vec![
                service.clone(),
                format!("{service}.svc"),
                format!("{service}.svc.{domain}"),
            ];
            if ns == namespace {
                derived.push(name.to_string());
            }
            for n in derived {
                names.entry(n).or_insert(e.vip);
            }
        }
        // Listed hostnames, except single labels: a bare name belongs to
        // the proxy's own namespace (above), whatever namespace the
        // translator wrote the list for.
        for e in &entries {
            for h in &e.hostnames {
                if let Some(h) = plain_hostname(h).filter(|h| h.contains('.')) {
                    names.entry(h).or_insert(e.vip);
                }
            }
        }
        NameTable { names }
    }

    /// The VIP of `name` (lower case, no final dot), also with one of
    /// `search` appended.
    pub fn lookup(&self, name: &str, search: &[String]) -> Option<Ipv4Addr> {
        if let Some(ip) = self.names.get(name) {
            return Some(*ip);
        }
        search.iter().find_map(|s| {
            let rest = name.strip_suffix(s.as_str())?.strip_suffix('.')?;
            self.names.get(rest).copied()
        })
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The mesh names of a config: one per Service that has a VIP listener
/// (`bind_to_port: false` at an IPv4 address, with `meshwork` metadata).
pub fn names_from_snapshot(snapshot: &Snapshot) -> Vec<MeshName> {
    let mut by_service: std::collections::BTreeMap<&str, MeshName> = Default::default();
    // By listener name, so a (never emitted) VIP mismatch resolves the same
    // way every time.
    let mut listeners: Vec<_> = snapshot.listeners.values().collect();
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    for l in listeners {
        let (Some(svc), std::net::IpAddr::V4(vip)) = (&l.service, l.address.ip()) else {
            continue;
        };
        let e = by_service.entry(&svc.service).or_insert_with(|| MeshName {
            service: svc.service.clone(),
            vip,
            hostnames: Vec::new(),
        });
        // Every port's listener of a Service carries the same VIP; a
        // mismatch (not emitted by our translator) keeps the first.
        if e.vip == vip {
            for h in &svc.hostnames {
                if !e.hostnames.contains(h) {
                    e.hostnames.push(h.clone());
                }
            }
        }
    }
    by_service.into_values().collect()
}

/// A hostname usable as a DNS name: lower case, without `:port` or a final
/// dot; `None` for wildcards and anything that is not a plain name.
fn plain_hostname(h: &str) -> Option<String> {
    let h = match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    };
    let h = h.trim_end_matches('.').to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(h)
}

/// What to do with one query.
#[derive(Debug)]
enum Outcome {
    /// Send this reply.
    Reply(Vec<u8>, DnsResult),
    /// Not ours: ask the upstream.
    Forward(Query),
    /// Not even a header: say nothing.
    Drop,
}

/// The state the listeners share.
#[derive(Debug)]
struct State {
    table: ArcSwap<NameTable>,
    upstream: SocketAddr,
    search: Vec<String>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    forwards: Arc<Semaphore>,
}

impl State {
    /// Answers from the table, or says to forward.
    fn resolve(&self, msg: &[u8]) -> Outcome {
        let q = match wire::parse_query(msg) {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(error = %e, "malformed DNS query");
                return match wire::error_reply(msg, wire::RCODE_FORMERR) {
                    Some(r) => Outcome::Reply(r, DnsResult::Error),
                    None => Outcome::Drop,
                };
            }
        };
        if q.header.opcode() != 0 {
            return Outcome::Reply(
                wire::reply(&q, wire::RCODE_NOTIMP, &[], 0, false),
                DnsResult::Error,
            );
        }
        if q.question.qclass == wire::CLASS_IN {
            let name = q.question.name.to_lower_dotted();
            if let Some(vip) = self.table.load().lookup(&name, &self.search) {
                let answers: &[Ipv4Addr] = if q.question.qtype == wire::TYPE_A {
                    &[vip]
                } else {
                    &[]
                };
                tracing::trace!(%name, qtype = q.question.qtype, %vip, "mesh name");
                return Outcome::Reply(
                    wire::reply(&q, wire::RCODE_NOERROR, answers, TTL, true),
                    DnsResult::Mesh,
                );
            }
        }
        Outcome::Forward(q)
    }

    fn count(&self, r: DnsResult) {
        self.metrics.dns_query(r);
    }
}

/// A running DNS server (UDP and TCP on one address). Dropping it stops it.
#[derive(Debug)]
pub struct DnsServer {
    state: Arc<State>,
    addr: SocketAddr,
    ipv6_addr: Option<SocketAddr>,
    domain: String,
    namespace: String,
    tasks: Vec<JoinHandle<()>>,
}

/// Why the DNS server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("DNS server: cannot bind {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("DNS server: the upstream resolver {0} is this server itself; give another with --dns-upstream")]
    Loop(SocketAddr),
}

impl DnsServer {
    /// Binds UDP and TCP on `opts.addr` and on its IPv6 twin, if any (with
    /// port 0: one free port for all), and starts serving an empty table.
    pub async fn start(opts: DnsOptions, metrics: Arc<Metrics>) -> Result<DnsServer, StartError> {
        let sockets = bind_all(opts.addr).await?;
        let (addr, ipv6_addr) = (sockets.addr, sockets.twin);
        let own = |a: SocketAddr| {
            std::iter::once(addr).chain(ipv6_addr).any(|b| {
                a == b || (a.port() == b.port() && b.ip().is_unspecified() && a.ip().is_loopback())
            })
        };
        if own(opts.upstream) {
            return Err(StartError::Loop(opts.upstream));
        }
        metrics.dns_enabled();
        let state = Arc::new(State {
            table: ArcSwap::from_pointee(NameTable::default()),
            upstream: opts.upstream,
            search: opts.search.clone(),
            timeout: opts.timeout,
            metrics,
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
        });
        for a in std::iter::once(addr).chain(ipv6_addr) {
            tracing::info!(address = %a, upstream = %opts.upstream, domain = %opts.domain, "DNS listening (udp, tcp)");
        }
        let mut tasks = Vec::new();
        for (udp, tcp) in sockets.pairs {
            tasks.push(tokio::spawn(serve_udp(Arc::new(udp), state.clone())));
            tasks.push(tokio::spawn(serve_tcp(tcp, state.clone())));
        }
        Ok(DnsServer {
            state,
            addr,
            ipv6_addr,
            domain: opts.domain,
            namespace: opts.namespace,
            tasks,
        })
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound IPv6 twin of [`local_addr`](Self::local_addr) (same port),
    /// if it has one and the host has IPv6.
    pub fn ipv6_addr(&self) -> Option<SocketAddr> {
        self.ipv6_addr
    }

    /// Replaces the mesh names (on every config change).
    pub fn set_names(&self, entries: impl IntoIterator<Item = MeshName>) {
        let table = NameTable::build(&self.domain, &self.namespace, entries);
        tracing::debug!(names = table.len(), "DNS names updated");
        self.state.table.store(Arc::new(table));
    }

    /// Stops serving (the proxy's shutdown, after the drain: applications
    /// still resolve names while they finish).
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// The current table (tests, admin).
    pub fn names(&self) -> Arc<NameTable> {
        self.state.table.load_full()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server's sockets: a UDP and TCP pair on the configured address, and
/// one on its IPv6 twin when there is one and the host has IPv6.
struct Sockets {
    pairs: Vec<(UdpSocket, TcpListener)>,
    /// The bound address of the first pair.
    addr: SocketAddr,
    /// The bound twin, if any.
    twin: Option<SocketAddr>,
}

/// Binds `addr` and its IPv6 twin at the same port (see the module docs).
/// With port 0 the twin's port may be taken: then a few tries with another
/// port.
async fn bind_all(addr: SocketAddr) -> Result<Sockets, StartError> {
    let twin_of = api::capture::ipv6_twin(addr);
    let mut last = None;
    for _ in 0..8 {
        let (udp, tcp) = bind_pair(addr).await?;
        let bound = udp.local_addr().map_err(|source| StartError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        let one = |udp, tcp| Sockets {
            pairs: vec![(udp, tcp)],
            addr: bound,
            twin: None,
        };
        let Some(twin) = twin_of.map(|t| SocketAddr::new(t.ip(), bound.port())) else {
            return Ok(one(udp, tcp));
        };
        match bind_v6_only(twin) {
            Ok(pair) => {
                return Ok(Sockets {
                    pairs: vec![(udp, tcp), pair],
                    addr: bound,
                    twin: Some(twin),
                })
            }
            Err((_, e)) if no_ipv6(&e) => {
                tracing::warn!(address = %twin, error = %e, "IPv6 is not available on this host: mesh DNS is not listening on this address (IPv4 only)");
                return Ok(one(udp, tcp));
            }
            Err((proto, e)) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last = Some((proto, e));
            }
            Err((proto, source)) => {
                return Err(StartError::Bind {
                    proto,
                    addr: twin,
                    source,
                })
            }
        }
    }
    let (proto, source) = last.unwrap_or(("tcp", io::Error::other("no free port")));
    Err(StartError::Bind {
        proto,
        addr,
        source,
    })
}

/// A UDP and a TCP socket on IPv6 address `addr` that take IPv6 only, so
/// they sit beside the IPv4 pair of the same port (`[::]` next to
/// `0.0.0.0`). The error says which protocol failed.
fn bind_v6_only(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), (&'static str, io::Error)> {
    let udp = udp_v6_only(addr).map_err(|e| ("udp", e))?;
    let tcp = tcp_v6_only(addr).map_err(|e| ("tcp", e))?;
    Ok((udp, tcp))
}

fn udp_v6_only(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(true)?;
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

fn tcp_v6_only(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    s.set_only_v6(true)?;
    // As std's bind does: restarting must not wait for TIME_WAIT.
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    TcpListener::from_std(s.into())
}

/// A UDP and a TCP socket on the same address; with port 0, a port free
/// for both (a few tries: UDP picks it, TCP may find it taken).
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), StartError> {
    let mut last = None;
    for _ in 0..8 {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                proto: "udp",
                addr,
                source,
            })?;
        let at = udp.local_addr().map_err(|source| StartError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        match TcpListener::bind(at).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) if addr.port() == 0 => last = Some(source),
            Err(source) => {
                return Err(StartError::Bind {
                    proto: "tcp",
                    addr,
                    source,
                })
            }
        }
    }
    Err(StartError::Bind {
        proto: "tcp",
        addr,
        source: last.unwrap_or_else(|| io::Error::other("no free port")),
    })
}

async fn serve_udp(socket: Arc<UdpSocket>, state: Arc<State>) {
    // 4096: the largest EDNS payload clients commonly offer; a longer
    // datagram is cut and then fails to parse (FORMERR), as it should.
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // E.g. ICMP errors surfacing on Linux; the socket stays usable.
                tracing::debug!(error = %e, "DNS udp receive");
                continue;
            }
        };
        let msg = &buf[..n];
        match state.resolve(msg) {
            Outcome::Reply(r, result) => {
                state.count(result);
                let _ = socket.send_to(&r, peer).await;
            }
            Outcome::Drop => state.count(DnsResult::Error),
            Outcome::Forward(q) => {
                let Ok(permit) = state.forwards.clone().try_acquire_owned() else {
                    state.count(DnsResult::Error);
                    tracing::warn!("DNS: too many forwarded queries in flight; SERVFAIL");
                    let r = wire::reply(&q, wire::RCODE_SERVFAIL, &[], 0, false);
                    let _ = socket.send_to(&r, peer).await;
                    continue;
                };
                let msg = msg.to_vec();
                let socket = socket.clone();
                let state = state.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let r = answer_forwarded(&state, &q, forward_udp(&state, &msg, &q).await);
                    let _ = socket.send_to(&r, peer).await;
                });
            }
        }
    }
}

/// The upstream's reply, or SERVFAIL (counting either).
fn answer_forwarded(state: &State, q: &Query, r: io::Result<Vec<u8>>) -> Vec<u8> {
    match r {
        Ok(r) => {
            state.count(DnsResult::Forwarded);
            r
        }
        Err(e) => {
            state.count(DnsResult::Error);
            tracing::debug!(
                name = %q.question.name.to_lower_dotted(),
                upstream = %state.upstream,
                error = %e,
                "DNS forward failed; SERVFAIL"
            );
            wire::reply(q, wire::RCODE_SERVFAIL, &[], 0, false)
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the upstream resolver did not answer in time",
    )
}

/// Forwards a UDP query; on a truncated answer, asks again over TCP and
/// returns the full answer if it fits the client's UDP size.
async fn forward_udp(state: &State, msg: &[u8], q: &Query) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + state.timeout;
    let local: SocketAddr = if state.upstream.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from anyone else, and an ICMP
    // "port unreachable" fails the receive at once instead of timing out.
    sock.connect(state.upstream).await?;
    sock.send(msg).await?;
    // One byte more than the client takes, to notice an answer too big for
    // it (the upstream saw the same EDNS size, so it should not happen).
    let mut buf = vec![0u8; q.udp_size.min(65_534) + 1];
    let reply = loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| timed_out())??;
        // A stray or spoofed datagram: keep waiting for the real one.
        if wire::is_reply_to(q, &buf[..n]) {
            break buf[..n].to_vec();
        }
    };
    let oversized = reply.len() > q.udp_size;
    let truncated = wire::Header::parse(&reply).is_some_and(|h| h.truncated());
    if !truncated && !oversized {
        return Ok(reply);
    }
    match tokio::time::timeout_at(deadline, forward_tcp_once(state.upstream, msg, q)).await {
        Ok(Ok(full)) if full.len() <= q.udp_size => Ok(full),
        // Too big for the client, or TCP failed: the truncated answer tells
        // the client to come back over TCP.
        _ if !oversized => Ok(reply),
        _ => Err(io::Error::other(
            "the upstream's answer is larger than the client's UDP size",
        )),
    }
}

/// Forwards a query over TCP (one connection per query), within the timeout.
async fn forward_tcp(state: &State, msg: &[u8], q: &Query) -> io::Result<Vec<u8>> {
    tokio::time::timeout(state.timeout, forward_tcp_once(state.upstream, msg, q))
        .await
        .map_err(|_| timed_out())?
}

async fn forward_tcp_once(upstream: SocketAddr, msg: &[u8], q: &Query) -> io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect(upstream).await?;
    write_framed(&mut conn, msg).await?;
    loop {
        let reply = read_framed(&mut conn).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the upstream closed the connection",
            )
        })?;
        if wire::is_reply_to(q, &reply) {
            return Ok(reply);
        }
    }
}

/// Writes one length-prefixed message (RFC 1035 4.2.2).
async fn write_framed(conn: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 65535 bytes"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    conn.write_all(&out).await
}

/// Reads one length-prefixed message; `None` on a clean end of stream.
async fn read_framed(conn: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match conn.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

async fn serve_tcp(listener: TcpListener, state: Arc<State>) {
    let clients = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off a little.
                tracing::warn!(error = %e, "DNS tcp accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "DNS: too many tcp clients; closing");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_tcp_client(conn, &state).await {
                tracing::debug!(%peer, error = %e, "DNS tcp client");
            }
        });
    }
}

/// Serves the queries of one TCP client in order, until it closes or idles.
async fn serve_tcp_client(mut conn: TcpStream, state: &State) -> io::Result<()> {
    loop {
        let Ok(msg) = tokio::time::timeout(TCP_IDLE, read_framed(&mut conn)).await else {
            return Ok(());
        };
        let Some(msg) = msg? else {
            return Ok(());
        };
        let reply = match state.resolve(&msg) {
            Outcome::Reply(r, result) => {
                state.count(result);
                r
            }
            Outcome::Drop => {
                state.count(DnsResult::Error);
                return Ok(());
            }
            Outcome::Forward(q) => {
                let r = forward_tcp(state, &msg, &q).await;
                answer_forwarded(state, &q, r)
            }
        };
        write_framed(&mut conn, &reply).await?;
    }
}

#[cfg(test)]
mod tests;
