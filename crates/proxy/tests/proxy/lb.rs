//! Load balancing as a client of the mesh sees it: several echo backends are
//! the workloads of one service `api`, a TrafficPolicy picks the algorithm,
//! and the `x-backend` header of each response says who answered.
//!
//! Distribution checks use tolerances of four or more standard deviations;
//! load-aware checks make the load deterministic (requests held in flight,
//! an endpoint slow on every request) rather than relying on timing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use testkit::{Backend, H1Client};

use crate::harness::*;

/// `n` echo backends named `api-0`.., the workloads of Service `api`.
async fn api_backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Backend::http(&format!("api-{i}")).await);
    }
    v
}

/// Service `api` over `backends` (with workload weights when given) and,
/// when `lb` is given, a TrafficPolicy with that `spec.loadBalancer`.
fn api_mesh(backends: &[&Backend], weights: Option<&[u32]>, lb: Option<&str>) -> String {
    let mut y = service("api", 80, "http");
    for (i, b) in backends.iter().enumerate() {
        y += &match weights {
            Some(w) => weighted_workload(&format!("api-{i}"), "api", 80, b.addr, w[i]),
            None => workload(&format!("api-{i}"), "api", 80, b.addr),
        };
    }
    if let Some(lb) = lb {
        y += &traffic_policy("api", lb);
    }
    y
}

fn get_with(
    path: &str,
    headers: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = http::Request::builder().uri(path).header("host", "api");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap()
}

fn within(m: &BTreeMap<String, usize>, name: &str, range: std::ops::RangeInclusive<usize>) {
    let n = m.get(name).copied().unwrap_or(0);
    assert!(
        range.contains(&n),
        "{name}: {n} not in {range:?}; all: {m:?}"
    );
}

#[tokio::test]
async fn round_robin_rotates_exactly() {
    let b = api_backends(3).await;
    let h = Harness::start(&api_mesh(
        &[&b[0], &b[1], &b[2]],
        None,
        Some("{algorithm: roundRobin}"),
    ))
    .await;
    let mut c = h.client().await;
    let mut order = Vec::new();
    for _ in 0..30 {
        let r = c.get("api", "/").await.unwrap();
        assert_eq!(r.status, 200);
        order.push(r.backend().unwrap().to_owned());
    }
    let first: BTreeSet<_> = order[..3].iter().collect();
    assert_eq!(first.len(), 3, "every endpoint once per turn: {order:?}");
    for i in 3..order.len() {
        assert_eq!(order[i], order[i - 3], "a fixed rotation: {order:?}");
    }
}

#[tokio::test]
async fn random_spreads_over_every_endpoint() {
    let b = api_backends(3).await;
    let h = Harness::start(&api_mesh(
        &[&b[0], &b[1], &b[2]],
        None,
        Some("{algorithm: random}"),
    ))
    .await;
    let m = spread(&h, "api", "/", 600).await;
    // 200 expected each, standard deviation ~12.
    for name in ["api-0", "api-1", "api-2"] {
        within(&m, name, 150..=250);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_prefers_the_idle_endpoint() {
    let b = api_backends(2).await;
    let h = Harness::start(&api_mesh(
        &[&b[0], &b[1]],
        None,
        Some("{algorithm: leastRequest}"),
    ))
    .await;
    // One request that stays in flight for the whole test.
    let mut slow_client = h.client().await;
    let slow = tokio::spawn(async move { slow_client.get("api", "/delay/30000").await });
    wait_until("a backend holds the slow request", || {
        b[0].hits() + b[1].hits() == 1
    })
    .await;
    let busy = if b[0].hits() == 1 { "api-0" } else { "api-1" };
    let idle = if busy == "api-0" { "api-1" } else { "api-0" };
    // With two endpoints both are compared on every pick: the one without a
    // request in flight wins every time.
    let m = spread(&h, "api", "/", 30).await;
    assert_eq!(
        m.get(idle),
        Some(&30),
        "all to the idle endpoint {idle}: {m:?}"
    );
    slow.abort();
}

#[tokio::test]
async fn peak_ewma_by_default_steers_away_from_a_slow_endpoint() {
    let fast = Backend::http("fast").await;
    let slow = Backend::http_slow("slow", Duration::from_millis(100)).await;
    let mut yaml = service("api", 80, "http");
    yaml += &workload("api-fast", "api", 80, fast.addr);
    yaml += &workload("api-slow", "api", 80, slow.addr);
    let h = Harness::start(&yaml).await;
    let m = spread(&h, "api", "/", 40).await;
    // The slow endpoint is tried at most about once: after one answer its
    // latency estimate is far above the fast one's.
    within(&m, "slow", 0..=2);
    within(&m, "fast", 38..=40);
}

#[tokio::test]
async fn ring_hash_on_a_header_sticks_and_spreads() {
    let b = api_backends(3).await;
    let h = Harness::start(&api_mesh(
        &[&b[0], &b[1], &b[2]],
        None,
        Some("{algorithm: ringHash, hash: {header: x-user}}"),
    ))
    .await;
    let mut c = h.client().await;
    let mut owner = BTreeMap::new();
    for user in 0..60 {
        let user = format!("user-{user}");
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            let r = c.send(get_with("/", &[("x-user", &user)])).await.unwrap();
            seen.insert(r.backend().unwrap().to_owned());
        }
        assert_eq!(seen.len(), 1, "{user} went to {seen:?}");
        *owner.entry(seen.pop_first().unwrap()).or_insert(0usize) += 1;
    }
    // 20 users each expected; an empty backend would mean no spreading.
    assert_eq!(owner.len(), 3, "users per backend: {owner:?}");
}

#[tokio::test]
async fn maglev_cookie_with_ttl_is_set_then_sticks() {
    let b = api_backends(3).await;
    let h = Harness::start(&api_mesh(
        &[&b[0], &b[1], &b[2]],
        None,
        Some("{algorithm: maglev, hash: {cookie: {name: mw-session, ttl: 1h, path: /}}}"),
    ))
    .await;
    let mut c = h.client().await;
    let mut owners = BTreeSet::new();
    for _ in 0..20 {
        // A new client: no cookie, so the proxy hands one out.
        let first = c.get("api", "/").await.unwrap();
        let set = first
            .header("set-cookie")
            .expect("Set-Cookie on the first response")
            .to_owned();
        let value = set
            .strip_prefix("mw-session=")
            .and_then(|s| s.split(';').next())
            .unwrap_or_else(|| panic!("cookie name: {set}"));
        assert!(!value.is_empty(), "{set}");
        assert!(set.contains("Max-Age=3600"), "ttl 1h: {set}");
        assert!(set.contains("Path=/"), "{set}");
        let home = first.backend().unwrap().to_owned();
        // Presenting the cookie lands on the same endpoint every time, the
        // one that served the first request; no new cookie is set.
        for _ in 0..5 {
            let cookie = format!("theme=dark; mw-session={value}");
            let r = c.send(get_with("/", &[("cookie", &cookie)])).await.unwrap();
            assert_eq!(r.backend(), Some(home.as_str()), "session {value}");
            assert_eq!(r.header("set-cookie"), None);
        }
        owners.insert(home);
    }
    assert!(owners.len() >= 2, "sessions spread: {owners:?}");
}

#[tokio::test]
async fn source_ip_hash_sticks_per_client_address() {
    let b = api_backends(3).await;
    let h = Harness::start(&api_mesh(
        &[&b[0], &b[1], &b[2]],
        None,
        Some("{algorithm: ringHash, hash: {sourceIP: true}}"),
    ))
    .await;
    let mut owners = BTreeSet::new();
    for host in 10..30u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, host));
        let mut seen = BTreeSet::new();
        // Fresh connections: the hash follows the address, not the connection.
        for _ in 0..3 {
            let mut c = H1Client::connect_from(h.outbound(), ip).await.unwrap();
            let r = c.get("api", "/").await.unwrap();
            assert_eq!(r.status, 200);
            seen.insert(r.backend().unwrap().to_owned());
        }
        assert_eq!(seen.len(), 1, "client {ip} went to {seen:?}");
        owners.extend(seen);
    }
    assert!(owners.len() >= 2, "clients spread: {owners:?}");
}

#[tokio::test]
async fn workload_weights_with_round_robin_and_random() {
    let light = Backend::http("light").await;
    let heavy = Backend::http("heavy").await;
    let mesh = |lb: &str| {
        let mut y = service("api", 80, "http");
        y += &weighted_workload("api-light", "api", 80, light.addr, 1);
        y += &weighted_workload("api-heavy", "api", 80, heavy.addr, 3);
        y + &traffic_policy("api", lb)
    };

    let h = Harness::start(&mesh("{algorithm: roundRobin}")).await;
    let m = spread(&h, "api", "/", 400).await;
    // Weighted round robin is exact over each cycle of 4.
    within(&m, "light", 99..=101);
    within(&m, "heavy", 299..=301);

    let h = Harness::start(&mesh("{algorithm: random}")).await;
    let m = spread(&h, "api", "/", 1000).await;
    // 250 expected, standard deviation ~14.
    within(&m, "light", 190..=310);
    within(&m, "heavy", 690..=810);
}
