//! `meshwork demo --transparent`: the demo with every instance in a network
//! namespace of its own, unmodified sample apps calling each other by name.
//!
//! What runs (root needed: network namespaces, iptables):
//! - the virtual network ([`super::netns`]): a host per instance of
//!   [`super::INSTANCES`], the root namespace on the subnet's first address;
//! - the control plane, in this process as in the explicit demo, bound to
//!   that address (API on `--control-port`, xDS on the next), with the demo
//!   mesh in strict mTLS ([`super::mesh::mesh_strict`]) and the same split;
//! - in each host, `meshwork run` (this binary) with a join token (in its
//!   environment), the trust bundle and the instance's Service, address and
//!   port, starting `meshwork demo-app <kind>` ([`super::standalone`]): the
//!   apps call `catalog:50051`, `inventory:7000` and `frontend:8080` by
//!   name; the capture rules and mesh DNS of `meshwork run` take them to the
//!   caller's sidecar, which sends them over mTLS to the callee's host;
//! - the traffic generator is an instance too (account `traffic`); its
//!   stdout (the summary lines) is passed through, after the banner, which
//!   is printed once both catalog versions answered it.
//!
//! Stopping (Ctrl-C, SIGTERM, `--seconds`, a child that exits, an error
//! while starting): the traffic first (SIGTERM: it prints its closing
//! line), then the other instances (SIGTERM: `meshwork run` drains them),
//! then the control plane; then the network is deleted, killing anything
//! still running in it. The children run in process groups of their own, so
//! a Ctrl-C at the terminal reaches only the demo, which stops them in order.
//!
//! Non-goals: surviving the loss of the demo process (a SIGKILL leaves the
//! namespaces; the next run with the same pid, or `ip netns del`, removes
//! them); IPv6; reaching anything outside the virtual network from the hosts.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::AsyncBufReadExt as _;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use super::mesh::{CATALOG_PORT, FRONTEND_PORT, INVENTORY_PORT};
use super::netns::{Host, Network};
use super::standalone::READY;
use super::{api_call, apply, create_token, mesh, write_secret, Args, Instance, INSTANCES};

/// Each host's sidecar admin address: loopback only, so neither the other
/// hosts' apps nor anything on the virtual network can reach it (its
/// `POST /healthcheck/fail`, `/drain_listeners`, `/logging`); the root
/// namespace reaches it with `ip netns exec <host> curl`.
const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// How long the instances get to answer from both catalog versions.
const READY_WITHIN: Duration = Duration::from_secs(90);
/// How long stopping instances get before the network's teardown kills them.
const STOP_WITHIN: Duration = Duration::from_secs(15);

/// A running instance: `meshwork run` in its host.
struct Proc {
    spec: &'static Instance,
    pid: Option<u32>,
    alive: bool,
}

/// Everything started so far, for the shutdown to stop.
#[derive(Default)]
struct State {
    procs: Vec<Proc>,
    /// Exits of the instances: (index in `procs`, status).
    exits: Option<mpsc::UnboundedReceiver<(usize, std::io::Result<ExitStatus>)>>,
    /// Fires when the traffic answered from both versions (banner printed).
    ready: Option<oneshot::Receiver<()>>,
    /// Passes the traffic's stdout through.
    forward: Option<tokio::task::JoinHandle<()>>,
    control: Option<control::app::Control>,
    /// Dropped last: deleting it kills whatever still runs in it.
    net: Option<Network>,
}

/// SIGINT and SIGTERM, watched from the start.
struct Stop {
    term: Signal,
    int: Signal,
}

impl Stop {
    fn new() -> anyhow::Result<Stop> {
        Ok(Stop {
            term: signal(SignalKind::terminate()).context("watching SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("watching SIGINT")?,
        })
    }

    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Exits non-zero with the reason unless we are root.
pub(super) fn check_root() -> anyhow::Result<()> {
    if super::euid() != Some(0) {
        bail!(
            "meshwork demo --transparent needs root: it creates network namespaces, a virtual \
             network and iptables rules (run it with sudo). Plain `meshwork demo` needs no root: \
             the same mesh in one process on 127.0.0.1"
        );
    }
    for (tool, args) in [("ip", ["-V"]), ("iptables", ["--version"])] {
        let ok = std::process::Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!(
                "meshwork demo --transparent needs `{tool}` (iproute2 and iptables); install it, \
                 or run plain `meshwork demo`"
            );
        }
    }
    Ok(())
}

pub(super) async fn run(args: &Args, dir: &Path) -> anyhow::Result<ExitCode> {
    let mut stop = Stop::new()?;
    let mut st = State::default();
    let started = tokio::select! {
        r = start(args, dir, &mut st) => r.map(|()| None),
        s = stop.wait() => Ok(Some(s)),
    };
    let outcome = match started {
        Ok(None) => watch(args, &mut st, &mut stop).await,
        Ok(Some(s)) => {
            eprintln!("meshwork demo: {s} while starting; stopping");
            Ok(ExitCode::from(if s == "SIGINT" { 130 } else { 143 }))
        }
        Err(e) => Err(e),
    };
    shutdown(&mut st).await;
    if outcome.is_ok() && args.dir.is_none() {
        println!("files kept in {}", dir.display());
    }
    outcome
}

/// Network, control plane, mesh, instances.
async fn start(args: &Args, dir: &Path, st: &mut State) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the meshwork binary")?;
    let names: Vec<&str> = INSTANCES.iter().map(|i| i.name).collect();
    let net = st.net.insert(
        Network::create(args.subnet, &names).context("creating the demo's virtual network")?,
    );
    let gateway = IpAddr::V4(net.gateway);
    let port = |offset: u16| {
        if args.control_port == 0 {
            return Ok(0);
        }
        args.control_port
            .checked_add(offset)
            .ok_or_else(|| anyhow!("--control-port {} is too high", args.control_port))
    };

    // The control plane, on the network's root-namespace address.
    let control = control::app::Control::start(control::app::Options {
        grace: Duration::from_secs(10),
        ..control::app::Options::new(
            args.data_dir.clone(),
            SocketAddr::new(gateway, port(1)?),
            SocketAddr::new(gateway, port(0)?),
        )
    })
    .await
    .map_err(|e| match e {
        control::app::Error::Bind { what, addr, source } => anyhow!(
            "the demo's control plane cannot bind its {what} port {addr}: {source}; pick other \
             ports with --control-port P (0: any free ports)"
        ),
        e => anyhow::Error::new(e).context("starting the demo's control plane"),
    })?;
    let control = st.control.insert(control);
    let (api, xds) = (control.api_addr(), control.xds_addr());
    let admin_token = control.admin_token().to_owned();
    let token_file = match control.admin_token_path() {
        Some(p) => p.to_path_buf(),
        None => {
            let p = dir.join("admin.token");
            write_secret(&p, &admin_token)?;
            p
        }
    };
    let bundle = api_call(api, &admin_token, "GET", "/api/v1/ca/bundle", None)
        .await
        .context("fetching the trust bundle")?;
    let bundle_file = dir.join("root.pem");
    std::fs::write(&bundle_file, &bundle)
        .with_context(|| format!("writing {}", bundle_file.display()))?;

    // The mesh: strict mTLS, the same routes, split and policy.
    let mesh_text = mesh::mesh_strict();
    let mesh_file = dir.join("mesh.yaml");
    let split_file = dir.join("catalog-split.yaml");
    let split = mesh::split(90, 10).replace(
        "THIS_FILE --control API_ADDR",
        &format!(
            "{} --control {api} --admin-token-file {}",
            split_file.display(),
            token_file.display()
        ),
    );
    for (file, text) in [(&mesh_file, mesh_text.as_str()), (&split_file, &split)] {
        std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))?;
    }
    apply(
        api,
        &admin_token,
        &[("mesh.yaml", &mesh_text), ("catalog-split.yaml", &split)],
    )
    .await
    .context("applying the demo mesh")?;

    let banner = banner(
        args,
        dir,
        net,
        api,
        xds,
        &mesh_file,
        &split_file,
        &token_file,
    );

    // The instances, each under `meshwork run` in its host.
    let (exits_tx, exits_rx) = mpsc::unbounded_channel();
    st.exits = Some(exits_rx);
    let hosts = net.hosts.clone();
    for (k, (spec, host)) in INSTANCES.iter().zip(hosts.iter()).enumerate() {
        let account = spec.service.unwrap_or(spec.name);
        let token = create_token(api, &admin_token, account)
            .await
            .with_context(|| format!("creating {}'s join token", spec.name))?;
        let mut cmd = command(&exe, args, dir, spec, host, xds, &bundle_file);
        cmd.env("MESHWORK_TOKEN", token);
        let is_traffic = spec.service.is_none();
        cmd.stdin(Stdio::null())
            .stdout(if is_traffic {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} in {} (`ip netns exec`)", spec.name, host.ns))?;
        if let Some(out) = child.stdout.take() {
            let (ready_tx, ready_rx) = oneshot::channel();
            st.ready = Some(ready_rx);
            st.forward = Some(tokio::spawn(forward(out, banner.clone(), ready_tx)));
        }
        st.procs.push(Proc {
            spec,
            pid: child.id(),
            alive: true,
        });
        let tx = exits_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((k, status));
        });
    }
    Ok(())
}

/// `ip netns exec HOST meshwork run ... -- meshwork demo-app KIND ...`.
fn command(
    exe: &Path,
    args: &Args,
    dir: &Path,
    spec: &Instance,
    host: &Host,
    xds: SocketAddr,
    bundle: &Path,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &host.ns]).arg(exe).arg("run");
    cmd.args(["--control", &xds.to_string()])
        .arg("--ca-bundle")
        .arg(bundle)
        .args(["--admin-addr", ADMIN_ADDR])
        .args(["--log-level", &args.log_level])
        .arg("--access-log")
        .arg(dir.join(format!("access-{}.log", spec.name)))
        .args(["--drain-timeout", "5s"]);
    if let Some(service) = spec.service {
        cmd.args(["--service", service, "--name", spec.name])
            .args(["--address", &host.ip.to_string()])
            .args(["--app-port", &app_port(spec).to_string()]);
        if let Some(v) = spec.version {
            cmd.args(["--labels", &format!("version={v}")]);
        }
    }
    if !spec.upstreams.is_empty() {
        cmd.args(["--upstreams", &spec.upstreams.join(",")]);
    }
    cmd.arg("--").arg(exe).arg("demo-app");
    let listen = |port: u16| format!("0.0.0.0:{port}");
    match spec.service {
        None => cmd.args([
            "traffic",
            "--target",
            &format!("frontend:{FRONTEND_PORT}"),
            "--rps",
            &args.rps.to_string(),
            "--every",
            &args.every.to_string(),
            "--ready-within",
            &READY_WITHIN.as_secs().to_string(),
        ]),
        Some("frontend") => cmd.args([
            "frontend",
            "--listen",
            &listen(FRONTEND_PORT),
            "--catalog",
            &format!("catalog:{CATALOG_PORT}"),
        ]),
        Some("inventory") => cmd.args(["inventory", "--listen", &listen(INVENTORY_PORT)]),
        Some(_) => cmd.args([
            "catalog",
            "--listen",
            &listen(CATALOG_PORT),
            "--version",
            spec.version.unwrap_or("v1"),
            "--instance",
            spec.name,
            "--inventory",
            &format!("inventory:{INVENTORY_PORT}"),
        ]),
    };
    cmd
}

/// The port an instance's app listens on: its Service's port.
fn app_port(spec: &Instance) -> u16 {
    match spec.service {
        Some("frontend") => FRONTEND_PORT,
        Some("inventory") => INVENTORY_PORT,
        Some(_) => CATALOG_PORT,
        None => 0,
    }
}

/// Passes the traffic's stdout through; its ready line becomes the banner.
async fn forward(out: tokio::process::ChildStdout, banner: String, ready: oneshot::Sender<()>) {
    let mut lines = tokio::io::BufReader::new(out).lines();
    let mut ready = Some(ready);
    while let Ok(Some(line)) = lines.next_line().await {
        if line.starts_with(READY) {
            if let Some(tx) = ready.take() {
                println!("{banner}");
                let _ = tx.send(());
            }
            continue;
        }
        println!("{line}");
    }
}

/// Until a signal, `--seconds` of traffic, or an instance exits.
async fn watch(args: &Args, st: &mut State, stop: &mut Stop) -> anyhow::Result<ExitCode> {
    let (Some(exits), Some(mut ready)) = (st.exits.as_mut(), st.ready.take()) else {
        bail!("the demo started no traffic generator");
    };
    let not_ready = tokio::time::sleep(READY_WITHIN + Duration::from_secs(5));
    tokio::pin!(not_ready);
    let mut is_ready = false;
    let traffic_for = tokio::time::sleep(Duration::MAX);
    tokio::pin!(traffic_for);
    loop {
        tokio::select! {
            s = stop.wait() => {
                eprintln!("meshwork demo: {s}: stopping");
                return Ok(ExitCode::SUCCESS);
            }
            Some((k, status)) = exits.recv() => {
                let p = &mut st.procs[k];
                p.alive = false;
                let how = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("could not be waited for ({e})"),
                };
                bail!(
                    "{} (in {}-{}) exited unexpectedly: {how}; its messages are above (more with \
                     --log-level info)",
                    p.spec.name,
                    st.net.as_ref().map(|n| n.tag.as_str()).unwrap_or("mwd"),
                    p.spec.name,
                );
            }
            r = &mut ready, if !is_ready => {
                if r.is_err() {
                    bail!("the traffic generator stopped before it got an answer");
                }
                is_ready = true;
                if args.seconds > 0 {
                    traffic_for
                        .as_mut()
                        .reset(tokio::time::Instant::now() + Duration::from_secs(args.seconds));
                }
            }
            _ = &mut not_ready, if !is_ready => bail!(
                "the demo app did not answer from both catalog versions within {}s; run with \
                 --log-level info to see why",
                READY_WITHIN.as_secs()
            ),
            _ = &mut traffic_for, if is_ready && args.seconds > 0 => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// Traffic first, then the other instances, the control plane, the network.
async fn shutdown(st: &mut State) {
    let traffic: Vec<usize> = (0..st.procs.len())
        .filter(|&k| st.procs[k].spec.service.is_none())
        .collect();
    let others: Vec<usize> = (0..st.procs.len())
        .filter(|k| !traffic.contains(k))
        .collect();
    for group in [traffic, others] {
        for &k in &group {
            let p = &st.procs[k];
            if p.alive {
                if let Some(pid) = p.pid {
                    let _ = std::process::Command::new("kill")
                        .args(["-s", "TERM", "--", &pid.to_string()])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        if let Some(exits) = st.exits.as_mut() {
            let wait = async {
                while group.iter().any(|&k| st.procs[k].alive) {
                    match exits.recv().await {
                        Some((k, _)) => st.procs[k].alive = false,
                        None => break,
                    }
                }
            };
            if tokio::time::timeout(STOP_WITHIN, wait).await.is_err() {
                eprintln!(
                    "meshwork demo: instances still running after {}s; killing them",
                    STOP_WITHIN.as_secs()
                );
            }
        }
        // The traffic's closing line.
        if let Some(forward) = st.forward.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), forward).await;
        }
    }
    // Whatever outlived its `meshwork run`, before its control plane goes.
    if let Some(net) = &st.net {
        net.kill_leftovers();
    }
    if let Some(control) = st.control.take() {
        control.shutdown(Duration::from_secs(2)).await;
    }
    if let Some(mut net) = st.net.take() {
        net.teardown();
    }
}

#[allow(clippy::too_many_arguments)]
fn banner(
    args: &Args,
    dir: &Path,
    net: &Network,
    api: SocketAddr,
    xds: SocketAddr,
    mesh_file: &Path,
    split_file: &Path,
    token_file: &Path,
) -> String {
    let store = match &args.data_dir {
        Some(d) => format!("stored in {}", d.display()),
        None => "stored in memory (gone when the demo stops; --data-dir keeps it)".to_owned(),
    };
    let mut table = format!(
        "  {:<28} {:<13} {:<13} {:<11} {}\n",
        "host (network namespace)", "address", "instance", "service", "app"
    );
    let mut host_of = std::collections::BTreeMap::new();
    for (spec, host) in INSTANCES.iter().zip(&net.hosts) {
        host_of.insert(spec.name, host.clone());
        let app = match spec.service {
            Some(_) => format!(":{} {}", app_port(spec), spec.protocol),
            None => "(traffic)".to_owned(),
        };
        table.push_str(&format!(
            "  {:<28} {:<13} {:<13} {:<11} {}\n",
            host.ns,
            host.ip.to_string(),
            spec.name,
            spec.service.unwrap_or("-"),
            app,
        ));
    }
    let ns = |name: &str| host_of.get(name).map(|h| h.ns.clone()).unwrap_or_default();
    let ip = |name: &str| {
        host_of
            .get(name)
            .map(|h| h.ip.to_string())
            .unwrap_or_default()
    };
    let hosts: Vec<&str> = net.hosts.iter().map(|h| h.ns.as_str()).collect();
    format!(
        r#"
meshwork demo --transparent: a control plane in this process and {n} hosts (network
namespaces) on the virtual network {subnet}, each running one instance under `meshwork run`:
its traffic is captured, names resolve through mesh DNS, and every hop is mutual TLS
(Mesh mtls: strict). The apps are unmodified: they call catalog:{cp}, inventory:{ip_} and
frontend:{fp} by name and know nothing of the mesh.

control plane (this process, on {gw}: interface {tag} of this namespace)
  API (HTTP)   http://{api}   resources {store}
  xDS (gRPC)   {xds} (TLS; also the CA's Sign service)

{table}
request path (each arrow is captured by the caller's sidecar and sent over mTLS):
  traffic --HTTP--> frontend:{fp} --gRPC--> catalog:{cp}: catalog-v1 (90%) | catalog-v2 (10%)
    --TCP--> inventory:{ip_}

files ({dir})
  applied at start:     {mesh}
  the split, to edit:   {split}
  access logs:          {dir}/access-<instance>.log
  trust bundle:         {dir}/root.pem

look (each sidecar's admin server is on http://{ADMIN_ADDR} inside its host only)
  meshwork get services --control {api}
  meshwork proxy-status --control {api}
  ip netns exec {c1_ns} curl -s http://{ADMIN_ADDR}/metrics | grep source_principal   # who called catalog-v1-0 (mTLS)
  ip netns exec {fe_ns} curl -s http://{ADMIN_ADDR}/config_dump
  ip netns exec {fe_ns} curl -s http://{ADMIN_ADDR}/certs
  ip netns exec {fe_ns} iptables -t nat -S | grep MESHWORK
  ip netns exec {fe_ns} getent hosts catalog      # mesh DNS: the Service's VIP

try
  ip netns exec {tr_ns} curl -s http://frontend:{fp}/product/3
  ip netns exec {tr_ns} curl -s -H 'x-catalog-version: v2' http://frontend:{fp}/
  curl -sS -m 3 http://{c1}:{cp}/      # plaintext from outside the mesh: refused
  change the split (e.g. weights 50 and 50), apply it, and watch the lines below follow:
  $EDITOR {split}
  meshwork apply -f {split} --control {api} --admin-token-file {token}

{stop} Stopping deletes the hosts and interface {tag}; if the demo is killed
with SIGKILL, remove them by hand:
  for n in {hosts} {tag}-net; do ip netns del $n; done; ip link del {tag}
"#,
        n = net.hosts.len(),
        subnet = net.subnet,
        gw = net.gateway,
        tag = net.tag,
        fp = FRONTEND_PORT,
        cp = CATALOG_PORT,
        ip_ = INVENTORY_PORT,
        dir = dir.display(),
        mesh = mesh_file.display(),
        split = split_file.display(),
        token = token_file.display(),
        c1 = ip("catalog-v1-0"),
        c1_ns = ns("catalog-v1-0"),
        fe_ns = ns("frontend-0"),
        tr_ns = ns("traffic"),
        stop = if args.seconds > 0 {
            format!("Running {}s of traffic.", args.seconds)
        } else {
            "Ctrl-C stops it.".to_owned()
        },
        hosts = hosts.join(" "),
    )
}
