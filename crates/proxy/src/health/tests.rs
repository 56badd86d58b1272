#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::check::{grpc_request, serving_status, Probe, Session};
use super::*;
use crate::balance::Balancer;
use crate::config::model::{
    Cluster, Detector, Endpoint, FailurePercentage, HealthCheckKind, LbPolicy, LocalityEndpoints,
    SuccessRate,
};

const SERVICE: &str = "svc.ns";

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, i as u8 + 1)), 8080)
}

fn endpoints(addrs: &[SocketAddr]) -> LoadAssignment {
    LoadAssignment {
        cluster_name: "c".into(),
        localities: vec![LocalityEndpoints {
            region: "r".into(),
            zone: "z".into(),
            weight: addrs.len() as u32,
            priority: 0,
            endpoints: addrs
                .iter()
                .map(|&address| Endpoint {
                    address,
                    weight: 1,
                    mtls: false,
                    unhealthy: false,
                })
                .collect(),
        }],
    }
}

fn cluster(outlier: Option<OutlierDetection>, checks: Vec<HealthCheck>) -> Cluster {
    Cluster {
        name: "c".into(),
        eds_name: "c".into(),
        static_endpoints: None,
        lb: LbPolicy::RoundRobin,
        http2: false,
        original_dst: false,
        connect_timeout: Duration::from_secs(1),
        idle_timeout: None,
        service: Some(SERVICE.into()),
        tls: None,
        circuit_breakers: Default::default(),
        outlier_detection: outlier.map(Arc::new),
        health_checks: checks.into_iter().map(Arc::new).collect(),
        panic_threshold: 0.0,
    }
}

/// Consecutive 5xx at 5, 100% enforced; 10 s interval, 30 s base ejection,
/// 300 s max, 100% max ejection.
fn outlier() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: Some(Detector {
            consecutive: 5,
            enforcing: 100,
        }),
        consecutive_gateway_failure: None,
        success_rate: None,
        failure_percentage: None,
        interval: Duration::from_secs(10),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_time: Duration::from_secs(300),
        max_ejection_percent: 100,
    }
}

fn check(kind: HealthCheckKind) -> HealthCheck {
    HealthCheck {
        timeout: Duration::from_millis(500),
        interval: Duration::from_millis(50),
        unhealthy_threshold: 2,
        healthy_threshold: 2,
        kind,
    }
}

struct Fixture {
    health: Arc<ClusterHealth>,
    balancer: Balancer,
    env: Arc<Env>,
}

impl Fixture {
    fn new(cluster: &Cluster, addrs: &[SocketAddr]) -> Self {
        let env = Arc::new(Env::default());
        let health = ClusterHealth::new(&cluster.name);
        let la = endpoints(addrs);
        health.configure(cluster, &la, &|_| None, &env);
        let balancer = Balancer::for_cluster(cluster, &la, &health);
        Self {
            health,
            balancer,
            env,
        }
    }

    /// Applies a new config, as a runtime rebuild does.
    fn update(&mut self, cluster: &Cluster, addrs: &[SocketAddr]) {
        let la = endpoints(addrs);
        self.health.configure(cluster, &la, &|_| None, &self.env);
        self.balancer = Balancer::for_cluster(cluster, &la, &self.health);
    }

    fn report(&self, a: SocketAddr, outcome: Outcome, times: usize) {
        let host = self.health.host(a);
        for _ in 0..times {
            host.report(outcome);
        }
    }

    fn status(&self, a: SocketAddr) -> HostStatus {
        self.health.status().remove(&a).expect("endpoint is known")
    }

    fn ejected(&self, a: SocketAddr) -> bool {
        self.status(a).outlier_ejected
    }

    fn healthy(&self, a: SocketAddr) -> bool {
        self.status(a).healthy
    }

    fn ejections(&self, detector: &'static str) -> u64 {
        self.env
            .metrics()
            .event_count(Event::Ejection, SERVICE, detector)
    }

    fn checks(&self, result: &'static str) -> u64 {
        self.env
            .metrics()
            .event_count(Event::HealthCheck, SERVICE, result)
    }

    /// Addresses seen in `n` picks.
    fn picked(&self, n: usize) -> HashSet<SocketAddr> {
        (0..n)
            .filter_map(|_| self.balancer.pick(None).map(|p| p.address()))
            .collect()
    }
}

use crate::metrics::Event;

async fn elapse(d: Duration) {
    tokio::time::sleep(d).await;
}

// ---------------------------------------------------------------------------
// Outlier detection (paused time).

#[tokio::test(start_paused = true)]
async fn consecutive_5xx_ejects_until_the_ejection_time_is_served() {
    let f = Fixture::new(
        &cluster(Some(outlier()), vec![]),
        &[addr(0), addr(1), addr(2)],
    );
    f.report(addr(0), Outcome::Status(500), 4);
    assert!(!f.ejected(addr(0)));
    f.report(addr(0), Outcome::Status(503), 1);
    assert!(f.ejected(addr(0)));
    assert_eq!(f.ejections("consecutive_5xx"), 1);
    assert!(!f.picked(60).contains(&addr(0)));
    let s = f.status(addr(0));
    assert_eq!(s.ejections, 1);
    assert_eq!(s.ejection_remaining_secs, Some(30.0));

    // Ticks at 10 s and 20 s leave it out; the one at 30 s returns it.
    elapse(Duration::from_secs(29)).await;
    assert!(f.ejected(addr(0)));
    elapse(Duration::from_millis(1500)).await;
    assert!(!f.ejected(addr(0)));
    assert!(f.picked(60).contains(&addr(0)));
}

#[tokio::test(start_paused = true)]
async fn a_success_breaks_the_run_of_failures() {
    let f = Fixture::new(&cluster(Some(outlier()), vec![]), &[addr(0), addr(1)]);
    f.report(addr(0), Outcome::Status(500), 4);
    f.report(addr(0), Outcome::Status(404), 1);
    f.report(addr(0), Outcome::Status(500), 4);
    assert!(!f.ejected(addr(0)));
    f.report(addr(0), Outcome::Status(502), 1);
    assert!(f.ejected(addr(0)));
}

#[tokio::test(start_paused = true)]
async fn connect_failures_resets_and_timeouts_count_as_5xx() {
    let f = Fixture::new(&cluster(Some(outlier()), vec![]), &[addr(0), addr(1)]);
    for o in [
        Outcome::ConnectFailure,
        Outcome::Reset,
        Outcome::Timeout,
        Outcome::ConnectFailure,
    ] {
        f.report(addr(0), o, 1);
    }
    assert!(!f.ejected(addr(0)));
    f.report(addr(0), Outcome::Timeout, 1);
    assert!(f.ejected(addr(0)));
    assert_eq!(f.ejections("consecutive_5xx"), 1);
}

#[tokio::test(start_paused = true)]
async fn gateway_failures_eject_under_their_own_detector() {
    let mut od = outlier();
    od.consecutive_5xx = None;
    od.consecutive_gateway_failure = Some(Detector {
        consecutive: 3,
        enforcing: 100,
    });
    let f = Fixture::new(&cluster(Some(od), vec![]), &[addr(0), addr(1)]);
    // A 500 is a 5xx but not a gateway error: it breaks the run.
    for o in [502, 504, 500, 503, 504].map(Outcome::Status) {
        f.report(addr(0), o, 1);
    }
    assert!(!f.ejected(addr(0)));
    f.report(addr(0), Outcome::ConnectFailure, 1);
    assert!(f.ejected(addr(0)));
    assert_eq!(f.ejections("consecutive_gateway_failure"), 1);
    assert_eq!(f.ejections("consecutive_5xx"), 0);

    // Both detectors completing at once: the gateway detector goes first.
    let mut od = outlier();
    od.consecutive_gateway_failure = Some(Detector {
        consecutive: 5,
        enforcing: 100,
    });
    let f = Fixture::new(&cluster(Some(od), vec![]), &[addr(0), addr(1)]);
    f.report(addr(0), Outcome::Status(503), 5);
    assert!(f.ejected(addr(0)));
    assert_eq!(f.ejections("consecutive_gateway_failure"), 1);
    assert_eq!(f.ejections("consecutive_5xx"), 0);
}

#[tokio::test(start_paused = true)]
async fn picks_report_to_their_endpoint() {
    let f = Fixture::new(&cluster(Some(outlier()), vec![]), &[addr(0), addr(1)]);
    let mut failures = 0;
    while failures < 5 {
        let pick = f.balancer.pick(None).unwrap();
        if pick.address() == addr(1) {
            pick.report(Outcome::Status(500));
            failures += 1;
        } else {
            pick.report(Outcome::Status(200));
        }
    }
    assert!(f.ejected(addr(1)));
    assert!(!f.ejected(addr(0)));
    assert_eq!(f.picked(20), HashSet::from([addr(0)]));
}

#[tokio::test(start_paused = true)]
async fn ejection_time_grows_with_repeats_is_capped_and_decays() {
    let mut od = outlier();
    od.consecutive_5xx = Some(Detector {
        consecutive: 1,
        enforcing: 100,
    });
    od.interval = Duration::from_secs(1);
    od.base_ejection_time = Duration::from_secs(10);
    od.max_ejection_time = Duration::from_secs(25);
    let f = Fixture::new(&cluster(Some(od), vec![]), &[addr(0), addr(1)]);
    let eject_and_serve = |expected: f64| {
        f.report(addr(0), Outcome::Status(500), 1);
        let s = f.status(addr(0));
        assert!(s.outlier_ejected);
        assert_eq!(s.ejection_remaining_secs, Some(expected));
        expected
    };
    // 10 s, then 20 s, then 30 s capped at 25 s; each ejection comes right
    // after the previous one ended (less than an interval of good health).
    for (n, expected) in [10.0, 20.0, 25.0].into_iter().enumerate() {
        let served = eject_and_serve(expected);
        elapse(Duration::from_secs_f64(served)).await;
        // The next whole-second tick returns it.
        elapse(Duration::from_millis(1000)).await;
        assert!(!f.ejected(addr(0)), "ejection {n}");
    }
    assert_eq!(f.status(addr(0)).ejections, 3);
    // Three healthy intervals bring the multiplier (3) back to 0, so the
    // next ejection is the base time again.
    elapse(Duration::from_secs(4)).await;
    eject_and_serve(10.0);
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_bounds_ejections() {
    let mut od = outlier();
    od.max_ejection_percent = 20;
    let addrs: Vec<SocketAddr> = (0..10).map(addr).collect();
    let f = Fixture::new(&cluster(Some(od), vec![]), &addrs);
    for &a in &addrs[..3] {
        f.report(a, Outcome::Status(500), 5);
    }
    assert!(f.ejected(addr(0)) && f.ejected(addr(1)));
    assert!(!f.ejected(addr(2)), "a third ejection would be 30% > 20%");
    assert_eq!(f.ejections("consecutive_5xx"), 2);
    // The refused detection restarted the run: 4 more are not enough.
    f.report(addr(2), Outcome::Status(500), 4);
    assert!(!f.ejected(addr(2)));

    // Envoy's default 10% with fewer than 10 endpoints ejects nobody (no
    // `always_eject_one_host`).
    let mut od = outlier();
    od.max_ejection_percent = 10;
    let f = Fixture::new(&cluster(Some(od), vec![]), &addrs[..5]);
    f.report(addr(0), Outcome::Status(500), 5);
    assert!(!f.ejected(addr(0)));
    assert_eq!(f.ejections("consecutive_5xx"), 0);
}

#[tokio::test(start_paused = true)]
async fn success_rate_ejects_a_statistical_outlier() {
    let mut od = outlier();
    od.consecutive_5xx = None;
    od.success_rate = Some(SuccessRate {
        minimum_hosts: 5,
        request_volume: 100,
        stdev_factor: 1.9,
        enforcing: 100,
    });
    let addrs: Vec<SocketAddr> = (0..5).map(addr).collect();
    let f = Fixture::new(&cluster(Some(od), vec![]), &addrs);
    // Success rates 50, 100, 100, 100, 100: mean 90, stdev 20, threshold
    // 90 - 1.9 * 20 = 52.
    f.report(addr(0), Outcome::Status(200), 50);
    f.report(addr(0), Outcome::Status(500), 50);
    for &a in &addrs[1..] {
        f.report(a, Outcome::Status(200), 100);
    }
    elapse(Duration::from_millis(10_001)).await;
    assert!(f.ejected(addr(0)));
    assert!(addrs[1..].iter().all(|&a| !f.ejected(a)));
    assert_eq!(f.ejections("success_rate"), 1);

    // Next interval: one endpoint short of the request volume means fewer
    // than `minimum_hosts` qualify, so nothing is evaluated.
    f.report(addr(1), Outcome::Status(500), 100);
    f.report(addr(2), Outcome::Status(200), 99);
    for &a in &addrs[3..] {
        f.report(a, Outcome::Status(200), 100);
    }
    elapse(Duration::from_secs(10)).await;
    assert!(!f.ejected(addr(1)));
    assert_eq!(f.ejections("success_rate"), 1);
}

#[tokio::test(start_paused = true)]
async fn failure_percentage_ejects_above_its_threshold() {
    let mut od = outlier();
    od.consecutive_5xx = None;
    od.failure_percentage = Some(FailurePercentage {
        threshold: 85,
        minimum_hosts: 5,
        request_volume: 50,
        enforcing: 100,
    });
    let addrs: Vec<SocketAddr> = (0..5).map(addr).collect();
    let f = Fixture::new(&cluster(Some(od), vec![]), &addrs);
    // 90% failures: out. 80%: stays.
    f.report(addr(0), Outcome::Status(200), 5);
    f.report(addr(0), Outcome::Status(500), 45);
    f.report(addr(1), Outcome::Status(200), 10);
    f.report(addr(1), Outcome::Timeout, 40);
    for &a in &addrs[2..] {
        f.report(a, Outcome::Status(200), 50);
    }
    elapse(Duration::from_millis(10_001)).await;
    assert!(f.ejected(addr(0)));
    assert!(!f.ejected(addr(1)));
    assert_eq!(f.ejections("failure_percentage"), 1);
}

#[tokio::test(start_paused = true)]
async fn health_survives_config_updates() {
    let addrs = [addr(0), addr(1), addr(2)];
    let mut f = Fixture::new(&cluster(Some(outlier()), vec![]), &addrs);
    f.report(addr(0), Outcome::Status(500), 5);
    f.report(addr(1), Outcome::Status(500), 4);
    elapse(Duration::from_secs(5)).await;

    // A new config (one more endpoint, another interval) and balancer.
    let mut od = outlier();
    od.interval = Duration::from_secs(5);
    let more = [addr(0), addr(1), addr(2), addr(3)];
    f.update(&cluster(Some(od.clone()), vec![]), &more);
    assert!(f.ejected(addr(0)));
    assert!(!f.picked(60).contains(&addr(0)));
    // The run of addr(1) carried over.
    f.report(addr(1), Outcome::Status(500), 1);
    assert!(f.ejected(addr(1)));
    // The ejection of addr(0) (at 0 s, 30 s) ends on the new timer.
    elapse(Duration::from_secs(26)).await;
    assert!(!f.ejected(addr(0)));

    // Removing outlier detection returns every ejected endpoint.
    assert!(f.ejected(addr(1)));
    f.update(&cluster(None, vec![]), &more);
    assert!(!f.ejected(addr(1)));
    assert_eq!(f.picked(80).len(), 4);
    // Without detection, outcomes are ignored.
    f.report(addr(2), Outcome::Status(500), 50);
    assert!(!f.ejected(addr(2)));

    // An endpoint removed and added back starts afresh.
    f.update(&cluster(Some(od.clone()), vec![]), &more);
    f.report(addr(3), Outcome::Status(500), 5);
    assert!(f.ejected(addr(3)));
    f.update(&cluster(Some(od.clone()), vec![]), &more[..3]);
    f.update(&cluster(Some(od), vec![]), &more);
    assert!(!f.ejected(addr(3)));
}

#[tokio::test(start_paused = true)]
async fn reports_on_removed_endpoints_are_ignored() {
    let mut f = Fixture::new(&cluster(Some(outlier()), vec![]), &[addr(0), addr(1)]);
    let old = f.health.host(addr(0));
    f.update(&cluster(Some(outlier()), vec![]), &[addr(1)]);
    for _ in 0..10 {
        old.report(Outcome::Status(500));
    }
    assert_eq!(f.ejections("consecutive_5xx"), 0);
    assert!(!f.health.status().contains_key(&addr(0)));
}

#[tokio::test(start_paused = true)]
async fn outlier_timer_stops_with_the_cluster() {
    let f = Fixture::new(&cluster(Some(outlier()), vec![]), &[addr(0)]);
    let weak = Arc::downgrade(&f.health);
    drop(f);
    assert!(
        weak.upgrade().is_none(),
        "tasks must not keep the cluster alive"
    );
    elapse(Duration::from_secs(30)).await;
}

// ---------------------------------------------------------------------------
// Active health checks: state machine.

#[test]
fn check_sessions_follow_envoys_thresholds() {
    let hc = HealthCheck {
        unhealthy_threshold: 3,
        healthy_threshold: 2,
        ..check(HealthCheckKind::Tcp)
    };
    // A new endpoint (failing, pending): the first success passes it.
    let mut s = Session::default();
    assert_eq!(s.observe(true, Probe::Healthy, &hc), Some(false));

    // Network failures count to the threshold; a success restarts them.
    let mut s = Session::default();
    assert_eq!(s.observe(false, Probe::NetworkFailure, &hc), None);
    assert_eq!(s.observe(false, Probe::Timeout, &hc), None);
    assert_eq!(s.observe(false, Probe::Healthy, &hc), None);
    assert_eq!(s.observe(false, Probe::NetworkFailure, &hc), None);
    assert_eq!(s.observe(false, Probe::NetworkFailure, &hc), None);
    assert_eq!(s.observe(false, Probe::Timeout, &hc), Some(true));
    // Back: healthy_threshold successes in a row (no first-check shortcut).
    assert_eq!(s.observe(true, Probe::Healthy, &hc), None);
    assert_eq!(s.observe(true, Probe::NetworkFailure, &hc), None);
    assert_eq!(s.observe(true, Probe::Healthy, &hc), None);
    assert_eq!(s.observe(true, Probe::Healthy, &hc), Some(false));

    // A wrong answer fails at once.
    let mut s = Session::default();
    assert_eq!(s.observe(false, Probe::Healthy, &hc), None);
    assert_eq!(s.observe(false, Probe::Unhealthy, &hc), Some(true));
    // A first failure of a pending endpoint changes nothing.
    let mut s = Session::default();
    assert_eq!(s.observe(true, Probe::NetworkFailure, &hc), None);
    assert_eq!(s.observe(true, Probe::Healthy, &hc), None);
}

#[test]
fn grpc_health_messages_round_trip() {
    assert_eq!(&grpc_request("")[..], &[0, 0, 0, 0, 0]);
    assert_eq!(
        &grpc_request("a.B")[..],
        &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']
    );
    // status = SERVING, with an unknown field before it.
    assert_eq!(serving_status(&[0, 0, 0, 0, 4, 0x10, 7, 0x08, 1]), Some(1));
    assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
    // Empty message: UNKNOWN.
    assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
    // Compressed, truncated, garbage.
    assert_eq!(serving_status(&[1, 0, 0, 0, 2, 0x08, 1]), None);
    assert_eq!(serving_status(&[0, 0, 0, 0, 3, 0x08, 1]), None);
    assert_eq!(serving_status(&[0, 0, 0]), None);
    assert_eq!(serving_status(&[0, 0, 0, 0, 1, 0x0f]), None);
}

// ---------------------------------------------------------------------------
// Active health checks against real sockets (real time, short intervals).

/// Waits up to 3 s for `cond`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Accepts connections on `listener` and counts them, holding them open.
fn count_connections(listener: TcpListener) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            c.fetch_add(1, SeqCst);
            held.push(s);
        }
    });
    (count, task)
}

async fn local() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// What the test HTTP server saw and answers.
#[derive(Default)]
struct Backend {
    status: AtomicU16,
    connections: AtomicUsize,
    requests: Mutex<Vec<(String, String, Option<String>)>>,
    /// gRPC: `(grpc-status, serving status)` to answer.
    grpc: Mutex<(u32, u8)>,
}

/// Serves `listener` as an HTTP/1.1 or HTTP/2 server answering `backend`'s
/// status (or, for gRPC paths, its gRPC answer).
fn serve(listener: TcpListener, http2: bool, backend: Arc<Backend>) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            backend.connections.fetch_add(1, SeqCst);
            let b = backend.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let b = b.clone();
                    async move {
                        let host = req
                            .headers()
                            .get(http::header::HOST)
                            .map(|h| h.to_str().unwrap().to_owned())
                            .or_else(|| req.uri().authority().map(|a| a.to_string()));
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        lock(&b.requests).push((
                            path.clone(),
                            host.unwrap_or_default(),
                            Some(format!("{body:?}")),
                        ));
                        let response = if path == "/grpc.health.v1.Health/Check" {
                            let (grpc_status, serving) = *lock(&b.grpc);
                            let mut trailers = http::HeaderMap::new();
                            trailers
                                .insert("grpc-status", grpc_status.to_string().parse().unwrap());
                            let frames = vec![
                                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![
                                    0, 0, 0, 0, 2, 0x08, serving,
                                ]))),
                                Ok(Frame::trailers(trailers)),
                            ];
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
                                .unwrap()
                        } else {
                            http::Response::builder()
                                .status(b.status.load(SeqCst))
                                .body(
                                    Full::new(Bytes::from_static(b"ok"))
                                        .map_err(|e| match e {})
                                        .boxed(),
                                )
                                .unwrap()
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
            let io = TokioIo::new(stream);
            tokio::spawn(async move {
                if http2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
}

#[tokio::test]
async fn tcp_check_follows_the_endpoint() {
    let (listener, live) = local().await;
    let (_, dead) = local().await; // bound, then closed: connections are refused
    let (accepted, server) = count_connections(listener);
    let f = Fixture::new(
        &cluster(None, vec![check(HealthCheckKind::Tcp)]),
        &[live, dead],
    );
    // Both start unhealthy, pending their first check.
    for a in [live, dead] {
        let s = f.status(a);
        assert!(
            !s.healthy && s.failed_active_hc && s.pending_active_hc,
            "{s:?}"
        );
    }
    assert!(
        f.balancer.pick(None).is_none(),
        "panic threshold 0: nothing to pick yet"
    );
    eventually("the live endpoint passes", || f.healthy(live)).await;
    eventually("both endpoints were checked", || {
        !f.status(dead).pending_active_hc
    })
    .await;
    assert!(!f.healthy(dead));
    assert_eq!(f.picked(20), HashSet::from([live]));
    assert!(accepted.load(SeqCst) >= 1);

    // The live endpoint dies: two failures (the threshold) take it out.
    server.abort();
    let _ = server.await;
    eventually("the dead endpoint is failed", || !f.healthy(live)).await;
    assert!(f.balancer.pick(None).is_none());
    assert!(f.checks("success") >= 1);
    assert!(f.checks("failure") >= 3);
}

#[tokio::test]
async fn http_check_expects_its_statuses_and_reuses_its_connection() {
    let (listener, a) = local().await;
    let backend = Arc::new(Backend::default());
    backend.status.store(200, SeqCst);
    serve(listener, false, backend.clone());
    let hc = HealthCheck {
        unhealthy_threshold: 3,
        ..check(HealthCheckKind::Http {
            path: "/healthz?full=1".into(),
            host: None,
            expected: vec![(200, 201), (204, 205)],
        })
    };
    let f = Fixture::new(&cluster(None, vec![hc]), &[a]);
    eventually("passes", || f.healthy(a)).await;
    {
        let requests = lock(&backend.requests);
        let (path, host, _) = &requests[0];
        assert_eq!(path, "/healthz");
        assert_eq!(host, "c", "Host defaults to the cluster name");
    }
    // A wrong status fails at once (threshold 3 is for network failures).
    backend.status.store(503, SeqCst);
    eventually("fails", || !f.healthy(a)).await;
    // 204 is expected too; two successes bring it back.
    backend.status.store(204, SeqCst);
    let before = f.checks("success");
    eventually("passes again", || f.healthy(a)).await;
    assert!(f.checks("success") >= before + 2);
    eventually("several checks", || lock(&backend.requests).len() >= 6).await;
    assert_eq!(backend.connections.load(SeqCst), 1, "one reused connection");
}

#[tokio::test]
async fn http2_check_sends_the_configured_host() {
    let (listener, a) = local().await;
    let backend = Arc::new(Backend::default());
    backend.status.store(200, SeqCst);
    serve(listener, true, backend.clone());
    let mut c = cluster(
        None,
        vec![check(HealthCheckKind::Http {
            path: "/ready".into(),
            host: Some("api.example".into()),
            expected: vec![(200, 201)],
        })],
    );
    c.http2 = true;
    let f = Fixture::new(&c, &[a]);
    eventually("passes", || f.healthy(a)).await;
    let (path, host, _) = lock(&backend.requests)[0].clone();
    assert_eq!((path.as_str(), host.as_str()), ("/ready", "api.example"));
}

#[tokio::test]
async fn grpc_check_wants_serving() {
    let (listener, a) = local().await;
    let backend = Arc::new(Backend::default());
    *lock(&backend.grpc) = (0, 1);
    serve(listener, true, backend.clone());
    let f = Fixture::new(
        &cluster(
            None,
            vec![check(HealthCheckKind::Grpc {
                service: "shop.Cart".into(),
                authority: None,
            })],
        ),
        &[a],
    );
    eventually("serving passes", || f.healthy(a)).await;
    let (path, host, body) = lock(&backend.requests)[0].clone();
    assert_eq!(path, "/grpc.health.v1.Health/Check");
    assert_eq!(host, "c", ":authority defaults to the cluster name");
    assert_eq!(body.unwrap(), format!("{:?}", grpc_request("shop.Cart")));
    // NOT_SERVING fails at once.
    *lock(&backend.grpc) = (0, 2);
    eventually("not serving fails", || !f.healthy(a)).await;
    *lock(&backend.grpc) = (0, 1);
    eventually("serving again", || f.healthy(a)).await;
    // A failed call (UNIMPLEMENTED) fails too, whatever the message says.
    *lock(&backend.grpc) = (12, 1);
    eventually("grpc-status 12 fails", || !f.healthy(a)).await;
}

#[tokio::test]
async fn a_silent_endpoint_times_out() {
    let (listener, a) = local().await;
    let _accepting = count_connections(listener);
    let hc = HealthCheck {
        timeout: Duration::from_millis(100),
        unhealthy_threshold: 1,
        ..check(HealthCheckKind::Http {
            path: "/".into(),
            host: None,
            expected: vec![(200, 201)],
        })
    };
    let f = Fixture::new(&cluster(None, vec![hc]), &[a]);
    eventually("a timeout is counted", || f.checks("timeout") >= 1).await;
    assert!(!f.healthy(a));
    assert_eq!(f.checks("success"), 0);
}

#[tokio::test]
async fn checkers_stop_with_their_endpoint_cluster_and_proxy() {
    let (listener, a) = local().await;
    let (accepted, _server) = count_connections(listener);
    let still = || async {
        let n = accepted.load(SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        accepted.load(SeqCst) == n
    };
    let c = cluster(None, vec![check(HealthCheckKind::Tcp)]);

    // Endpoint removed from the cluster.
    let mut f = Fixture::new(&c, &[a]);
    eventually("checked", || accepted.load(SeqCst) >= 2).await;
    f.update(&c, &[]);
    assert!(still().await, "the checker of a removed endpoint stopped");

    // Cluster gone (its last runtime dropped).
    f.update(&c, &[a]);
    let n = accepted.load(SeqCst);
    eventually("checked again", || accepted.load(SeqCst) > n + 1).await;
    drop(f);
    assert!(still().await, "the checkers of a removed cluster stopped");

    // Proxy shutdown.
    let (trigger, _watch) = crate::drain::channel();
    let env = Arc::new(Env::default());
    env.watch_drain(trigger.watch());
    let health = ClusterHealth::new("c");
    health.configure(&c, &endpoints(&[a]), &|_| None, &env);
    let n = accepted.load(SeqCst);
    eventually("checked by the new cluster", || {
        accepted.load(SeqCst) > n + 1
    })
    .await;
    trigger.signal();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(still().await, "checkers stopped on shutdown");
    drop(health);
}

#[tokio::test]
async fn a_passing_check_returns_an_ejected_endpoint() {
    let (listener, a) = local().await;
    let (_accepted, _server) = count_connections(listener);
    let hc = HealthCheck {
        interval: Duration::from_millis(200),
        ..check(HealthCheckKind::Tcp)
    };
    let f = Fixture::new(&cluster(Some(outlier()), vec![hc]), &[a, addr(0)]);
    eventually("passes", || f.healthy(a)).await;
    f.report(a, Outcome::Status(500), 5);
    // max_ejection_percent 100: allowed.
    assert!(f.ejected(a));
    eventually("the next check un-ejects it", || !f.ejected(a)).await;
    assert_eq!(f.status(a).ejections, 1);
}

#[tokio::test]
async fn endpoints_already_serving_keep_serving_when_checks_are_added() {
    let (listener, a) = local().await;
    let (_accepted, _server) = count_connections(listener);
    let mut f = Fixture::new(&cluster(None, vec![]), &[a]);
    assert!(f.healthy(a));
    f.update(&cluster(None, vec![check(HealthCheckKind::Tcp)]), &[a]);
    assert!(
        f.healthy(a),
        "kept in rotation until its checks say otherwise"
    );
    // A new endpoint added now waits for its first check.
    let (_, b) = local().await;
    f.update(&cluster(None, vec![check(HealthCheckKind::Tcp)]), &[a, b]);
    assert!(f.status(b).pending_active_hc && !f.healthy(b));
    // Removing the checks clears their verdicts.
    f.update(&cluster(None, vec![]), &[a, b]);
    assert!(f.healthy(b));
}

// ---------------------------------------------------------------------------
// Through the runtime, as the proxy uses it.

fn snapshot(c: &Cluster, addrs: &[SocketAddr]) -> Arc<crate::config::model::Snapshot> {
    let mut s = crate::config::model::Snapshot::default();
    s.clusters.insert(c.name.clone(), Arc::new(c.clone()));
    s.endpoints
        .insert(c.eds_name.clone(), Arc::new(endpoints(addrs)));
    Arc::new(s)
}

#[tokio::test(start_paused = true)]
async fn runtimes_share_health_and_show_it() {
    use crate::runtime::Runtime;
    let env = Env::new(Arc::new(crate::metrics::Metrics::new()));
    let c = cluster(Some(outlier()), vec![]);
    let first = Runtime::build(
        snapshot(&c, &[addr(0), addr(1)]),
        Some(&Runtime::empty(env.clone())),
    );
    let state = first.cluster("c").unwrap();
    state
        .balancer
        .health()
        .host(addr(0))
        .report(Outcome::Status(500));
    for _ in 0..4 {
        state
            .balancer
            .health()
            .host(addr(0))
            .report(Outcome::Status(500));
    }
    let second = Runtime::build(snapshot(&c, &[addr(0), addr(1), addr(2)]), Some(&first));
    let state2 = second.cluster("c").unwrap();
    assert!(Arc::ptr_eq(
        state.balancer.health(),
        state2.balancer.health()
    ));
    assert_eq!(
        env.metrics()
            .event_count(Event::Ejection, SERVICE, "consecutive_5xx"),
        1
    );

    let status = serde_json::to_value(second.clusters_status()).unwrap();
    let eps = status["c"]["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 3);
    let ejected = eps
        .iter()
        .find(|e| e["address"] == addr(0).to_string())
        .unwrap();
    assert_eq!(ejected["healthy"], false);
    assert_eq!(ejected["outlier_ejected"], true);
    assert_eq!(ejected["ejections"], 1);
    assert_eq!(ejected["ejection_remaining_secs"], 30.0);
    assert_eq!(status["c"]["priorities"][0]["healthy"], 2);
    assert_eq!(status["c"]["panic_threshold"], 0.0);

    // A runtime without the cluster, once the old ones are gone, drops it.
    let weak = Arc::downgrade(state2.balancer.health());
    let third = Runtime::build(
        Arc::new(crate::config::model::Snapshot::default()),
        Some(&second),
    );
    drop((first, second));
    assert!(weak.upgrade().is_none());
    assert!(third.clusters_status().is_empty());
}

#[tokio::test]
async fn http2_checks_of_clusters_named_like_meshwork_use_the_endpoint_address() {
    let (listener, a) = local().await;
    let backend = Arc::new(Backend::default());
    *lock(&backend.grpc) = (0, 1);
    serve(listener, true, backend.clone());
    let mut c = cluster(
        None,
        vec![check(HealthCheckKind::Grpc {
            service: String::new(),
            authority: None,
        })],
    );
    c.name = "outbound|8080||cart.shop".into();
    let f = Fixture::new(&c, &[a]);
    eventually("passes", || f.healthy(a)).await;
    let (_, host, body) = lock(&backend.requests)[0].clone();
    assert_eq!(host, a.to_string());
    assert_eq!(body.unwrap(), format!("{:?}", grpc_request("")));
}
