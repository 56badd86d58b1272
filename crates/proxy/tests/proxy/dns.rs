//! Mesh DNS end to end: a standalone proxy in capture mode answers the VIPs
//! of its config's Services (the same ones `api::Mesh::service_vip` gives
//! the translator), follows config changes, and forwards other names to an
//! upstream resolver. `dig` (dnsutils, installed by `scripts/test.sh`) is
//! the real client where a stub resolver's behaviour matters.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use proxy::dns::wire::{self, Header, Name};
use proxy::dns::DnsOptions;
use proxy::{Options, Proxy};
use tokio::net::UdpSocket;

use crate::harness::{scratch, sum_metric};

const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

fn mesh(with_cart: bool) -> String {
    let mut y = String::from(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: catalog}\n\
         spec:\n  ports: [{name: http, port: 80}]\n---\n",
    );
    if with_cart {
        y += "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: cart, namespace: shop}\n\
              spec:\n  ports: [{name: db, port: 5432, appProtocol: tcp, localPort: 0}]\n---\n";
    }
    y
}

fn vip(yaml: &str, ns: &str, name: &str) -> Ipv4Addr {
    let m = api::validate(api::load_str("m.yaml", yaml).unwrap()).unwrap();
    m.service_vip(ns, name).unwrap()
}

/// A resolver on UDP and TCP (one port) that answers every query with
/// `UPSTREAM_ANSWER`.
async fn upstream() -> (SocketAddr, Vec<tokio::task::JoinHandle<()>>) {
    let (sock, tcp) = loop {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(sock.local_addr().unwrap()).await {
            break (sock, tcp);
        }
    };
    let addr = sock.local_addr().unwrap();
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            if let Ok(q) = wire::parse_query(&buf[..n]) {
                let r = wire::reply(&q, 0, &[UPSTREAM_ANSWER], 60, false);
                let _ = sock.send_to(&r, peer).await;
            }
        }
    });
    let tcp_task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                while conn.read_exact(&mut len).await.is_ok() {
                    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if conn.read_exact(&mut msg).await.is_err() {
                        return;
                    }
                    let Ok(q) = wire::parse_query(&msg) else {
                        return;
                    };
                    let r = wire::reply(&q, 0, &[UPSTREAM_ANSWER], 60, false);
                    let mut out = (r.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&r);
                    if conn.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, vec![udp_task, tcp_task])
}

async fn start(yaml: &str, upstream: SocketAddr) -> (Proxy, std::path::PathBuf) {
    let dir = scratch();
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, yaml).unwrap();
    let opts = Options {
        source: proxy::app::Source::File {
            path: file.clone(),
            poll_interval: Duration::from_millis(50),
        },
        // Capture needs a fixed outbound port.
        outbound_addr: SocketAddr::from(([127, 0, 0, 1], testkit::free_port())),
        inbound_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        workload: None,
        access_log: proxy::accesslog::Target::Off,
        detect_timeout: Duration::from_millis(300),
        identity: None,
        capture: true,
        dns: Some(DnsOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            domain: "cluster.local".into(),
            namespace: "default".into(),
            upstream,
            search: vec![],
            timeout: Duration::from_millis(500),
        }),
    };
    let (_sub, log) = proxy::logging::build("warn", false).unwrap();
    (Proxy::start(opts, log).await.unwrap(), file)
}

async fn ask(server: SocketAddr, name: &str, qtype: u16) -> Vec<u8> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let q = wire::query(0x4d57, &Name::from_dotted(name).unwrap(), qtype, true);
    sock.send_to(&q, server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("a DNS answer within 2s")
        .unwrap();
    buf[..n].to_vec()
}

async fn a(server: SocketAddr, name: &str) -> Vec<Ipv4Addr> {
    let r = ask(server, name, wire::TYPE_A).await;
    assert_eq!(Header::parse(&r).unwrap().rcode(), 0, "{name}");
    wire::answer_addresses(&r).unwrap()
}

#[tokio::test]
async fn proxy_answers_service_vips_and_follows_config_changes() {
    let (up, _up_task) = upstream().await;
    let yaml = mesh(true);
    let catalog = vip(&yaml, "default", "catalog");
    let cart = vip(&yaml, "shop", "cart");
    let (proxy, file) = start(&yaml, up).await;
    let dns = proxy.dns_addr().expect("the DNS server runs");
    for name in [
        "catalog",
        "catalog.default",
        "Catalog.Default.Svc",
        "catalog.default.svc.cluster.local",
    ] {
        assert_eq!(a(dns, name).await, vec![catalog], "{name}");
    }
    assert_eq!(a(dns, "cart.shop.svc.cluster.local").await, vec![cart]);
    // `cart` alone is a name in namespace shop, not this proxy's: forwarded.
    assert_eq!(a(dns, "cart").await, vec![UPSTREAM_ANSWER]);
    assert_eq!(a(dns, "example.com").await, vec![UPSTREAM_ANSWER]);
    let r = ask(dns, "catalog", wire::TYPE_AAAA).await;
    let h = Header::parse(&r).unwrap();
    assert_eq!(
        (h.rcode(), h.ancount),
        (0, 0),
        "AAAA of a mesh name: empty NOERROR"
    );

    // cart leaves the mesh: its name goes upstream.
    std::fs::write(&file, mesh(false)).unwrap();
    proxy.reload().await.unwrap();
    assert_eq!(a(dns, "cart.shop").await, vec![UPSTREAM_ANSWER]);
    assert_eq!(a(dns, "catalog").await, vec![catalog]);

    let metrics = {
        let mut c = testkit::H1Client::connect(proxy.admin_addr())
            .await
            .unwrap();
        c.get("localhost", "/metrics").await.unwrap().text()
    };
    let count = |r: &str| sum_metric(&metrics, "meshwork_dns_queries_total", &[("result", r)]);
    assert_eq!(count("mesh"), 7.0, "{metrics}");
    assert_eq!(count("forwarded"), 3.0, "{metrics}");
    assert_eq!(count("error"), 0.0, "{metrics}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// `dig` as the client: a real stub implementation over UDP and TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_resolves_mesh_names_over_udp_and_tcp() {
    let (up, _up_task) = upstream().await;
    let yaml = mesh(true);
    let catalog = vip(&yaml, "default", "catalog");
    let (proxy, _file) = start(&yaml, up).await;
    let dns = proxy.dns_addr().unwrap();
    let dig = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("dig")
                .args(&args)
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run dig ({e}): install dnsutils, or run ./scripts/test.sh")
                });
            assert!(out.status.success(), "dig {args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        })
    };
    let base = |name: &str, extra: &[&str]| {
        let mut v = vec![
            format!("@{}", dns.ip()),
            "-p".to_string(),
            dns.port().to_string(),
            "+time=2".to_string(),
            "+tries=1".to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(name.to_string());
        v
    };
    for transport in ["+notcp", "+tcp"] {
        let short = dig(base(
            "catalog.default.svc.cluster.local",
            &[transport, "+short"],
        ))
        .await
        .unwrap();
        assert_eq!(short.trim(), catalog.to_string(), "{transport}");
        let short = dig(base("example.com", &[transport, "+short"]))
            .await
            .unwrap();
        assert_eq!(short.trim(), UPSTREAM_ANSWER.to_string(), "{transport}");
    }
    // A mesh name's AAAA: NOERROR with no answer (not NXDOMAIN).
    let full = dig(base("catalog", &["AAAA"])).await.unwrap();
    assert!(full.contains("status: NOERROR"), "{full}");
    assert!(full.contains("ANSWER: 0"), "{full}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// The DNS server on `127.0.0.1` also answers on `[::1]` at the same port
/// (where ip6tables sends queries to IPv6 nameservers): `dig` over IPv6,
/// UDP and TCP, mesh names and forwarded ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_over_ipv6_reaches_the_ipv6_loopback_twin() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let (up, _up_task) = upstream().await;
    let yaml = mesh(true);
    let catalog = vip(&yaml, "default", "catalog");
    let (proxy, _file) = start(&yaml, up).await;
    let port = proxy.dns_addr().unwrap().port();
    let dig = |extra: &[&str]| {
        let mut args: Vec<String> = ["@::1", "-p", &port.to_string(), "+time=2", "+tries=1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("dig")
                .args(&args)
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run dig ({e}): install dnsutils, or run ./scripts/test.sh")
                });
            assert!(out.status.success(), "dig {args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        })
    };
    for transport in ["+notcp", "+tcp"] {
        let short = dig(&[
            transport,
            "+short",
            "catalog.default.svc.cluster.local",
            "A",
        ])
        .await
        .unwrap();
        assert_eq!(short.trim(), catalog.to_string(), "{transport}");
        let short = dig(&[transport, "+short", "example.com"]).await.unwrap();
        assert_eq!(short.trim(), UPSTREAM_ANSWER.to_string(), "{transport}");
        let full = dig(&[transport, "catalog", "AAAA"]).await.unwrap();
        assert!(full.contains("status: NOERROR"), "{full}");
        assert!(full.contains("ANSWER: 0"), "{full}");
        assert!(full.contains("SERVER: ::1#"), "{full}");
    }
    proxy.shutdown(Duration::from_secs(1)).await;
}
