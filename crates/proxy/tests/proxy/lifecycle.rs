//! The proxy over time: hot reload under traffic, refused configs, listener
//! moves, and graceful shutdown. What a user must never see is a failed
//! request caused by the proxy changing its config or stopping.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::{free_port, Backend, H1Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// Every request a background client made: answers by backend, and failures.
#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    by_backend: std::collections::BTreeMap<String, usize>,
    failures: Vec<String>,
}

/// Sends GETs to `host` until `stop`, on one keep-alive connection
/// (`keep_alive`) or a fresh connection per request.
fn load(
    addr: SocketAddr,
    host: &'static str,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut kept: Option<H1Client> = None;
        while !stop.load(Ordering::SeqCst) {
            let result = async {
                let mut c = match kept.take() {
                    Some(c) => c,
                    None => H1Client::connect(addr).await?,
                };
                let r = c.get(host, "/").await?;
                if keep_alive {
                    kept = Some(c);
                }
                anyhow::Ok(r)
            }
            .await;
            let mut t = tally.lock().unwrap();
            match result {
                Ok(r) if r.status == 200 => {
                    t.ok += 1;
                    *t.by_backend
                        .entry(r.backend().unwrap_or("?").to_owned())
                        .or_default() += 1;
                }
                Ok(r) => t.failures.push(format!("{} {}", r.status, r.text())),
                Err(e) => t.failures.push(format!("{e:#}")),
            }
        }
    })
}

fn route_to(parent: &str, backend: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {parent}}}\nspec:\n  parentRefs: [{{kind: Service, name: {parent}, port: 80}}]\n  rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]\n---\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_fails_no_request() {
    let v1 = Backend::http("v1").await;
    let v2 = Backend::http("v2").await;
    // To v1; or to v2 with v1's Service and Workload gone altogether, so
    // clusters and endpoints come and go too, not just route weights.
    let to_v1 = service("web", 80, "http")
        + &http_service("v1", &[&v1])
        + &http_service("v2", &[&v2])
        + &route_to("web", "v1");
    let to_v2 = service("web", 80, "http") + &http_service("v2", &[&v2]) + &route_to("web", "v2");
    let h = Harness::start(&to_v1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = [true, true, false, false]
        .into_iter()
        .map(|keep_alive| load(h.outbound(), "web", keep_alive, stop.clone(), tally.clone()))
        .collect();
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let next = if i % 2 == 0 { &to_v2 } else { &to_v1 };
        h.rewrite_atomic(next).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    {
        let t = tally.lock().unwrap();
        assert!(
            t.failures.is_empty(),
            "{} of {} requests failed: {:?}",
            t.failures.len(),
            t.ok + t.failures.len(),
            &t.failures[..t.failures.len().min(5)]
        );
        assert!(t.ok >= 100, "load was sent: {t:?}");
        assert!(v1.hits() > 0 && v2.hits() > 0, "both configs served: {t:?}");
    }

    // The last config (to v1) is the one in effect.
    let m = spread(&h, "web", "/", 20).await;
    assert_eq!(m.get("v1"), Some(&20), "{m:?}");
    let accepted = h
        .metric("meshwork_config_updates_total", &[("result", "accepted")])
        .await;
    assert!(accepted >= 9.0, "initial + 8 reloads accepted: {accepted}");
}

#[tokio::test]
async fn invalid_config_is_refused_and_the_last_good_one_keeps_serving() {
    let web = Backend::http("web").await;
    let good = http_service("web", &[&web]);
    let h = Harness::start(&good).await;
    let rejected = || h.metric("meshwork_config_updates_total", &[("result", "rejected")]);
    assert_eq!(rejected().await, 0.0);

    // A typo: unknown fields are errors, reported with file, line and field.
    let typo =
        good.clone() + &route_to("web", "web").replace("port: 80}]}]", "port: 80, weigth: 5}]}]");
    let line = typo.lines().position(|l| l.contains("weigth")).unwrap() + 1;
    let err = h
        .rewrite(&typo)
        .await
        .expect_err("a typo is refused")
        .to_string();
    let file = h.file.display().to_string();
    assert!(
        err.contains(&format!("{file}:{line}")),
        "names file and line {line}: {err}"
    );
    assert!(err.contains("weigth"), "names the field: {err}");
    assert_eq!(
        h.get("web", "/").await.status,
        200,
        "the last good config serves"
    );
    assert_eq!(rejected().await, 1.0);

    // Well-formed but wrong: a backend Service that does not exist.
    let dangling = good.clone() + &route_to("web", "nope");
    let err = h
        .rewrite_atomic(&dangling)
        .await
        .expect_err("a dangling backendRef is refused")
        .to_string();
    assert!(err.contains(&file), "names the file: {err}");
    assert!(
        err.contains("HTTPRoute default/web"),
        "names the resource: {err}"
    );
    assert!(err.contains("backendRefs[0]"), "names the field: {err}");
    assert!(err.contains("nope"), "names the missing Service: {err}");
    let r = h.get("web", "/").await;
    assert_eq!((r.status.as_u16(), r.backend()), (200, Some("web")));

    // The poller sees the same refused file again and again: counted once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rejected().await, 2.0);

    // A good file is accepted again afterwards.
    let other = Backend::http("other").await;
    h.rewrite_atomic(&(good + &http_service("other", &[&other])))
        .await
        .unwrap();
    assert_eq!(h.get("other", "/").await.backend(), Some("other"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let b = Backend::http("web").await;
    let h = Harness::start(&http_service("web", &[&b])).await;
    let outbound = h.outbound();

    let mut idle = h.client().await;
    assert_eq!(idle.get("web", "/").await.unwrap().status, 200);
    let mut in_flight = Vec::new();
    for i in 0..4 {
        let mut c = h.client().await;
        in_flight.push(tokio::spawn(async move {
            c.get("web", &format!("/delay/500?conn={i}")).await
        }));
    }
    wait_until("every slow request reached the backend", || b.hits() == 5).await;

    let Harness { proxy, .. } = h;
    let finished = proxy.shutdown(Duration::from_secs(10)).await;
    assert!(finished, "everything finished before the deadline");
    for (i, t) in in_flight.into_iter().enumerate() {
        let r = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("in-flight request {i} failed: {e:#}"));
        assert_eq!(r.status, 200, "in-flight request {i}: {}", r.text());
    }
    let refused = TcpStream::connect(outbound).await;
    assert!(
        refused.is_err(),
        "new connections are refused after shutdown"
    );
    assert!(
        idle.get("web", "/").await.is_err(),
        "idle keep-alive connections were closed"
    );
}

async fn echo(s: &mut TcpStream, payload: &[u8]) {
    s.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_moves_on_reload_without_breaking_traffic() {
    let web = Backend::http("web").await;
    let db = Backend::tcp_echo("db").await;
    let (p1, mut p2) = (free_port(), free_port());
    while p2 == p1 {
        p2 = free_port();
    }
    let mesh = |local: u16| {
        http_service("web", &[&web])
            + &tcp_service("db", 5432, local)
            + &workload("db-0", "db", 5432, db.addr)
    };
    let h = Harness::start(&mesh(p1)).await;
    let name = "outbound_tcp|5432|db.default";
    assert_eq!(h.listener(name).port(), p1);
    let mut before = TcpStream::connect(h.listener(name)).await.unwrap();
    echo(&mut before, b"before the move").await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let http = [true, false]
        .map(|keep_alive| load(h.outbound(), "web", keep_alive, stop.clone(), tally.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.rewrite_atomic(&mesh(p2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(h.listener(name).port(), p2, "the listener moved");
    let mut after = TcpStream::connect(h.listener(name)).await.unwrap();
    echo(&mut after, b"after the move").await;
    // The connection accepted on the old address is drained, not cut.
    echo(&mut before, b"still here").await;
    // The old address stops accepting.
    let old: SocketAddr = ([127, 0, 0, 1], p1).into();
    let mut closed = false;
    for _ in 0..100 {
        if TcpStream::connect(old).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "{old} still accepts after the move");

    stop.store(true, Ordering::SeqCst);
    for c in http {
        c.await.unwrap();
    }
    let t = tally.lock().unwrap();
    assert!(
        t.failures.is_empty(),
        "HTTP failed during the move: {:?}",
        &t.failures[..t.failures.len().min(5)]
    );
    assert!(t.ok > 0);
}

/// `POST /drain_listeners?inboundonly` (what `meshwork run` sends on
/// SIGTERM): inbound stops accepting and stays closed across config reloads,
/// while outbound keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drains_inbound_only_and_it_stays_drained_across_reloads() {
    let web = Backend::http("web").await;
    let mesh = http_service("web", &[&web]);
    let h = Harness::start_with(&mesh, Some("web-0")).await;
    let inbound = h.inbound();
    drop(TcpStream::connect(inbound).await.unwrap());

    let mut admin = TcpStream::connect(h.proxy.admin_addr()).await.unwrap();
    admin
        .write_all(b"POST /drain_listeners?inboundonly HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    admin.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("OK: stopped accepting on [inbound]\n"),
        "{answer}"
    );

    let refused = || async { TcpStream::connect(inbound).await.is_err() };
    let mut closed = false;
    for _ in 0..100 {
        if refused().await {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "{inbound} still accepts after the drain");
    assert_eq!(
        h.get("web", "/").await.status,
        200,
        "outbound keeps serving"
    );

    // A new config does not bring inbound back.
    h.rewrite(&(mesh + &service("extra", 80, "http")))
        .await
        .unwrap();
    assert!(
        h.proxy.listener("inbound").is_none(),
        "{:?}",
        h.proxy.listeners()
    );
    assert!(refused().await, "{inbound} accepts again after a reload");
    assert!(!h.admin("/listeners").await.text().contains("inbound"));
    assert_eq!(h.get("web", "/").await.status, 200);
}
