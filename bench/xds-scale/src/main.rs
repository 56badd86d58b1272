//! xds-scale: how long one change takes to reach many proxies, and what the
//! control plane spends on them.
//!
//! Purpose: the scale benchmark of the control plane (issue 3). The driver
//! (this process) runs a meshwork control plane in-process
//! ([`control::app::Control`], redb store in a temporary directory, ports
//! 0 on 127.0.0.1), applies a mesh of S Services, S x W static Workloads and
//! R HTTPRoutes through the resource API, then starts itself again as a
//! child process holding N simulated proxies (see [`sim`]). Once all are
//! synced it applies one change at a time (alternately a route's header
//! filter and one endpoint's address) and collects, per proxy, the time
//! from the apply to the response carrying the change. Last, it runs one
//! real `meshwork proxy` against the control plane and reads its memory.
//!
//! Contract: the control plane is alone in this process (the clients are in
//! the child), so this process's RSS and CPU time are the control plane's,
//! plus the small driver. Everything listens on 127.0.0.1; every phase has a
//! deadline; processes started here are killed at the end. The report is
//! printed as Markdown and, with `--results FILE`, written into FILE between
//! the `BEGIN XDS-SCALE RESULTS` / `END XDS-SCALE RESULTS` markers (appended
//! when they are missing; the rest of the file is kept).
//!
//! Non-goals: delta xDS clients (our proxy speaks SotW), TLS, several
//! control-plane replicas, load on the data path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use std::io::{BufRead, Write};

mod mesh;
mod sim;
mod sys;

/// Everything the command line sets.
#[derive(Debug, Clone)]
struct Opts {
    proxies: usize,
    services: usize,
    workloads: usize,
    routes: usize,
    upstreams: usize,
    /// Proxies connected first, to measure memory before the rest connect.
    first: usize,
    changes: usize,
    disk: bool,
    meshwork: Option<PathBuf>,
    results: Option<PathBuf>,
    connect_parallel: usize,
    sync_timeout: Duration,
    change_timeout: Duration,
}

const USAGE: &str =
    "xds-scale [--proxies N] [--services N] [--workloads-per-service N] [--routes N]
          [--upstreams N] [--first N] [--changes N] [--store disk|mem] [--meshwork BIN] [--results FILE]
          [--connect-parallel N] [--sync-timeout SECS] [--change-timeout SECS]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some("--clients") {
        parse_clients(&args[1..]).and_then(sim::main)
    } else {
        parse(&args).and_then(drive)
    };
    if let Err(e) = result {
        eprintln!("xds-scale: {e}");
        std::process::exit(1);
    }
}

fn flag_map(args: &[String]) -> Result<HashMap<String, String>, String> {
    let mut m = HashMap::new();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        if k == "-h" || k == "--help" {
            return Err(format!("usage: {USAGE}"));
        }
        let Some(name) = k.strip_prefix("--") else {
            return Err(format!("unexpected argument {k:?}; usage: {USAGE}"));
        };
        let v = it
            .next()
            .ok_or_else(|| format!("--{name} needs a value; usage: {USAGE}"))?;
        m.insert(name.to_string(), v.clone());
    }
    Ok(m)
}

fn num(m: &HashMap<String, String>, k: &str, default: usize) -> Result<usize, String> {
    match m.get(k) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("--{k}: {v:?} is not a number")),
    }
}

impl Opts {
    /// Proxies in the first stage: half the fleet by default, none when
    /// `--first 0` or the fleet is too small to split.
    fn first_fleet(&self) -> usize {
        let f = if self.first == usize::MAX {
            self.proxies / 2
        } else {
            self.first
        };
        if f < self.proxies {
            f
        } else {
            0
        }
    }
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let m = flag_map(args)?;
    let known = [
        "proxies",
        "services",
        "workloads-per-service",
        "routes",
        "upstreams",
        "first",
        "changes",
        "store",
        "meshwork",
        "results",
        "connect-parallel",
        "sync-timeout",
        "change-timeout",
    ];
    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown flag --{k}; usage: {USAGE}"));
    }
    let o = Opts {
        proxies: num(&m, "proxies", 1000)?,
        services: num(&m, "services", 1000)?,
        workloads: num(&m, "workloads-per-service", 10)?,
        routes: num(&m, "routes", 100)?,
        upstreams: num(&m, "upstreams", 5)?,
        first: m
            .get("first")
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("--first: {v:?} is not a number"))
            })
            .transpose()?
            .unwrap_or(usize::MAX),
        changes: num(&m, "changes", 4)?,
        disk: match m.get("store").map(String::as_str) {
            None | Some("disk") => true,
            Some("mem") => false,
            Some(v) => return Err(format!("--store: {v:?} is not disk or mem")),
        },
        meshwork: m.get("meshwork").map(PathBuf::from),
        results: m.get("results").map(PathBuf::from),
        connect_parallel: num(&m, "connect-parallel", 64)?,
        sync_timeout: Duration::from_secs(num(&m, "sync-timeout", 120)? as u64),
        change_timeout: Duration::from_secs(num(&m, "change-timeout", 30)? as u64),
    };
    if o.services == 0 || o.workloads == 0 || o.routes == 0 || o.upstreams == 0 {
        return Err("--services, --workloads-per-service, --routes and --upstreams must be at least 1 (the changes touch service 0, its route and its first workload)".into());
    }
    if o.changes > 250 {
        return Err(
            "--changes: at most 250 (each moves an endpoint to its own 10.250.<n>.77)".into(),
        );
    }
    Ok(o)
}

fn parse_clients(args: &[String]) -> Result<sim::SimOptions, String> {
    let m = flag_map(args)?;
    Ok(sim::SimOptions {
        xds: m.get("xds").cloned().ok_or("--xds is required")?,
        proxies: num(&m, "proxies", 1000)?,
        services: num(&m, "services", 1000)?.max(1),
        upstreams: num(&m, "upstreams", 5)?.max(1),
        first: num(&m, "first", 0)?,
        connect_parallel: num(&m, "connect-parallel", 64)?,
        sync_timeout: Duration::from_secs(num(&m, "sync-timeout", 120)? as u64),
        change_timeout: Duration::from_secs(num(&m, "change-timeout", 15)? as u64),
    })
}

/// One timed change.
#[derive(Debug)]
struct ChangeResult {
    kind: &'static str,
    apply: Duration,
    seen: usize,
    of: usize,
    /// Sorted.
    lat: Vec<Duration>,
    observer: Option<Duration>,
    control_cpu: Option<f64>,
    clients_cpu: Option<f64>,
    bytes: u64,
}

/// What the report is made of.
#[derive(Debug, Default)]
struct Report {
    started: String,
    git: String,
    machine: Vec<(String, String)>,
    mesh_apply: Duration,
    rss_start: Option<u64>,
    rss_mesh: Option<u64>,
    rss_connected: Option<u64>,
    /// Proxies synced in the first stage, and the RSS then.
    first: Option<(usize, Option<u64>)>,
    rss_after: Option<u64>,
    hwm: Option<u64>,
    synced: HashMap<String, String>,
    /// Since the clients started: until the control plane was idle, and
    /// whether it got there.
    idle_after_sync: Option<(Duration, Duration, bool)>,
    changes: Vec<ChangeResult>,
    clients_bye: HashMap<String, String>,
    real_full: Option<Result<(u64, Duration), String>>,
    real_scoped: Option<Result<(u64, Duration), String>>,
    load_before: String,
    load_after: String,
    notes: Vec<String>,
}

fn drive(o: Opts) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("control")
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(drive_async(o))
}

fn me() -> String {
    std::process::id().to_string()
}

async fn start_control(data_dir: Option<PathBuf>) -> Result<control::app::Control, String> {
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    control::app::Control::start(control::app::Options {
        // Longer than the run: a simulated proxy that drops out stays
        // registered, so the mesh does not shift under the measurements.
        grace: Duration::from_secs(600),
        // The simulated proxies speak plaintext ADS.
        plaintext_xds: true,
        ..control::app::Options::new(data_dir, local, local)
    })
    .await
    .map_err(|e| format!("control plane: {e}"))
}

async fn drive_async(o: Opts) -> Result<(), String> {
    let mut r = Report {
        started: utc_now(),
        git: git_head(),
        machine: machine(),
        load_before: loadavg(),
        rss_start: sys::status_bytes(&me(), "VmRSS"),
        ..Default::default()
    };
    let dir = std::env::temp_dir().join(format!("xds-scale-{}", std::process::id()));
    if o.disk {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let cp = start_control(o.disk.then(|| dir.clone())).await?;
    let outcome = run_phases(&o, &cp, &mut r).await;
    cp.shutdown(Duration::from_secs(5)).await;
    if o.disk {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Err(e) = &outcome {
        r.notes.push(format!("run stopped early: {e}"));
    }
    r.load_after = loadavg();
    let text = render(&o, &r);
    println!("{text}");
    if let Some(path) = &o.results {
        write_results(path, &text)?;
        eprintln!("xds-scale: results written to {}", path.display());
    }
    outcome
}

async fn run_phases(o: &Opts, cp: &control::app::Control, r: &mut Report) -> Result<(), String> {
    let api = cp.api_addr();
    eprintln!(
        "xds-scale: control plane xds={} api={}; applying {} services, {} workloads, {} routes",
        cp.xds_addr(),
        api,
        o.services,
        o.services * o.workloads,
        o.routes.min(o.services)
    );
    let body = mesh::mesh_body(o.services, o.workloads, o.routes);
    let t = Instant::now();
    sys::apply(api, cp.admin_token(), &body).await?;
    r.mesh_apply = t.elapsed();
    drop(body);
    // Let the debounced mesh settle before the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.rss_mesh = sys::status_bytes(&me(), "VmRSS");

    eprintln!("xds-scale: starting {} simulated proxies", o.proxies);
    let mut clients = Clients::spawn(o, cp.xds_addr())?;
    let result = match staged(o, &mut clients, r).await {
        Ok(()) => timed_changes(o, api, cp.admin_token(), &mut clients, r).await,
        Err(e) => Err(e),
    };
    r.rss_after = sys::status_bytes(&me(), "VmRSS");
    r.hwm = sys::status_bytes(&me(), "VmHWM");
    clients.send("quit");
    if let Ok(line) = clients.expect("bye", Duration::from_secs(10)) {
        r.clients_bye = kv(&line);
    }
    clients.stop();
    result?;

    if let Some(bin) = &o.meshwork {
        eprintln!("xds-scale: one real meshwork proxy against the full mesh");
        r.real_full = Some(real_proxy(bin, cp.xds_addr(), api, "real-full", 1 % o.services).await);
        eprintln!(
            "xds-scale: one real meshwork proxy against a mesh of {} services",
            o.upstreams
        );
        let small = start_control(None).await?;
        let body = mesh::mesh_body(o.upstreams, o.workloads, o.routes.min(o.upstreams));
        let res = match sys::apply(small.api_addr(), small.admin_token(), &body).await {
            Ok(()) => {
                real_proxy(
                    bin,
                    small.xds_addr(),
                    small.api_addr(),
                    "real-small",
                    1 % o.upstreams,
                )
                .await
            }
            Err(e) => Err(e),
        };
        r.real_scoped = Some(res);
        small.shutdown(Duration::from_secs(5)).await;
    }
    Ok(())
}

/// The first fleet: once it is synced and the control plane idle, records
/// the RSS, then lets the rest connect.
async fn staged(o: &Opts, clients: &mut Clients, r: &mut Report) -> Result<(), String> {
    let first = o.first_fleet();
    if first == 0 {
        return Ok(());
    }
    let line = clients.expect("staged", o.sync_timeout + Duration::from_secs(30))?;
    eprintln!("xds-scale: {line}");
    wait_idle(o.sync_timeout).await;
    r.first = Some((first, sys::status_bytes(&me(), "VmRSS")));
    clients.send("continue");
    Ok(())
}

async fn timed_changes(
    o: &Opts,
    api: SocketAddr,
    token: &str,
    clients: &mut Clients,
    r: &mut Report,
) -> Result<(), String> {
    let t = Instant::now();
    let line = clients.expect("synced", o.sync_timeout + Duration::from_secs(30))?;
    r.synced = kv(&line);
    eprintln!("xds-scale: {line}");
    // The clients saw no response for a second, but the control plane may
    // still be translating for registrations that change nothing they hold.
    let (idle, ok) = wait_idle(o.sync_timeout).await;
    r.idle_after_sync = Some((t.elapsed(), idle, ok));
    r.rss_connected = sys::status_bytes(&me(), "VmRSS");
    let synced: usize = r.synced.get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
    if synced == 0 {
        return Err("no simulated proxy got its config; see the synced line".into());
    }
    for n in 0..o.changes {
        // Each change starts from an idle control plane, so it measures one
        // push and not the tail of the previous one.
        let (waited, ok) = wait_idle(Duration::from_secs(60)).await;
        if !ok {
            r.notes.push(format!(
                "change {n}: the control plane was still busy after {} of waiting; measured anyway",
                fmt_dur(Some(waited))
            ));
        }
        let (kind, marker, body) = if n % 2 == 0 {
            let value = format!("mark-{n}-{}", std::process::id());
            let body = serde_json::Value::Array(vec![mesh::route_doc(0, &value)]).to_string();
            ("route", value, body)
        } else {
            let addr = format!("10.250.{n}.77");
            let body =
                serde_json::Value::Array(vec![mesh::workload_doc(0, 0, Some(&addr))]).to_string();
            ("endpoint", addr, body)
        };
        clients.send(&format!("watch {n} {kind} {marker}"));
        clients.expect(&format!("ready {n}"), Duration::from_secs(10))?;
        let cpu0 = sys::cpu_seconds(&me());
        let ccpu0 = sys::cpu_seconds(&clients.pid());
        let t = Instant::now();
        sys::apply(api, token, &body).await?;
        let apply = t.elapsed();
        let line = clients.expect(
            &format!("done {n} "),
            o.change_timeout + Duration::from_secs(10),
        )?;
        let cpu1 = sys::cpu_seconds(&me());
        let ccpu1 = sys::cpu_seconds(&clients.pid());
        let f = kv(&line);
        let us = |s: &str| s.parse::<u64>().ok().map(Duration::from_micros);
        let mut lat: Vec<Duration> = f
            .get("lat")
            .map(|l| l.split(',').filter_map(us).collect())
            .unwrap_or_default();
        lat.sort();
        let c = ChangeResult {
            kind,
            apply,
            seen: f.get("seen").and_then(|v| v.parse().ok()).unwrap_or(0),
            of: f.get("of").and_then(|v| v.parse().ok()).unwrap_or(0),
            lat,
            observer: f.get("observer_us").and_then(|v| us(v)),
            control_cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
            clients_cpu: ccpu0.zip(ccpu1).map(|(a, b)| b - a),
            bytes: f.get("bytes").and_then(|v| v.parse().ok()).unwrap_or(0),
        };
        eprintln!(
            "xds-scale: change {n} ({kind}): {}/{} proxies, p50 {} p99 {} max {}",
            c.seen,
            c.of,
            fmt_dur(pct(&c.lat, 0.50)),
            fmt_dur(pct(&c.lat, 0.99)),
            fmt_dur(c.lat.last().copied()),
        );
        r.changes.push(c);
    }
    Ok(())
}

/// Waits until this process (the control plane) used less than 5% of one
/// core over half a second, at most `limit`. Returns the time waited and
/// whether it became idle.
async fn wait_idle(limit: Duration) -> (Duration, bool) {
    let t = Instant::now();
    let window = Duration::from_millis(500);
    while t.elapsed() < limit {
        let c0 = sys::cpu_seconds(&me());
        tokio::time::sleep(window).await;
        let c1 = sys::cpu_seconds(&me());
        match c0.zip(c1) {
            Some((a, b)) if b - a < 0.05 * window.as_secs_f64() => return (t.elapsed(), true),
            Some(_) => {}
            None => return (t.elapsed(), false),
        }
    }
    (t.elapsed(), false)
}

/// The child process holding the simulated proxies.
struct Clients {
    child: Child,
    lines: std_mpsc::Receiver<String>,
}

impl Clients {
    fn spawn(o: &Opts, xds: SocketAddr) -> Result<Clients, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let mut child = Command::new(exe)
            .arg("--clients")
            .args(["--xds", &xds.to_string()])
            .args(["--proxies", &o.proxies.to_string()])
            .args(["--services", &o.services.to_string()])
            .args(["--upstreams", &o.upstreams.to_string()])
            .args(["--first", &o.first_fleet().to_string()])
            .args(["--connect-parallel", &o.connect_parallel.to_string()])
            .args(["--sync-timeout", &o.sync_timeout.as_secs().to_string()])
            .args(["--change-timeout", &o.change_timeout.as_secs().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the clients: {e}"))?;
        let out = child
            .stdout
            .take()
            .ok_or("the clients' stdout is not piped")?;
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Clients { child, lines })
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn send(&mut self, line: &str) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    /// The next line starting with `prefix` (others are skipped), within
    /// `timeout`. Blocking the driver thread here is fine: the control plane
    /// runs on the runtime's worker threads.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => {}
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "the clients did not say {prefix:?} within {timeout:?}"
                    ))
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("the clients exited before saying {prefix:?}"))
                }
            }
        }
    }

    fn stop(mut self) {
        // Give it a moment to exit by itself after `quit`, then make sure.
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free right now on 127.0.0.1 (for the real proxy's listeners).
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// Runs `meshwork proxy` for service `svc` against the control plane, waits
/// until the control plane shows all four types ACKed, lets it settle, and
/// returns its VmRSS and the time it took to sync.
async fn real_proxy(
    bin: &PathBuf,
    xds: SocketAddr,
    api: SocketAddr,
    name: &str,
    svc: usize,
) -> Result<(u64, Duration), String> {
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let mut child = Command::new(bin)
        .arg("proxy")
        .args(["--control", &xds.to_string()])
        .args(["--service", &mesh::service(svc)])
        .args(["--app-port", &mesh::PORT.to_string()])
        .args(["--name", name])
        .args(["--outbound-addr", &addr(free_port()?)])
        .args(["--inbound-addr", &addr(free_port()?)])
        .args(["--admin-addr", &addr(free_port()?)])
        .args(["--access-log", "off"])
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let pid = child.id().to_string();
    let t = Instant::now();
    let path = format!("/api/v1/proxies/{name}.default");
    let mut result = Err(format!("{name} did not ACK all four types within 60 s"));
    while t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(Some(status)) = child.try_wait() {
            result = Err(format!("{name} exited: {status}"));
            break;
        }
        let Ok((200, body)) = sys::http(api, "GET", &path, "", None).await else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            continue;
        };
        let types = ["clusters", "endpoints", "listeners", "routes"];
        if types
            .iter()
            .all(|k| v["types"][k]["in_sync"].as_bool() == Some(true))
        {
            let synced = t.elapsed();
            // Settle: the config is applied after the ACK is counted.
            tokio::time::sleep(Duration::from_secs(2)).await;
            result = sys::status_bytes(&pid, "VmRSS")
                .map(|rss| (rss, synced))
                .ok_or_else(|| format!("no VmRSS for {name}"));
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// `key=value` words of a line (the first word is the verb).
fn kv(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn fmt_dur(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(10) => format!("{:.2} ms", d.as_secs_f64() * 1e3),
        Some(d) if d < Duration::from_secs(1) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    }
}

fn fmt_bytes(b: Option<u64>) -> String {
    match b {
        None => "n/a".into(),
        Some(b) if b < 1024 => format!("{b} B"),
        Some(b) if b < 1024 * 1024 => format!("{:.1} KB", b as f64 / 1024.0),
        Some(b) => format!("{:.1} MB", b as f64 / (1024.0 * 1024.0)),
    }
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn git_head() -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "--short", "HEAD"]) {
        Some(h) => match run(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{h} (with uncommitted changes)"),
            _ => h,
        },
        None => "unknown".into(),
    }
}

fn machine() -> Vec<(String, String)> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let mem = sys::status_bytes("self", "VmRSS").map(|_| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| "?".into())
    });
    vec![
        ("CPUs".into(), cpus),
        ("CPU model".into(), model),
        ("kernel".into(), format!("Linux {kernel}")),
        ("memory".into(), mem.unwrap_or_else(|| "?".into())),
    ]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

const BEGIN: &str = "<!-- BEGIN XDS-SCALE RESULTS: bench/xds-scale.sh rewrites everything down to END XDS-SCALE RESULTS -->";
const END: &str = "<!-- END XDS-SCALE RESULTS -->";

fn write_results(path: &PathBuf, text: &str) -> Result<(), String> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!("{BEGIN}\n{text}\n{END}");
    let new = match (old.find("<!-- BEGIN XDS-SCALE RESULTS"), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{section}{}", &old[..b], &old[e + END.len()..])
        }
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    };
    std::fs::write(path, new).map_err(|e| format!("{}: {e}", path.display()))
}

fn render(o: &Opts, r: &Report) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    let get = |k: &str| r.synced.get(k).cloned().unwrap_or_else(|| "?".into());
    line("## Control plane: one change reaching many proxies (`bench/xds-scale.sh`)".into());
    line(String::new());
    line(format!(
        "Run {}, meshwork at {}. {} simulated proxies (state-of-the-world ADS, each on its own \
         TCP connection and HTTP/2 session) in a child process; the control plane alone in the \
         measured process ({} store). bench/README.md says what each number means.",
        r.started,
        r.git,
        o.proxies,
        if o.disk {
            "redb, temporary directory"
        } else {
            "in-memory"
        }
    ));
    line(String::new());
    line("| machine | |".into());
    line("|---|---|".into());
    for (k, v) in &r.machine {
        line(format!("| {k} | {v} |"));
    }
    line(format!(
        "| load average (1 min) before / after | {} / {} |",
        r.load_before, r.load_after
    ));
    line(String::new());
    line("| mesh | |".into());
    line("|---|---|".into());
    line(format!(
        "| Services (one HTTP port each) | {} |",
        o.services
    ));
    line(format!(
        "| static Workloads | {} ({} per service) |",
        o.services * o.workloads,
        o.workloads
    ));
    line(format!("| HTTPRoutes | {} |", o.routes.min(o.services)));
    line(format!(
        "| registered Workloads | one per simulated proxy ({}) |",
        o.proxies
    ));
    line(format!(
        "| each proxy calls (`upstreams`) | {} services: `svc-0000` (shared by all, the one changed) and the next {} after its own |",
        o.upstreams,
        o.upstreams.saturating_sub(1)
    ));
    line(format!(
        "| apply of the whole mesh (one request) | {} |",
        fmt_dur(Some(r.mesh_apply))
    ));
    line(String::new());
    line("### Connecting".into());
    line(String::new());
    line("| proxies | streams open | synced (all 4 types) | failed | all synced, no response for 1 s | control plane idle | errors |".into());
    line("|---:|---:|---:|---:|---:|---:|---|".into());
    line(format!(
        "| {} | {} | {} | {} | {} s | {} | {} |",
        o.proxies,
        get("connected"),
        get("n"),
        get("failed"),
        get("secs"),
        match r.idle_after_sync {
            Some((total, _, true)) => format!("{} after start", fmt_dur(Some(total))),
            Some((total, _, false)) => format!("still busy after {}", fmt_dur(Some(total))),
            None => "-".into(),
        },
        get("errors")
    ));
    line(String::new());
    line("### Propagation of one change".into());
    line(String::new());
    line("Time from the apply request to each proxy receiving the response that carries the change. \
          `route`: the header value of `route-0000`'s filter (an RDS push); `endpoint`: the address of \
          Workload `svc-0000-0` (an EDS push). Every proxy calls `svc-0000`, so every change reaches all of them.".into());
    line(String::new());
    line("| # | change | apply request | proxies reached | p50 | p99 | max | full-mesh observer | control-plane CPU | clients CPU | resource bytes sent per proxy |".into());
    line("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into());
    let mut all: Vec<Duration> = Vec::new();
    for (i, c) in r.changes.iter().enumerate() {
        all.extend(&c.lat);
        let cpu = |v: Option<f64>| v.map_or("n/a".into(), |s| format!("{:.2} s", s));
        line(format!(
            "| {i} | {} | {} | {} of {} | {} | {} | {} | {} | {} | {} | {} |",
            c.kind,
            fmt_dur(Some(c.apply)),
            c.seen,
            c.of,
            fmt_dur(pct(&c.lat, 0.5)),
            fmt_dur(pct(&c.lat, 0.99)),
            fmt_dur(c.lat.last().copied()),
            fmt_dur(c.observer),
            cpu(c.control_cpu),
            cpu(c.clients_cpu),
            fmt_bytes(Some(c.bytes / c.seen.max(1) as u64)),
        ));
    }
    all.sort();
    let p99 = pct(&all, 0.99);
    line(String::new());
    line(format!(
        "All changes together: p50 {}, p99 {}, max {} over {} deliveries. Target p99 under 1 s: **{}**.",
        fmt_dur(pct(&all, 0.5)),
        fmt_dur(p99),
        fmt_dur(all.last().copied()),
        all.len(),
        match p99 {
            Some(d) if d < Duration::from_secs(1) && r.changes.iter().all(|c| c.seen == c.of && c.of > 0) => "met",
            Some(_) => "not met",
            None => "not measured",
        }
    ));
    line(String::new());
    line("### Control-plane memory".into());
    line(String::new());
    let connected: u64 = get("n").parse().unwrap_or(0);
    let per = match (r.rss_mesh, r.rss_connected) {
        (Some(a), Some(b)) if connected > 0 => Some(b.saturating_sub(a) / connected),
        _ => None,
    };
    let per_after = match (r.rss_mesh, r.rss_after) {
        (Some(a), Some(b)) if connected > 0 => Some(b.saturating_sub(a) / connected),
        _ => None,
    };
    // The marginal cost: what the second fleet added, per proxy. Fixed costs
    // (the shared translation of the mesh, allocator arenas warming up) are
    // paid by the first fleet.
    let marginal = match (r.first, r.rss_connected) {
        (Some((first, Some(a))), Some(b)) if connected > first as u64 => {
            Some(b.saturating_sub(a) / (connected - first as u64))
        }
        _ => None,
    };
    line("VmRSS of the control-plane process (the driver adds a few hundred KB).".into());
    line(String::new());
    line("| when | RSS |".into());
    line("|---|---:|".into());
    line(format!("| started, empty | {} |", fmt_bytes(r.rss_start)));
    line(format!(
        "| mesh applied, no proxy | {} |",
        fmt_bytes(r.rss_mesh)
    ));
    if let Some((first, rss)) = r.first {
        line(format!(
            "| first {first} proxies synced (the fleet connects in two stages) | {} |",
            fmt_bytes(rss)
        ));
    }
    line(format!(
        "| {connected} proxies synced | {} |",
        fmt_bytes(r.rss_connected)
    ));
    line(format!(
        "| after the changes | {} |",
        fmt_bytes(r.rss_after)
    ));
    line(format!("| peak (VmHWM) | {} |", fmt_bytes(r.hwm)));
    line(format!(
        "| all (synced - mesh applied) / proxies, fixed costs included | {} (after the changes: {}) |",
        fmt_bytes(per),
        fmt_bytes(per_after)
    ));
    line(format!(
        "| **per connected proxy**: (all synced - first stage synced) / proxies added | **{}** |",
        fmt_bytes(marginal)
    ));
    line(String::new());
    line(format!(
        "Target under 100 KB per connected proxy (the marginal cost): **{}**.",
        match marginal {
            Some(b) if b < 100 * 1024 => "met",
            Some(_) => "not met",
            None => "not measured",
        }
    ));
    line(String::new());
    line("### Config size and a real proxy's memory".into());
    line(String::new());
    let held_p50: Option<u64> = r.synced.get("held_p50").and_then(|v| v.parse().ok());
    let full: Option<u64> = r.synced.get("observer_held").and_then(|v| v.parse().ok());
    let types: Vec<Option<u64>> = r
        .synced
        .get("types_p50")
        .map(|v| v.split(',').map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    let t = |i: usize| fmt_bytes(types.get(i).copied().flatten());
    line("| config | bytes of resources held |".into());
    line("|---|---:|".into());
    line(format!(
        "| scoped proxy, median (clusters / endpoints / listeners / routes) | {} ({} / {} / {} / {}) |",
        fmt_bytes(held_p50),
        t(0),
        t(1),
        t(2),
        t(3)
    ));
    line(format!(
        "| scoped proxy, largest | {} |",
        fmt_bytes(r.synced.get("held_max").and_then(|v| v.parse().ok()))
    ));
    line(format!(
        "| whole mesh (an observer declaring no `upstreams`) | {} |",
        fmt_bytes(full)
    ));
    if let (Some(a), Some(b)) = (held_p50, full) {
        if a > 0 {
            line(format!(
                "| whole mesh / scoped | {:.0}x |",
                b as f64 / a as f64
            ));
        }
    }
    line(String::new());
    let real = |v: &Option<Result<(u64, Duration), String>>| match v {
        None => "not run (no --meshwork binary)".to_string(),
        Some(Ok((rss, t))) => format!(
            "{} (synced in {})",
            fmt_bytes(Some(*rss)),
            fmt_dur(Some(*t))
        ),
        Some(Err(e)) => format!("failed: {e}"),
    };
    line("| one real `meshwork proxy --control` | VmRSS after sync |".into());
    line("|---|---:|".into());
    line(format!(
        "| against this mesh ({} services; `meshwork proxy` declares no upstreams yet, so it gets all of them) | {} |",
        o.services,
        real(&r.real_full)
    ));
    line(format!(
        "| against a mesh of {} services (the size of a scoped config) | {} |",
        o.upstreams,
        real(&r.real_scoped)
    ));
    line(String::new());
    line(format!(
        "Simulated clients (child process): {} CPU s in total, peak RSS {}.",
        r.clients_bye
            .get("cpu")
            .cloned()
            .unwrap_or_else(|| "?".into()),
        fmt_bytes(r.clients_bye.get("hwm").and_then(|v| v.parse().ok()))
    ));
    for n in &r.notes {
        line(String::new());
        line(format!("Note: {n}"));
    }
    s.trim_end().to_string()
}
