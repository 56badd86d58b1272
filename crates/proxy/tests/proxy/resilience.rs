//! The resilience mechanisms of issue 5 through real sockets: a standalone
//! proxy (from mesh YAML, the same translation a control plane serves) in
//! front of misbehaving `testkit` backends. One test (or a few) per "Done
//! when" item: retries hide transient failures; the retry budget keeps the
//! backend's load under (1 + budget) x the offered load during an outage;
//! outlier detection ejects a bad endpoint and traffic recovers; active
//! health checks (HTTP, TCP, gRPC) take an endpoint out before requests
//! reach it; circuit breakers shed load without waiting for the slow
//! backend; rate limits hold their rate; faults fire at their percentage;
//! timeouts (per try, request, stream idle); locality preference and
//! failover.
//!
//! Assertions are on counts (requests the backend saw, statuses the client
//! saw, metric values), never on how long something took: the machine is
//! shared and noisy. Waits are bounded polls. Each test sends a bounded
//! number of requests, so load does not depend on timing either.
//!
//! The drivers ([`Tally`], [`sequential`], [`concurrent`]) are shared with
//! the Envoy parity tests (`parity.rs`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use testkit::{Backend, Behavior, H1Client, H2Client, Pattern, Reply};

use crate::harness::*;

const HEAD: &str = "apiVersion: meshwork.dev/v1alpha1";

// ---------------------------------------------------------------- drivers

/// What clients saw over a run of requests.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub replies: Vec<Reply>,
    /// Requests that got no HTTP response (connection closed or reset).
    pub errors: Vec<String>,
}

impl Tally {
    /// Responses with this status.
    pub fn count(&self, status: u16) -> usize {
        self.replies.iter().filter(|r| r.status == status).count()
    }

    /// Responses by status; `0` counts requests without a response.
    pub fn statuses(&self) -> BTreeMap<u16, usize> {
        let mut m = BTreeMap::new();
        for r in &self.replies {
            *m.entry(r.status.as_u16()).or_default() += 1;
        }
        if !self.errors.is_empty() {
            m.insert(0, self.errors.len());
        }
        m
    }

    /// Responses carrying header `name` with exactly `value`.
    pub fn with_header(&self, name: &str, value: &str) -> usize {
        self.replies
            .iter()
            .filter(|r| r.header(name) == Some(value))
            .count()
    }

    /// Responses that came from backend `name` (`x-backend`).
    pub fn from(&self, backend: &str) -> usize {
        self.replies
            .iter()
            .filter(|r| r.backend() == Some(backend))
            .count()
    }

    pub fn merge(&mut self, other: Tally) {
        self.replies.extend(other.replies);
        self.errors.extend(other.errors);
    }
}

/// How long a test client waits for an answer before it records an error:
/// a bound against hanging tests (a hung request fails its test), not a
/// timing assertion.
const ANSWER_BOUND: Duration = Duration::from_secs(10);

/// An HTTP/1.1 client on one keep-alive connection, reopened when the
/// proxy closed it (after an error, or a `connection: close` answer), and
/// giving up on an answer after [`ANSWER_BOUND`].
pub(crate) struct Client {
    addr: SocketAddr,
    from: Option<IpAddr>,
    conn: Option<H1Client>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Client {
            addr,
            from: None,
            conn: None,
        }
    }

    /// A client whose connections come from `from` (any 127.0.0.0/8
    /// address), to act as several client hosts.
    pub fn from(addr: SocketAddr, from: IpAddr) -> Self {
        Client {
            addr,
            from: Some(from),
            conn: None,
        }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        if self.conn.is_none() {
            let c = match self.from {
                Some(ip) => H1Client::connect_from(self.addr, ip).await,
                None => H1Client::connect(self.addr).await,
            };
            self.conn = Some(c.map_err(|e| format!("connect: {e}"))?);
        }
        let conn = self.conn.as_mut().unwrap();
        let sent = tokio::time::timeout(ANSWER_BOUND, conn.send(req)).await;
        let sent = sent.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {ANSWER_BOUND:?}")));
        match sent {
            Ok(r) => {
                if r.header("connection") == Some("close") {
                    self.conn = None;
                }
                Ok(r)
            }
            Err(e) => {
                self.conn = None;
                Err(format!("{e:#}"))
            }
        }
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply, String> {
        self.send(testkit::get(host, path)).await
    }

    /// `n` GETs one after another, tallied.
    pub async fn run(&mut self, host: &str, path: &str, n: usize) -> Tally {
        let mut t = Tally::default();
        for _ in 0..n {
            match self.get(host, path).await {
                Ok(r) => t.replies.push(r),
                Err(e) => t.errors.push(e),
            }
        }
        t
    }
}

/// Sends `n` GETs one after another (a closed loop of one client).
pub(crate) async fn sequential(addr: SocketAddr, host: &str, path: &str, n: usize) -> Tally {
    Client::new(addr).run(host, path, n).await
}

/// `clients` clients at once, each sending `per_client` GETs one after
/// another: a bounded load of `clients x per_client` requests with at most
/// `clients` in flight.
pub(crate) async fn concurrent(
    addr: SocketAddr,
    host: &str,
    path: &str,
    clients: usize,
    per_client: usize,
) -> Tally {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (host, path) = (host.to_owned(), path.to_owned());
            tokio::spawn(async move { sequential(addr, &host, &path, per_client).await })
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        all.merge(t.await.unwrap());
    }
    all
}

/// Polls the async `cond` every 20 ms until it holds; panics naming `what`
/// after 10 s (a bound against hanging, not a timing assertion).
pub(crate) async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Bounds of a binomial count (`n` trials, probability `p`) at 4 standard
/// deviations: a correct implementation falls outside them about once in
/// 16 000 runs.
pub(crate) fn binomial_bounds(n: usize, p: f64) -> (usize, usize) {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    let lo = (mean - 4.0 * sigma).floor().max(0.0) as usize;
    let hi = (mean + 4.0 * sigma).ceil() as usize;
    (lo, hi)
}

/// The access log once it has at least `n` entries (the writer batches;
/// bounded wait).
pub(crate) async fn access_log(h: &Harness, n: usize) -> Vec<serde_json::Value> {
    let mut entries = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&h.access_log).unwrap_or_default();
        entries = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("access log line is JSON"))
            .collect();
        if entries.len() >= n {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the access log has {} entries, expected {n}", entries.len());
}

/// Access log entries whose `response_flags` include `flag`.
fn flagged(log: &[serde_json::Value], flag: &str) -> usize {
    log.iter()
        .filter(|e| {
            e["response_flags"]
                .as_str()
                .unwrap_or("")
                .split(',')
                .any(|f| f == flag)
        })
        .count()
}

// ---------------------------------------------------------------- YAML

/// A `TrafficPolicy` on Service `svc`; `spec` holds its sections, as YAML
/// lines indented by two spaces.
pub(crate) fn policy(svc: &str, spec: &str) -> String {
    policy_on(
        &format!("{svc}-resilience"),
        &format!("{{kind: Service, name: {svc}}}"),
        spec,
    )
}

/// A `TrafficPolicy` named `name` with `targetRef` given as a YAML flow
/// mapping.
pub(crate) fn policy_on(name: &str, target_ref: &str, spec: &str) -> String {
    format!(
        "{HEAD}\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {target_ref}\n{spec}---\n"
    )
}

/// A Workload of `svc` (port `p80`) at `addr` in `region`/`zone`.
pub(crate) fn located(name: &str, svc: &str, addr: SocketAddr, region: &str, zone: &str) -> String {
    format!(
        "{HEAD}\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{service: {svc}, address: \"{}\", ports: {{p80: {}}}, locality: {{region: {region}, zone: {zone}}}}}\n---\n",
        addr.ip(),
        addr.port()
    )
}

/// Health check settings of the tests: fast, and two failures to go down.
pub(crate) const FAST_CHECKS: &str =
    "interval: 200ms, timeout: 100ms, healthyThreshold: 1, unhealthyThreshold: 2";
const UNHEALTHY_THRESHOLD: usize = 2;

/// Waits until `b` has answered `n` more health probes than it had when
/// called. Probes of one endpoint are sequential, so once probe `k + 1`
/// arrived, the checker has acted on probe `k`.
pub(crate) async fn probes(b: &Backend, n: usize) {
    let target = b.health_checks() + n;
    wait_until(
        &format!("{} answered {target} health probes", b.name),
        || b.health_checks() >= target,
    )
    .await;
}

// ---------------------------------------------------------------- retries

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_transient_failures() {
    // Every second request fails: with a 503, with a reset connection, or
    // (for half the endpoints of `halfdead`) because nothing listens.
    let flappy = Backend::flapping("flappy", Pattern::EveryNth(2, Behavior::Status(503))).await;
    let resetting = Backend::flapping("resetting", Pattern::EveryNth(2, Behavior::Reset)).await;
    let alive = Backend::http("alive").await;
    let dead = Backend::http("dead").await;
    dead.kill().await;
    let yaml = http_service("flappy", &[&flappy])
        + &http_service("resetting", &[&resetting])
        + &http_service("halfdead", &[&alive, &dead])
        + &policy("flappy", "  retries: {attempts: 2, on: [5xx]}\n")
        + &policy("resetting", "  retries: {attempts: 2, on: [reset]}\n")
        + &policy(
            "halfdead",
            "  loadBalancer: {algorithm: roundRobin}\n  retries: {attempts: 2, on: [connect-failure]}\n",
        );
    let h = Harness::start(&yaml).await;
    let n = 20;

    let t = sequential(h.outbound(), "flappy", "/", n).await;
    assert_eq!(t.statuses(), BTreeMap::from([(200, n)]), "{:?}", t.errors);
    // The first request succeeds at once; each later one fails once and
    // succeeds on its retry.
    assert_eq!(flappy.hits(), 2 * n - 1);
    assert_eq!(
        h.metric("meshwork_retries_total", &[("reason", "5xx")])
            .await,
        (n - 1) as f64
    );

    let t = sequential(h.outbound(), "resetting", "/", n).await;
    assert_eq!(t.statuses(), BTreeMap::from([(200, n)]), "{:?}", t.errors);
    assert_eq!(resetting.hits(), 2 * n - 1);

    let t = sequential(h.outbound(), "halfdead", "/", n).await;
    assert_eq!(t.statuses(), BTreeMap::from([(200, n)]), "{:?}", t.errors);
    assert_eq!((t.from("alive"), alive.hits()), (n, n));
    assert!(
        h.metric("meshwork_retries_total", &[("reason", "connect-failure")])
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_replay_small_bodies_but_not_large_ones() {
    let down = Backend::status("down", 503).await;
    let yaml =
        http_service("web", &[&down]) + &policy("web", "  retries: {attempts: 2, on: [5xx]}\n");
    let h = Harness::start(&yaml).await;
    let post = |len: usize| {
        Request::post("/upload")
            .header("host", "web")
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .unwrap()
    };
    let mut c = Client::new(h.outbound());

    // A 1 KiB body is buffered and replayed: three attempts, then the last
    // 503 is forwarded.
    let r = c.send(post(1024)).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(down.hits(), 3);

    // 100 KiB is more than the proxy buffers for replay: one attempt.
    down.reset_hits();
    let r = c.send(post(100 * 1024)).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(down.hits(), 1);
    assert_eq!(
        h.metric(
            "meshwork_retries_skipped_total",
            &[("reason", "body_not_replayable")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_keeps_backend_load_under_one_plus_budget_during_an_outage() {
    // A full outage: every attempt fails, after 20 ms (so requests spend
    // their time in the proxy, where the budget counts them, rather than in
    // the test's clients). `web` has a 20% budget; `unbudgeted` only a
    // generous maxRetries, so there every request costs 1 + 3 attempts.
    let slow_503 = Pattern::Always(Behavior::StatusAfter(503, Duration::from_millis(20)));
    let down = Backend::controlled("down", slow_503.clone()).await;
    let also_down = Backend::controlled("also-down", slow_503).await;
    let budget = 0.20;
    let yaml = http_service("web", &[&down])
        + &http_service("unbudgeted", &[&also_down])
        + &policy(
            "web",
            "  retries:\n    attempts: 3\n    on: [5xx]\n    budget: {percent: 20, minConcurrency: 1}\n",
        )
        + &policy(
            "unbudgeted",
            "  connectionPool: {maxRetries: 1000}\n  retries: {attempts: 3, on: [5xx]}\n",
        );
    let h = Harness::start(&yaml).await;
    let clients = 20;

    let offered = clients * 10;
    let t = concurrent(h.outbound(), "web", "/", clients, 10).await;
    assert_eq!(
        t.statuses(),
        BTreeMap::from([(503, offered)]),
        "{:?}",
        t.errors
    );
    let hits = down.hits();
    assert!(
        hits as f64 <= (1.0 + budget) * offered as f64,
        "{hits} backend requests for {offered} offered: more than (1 + {budget}) x"
    );
    // Some retries were allowed, and the budget refused others.
    assert!(hits > offered, "no retry at all: {hits}");
    let web = [("destination_service", "web.default")];
    let skipped = h
        .metric(
            "meshwork_retries_skipped_total",
            &[web[0], ("reason", "budget_exhausted")],
        )
        .await;
    assert!(skipped >= 1.0, "the budget never refused a retry");
    let sent = h.metric("meshwork_retries_total", &web).await;
    assert_eq!(sent as usize, hits - offered, "every retry is counted");

    // The same outage without a budget: the load multiplies.
    let offered = clients * 5;
    let t = concurrent(h.outbound(), "unbudgeted", "/", clients, 5).await;
    assert_eq!(t.count(503), offered);
    assert_eq!(also_down.hits(), 4 * offered);
}

// ---------------------------------------------------------------- outlier detection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_bad_endpoint_and_traffic_recovers() {
    let good = Backend::http("good").await;
    let bad = Backend::status("bad", 503).await;
    let yaml = http_service("web", &[&good, &bad])
        + &policy(
            "web",
            "  loadBalancer: {algorithm: roundRobin}\n  outlierDetection: {consecutive5xx: 3, interval: 200ms, baseEjectionTime: 1s, maxEjectionPercent: 50}\n",
        );
    let h = Harness::start(&yaml).await;

    let t = sequential(h.outbound(), "web", "/", 30).await;
    // Round robin sends every second request to `bad` until its third 5xx
    // in a row ejects it (Envoy applies the ejection right away, maybe one
    // request late); then everything goes to `good`.
    let failures = bad.hits();
    assert!((3..=4).contains(&failures), "bad got {failures} requests");
    assert_eq!(t.count(503), failures, "{:?}", t.statuses());
    assert_eq!(t.from("good"), 30 - failures);
    assert!(
        t.replies[t.replies.len() - 10..]
            .iter()
            .all(|r| r.backend() == Some("good")),
        "traffic still reaches the ejected endpoint"
    );
    assert_eq!(
        h.metric(
            "meshwork_outlier_ejections_total",
            &[("detector", "consecutive_5xx")]
        )
        .await,
        1.0
    );

    // Healed: once the ejection time has passed, it gets traffic again.
    bad.set(Behavior::Ok);
    let mut c = Client::new(h.outbound());
    let mut healed = false;
    for _ in 0..250 {
        let r = c.get("web", "/").await.unwrap();
        if r.backend() == Some("bad") {
            healed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(healed, "the healed endpoint never got traffic again");
    let t = sequential(h.outbound(), "web", "/", 10).await;
    assert_eq!(t.count(200), 10);
    assert!(
        t.from("bad") >= 4,
        "{:?}",
        t.replies.iter().map(|r| r.backend()).collect::<Vec<_>>()
    );

    // Failing again, it is ejected again (for twice as long).
    bad.set(Behavior::Status(503));
    sequential(h.outbound(), "web", "/", 20).await;
    assert_eq!(
        h.metric(
            "meshwork_outlier_ejections_total",
            &[("detector", "consecutive_5xx")]
        )
        .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_never_ejects_more_than_max_ejection_percent() {
    let a = Backend::status("a", 503).await;
    let b = Backend::status("b", 503).await;
    let yaml = http_service("web", &[&a, &b])
        + &policy(
            "web",
            "  loadBalancer: {algorithm: roundRobin}\n  outlierDetection: {consecutiveGatewayErrors: 2, consecutive5xx: 0, baseEjectionTime: 30s, maxEjectionPercent: 50}\n",
        );
    let h = Harness::start(&yaml).await;
    let t = sequential(h.outbound(), "web", "/", 20).await;
    assert_eq!(t.count(503), 20);
    // One of the two is ejected; the other stays, failing, because a second
    // ejection would exceed 50%.
    assert_eq!(
        h.metric(
            "meshwork_outlier_ejections_total",
            &[("detector", "consecutive_gateway_failure")]
        )
        .await,
        1.0
    );
    let (ha, hb) = (a.hits(), b.hits());
    assert_eq!(ha + hb, 20);
    assert!(ha.min(hb) <= 3 && ha.max(hb) >= 17, "a {ha}, b {hb}");
}

// ---------------------------------------------------------------- health checks

/// Two endpoints, `a` and `b`, checked with `check` (YAML flow mapping
/// entries, e.g. `http: {path: /healthz}`) on a `proto` port; `probed`
/// counts the checks an endpoint has seen; the test turns `b` unhealthy
/// with `down`, and back with `up`.
async fn health_check_case(
    check: &str,
    proto: &str,
    probed: fn(&Backend) -> usize,
    down: impl AsyncFnOnce(&Harness, &Backend),
    up: impl AsyncFnOnce(&Harness, &Backend),
) {
    let a = Backend::grpc_health("a").await;
    let b = Backend::grpc_health("b").await;
    let mut yaml = service("web", 80, proto);
    yaml += &workload("web-0", "web", 80, a.addr);
    yaml += &workload("web-1", "web", 80, b.addr);
    yaml += &policy(
        "web",
        &format!("  loadBalancer: {{algorithm: roundRobin}}\n  healthCheck: {{{FAST_CHECKS}, {check}}}\n"),
    );
    let h = Harness::start(&yaml).await;

    // Both checked and healthy: both serve.
    wait_until("both endpoints were checked twice", || {
        probed(&a) >= 2 && probed(&b) >= 2
    })
    .await;
    let t = sequential(h.outbound(), "web", "/", 10).await;
    assert_eq!(t.count(200), 10, "{:?} {:?}", t.statuses(), t.errors);
    assert!(t.from("a") > 0 && t.from("b") > 0, "{:?}", t.statuses());

    // Marked down: not one request reaches it, and no client sees an error.
    down(&h, &b).await;
    b.reset_hits();
    let t = sequential(h.outbound(), "web", "/", 20).await;
    assert_eq!(t.count(200), 20, "{:?} {:?}", t.statuses(), t.errors);
    assert_eq!((t.from("a"), b.hits()), (20, 0));
    assert!(
        h.metric("meshwork_health_checks_total", &[("result", "failure")])
            .await
            >= UNHEALTHY_THRESHOLD as f64
    );

    // Back up: it serves again.
    up(&h, &b).await;
    let t = sequential(h.outbound(), "web", "/", 10).await;
    assert_eq!(t.count(200), 10);
    assert!(t.from("b") > 0, "the recovered endpoint gets no traffic");
    assert!(
        h.metric("meshwork_health_checks_total", &[("result", "success")])
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_take_an_endpoint_out_before_requests_hit_it() {
    health_check_case(
        &format!("http: {{path: {}}}", testkit::HEALTH_PATH),
        "http",
        Backend::health_checks,
        async |_, b| {
            b.set_healthy(false);
            probes(b, UNHEALTHY_THRESHOLD + 1).await;
        },
        async |_, b| {
            b.set_healthy(true);
            probes(b, 2).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_follow_serving_and_not_serving() {
    health_check_case(
        "grpc: {}",
        "grpc",
        Backend::health_checks,
        async |_, b| {
            b.set_healthy(false);
            probes(b, UNHEALTHY_THRESHOLD + 1).await;
        },
        async |_, b| {
            b.set_healthy(true);
            probes(b, 2).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_checks_take_a_dead_endpoint_out_before_requests_hit_it() {
    health_check_case(
        "tcp: {}",
        "http",
        // Before any request, the only connections are the checks'.
        Backend::connections,
        // Dead: connections are refused. Requests that reached it would
        // fail (no retries here), so 20 successes mean none did.
        async |h, b| {
            let before = h
                .metric("meshwork_health_checks_total", &[("result", "failure")])
                .await;
            b.kill().await;
            let want = before + (UNHEALTHY_THRESHOLD + 1) as f64;
            eventually("the dead endpoint failed its checks", move || async move {
                h.metric("meshwork_health_checks_total", &[("result", "failure")])
                    .await
                    >= want
            })
            .await;
        },
        async |h, b| {
            let before = h
                .metric("meshwork_health_checks_total", &[("result", "success")])
                .await;
            b.revive().await;
            // Both endpoints pass every round: 4 more successes include
            // at least 2 of the revived one's, which is sequential.
            eventually(
                "the revived endpoint passed its checks",
                move || async move {
                    h.metric("meshwork_health_checks_total", &[("result", "success")])
                        .await
                        >= before + 4.0
                },
            )
            .await;
        },
    )
    .await;
}

// ---------------------------------------------------------------- circuit breaking

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_sheds_load_without_waiting_for_the_slow_backend() {
    // The first two requests hang until the test releases them.
    let slow = Backend::controlled("slow", Pattern::First(2, Behavior::Hold)).await;
    let yaml =
        http_service("web", &[&slow]) + &policy("web", "  connectionPool: {maxRequests: 2}\n");
    let h = Harness::start(&yaml).await;
    let out = h.outbound();
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { sequential(out, "web", "/held", 1).await }))
        .collect();
    wait_until("two requests are in flight", || slow.in_flight() == 2).await;

    // Every further request is refused at once: the backend never sees it
    // and the two held requests are still in flight when the answers come.
    let t = sequential(out, "web", "/", 10).await;
    assert_eq!(t.count(503), 10, "{:?} {:?}", t.statuses(), t.errors);
    assert_eq!(t.with_header("x-meshwork-error", "upstream_overflow"), 10);
    assert_eq!(t.with_header("x-envoy-overloaded", "true"), 10);
    assert!(
        t.replies[0].text().contains("maxRequests"),
        "{}",
        t.replies[0].text()
    );
    assert_eq!((slow.in_flight(), slow.hits()), (2, 2));
    assert_eq!(
        h.metric("meshwork_upstream_overflow_total", &[("limit", "requests")])
            .await,
        10.0
    );

    slow.release();
    for t in held {
        assert_eq!(t.await.unwrap().count(200), 1);
    }
    // Capacity is back.
    assert_eq!(sequential(out, "web", "/", 3).await.count(200), 3);
    let log = access_log(&h, 15).await;
    assert_eq!(flagged(&log, "UO"), 10, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_of_pending_requests_when_connections_are_used_up() {
    // One connection (HTTP/1.1: one request at a time on it), one waiting
    // request: of two more requests, one waits and one is shed.
    let slow = Backend::controlled("slow", Pattern::First(1, Behavior::Hold)).await;
    let yaml = http_service("web", &[&slow])
        + &policy(
            "web",
            "  connectionPool: {maxConnections: 1, maxPendingRequests: 1}\n",
        );
    let h = Harness::start(&yaml).await;
    let out = h.outbound();
    let first = tokio::spawn(async move { sequential(out, "web", "/first", 1).await });
    wait_until("the first request is in flight", || slow.in_flight() == 1).await;
    let more: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { sequential(out, "web", "/", 1).await }))
        .collect();
    let h = &h;
    eventually("one request was shed", move || async move {
        h.metric(
            "meshwork_upstream_overflow_total",
            &[("limit", "pending_requests")],
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(
        slow.hits(),
        1,
        "the pending request went out without a connection"
    );
    slow.release();
    let mut t = first.await.unwrap();
    for m in more {
        t.merge(m.await.unwrap());
    }
    assert_eq!(
        t.statuses(),
        BTreeMap::from([(200, 2), (503, 1)]),
        "{:?}",
        t.errors
    );
    assert_eq!(t.with_header("x-meshwork-error", "upstream_overflow"), 1);
    assert_eq!(
        (slow.hits(), slow.connections(), slow.peak_in_flight()),
        (2, 1, 1)
    );
}

// ---------------------------------------------------------------- rate limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_its_burst_and_says_when_to_retry() {
    let app = Backend::http("web-app").await;
    // A bucket of 10 that refills 5 a minute: nothing refills in this test.
    let yaml = http_service("web", &[&app])
        + &policy(
            "web",
            "  rateLimit: {requests: 5, interval: 1m, burst: 10}\n",
        );
    let h = Harness::start_with(&yaml, Some("web-0")).await;

    let t = sequential(h.inbound(), "web", "/", 30).await;
    assert_eq!(
        t.statuses(),
        BTreeMap::from([(200, 10), (429, 20)]),
        "{:?}",
        t.errors
    );
    assert_eq!(app.hits(), 10);
    assert_eq!(t.with_header("x-meshwork-error", "rate_limited"), 20);
    for r in t.replies.iter().filter(|r| r.status == 429) {
        let after: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("429 without a retry-after: {:?}", r.headers));
        assert!((1..=60).contains(&after), "retry-after {after}");
        assert_eq!(
            r.header("x-ratelimit-limit")
                .map(|v| v.split(',').next().unwrap().trim()),
            Some("10")
        );
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    }
    assert_eq!(
        h.metric("meshwork_rate_limited_total", &[("scope", "listener")])
            .await,
        20.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_refills_at_its_rate() {
    let app = Backend::http("web-app").await;
    let yaml =
        http_service("web", &[&app]) + &policy("web", "  rateLimit: {requests: 3, interval: 1s}\n");
    let h = Harness::start_with(&yaml, Some("web-0")).await;
    let mut c = Client::new(h.inbound());

    // Empty the bucket (3), then keep asking for a bounded number of
    // requests spread over at least two intervals.
    let t = c.run("web", "/", 6).await;
    assert_eq!(t.statuses(), BTreeMap::from([(200, 3), (429, 3)]));
    let start = Instant::now();
    let wait: u64 = t.replies[5].header("retry-after").unwrap().parse().unwrap();
    assert_eq!(wait, 1);
    let mut allowed = 0;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = c.get("web", "/").await.unwrap();
        allowed += usize::from(r.status == 200);
    }
    // At least one refill happened (>= 2.4 s passed), and never more tokens
    // than the time allows: 3 per started second.
    let elapsed = start.elapsed().as_secs_f64();
    let most = 3 * (elapsed.ceil() as usize + 1);
    assert!(allowed >= 3, "no refill in {elapsed:.1}s");
    assert!(allowed <= most, "{allowed} allowed in {elapsed:.1}s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_rate_limits_give_each_client_its_own_bucket() {
    let app = Backend::http("web-app").await;
    let yaml = http_service("web", &[&app])
        + &policy(
            "web",
            "  rateLimit: {requests: 4, interval: 1m, perSource: true}\n",
        );
    let h = Harness::start_with(&yaml, Some("web-0")).await;
    for last in [2u8, 3] {
        let ip = IpAddr::from([127, 0, 0, last]);
        let t = Client::from(h.inbound(), ip).run("web", "/", 6).await;
        assert_eq!(
            t.statuses(),
            BTreeMap::from([(200, 4), (429, 2)]),
            "client {ip}"
        );
    }
    assert_eq!(app.hits(), 8);
    assert_eq!(
        h.metric("meshwork_rate_limited_total", &[("scope", "source")])
            .await,
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_rate_limits_are_enforced_by_the_caller_on_that_route_only() {
    let app = Backend::http("web-app").await;
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n  rules:\n  - name: search\n    matches: [{path: {type: PathPrefix, value: /search}}]\n    backendRefs: [{name: web, port: 80}]\n  - backendRefs: [{name: web, port: 80}]\n---\n";
    let yaml = http_service("web", &[&app])
        + route
        + &policy_on(
            "search-limit",
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: web, sectionName: search}",
            "  rateLimit: {requests: 3, interval: 1m}\n",
        );
    let h = Harness::start(&yaml).await;
    let t = sequential(h.outbound(), "web", "/search?q=1", 8).await;
    assert_eq!(t.statuses(), BTreeMap::from([(200, 3), (429, 5)]));
    let t = sequential(h.outbound(), "web", "/other", 8).await;
    assert_eq!(t.count(200), 8);
    assert_eq!(app.hits(), 11);
    assert_eq!(
        h.metric("meshwork_rate_limited_total", &[("scope", "route")])
            .await,
        5.0
    );
}

// ---------------------------------------------------------------- faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_aborts_fire_at_their_percentage() {
    let app = Backend::http("web-app").await;
    let yaml = http_service("web", &[&app])
        + &policy(
            "web",
            "  fault:\n    abort: {httpStatus: 503, percent: 20}\n",
        );
    let h = Harness::start(&yaml).await;
    let n = 500;
    let t = concurrent(h.outbound(), "web", "/", 5, n / 5).await;
    let aborted = t.count(503);
    let (lo, hi) = binomial_bounds(n, 0.20);
    assert!(
        (lo..=hi).contains(&aborted),
        "{aborted} of {n} aborted, expected {lo}..={hi}"
    );
    assert_eq!(
        t.count(200) + aborted,
        n,
        "{:?} {:?}",
        t.statuses(),
        t.errors
    );
    // Aborted requests never reach the backend, and say why.
    assert_eq!(app.hits(), n - aborted);
    assert_eq!(t.with_header("x-meshwork-error", "fault_abort"), aborted);
    assert_eq!(
        h.metric("meshwork_faults_injected_total", &[("kind", "abort")])
            .await,
        aborted as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delays_fire_at_their_percentage_and_only_with_the_header() {
    let app = Backend::http("web-app").await;
    let yaml = http_service("web", &[&app])
        + &policy(
            "web",
            "  fault:\n    delay: {fixedDelay: 20ms, percent: 30}\n    abort: {httpStatus: 418}\n    headers: [{name: x-chaos, value: 'on'}]\n",
        );
    let h = Harness::start(&yaml).await;

    // Without the header: no fault at all.
    let t = concurrent(h.outbound(), "web", "/", 5, 20).await;
    assert_eq!(t.count(200), 100);
    assert_eq!(h.metric("meshwork_faults_injected_total", &[]).await, 0.0);

    // With it: every request is aborted (100% by default), and about 30%
    // are delayed first.
    let n = 300;
    let mut c = Client::new(h.outbound());
    let mut teapots = 0;
    for _ in 0..n {
        let req = Request::get("/")
            .header("host", "web")
            .header("x-chaos", "on")
            .body(Full::new(Bytes::new()))
            .unwrap();
        teapots += usize::from(c.send(req).await.unwrap().status == 418);
    }
    assert_eq!(teapots, n);
    assert_eq!(app.hits(), 100);
    let delayed = h
        .metric("meshwork_faults_injected_total", &[("kind", "delay")])
        .await as usize;
    let (lo, hi) = binomial_bounds(n, 0.30);
    assert!(
        (lo..=hi).contains(&delayed),
        "{delayed} of {n} delayed, expected {lo}..={hi}"
    );
    let log = access_log(&h, 100 + n).await;
    assert_eq!(flagged(&log, "DI"), delayed, "access log DI flags");
    assert_eq!(flagged(&log, "FI"), n, "access log FI flags");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_fault_aborts_answer_with_a_grpc_status() {
    let app = Backend::http("grpc-app").await;
    let mut yaml = service("greeter", 50051, "grpc");
    yaml += &workload("greeter-0", "greeter", 50051, app.addr);
    yaml += &policy("greeter", "  fault:\n    abort: {grpcStatus: 14}\n");
    let h = Harness::start(&yaml).await;
    let mut c = H2Client::connect(h.outbound()).await.unwrap();
    let req = Request::post("http://greeter:50051/helloworld.Greeter/SayHello")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let r = c.send(req).await.unwrap();
    // Trailers-only: HTTP 200 with grpc-status in the headers.
    assert_eq!(r.status, 200);
    let grpc_status = r
        .header("grpc-status")
        .or_else(|| r.trailers.as_ref()?.get("grpc-status")?.to_str().ok());
    assert_eq!(grpc_status, Some("14"), "{:?}", r.headers);
    assert_eq!(app.hits(), 0);
}

// ---------------------------------------------------------------- timeouts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_a_hung_attempt() {
    // The first attempt hangs forever; the retry answers.
    let app = Backend::controlled("app", Pattern::First(1, Behavior::BlackHole)).await;
    let yaml = http_service("web", &[&app])
        + &policy(
            "web",
            "  timeouts: {request: 10s, perTry: 300ms}\n  retries: {attempts: 2, on: [5xx]}\n",
        );
    let h = Harness::start(&yaml).await;
    let r = sequential(h.outbound(), "web", "/", 1).await;
    assert_eq!(r.count(200), 1, "{:?} {:?}", r.statuses(), r.errors);
    assert_eq!(app.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_route_backend_request_timeout_is_per_try() {
    // Gateway API `timeouts.backendRequest` is one attempt, `request` the
    // whole: with a retry the second attempt answers within `request`.
    let app = Backend::controlled("app", Pattern::First(1, Behavior::BlackHole)).await;
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n  rules:\n  - backendRefs: [{name: web, port: 80}]\n    timeouts: {request: 10s, backendRequest: 300ms}\n---\n";
    let yaml = http_service("web", &[&app])
        + route
        + &policy_on(
            "web-retries",
            "{kind: HTTPRoute, name: web}",
            "  retries: {attempts: 1, on: [gateway-error]}\n",
        );
    let h = Harness::start(&yaml).await;
    let r = sequential(h.outbound(), "web", "/", 1).await;
    assert_eq!(r.count(200), 1, "{:?} {:?}", r.statuses(), r.errors);
    assert_eq!(app.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_the_request_and_its_retries() {
    let hung = Backend::controlled("hung", Pattern::Always(Behavior::BlackHole)).await;
    let yaml = http_service("web", &[&hung])
        + &policy(
            "web",
            "  timeouts: {request: 500ms, perTry: 200ms}\n  retries: {attempts: 5, on: [5xx], backoff: {baseInterval: 1ms}}\n",
        );
    let h = Harness::start(&yaml).await;
    let r = sequential(h.outbound(), "web", "/", 1).await;
    assert_eq!(r.count(504), 1, "{:?} {:?}", r.statuses(), r.errors);
    // Attempts start at 0 ms, >= 200 ms, >= 400 ms: a fourth would start
    // after the request's 500 ms are up (6 without the request timeout).
    let attempts = hung.hits();
    assert!((2..=3).contains(&attempts), "{attempts} attempts");
    let log = access_log(&h, 1).await;
    assert_eq!(flagged(&log, "UT"), 1, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_idle_timeout_cuts_a_stalled_response() {
    // Headers and "hello" at once, then silence for 5 s.
    let stalled = Backend::slow_body("stalled", Duration::from_secs(5)).await;
    let yaml =
        http_service("web", &[&stalled]) + &policy("web", "  timeouts: {streamIdle: 300ms}\n");
    let h = Harness::start(&yaml).await;
    let r = tokio::time::timeout(Duration::from_secs(4), h.client().await.get("web", "/")).await;
    let r = r.expect("the stalled response was not cut");
    match r {
        Err(_) => {}
        Ok(r) => assert_ne!(
            r.text(),
            "hello world",
            "the stream idle timeout did not fire"
        ),
    }
}

// ---------------------------------------------------------------- locality

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_prefers_the_callers_zone_and_fails_over_by_region() {
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
    let h = Harness::start_with(&yaml, Some("client-0")).await;
    for b in [&near, &zone2, &far, &fallback] {
        probes(b, 2).await;
    }

    let t = sequential(h.outbound(), "web", "/", 20).await;
    assert_eq!(t.from("near"), 20, "{:?}", t.statuses());

    // The caller's zone is down: the rest of its region takes over.
    near.set_healthy(false);
    probes(&near, UNHEALTHY_THRESHOLD + 1).await;
    let t = sequential(h.outbound(), "web", "/", 20).await;
    assert_eq!(
        t.from("zone2"),
        20,
        "{:?}",
        t.replies.iter().map(|r| r.backend()).collect::<Vec<_>>()
    );

    // The whole region is down: the failover region, not just any.
    zone2.set_healthy(false);
    probes(&zone2, UNHEALTHY_THRESHOLD + 1).await;
    let t = sequential(h.outbound(), "web", "/", 20).await;
    assert_eq!(
        t.from("fallback"),
        20,
        "{:?}",
        t.replies.iter().map(|r| r.backend()).collect::<Vec<_>>()
    );
    assert_eq!(far.hits(), 0);

    // The zone is back: traffic returns home.
    near.set_healthy(true);
    probes(&near, 2).await;
    let t = sequential(h.outbound(), "web", "/", 20).await;
    assert_eq!(t.from("near"), 20);
}

// ---------------------------------------------------------------- visibility

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_shows_every_mechanism() {
    let app = Backend::http("web-app").await;
    let yaml = http_service("web", &[&app])
        + &policy(
            "web",
            "  connectionPool: {maxConnections: 7, maxPendingRequests: 8, maxRequests: 9}\n  timeouts: {request: 3s, perTry: 1s}\n  retries: {attempts: 2, on: [5xx], budget: {percent: 25, minConcurrency: 2}}\n  outlierDetection: {consecutive5xx: 4}\n  healthCheck: {interval: 5s, timeout: 1s, tcp: {}}\n  fault:\n    abort: {httpStatus: 503, percent: 1}\n",
        );
    let h = Harness::start(&yaml).await;
    let dump = h.admin("/config_dump").await.json();
    let cluster = dump["clusters"]
        .as_object()
        .unwrap()
        .values()
        .find(|c| c["circuit_breakers"]["max_requests"] == 9)
        .unwrap_or_else(|| panic!("no cluster with max_requests 9: {:#}", dump["clusters"]));
    assert_eq!(cluster["circuit_breakers"]["max_connections"], 7);
    assert_eq!(cluster["circuit_breakers"]["max_pending_requests"], 8);
    assert_eq!(
        cluster["circuit_breakers"]["retry_budget"]["budget_percent"],
        25.0
    );
    assert_eq!(
        cluster["outlier_detection"]["consecutive_5xx"]["consecutive"],
        4
    );
    assert_eq!(cluster["health_checks"].as_array().map(Vec::len), Some(1));
    let text = dump.to_string();
    for want in ["\"retry\":{", "\"per_try_timeout\"", "\"fault\":{"] {
        assert!(text.contains(want), "{want} not in the config dump: {text}");
    }
}

/// `connectionPool.maxConnections` also bounds opaque TCP connections, as
/// Envoy's tcp_proxy does: past the limit a new connection is closed at once
/// (flag UO) and counted, while the open one keeps working.
#[tokio::test]
async fn tcp_connections_past_max_connections_are_closed_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = Backend::tcp_echo("db").await;
    let yaml = tcp_service("db", 5432, 0)
        + &workload("db-0", "db", 5432, db.addr)
        + "apiVersion: meshwork.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: db}\nspec:\n  targetRef: {kind: Service, name: db}\n  connectionPool: {maxConnections: 1}\n---\n";
    let h = Harness::start(&yaml).await;
    let addr = h.listener("outbound_tcp|5432|db.default");

    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    first.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"one");

    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = second.write_all(b"two").await;
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf))
        .await
        .expect("closed, not left hanging")
        .unwrap_or(0);
    assert_eq!(
        n, 0,
        "the connection over the limit is closed without a byte"
    );
    let overflows = h
        .metric(
            "meshwork_upstream_overflow_total",
            &[
                ("destination_service", "db.default"),
                ("limit", "connections"),
            ],
        )
        .await;
    assert_eq!(overflows, 1.0);

    // The first connection still works; once it closes, a new one may open.
    first.write_all(b"again").await.unwrap();
    let mut buf = [0u8; 5];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again");
    drop(first);
    let mut third = None;
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"three").await;
        let mut buf = [0u8; 5];
        let ok = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .is_ok_and(|r| r.is_ok());
        if ok {
            third = Some(buf);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(third.as_ref().map(|b| &b[..]), Some(&b"three"[..]));
}
