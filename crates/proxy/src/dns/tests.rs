//! DNS server tests: the name table, resolv.conf, and real queries over UDP
//! and TCP against a server on 127.0.0.1:0 with a fake upstream resolver.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::wire::{self, Header, Name, TYPE_A, TYPE_AAAA};
use super::*;
use std::net::Ipv6Addr;

const CATALOG: Ipv4Addr = Ipv4Addr::new(240, 240, 1, 1);
const CART: Ipv4Addr = Ipv4Addr::new(240, 240, 2, 2);
/// What the fake upstream answers over UDP, and over TCP.
const UP_UDP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const UP_TCP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

fn entries() -> Vec<MeshName> {
    vec![
        MeshName {
            service: "catalog.default".into(),
            vip: CATALOG,
            hostnames: vec![
                "catalog".into(),
                "catalog.default".into(),
                "shop.example.com:8080".into(),
                "*.wild.example".into(),
            ],
        },
        MeshName {
            service: "cart.shop".into(),
            vip: CART,
            hostnames: vec!["cart.shop".into(), "cart.shop.svc".into()],
        },
    ]
}

#[test]
fn table_answers_the_kubernetes_forms_and_listed_hostnames() {
    let t = NameTable::build("Cluster.Local.", "default", entries());
    let none: &[String] = &[];
    for n in [
        "catalog",
        "catalog.default",
        "catalog.default.svc",
        "catalog.default.svc.cluster.local",
        "shop.example.com",
    ] {
        assert_eq!(t.lookup(n, none), Some(CATALOG), "{n}");
    }
    for n in ["cart.shop", "cart.shop.svc", "cart.shop.svc.cluster.local"] {
        assert_eq!(t.lookup(n, none), Some(CART), "{n}");
    }
    // Bare names only in the proxy's own namespace; no wildcards.
    assert_eq!(t.lookup("cart", none), None);
    assert_eq!(t.lookup("x.wild.example", none), None);
    assert_eq!(t.lookup("catalog.other", none), None);
    // In namespace shop, `cart` resolves, and `catalog` does not, although
    // the translator listed it (for a proxy in namespace default).
    let shop = NameTable::build("cluster.local", "shop", entries());
    assert_eq!(shop.lookup("cart", none), Some(CART));
    assert_eq!(shop.lookup("catalog", none), None);
    assert_eq!(shop.lookup("catalog.default", none), Some(CATALOG));
    // Search domains the stub resolver appended.
    let search = vec![
        "corp.example".to_string(),
        "default.svc.cluster.local".to_string(),
    ];
    assert_eq!(t.lookup("catalog.corp.example", &search), Some(CATALOG));
    assert_eq!(t.lookup("cart.shop.corp.example", &search), Some(CART));
    assert_eq!(t.lookup("nothing.corp.example", &search), None);
    assert_eq!(t.lookup("xcorp.example", &search), None);
}

#[test]
fn derived_names_win_over_listed_hostnames() {
    let t = NameTable::build(
        "cluster.local",
        "default",
        vec![
            MeshName {
                service: "a.default".into(),
                vip: CATALOG,
                hostnames: vec!["b.default".into()],
            },
            MeshName {
                service: "b.default".into(),
                vip: CART,
                hostnames: vec![],
            },
        ],
    );
    assert_eq!(t.lookup("b.default", &[]), Some(CART));
    assert_eq!(t.lookup("b", &[]), Some(CART));
}

#[test]
fn resolv_conf_first_nameserver_and_last_search() {
    let c = ResolvConf::parse(
        "# generated\nnameserver fe80::1%eth0\nnameserver 10.0.0.2 # primary\nnameserver 10.0.0.3\n\
         domain old.example\nsearch Corp.Example. svc.cluster.local\noptions ndots:5\n",
    );
    assert_eq!(c.nameserver, Some("10.0.0.2:53".parse().unwrap()));
    assert_eq!(c.search, vec!["corp.example", "svc.cluster.local"]);
    let v6 = ResolvConf::parse("nameserver ::1\n");
    assert_eq!(v6.nameserver, Some("[::1]:53".parse().unwrap()));
    assert_eq!(ResolvConf::parse(""), ResolvConf::default());
}

// ------------------------------------------------------------ sockets

/// A stand-in upstream resolver on UDP and TCP (same port). By name:
/// `slow.example` is never answered; `big.example` comes back truncated over
/// UDP; `huge.example` gets an answer over UDP larger than 512 bytes;
/// `stray.example` is first answered with a wrong id; anything else
/// gets `UP_UDP` over UDP and `UP_TCP` over TCP.
struct Upstream {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn upstream() -> Upstream {
    let (udp, tcp) = bind_pair("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = udp.local_addr().unwrap();
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(q) = wire::parse_query(&buf[..n]) else {
                continue;
            };
            let name = q.question.name.to_lower_dotted();
            match name.as_str() {
                "slow.example" => {}
                "huge.example" => {
                    // More than the client's 512 bytes, ignoring its size.
                    let r = wire::reply(&q, 0, &[UP_UDP; 40], 60, false);
                    udp.send_to(&r, peer).await.unwrap();
                }
                "big.example" => {
                    let mut r = wire::reply(&q, 0, &[], 60, false);
                    r[2] |= 0x02; // TC
                    udp.send_to(&r, peer).await.unwrap();
                }
                _ => {
                    if name == "stray.example" {
                        let mut wrong = wire::reply(&q, 0, &[Ipv4Addr::new(6, 6, 6, 6)], 60, false);
                        wrong[1] ^= 0xff;
                        udp.send_to(&wrong, peer).await.unwrap();
                    }
                    let r = wire::reply(&q, 0, &[UP_UDP], 60, false);
                    udp.send_to(&r, peer).await.unwrap();
                }
            }
        }
    });
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = tcp.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                while let Ok(Some(msg)) = read_framed(&mut conn).await {
                    let q = wire::parse_query(&msg).unwrap();
                    if q.question.name.to_lower_dotted() == "slow.example" {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    let r = wire::reply(&q, 0, &[UP_TCP], 60, false);
                    write_framed(&mut conn, &r).await.unwrap();
                }
            });
        }
    });
    Upstream {
        addr,
        tasks: vec![udp_task, tcp_task],
    }
}

async fn server(upstream: SocketAddr) -> (DnsServer, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let s = DnsServer::start(
        DnsOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            domain: "cluster.local".into(),
            namespace: "default".into(),
            upstream,
            search: vec!["corp.example".into()],
            timeout: Duration::from_millis(300),
        },
        metrics.clone(),
    )
    .await
    .unwrap();
    s.set_names(entries());
    (s, metrics)
}

fn q(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    wire::query(id, &Name::from_dotted(name).unwrap(), qtype, true)
}

/// Sends `msg` over UDP; `None` when nothing comes back within 2 s.
async fn udp(server: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind(client_addr(server)).await.unwrap();
    sock.send_to(msg, server).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(buf[..n].to_vec())
}

/// A loopback client address of `server`'s family.
fn client_addr(server: SocketAddr) -> SocketAddr {
    if server.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    }
}

/// Whether this host has IPv6 loopback (a container may not).
fn has_ipv6() -> bool {
    std::net::UdpSocket::bind("[::1]:0").is_ok()
}

async fn tcp(server: SocketAddr, msgs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut conn = TcpStream::connect(server).await.unwrap();
    let mut out = Vec::new();
    for m in msgs {
        write_framed(&mut conn, m).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(2), read_framed(&mut conn))
            .await
            .expect("a TCP answer within 2s")
            .unwrap()
            .expect("an answer, not EOF");
        out.push(r);
    }
    out
}

fn rcode(r: &[u8]) -> u8 {
    Header::parse(r).unwrap().rcode()
}

fn addrs(r: &[u8]) -> Vec<Ipv4Addr> {
    wire::answer_addresses(r).unwrap()
}

#[tokio::test]
async fn mesh_names_are_answered_over_udp_and_tcp() {
    let up = upstream().await;
    let (s, metrics) = server(up.addr).await;
    let at = s.local_addr();
    for name in [
        "catalog",
        "CATALOG.default",
        "catalog.default.svc",
        "catalog.default.svc.cluster.local.",
        "catalog.corp.example",
    ] {
        let r = udp(at, &q(1, name, TYPE_A)).await.unwrap();
        assert_eq!(rcode(&r), 0, "{name}");
        assert_eq!(addrs(&r), vec![CATALOG], "{name}");
        let h = Header::parse(&r).unwrap();
        assert!(h.flags & 0x0400 != 0, "authoritative: {name}");
        // The question comes back with the client's case.
        let echoed = wire::reply_question(&r).unwrap().name;
        assert_eq!(echoed, Name::from_dotted(name).unwrap());
    }
    // AAAA and other types: NOERROR, no answer.
    for qtype in [TYPE_AAAA, 16 /* TXT */] {
        let r = udp(at, &q(2, "catalog.default", qtype)).await.unwrap();
        assert_eq!(rcode(&r), 0);
        assert_eq!(Header::parse(&r).unwrap().ancount, 0);
    }
    // TCP, two queries on one connection.
    let rs = tcp(
        at,
        &[
            q(3, "cart.shop.svc.cluster.local", TYPE_A),
            q(4, "catalog", TYPE_AAAA),
        ],
    )
    .await;
    assert_eq!(addrs(&rs[0]), vec![CART]);
    assert_eq!(Header::parse(&rs[0]).unwrap().id, 3);
    assert_eq!(
        (rcode(&rs[1]), Header::parse(&rs[1]).unwrap().ancount),
        (0, 0)
    );
    assert_eq!(metrics.dns_queries(DnsResult::Mesh), 9);
    assert_eq!(metrics.dns_queries(DnsResult::Forwarded), 0);
    // Names change with the config.
    s.set_names(vec![]);
    let r = udp(at, &q(5, "catalog", TYPE_A)).await.unwrap();
    assert_eq!(addrs(&r), vec![UP_UDP], "no longer a mesh name: forwarded");
    let text = metrics.render();
    assert!(
        text.contains("meshwork_dns_queries_total{result=\"mesh\"} 9"),
        "{text}"
    );
    assert!(
        text.contains("meshwork_dns_queries_total{result=\"forwarded\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn other_names_are_forwarded_udp_to_udp_and_tcp_to_tcp() {
    let up = upstream().await;
    let (s, metrics) = server(up.addr).await;
    let at = s.local_addr();
    // An unknown name under the cluster domain is not ours either.
    for name in ["example.com", "nope.default.svc.cluster.local"] {
        let r = udp(at, &q(10, name, TYPE_A)).await.unwrap();
        assert_eq!(Header::parse(&r).unwrap().id, 10);
        assert_eq!(addrs(&r), vec![UP_UDP], "{name}");
    }
    let rs = tcp(
        at,
        &[
            q(11, "example.com", TYPE_A),
            q(12, "example.org", TYPE_AAAA),
        ],
    )
    .await;
    assert_eq!(addrs(&rs[0]), vec![UP_TCP]);
    assert_eq!(Header::parse(&rs[1]).unwrap().id, 12);
    // Truncated over UDP: asked again over TCP, relayed since it fits.
    let r = udp(at, &q(13, "big.example", TYPE_A)).await.unwrap();
    assert_eq!(addrs(&r), vec![UP_TCP]);
    assert!(!Header::parse(&r).unwrap().truncated());
    // Over the client's UDP size without TC (a misbehaving upstream): asked
    // again over TCP too.
    let r = udp(at, &q(15, "huge.example", TYPE_A)).await.unwrap();
    assert_eq!(addrs(&r), vec![UP_TCP]);
    // A stray datagram with a wrong id is ignored.
    let r = udp(at, &q(14, "stray.example", TYPE_A)).await.unwrap();
    assert_eq!(addrs(&r), vec![UP_UDP]);
    assert_eq!(metrics.dns_queries(DnsResult::Forwarded), 7);
    assert_eq!(metrics.dns_queries(DnsResult::Error), 0);
}

#[tokio::test]
async fn upstream_failures_become_servfail() {
    let up = upstream().await;
    let (s, metrics) = server(up.addr).await;
    let at = s.local_addr();
    let started = std::time::Instant::now();
    let r = udp(at, &q(20, "slow.example", TYPE_A))
        .await
        .expect("SERVFAIL, not silence");
    assert_eq!(rcode(&r), wire::RCODE_SERVFAIL);
    assert_eq!(Header::parse(&r).unwrap().id, 20);
    let rs = tcp(at, &[q(21, "slow.example", TYPE_A)]).await;
    assert_eq!(rcode(&rs[0]), wire::RCODE_SERVFAIL);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Nothing listening upstream at all.
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let (s2, m2) = server(dead).await;
    let r = udp(s2.local_addr(), &q(22, "example.com", TYPE_A))
        .await
        .unwrap();
    assert_eq!(rcode(&r), wire::RCODE_SERVFAIL);
    let rs = tcp(s2.local_addr(), &[q(23, "example.com", TYPE_A)]).await;
    assert_eq!(rcode(&rs[0]), wire::RCODE_SERVFAIL);
    assert_eq!(metrics.dns_queries(DnsResult::Error), 2);
    assert_eq!(m2.dns_queries(DnsResult::Error), 2);
}

#[tokio::test]
async fn malformed_queries_get_formerr_or_nothing() {
    let up = upstream().await;
    let (s, metrics) = server(up.addr).await;
    let at = s.local_addr();
    // A header, then a pointer loop as the question name.
    let mut bad = q(30, "a", TYPE_A);
    bad.truncate(wire::HEADER_LEN);
    bad.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let r = udp(at, &bad).await.unwrap();
    assert_eq!(
        (Header::parse(&r).unwrap().id, rcode(&r)),
        (30, wire::RCODE_FORMERR)
    );
    // Too short for a header: no answer.
    assert_eq!(udp(at, &[1, 2, 3]).await, None);
    // Opcode STATUS (2): NOTIMP.
    let mut status = q(31, "catalog", TYPE_A);
    status[2] |= 2 << 3;
    let r = udp(at, &status).await.unwrap();
    assert_eq!(rcode(&r), wire::RCODE_NOTIMP);
    // Over TCP too; the server keeps serving afterwards.
    let rs = tcp(at, &[bad.clone(), q(32, "catalog", TYPE_A)]).await;
    assert_eq!(rcode(&rs[0]), wire::RCODE_FORMERR);
    assert_eq!(addrs(&rs[1]), vec![CATALOG]);
    assert_eq!(metrics.dns_queries(DnsResult::Error), 4);
    // Random datagrams do not take the server down.
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..200 {
        let len = rng.usize(0..100);
        let junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&junk, at).await.unwrap();
    }
    let r = udp(at, &q(33, "catalog", TYPE_A)).await.unwrap();
    assert_eq!(addrs(&r), vec![CATALOG]);
}

#[tokio::test]
async fn an_upstream_that_is_the_server_itself_is_refused() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    drop(taken);
    let r = DnsServer::start(
        DnsOptions {
            addr,
            domain: "cluster.local".into(),
            namespace: "default".into(),
            upstream: addr,
            search: vec![],
            timeout: Duration::from_millis(100),
        },
        Arc::new(Metrics::new()),
    )
    .await;
    assert!(matches!(r, Err(StartError::Loop(a)) if a == addr), "{r:?}");
}

/// `127.0.0.1` also serves `[::1]` at the same port (where ip6tables
/// REDIRECT sends queries to IPv6 nameservers), IPv6-only: mesh names,
/// forwarding, and answers back to the IPv6 client, over UDP and TCP.
#[tokio::test]
async fn the_ipv6_loopback_twin_answers_and_forwards_for_ipv6_clients() {
    if !has_ipv6() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let up = upstream().await;
    let (s, metrics) = server(up.addr).await;
    let v4 = s.local_addr();
    let v6 = s.ipv6_addr().expect("an IPv6 twin");
    assert_eq!(v6, SocketAddr::new(Ipv6Addr::LOCALHOST.into(), v4.port()));

    let r = udp(v6, &q(40, "catalog.default.svc.cluster.local", TYPE_A))
        .await
        .unwrap();
    assert_eq!((rcode(&r), addrs(&r)), (0, vec![CATALOG]));
    let r = udp(v6, &q(41, "catalog", TYPE_AAAA)).await.unwrap();
    assert_eq!((rcode(&r), Header::parse(&r).unwrap().ancount), (0, 0));
    // Forwarded (the upstream is IPv4), the answer back to the IPv6 client.
    let r = udp(v6, &q(42, "example.com", TYPE_A)).await.unwrap();
    assert_eq!(
        (Header::parse(&r).unwrap().id, addrs(&r)),
        (42, vec![UP_UDP])
    );
    let rs = tcp(
        v6,
        &[q(43, "cart.shop", TYPE_A), q(44, "example.com", TYPE_A)],
    )
    .await;
    assert_eq!(addrs(&rs[0]), vec![CART]);
    assert_eq!(addrs(&rs[1]), vec![UP_TCP]);
    assert_eq!(metrics.dns_queries(DnsResult::Mesh), 3);
    assert_eq!(metrics.dns_queries(DnsResult::Forwarded), 2);

    // IPv6-only: the IPv4 sockets of the port are separate and still answer.
    let r = udp(v4, &q(45, "catalog", TYPE_A)).await.unwrap();
    assert_eq!(addrs(&r), vec![CATALOG]);
    // `0.0.0.0` gets `[::]`.
    let any = DnsServer::start(
        DnsOptions {
            addr: "0.0.0.0:0".parse().unwrap(),
            ..options(up.addr)
        },
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    any.set_names(entries());
    let twin = any.ipv6_addr().expect("[::] beside 0.0.0.0");
    assert!(twin.ip().is_unspecified() && twin.is_ipv6());
    assert_eq!(twin.port(), any.local_addr().port());
    let r = udp(
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), twin.port()),
        &q(46, "catalog", TYPE_A),
    )
    .await
    .unwrap();
    assert_eq!(addrs(&r), vec![CATALOG]);
}

#[tokio::test]
async fn an_ipv6_address_is_its_own_and_has_no_twin() {
    if !has_ipv6() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let up = upstream().await;
    let addr = "[::1]:0".parse().unwrap();
    let s = DnsServer::start(
        DnsOptions {
            addr,
            ..options(up.addr)
        },
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    assert!(s.local_addr().is_ipv6());
    assert_eq!(s.ipv6_addr(), None);
    s.set_names(entries());
    let r = udp(s.local_addr(), &q(47, "cart.shop", TYPE_A))
        .await
        .unwrap();
    assert_eq!(addrs(&r), vec![CART]);
}

#[tokio::test]
async fn an_upstream_on_the_ipv6_twin_is_refused() {
    if !has_ipv6() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let port = free_port_everywhere();
    let r = DnsServer::start(
        DnsOptions {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            upstream: SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            ..options("192.0.2.1:53".parse().unwrap())
        },
        Arc::new(Metrics::new()),
    )
    .await;
    assert!(
        matches!(r, Err(StartError::Loop(a)) if a.is_ipv6() && a.port() == port),
        "{r:?}"
    );
}

#[test]
fn no_ipv6_means_address_not_available_or_family_not_supported() {
    assert!(no_ipv6(&io::Error::from(io::ErrorKind::AddrNotAvailable)));
    assert!(no_ipv6(&io::Error::from_raw_os_error(97)));
    assert!(!no_ipv6(&io::Error::from(io::ErrorKind::AddrInUse)));
    assert!(!no_ipv6(&io::Error::from(io::ErrorKind::PermissionDenied)));
}

/// Options of a test server with `upstream`.
fn options(upstream: SocketAddr) -> DnsOptions {
    DnsOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        domain: "cluster.local".into(),
        namespace: "default".into(),
        upstream,
        search: vec![],
        timeout: Duration::from_millis(300),
    }
}

/// A port free on UDP and TCP, IPv4 and IPv6, just now.
fn free_port_everywhere() -> u16 {
    loop {
        let u4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u4.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("::1", port)).is_ok()
            && std::net::TcpListener::bind(("::1", port)).is_ok()
        {
            return port;
        }
    }
}
