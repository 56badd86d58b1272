//! Envoy parity for the resilience mechanisms: the same mesh YAML is
//! translated for a real Envoy 1.40 (a static bootstrap, `api::envoy_bootstrap`)
//! and run by our standalone proxy; both front the same misbehaving
//! `testkit` backends, the same request sequence goes through each (ours
//! first, then Envoy, the backends reset in between), and the outcomes a
//! user would notice are compared: statuses, requests that reached each
//! backend, and the matching counters (our metrics, Envoy's `/stats`).
//!
//! Envoy's semantics are the spec: where these tests fail for our proxy
//! alone, the proxy is wrong; where they fail for both, the translation is.
//!
//! Needs `$MESHWORK_ENVOY` (`./scripts/test.sh` sets it): a missing Envoy
//! fails the test rather than skipping it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use api::ProxyContext;
use testkit::{Backend, Behavior, Pattern};

use crate::harness::*;
use crate::resilience::{
    binomial_bounds, concurrent, eventually, located, policy, probes, sequential, Tally,
    FAST_CHECKS,
};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Envoy as the sidecar of the parity cases, with its listeners.
struct Envoy {
    process: EnvoyProcess,
    outbound: SocketAddr,
    inbound: SocketAddr,
}

impl Envoy {
    /// Starts Envoy with the static bootstrap translated from `yaml` for a
    /// sidecar fronting `workload` (or none), and waits (bounded) until its
    /// listeners accept connections.
    async fn start(yaml: &str, workload: Option<&str>) -> Envoy {
        let ctx = ProxyContext {
            outbound_addr: local(testkit::free_port()),
            inbound_addr: local(testkit::free_port()),
            workload: workload.map(|w| ("default".to_owned(), w.to_owned())),
            detect_timeout: Duration::from_millis(300),
            certs_dir: None,
            capture: false,
        };
        let mut ready = vec![ctx.outbound_addr];
        if workload.is_some() {
            ready.push(ctx.inbound_addr);
        }
        Envoy {
            process: EnvoyProcess::start(yaml, &ctx, &ready).await,
            outbound: ctx.outbound_addr,
            inbound: ctx.inbound_addr,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    /// The sum of Envoy's counters whose name ends with `.suffix` (or is
    /// `suffix`), from admin `/stats`: cluster and filter stats carry
    /// generated prefixes.
    async fn stat(&self, suffix: &str) -> u64 {
        let text = self.process.stats(&format!("{suffix}$")).await;
        text.lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(k, _)| *k == suffix || k.ends_with(&format!(".{suffix}")))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    }
}

/// Our proxy and Envoy, both from `yaml`.
async fn both(yaml: &str, workload: Option<&str>) -> (Harness, Envoy) {
    let ours = Harness::start_with(yaml, workload).await;
    let envoy = Envoy::start(yaml, workload).await;
    (ours, envoy)
}

fn summary(t: &Tally) -> String {
    let mut backends: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &t.replies {
        *backends.entry(r.backend().unwrap_or("-")).or_default() += 1;
    }
    format!("{:?} from {backends:?} errors {:?}", t.statuses(), t.errors)
}

// ---------------------------------------------------------------- cases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_retries_hide_a_flapping_backend() {
    let flaky = Pattern::EveryNth(2, Behavior::Status(503));
    let app = Backend::flapping("flappy", flaky.clone()).await;
    let yaml =
        http_service("web", &[&app]) + &policy("web", "  retries: {attempts: 2, on: [5xx]}\n");
    let (ours, envoy) = both(&yaml, None).await;
    let n = 20;

    let t = sequential(ours.outbound(), "web", "/", n).await;
    let our_hits = app.hits();
    let our_retries = ours.metric("meshwork_retries_total", &[]).await as u64;
    app.set_pattern(flaky);
    app.reset_hits();
    let e = sequential(envoy.outbound, "web", "/", n).await;
    let envoy_hits = app.hits();
    let envoy_retries = envoy.stat("upstream_rq_retry").await;

    assert_eq!(
        e.statuses(),
        BTreeMap::from([(200, n)]),
        "Envoy: {}\n{}",
        summary(&e),
        envoy.log()
    );
    assert_eq!(
        t.statuses(),
        BTreeMap::from([(200, n)]),
        "meshwork: {}",
        summary(&t)
    );
    assert_eq!(envoy_hits, 2 * n - 1, "Envoy");
    assert_eq!(our_hits, envoy_hits, "backend requests: meshwork vs Envoy");
    assert_eq!(our_retries, envoy_retries, "retries: meshwork vs Envoy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_overflow_sheds_the_same_requests() {
    let held = Pattern::First(2, Behavior::Hold);
    let slow = Backend::controlled("slow", held.clone()).await;
    let yaml =
        http_service("web", &[&slow]) + &policy("web", "  connectionPool: {maxRequests: 2}\n");
    let (ours, envoy) = both(&yaml, None).await;

    let mut outcomes = Vec::new();
    for addr in [ours.outbound(), envoy.outbound] {
        slow.set_pattern(held.clone());
        slow.reset_hits();
        let holders: Vec<_> = (0..2)
            .map(|_| tokio::spawn(async move { sequential(addr, "web", "/held", 1).await }))
            .collect();
        wait_until("two requests are held", || slow.in_flight() == 2).await;
        let t = sequential(addr, "web", "/", 10).await;
        let still_held = slow.in_flight();
        slow.release();
        let mut done = 0;
        for h in holders {
            done += h.await.unwrap().count(200);
        }
        outcomes.push((
            t.count(503),
            t.with_header("x-envoy-overloaded", "true"),
            still_held,
            slow.hits(),
            done,
        ));
    }
    // Envoy counts `max_requests` overflows as "active" overflows.
    let envoy_overflows = envoy.stat("upstream_rq_active_overflow").await;
    assert_eq!(
        outcomes[1],
        (10, 10, 2, 2, 2),
        "Envoy (shed, overloaded, held, hits, done)\n{}",
        envoy.log()
    );
    assert_eq!(
        outcomes[0], outcomes[1],
        "meshwork vs Envoy (shed, overloaded, held, hits, done)"
    );
    assert_eq!(
        ours.metric("meshwork_upstream_overflow_total", &[]).await as u64,
        envoy_overflows,
        "overflow counters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_outlier_detection_stops_sending_to_the_bad_endpoint() {
    let good = Backend::http("good").await;
    let bad = Backend::status("bad", 503).await;
    let yaml = http_service("web", &[&good, &bad])
        + &policy(
            "web",
            "  loadBalancer: {algorithm: roundRobin}\n  outlierDetection: {consecutive5xx: 3, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}\n",
        );
    let (ours, envoy) = both(&yaml, None).await;

    for (who, addr) in [("meshwork", ours.outbound()), ("Envoy", envoy.outbound)] {
        bad.reset_hits();
        let t = sequential(addr, "web", "/", 30).await;
        let tail_bad = t.replies[20..]
            .iter()
            .filter(|r| r.backend() == Some("bad"))
            .count();
        let hits = bad.hits();
        assert!(
            (3..=4).contains(&hits),
            "{who}: bad got {hits} requests: {}",
            summary(&t)
        );
        assert_eq!(tail_bad, 0, "{who} still sends to the ejected endpoint");
        assert_eq!(t.count(503), hits, "{who}: {}", summary(&t));
    }
    assert_eq!(
        envoy
            .stat("outlier_detection.ejections_enforced_consecutive_5xx")
            .await,
        1
    );
    assert_eq!(
        ours.metric(
            "meshwork_outlier_ejections_total",
            &[("detector", "consecutive_5xx")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_fault_abort_fires_at_the_same_percentage() {
    let app = Backend::http("web-app").await;
    let yaml = http_service("web", &[&app])
        + &policy(
            "web",
            "  fault:\n    abort: {httpStatus: 503, percent: 20}\n",
        );
    let (ours, envoy) = both(&yaml, None).await;
    let n = 500;
    let (lo, hi) = binomial_bounds(n, 0.20);
    let mut aborted = Vec::new();
    for (who, addr) in [("meshwork", ours.outbound()), ("Envoy", envoy.outbound)] {
        app.reset_hits();
        let t = concurrent(addr, "web", "/", 5, n / 5).await;
        let a = t.count(503);
        assert!(
            (lo..=hi).contains(&a),
            "{who}: {a} of {n} aborted, expected {lo}..={hi}"
        );
        assert_eq!(t.count(200), n - a, "{who}: {}", summary(&t));
        assert_eq!(
            app.hits(),
            n - a,
            "{who}: aborted requests reached the backend"
        );
        aborted.push(a);
    }
    assert_eq!(
        envoy.stat("fault.aborts_injected").await as usize,
        aborted[1]
    );
    assert_eq!(
        ours.metric("meshwork_faults_injected_total", &[("kind", "abort")])
            .await as usize,
        aborted[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_local_rate_limit_allows_the_same_count() {
    let app = Backend::http("web-app").await;
    let yaml = http_service("web", &[&app])
        + &policy(
            "web",
            "  rateLimit: {requests: 5, interval: 1m, burst: 10}\n",
        );
    let (ours, envoy) = both(&yaml, Some("web-0")).await;
    let mut outcomes = Vec::new();
    for addr in [ours.inbound(), envoy.inbound] {
        app.reset_hits();
        let t = sequential(addr, "web", "/", 30).await;
        let limited = t.replies.iter().filter(|r| r.status == 429);
        let headers = limited
            .clone()
            .filter(|r| {
                r.header("x-ratelimit-limit").is_some()
                    && r.header("x-ratelimit-remaining") == Some("0")
                    && r.header("retry-after").is_some()
                    && r.header("x-meshwork-error") == Some("rate_limited")
            })
            .count();
        outcomes.push((t.statuses(), app.hits(), headers));
    }
    let want = (BTreeMap::from([(200, 10), (429, 20)]), 10, 20);
    assert_eq!(
        outcomes[1],
        want,
        "Envoy (statuses, hits, 429s with x-ratelimit-*, retry-after, x-meshwork-error)\n{}",
        envoy.log()
    );
    assert_eq!(outcomes[0], outcomes[1], "meshwork vs Envoy");
    assert_eq!(envoy.stat("http_local_rate_limit.rate_limited").await, 20);
}

/// Two endpoints checked with `check` on a `proto` port; `b` turns
/// unhealthy and both proxies must stop sending it requests.
async fn health_check_parity(check: &str, proto: &str) {
    let a = Backend::grpc_health("a").await;
    let b = Backend::grpc_health("b").await;
    let mut yaml = service("web", 80, proto);
    yaml += &workload("web-0", "web", 80, a.addr);
    yaml += &workload("web-1", "web", 80, b.addr);
    yaml += &policy(
        "web",
        &format!(
            "  loadBalancer: {{algorithm: roundRobin}}\n  healthCheck: {{interval: 200ms, timeout: 100ms, healthyThreshold: 1, unhealthyThreshold: 2, {check}}}\n"
        ),
    );
    let (ours, envoy) = both(&yaml, None).await;
    // Two checkers (ours and Envoy's) probe each endpoint; wait until each
    // has passed each endpoint at least twice (Envoy first: the reference).
    let (ours_ref, envoy_ref) = (&ours, &envoy);
    eventually("Envoy passed both endpoints", move || async move {
        envoy_ref.stat("health_check.success").await >= 4
    })
    .await;
    eventually("meshwork passed both endpoints", move || async move {
        ours_ref
            .metric("meshwork_health_checks_total", &[("result", "success")])
            .await
            >= 4.0
    })
    .await;
    for (who, addr) in [("meshwork", ours.outbound()), ("Envoy", envoy.outbound)] {
        let t = sequential(addr, "web", "/", 10).await;
        assert!(t.from("a") > 0 && t.from("b") > 0, "{who}: {}", summary(&t));
    }
    b.set_healthy(false);
    // Each checker needs at most 2 failures; a third proves it acted.
    eventually("both checkers failed b three times", move || async move {
        ours_ref
            .metric("meshwork_health_checks_total", &[("result", "failure")])
            .await
            >= 3.0
            && envoy_ref.stat("health_check.failure").await >= 3
    })
    .await;
    // Ours must not send b one more request; Envoy routes by a health
    // change a moment after its admin shows it, so it gets until 4 requests
    // in a row (round robin over two) avoid b.
    let mut c = crate::resilience::Client::new(envoy.outbound);
    let mut in_a_row = 0;
    for _ in 0..100 {
        let r = c.get("web", "/").await;
        in_a_row = if r.is_ok_and(|r| r.backend() == Some("a")) {
            in_a_row + 1
        } else {
            0
        };
        if in_a_row == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (who, addr) in [("meshwork", ours.outbound()), ("Envoy", envoy.outbound)] {
        b.reset_hits();
        let t = sequential(addr, "web", "/", 20).await;
        assert_eq!((t.from("a"), b.hits()), (20, 0), "{who}: {}", summary(&t));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_http_health_checks_take_the_same_endpoint_out() {
    health_check_parity(&format!("http: {{path: {}}}", testkit::HEALTH_PATH), "http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_grpc_health_checks_take_the_same_endpoint_out() {
    health_check_parity("grpc: {}", "grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_pending_overflow_when_connections_are_used_up() {
    // One connection, one waiting request: of two more requests, one waits
    // and one is shed, by both proxies.
    let held = Pattern::First(1, Behavior::Hold);
    let slow = Backend::controlled("slow", held.clone()).await;
    let yaml = http_service("web", &[&slow])
        + &policy(
            "web",
            "  connectionPool: {maxConnections: 1, maxPendingRequests: 1}\n",
        );
    let (ours, envoy) = both(&yaml, None).await;
    let mut outcomes = Vec::new();
    for (who, addr) in [("meshwork", ours.outbound()), ("Envoy", envoy.outbound)] {
        slow.set_pattern(held.clone());
        slow.reset_hits();
        let first = tokio::spawn(async move { sequential(addr, "web", "/first", 1).await });
        wait_until("the first request is held", || slow.in_flight() == 1).await;
        let more: Vec<_> = (0..2)
            .map(|_| tokio::spawn(async move { sequential(addr, "web", "/", 1).await }))
            .collect();
        // One of the two is shed at once; the other waits for the connection.
        wait_until("one request was answered", || {
            more.iter().any(|t| t.is_finished())
        })
        .await;
        let hits_while_held = slow.hits();
        slow.release();
        let mut t = first.await.unwrap();
        for m in more {
            t.merge(m.await.unwrap());
        }
        assert_eq!(hits_while_held, 1, "{who}: a pending request went out");
        outcomes.push((t.statuses(), slow.hits()));
    }
    assert_eq!(
        outcomes[1].0,
        BTreeMap::from([(200, 2), (503, 1)]),
        "Envoy\n{}",
        envoy.log()
    );
    assert_eq!(
        outcomes[0], outcomes[1],
        "meshwork vs Envoy (statuses, hits)"
    );
    assert_eq!(envoy.stat("upstream_rq_pending_overflow").await, 1);
    assert_eq!(
        ours.metric(
            "meshwork_upstream_overflow_total",
            &[("limit", "pending_requests")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_timeouts_per_try_and_request() {
    // `/retry`: the first attempt hangs, the retry answers. `/hang`: every
    // attempt hangs, the request timeout ends it.
    let app = Backend::controlled("app", Pattern::Always(Behavior::Ok)).await;
    let yaml = http_service("web", &[&app])
        + &policy(
            "web",
            "  timeouts: {request: 1s, perTry: 300ms}\n  retries: {attempts: 5, on: [5xx], backoff: {baseInterval: 1ms}}\n",
        );
    let (ours, envoy) = both(&yaml, None).await;
    let mut outcomes = Vec::new();
    for addr in [ours.outbound(), envoy.outbound] {
        app.set_pattern(Pattern::First(1, Behavior::BlackHole));
        app.reset_hits();
        let retried = sequential(addr, "web", "/retry", 1).await;
        let retried_hits = app.hits();
        app.set(Behavior::BlackHole);
        app.reset_hits();
        let hung = sequential(addr, "web", "/hang", 1).await;
        // Attempts start at 0, >= 300, >= 600, >= 900 ms: at most 4 in 1 s.
        let hung_hits = app.hits();
        assert!((2..=4).contains(&hung_hits), "{hung_hits} attempts in 1 s");
        outcomes.push((retried.statuses(), retried_hits, hung.statuses()));
    }
    let want = (BTreeMap::from([(200, 1)]), 2, BTreeMap::from([(504, 1)]));
    assert_eq!(outcomes[1], want, "Envoy\n{}", envoy.log());
    assert_eq!(outcomes[0], outcomes[1], "meshwork vs Envoy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_locality_prefers_the_zone_and_fails_over_the_same_way() {
    let near = Backend::grpc_health("near").await; // r1/z1, the caller's zone
    let zone2 = Backend::grpc_health("zone2").await; // r1/z2
    let far = Backend::grpc_health("far").await; // r2/z1
    let fallback = Backend::grpc_health("fallback").await; // r3/z1, the failover target
    let caller = Backend::http("caller").await;
    let mut yaml = service("client", 80, "http");
    yaml += &located("client-0", "client", caller.addr, "r1", "z1");
    yaml += &service("web", 80, "http");
    yaml += &located("web-near", "web", near.addr, "r1", "z1");
    yaml += &located("web-zone2", "web", zone2.addr, "r1", "z2");
    yaml += &located("web-far", "web", far.addr, "r2", "z1");
    yaml += &located("web-fallback", "web", fallback.addr, "r3", "z1");
    yaml += &policy(
        "web",
        &format!(
            "  healthCheck: {{{FAST_CHECKS}, http: {{path: {}}}}}\n  locality:\n    failover: [{{from: r1, to: r3}}]\n",
            testkit::HEALTH_PATH
        ),
    );
    let (ours, envoy) = both(&yaml, Some("client-0")).await;
    // Two checkers probe each endpoint at the same interval: 4 probes of
    // an endpoint include at least one of each (8 after a change: at least
    // two each, and a checker acts on the first wrong answer).
    for b in [&near, &zone2, &far, &fallback] {
        probes(b, 4).await;
    }
    // Envoy routes by a health change a moment after its admin shows it
    // (seen: a few hundred milliseconds on this machine), so each
    // proxy first gets a bounded time to converge; then 20 requests in a
    // row must all go to the expected locality.
    let phase = async |want: &str| {
        for (who, addr) in [("meshwork", ours.outbound()), ("Envoy", envoy.outbound)] {
            let mut c = crate::resilience::Client::new(addr);
            let mut converged = false;
            for _ in 0..100 {
                if c.get("web", "/")
                    .await
                    .is_ok_and(|r| r.backend() == Some(want))
                {
                    converged = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(converged, "{who} never sent to {want}");
            let t = sequential(addr, "web", "/", 20).await;
            assert_eq!(t.from(want), 20, "{who}, expecting {want}: {}", summary(&t));
        }
    };
    phase("near").await;
    near.set_healthy(false);
    probes(&near, 8).await;
    phase("zone2").await;
    zone2.set_healthy(false);
    probes(&zone2, 8).await;
    phase("fallback").await;
    near.set_healthy(true);
    probes(&near, 8).await;
    phase("near").await;
    assert_eq!(far.hits(), 0);
}
