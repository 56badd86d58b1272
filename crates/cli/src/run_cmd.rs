//! `meshwork run`: start an application with its sidecar, in the right order.
//!
//! 1. The sidecar starts as a child process (this same binary, `meshwork
//!    proxy ...`) with the proxy gid, in a process group of its own (a Ctrl-C
//!    at the terminal reaches the application, not the sidecar).
//! 2. `meshwork run` waits until the sidecar's admin `/ready` says 200 (it has
//!    its config and, with a join token, its certificate), bounded by
//!    `--ready-timeout`; on failure it says what is missing.
//! 3. As root with a usable `iptables`, it installs the capture rules
//!    ([`iptables`]) and the sidecar runs with `--capture`; otherwise it says
//!    so and runs in explicit mode.
//! 4. The application starts (stdio inherited) only now, so its first
//!    request already goes through a ready sidecar. A workload registered
//!    with a control plane (`--service` with `--app-port`) starts as
//!    `starting` (`meshwork proxy --workload-state starting`): it is no
//!    endpoint of its Service until the sidecar's probe finds the
//!    application accepting, so no caller is sent to it before.
//! 5. The application exits by itself: the sidecar is stopped (SIGINT, it
//!    drains), the rules removed, and `meshwork run` exits with the
//!    application's code (128+N if a signal N killed it).
//!    SIGTERM / SIGINT / SIGHUP: a registered workload is announced as
//!    draining (admin `POST /healthcheck/fail`: callers get it as DRAINING
//!    and stop picking it) and `--drain-delay` passes; then inbound is
//!    drained (admin `POST /drain_listeners?inboundonly`), the signal goes
//!    to the application, outbound keeps working until it exits or
//!    `--drain-timeout` passes (then SIGKILL), then the sidecar stops and
//!    the rules go. That order is what makes a rolling restart lose no
//!    request.
//!
//! The rules are removed on every way out, errors included (a drop guard);
//! a run killed with SIGKILL leaves them, and the next run replaces them;
//! its sidecar (`--exit-with-parent`) notices and exits, so the rules left
//! behind fail closed.
//! `meshwork run` itself failing (the sidecar never got ready, rules could
//! not be installed) exits 125; an application that cannot be started, 127
//! (not found) or 126.
//!
//! Non-goals: restarting a crashed sidecar (the application is stopped and
//! the run ends, like a pod whose sidecar died), more than one `meshwork
//! run` per network namespace (they would share the chains).

mod iptables;

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::proxy_cmd::parse_duration;

/// `meshwork run` failed itself (not the application).
const FAILED: u8 = 125;
/// How long the sidecar gets to drain once the application is gone: whatever
/// is still in flight has no application behind it any more.
const PROXY_DRAIN_SECS: u64 = 5;
/// Beyond the sidecar's drain, before it is killed.
const PROXY_STOP_GRACE: Duration = Duration::from_secs(5);
/// How often `/ready` is asked while waiting.
const READY_POLL: Duration = Duration::from_millis(100);
/// Bound on one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "control"])))]
pub struct Args {
    /// Where the sidecar's config comes from and who it is: the same flags as `meshwork proxy`.
    #[command(flatten)]
    sidecar: crate::proxy_cmd::SidecarArgs,
    /// The port(s) the application listens on, `P[,P...]`: the first is registered with the
    /// control plane; with capture, inbound TCP to any of them goes through the sidecar.
    #[arg(long, value_delimiter = ',')]
    app_port: Vec<u16>,

    /// The Workload (`namespace/name`) the sidecar fronts (as `meshwork proxy --workload`).
    #[arg(long)]
    workload: Option<String>,
    /// The sidecar's outbound listener; with capture, outbound TCP is redirected to its port.
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_addr: SocketAddr,
    /// The sidecar's inbound listener; with capture, TCP to --app-port is redirected to its port.
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_addr: SocketAddr,
    /// The sidecar's admin server (port 0: a free port is picked).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// With capture: the sidecar's DNS server, where DNS (port 53) is redirected.
    #[arg(long, default_value = "127.0.0.1:15053")]
    dns_addr: SocketAddr,
    /// The sidecar's log filter.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// The sidecar's access log: a file, `-` (this process's stderr) or `off`.
    #[arg(long, default_value = "off")]
    access_log: String,
    /// Any other `meshwork proxy` flag, passed as is (repeatable): `--proxy-arg=--workers=2`.
    #[arg(long, allow_hyphen_values = true)]
    proxy_arg: Vec<String>,

    /// The group the sidecar runs as; its traffic is never redirected.
    #[arg(long, default_value_t = 1337)]
    proxy_gid: u32,
    /// Outbound TCP to these destination ports bypasses the sidecar, `P[,P...]`.
    #[arg(long, value_delimiter = ',')]
    exclude_ports: Vec<u16>,
    /// Outbound TCP to these destinations bypasses the sidecar, `CIDR[,CIDR...]`.
    #[arg(long, value_delimiter = ',', value_parser = iptables::Cidr::parse)]
    exclude_cidrs: Vec<iptables::Cidr>,
    /// With capture: redirect DNS queries to the sidecar's DNS server (mesh names resolve).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    capture_dns: bool,
    /// Never install capture rules, even as root: the application addresses the sidecar itself.
    #[arg(long)]
    explicit: bool,
    /// How long the sidecar may take to become ready (config and certificate).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ready_timeout: Duration,
    /// On SIGTERM, how long the application gets to exit before it is killed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// On SIGTERM, with --service and a control plane: how long after announcing the workload
    /// as draining (callers stop picking it) the inbound listeners stop accepting.
    #[arg(long, default_value = "3s", value_parser = crate::proxy_cmd::parse_duration_or_zero)]
    drain_delay: Duration,

    /// The application and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// Capture rules for these families, or explicit mode and why.
#[derive(Debug)]
enum Mode {
    Capture(Vec<iptables::Family>),
    Explicit(String),
}

/// How a wait for the application ended.
enum Ended {
    /// It exited by itself.
    Exited(ExitStatus),
    /// `meshwork run` got this signal first.
    Signaled(&'static str),
    /// The sidecar died under it.
    ProxyDied(ExitStatus),
}

pub fn run(mut args: Args) -> anyhow::Result<ExitCode> {
    if args.admin_addr.port() == 0 {
        args.admin_addr = free_port(args.admin_addr)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(supervise(args)))
}

async fn supervise(args: Args) -> ExitCode {
    // Before any child exists, so no signal is missed.
    // SIGHUP (the terminal or session went away) too: unwatched, it would
    // kill `meshwork run` with its rules still in and its sidecar running.
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return fail(format!("cannot watch signals: {e}"))
        }
    };
    let mode = mode(&args);
    if let Mode::Explicit(why) = &mode {
        eprintln!(
            "meshwork run: {why}: running in explicit mode (no capture rules); the application must address the sidecar at {} (outbound; $MESHWORK_OUTBOUND_ADDR)",
            connect_addr(args.outbound_addr)
        );
    }
    if matches!(mode, Mode::Capture(_))
        && args.capture_dns
        && args.dns_addr.ip() != IpAddr::V4(Ipv4Addr::LOCALHOST)
    {
        // REDIRECT sends captured queries to the loopback (127.0.0.1, and
        // the [::1] twin for IPv6); a server elsewhere would never see them.
        return fail(format!(
            "--dns-addr {}: with capture, DNS is redirected to the loopback; use 127.0.0.1:PORT (or --capture-dns=false)",
            args.dns_addr
        ));
    }
    if let Mode::Capture(families) = &mode {
        // A crashed run's rules would capture this run's own traffic (the
        // readiness checks, the sidecar's connections) before its own
        // rules are in: away with them first.
        for &family in families {
            if let Err(e) = iptables::remove(family) {
                return fail(format!("removing stale capture rules: {e}"));
            }
        }
    }
    let mut proxy = match spawn_proxy(&args, &mode) {
        Ok(p) => p,
        Err(e) => return fail(format!("starting the sidecar: {e:#}")),
    };
    let admin = connect_addr(args.admin_addr);
    tokio::select! {
        r = wait_ready(&mut proxy, &args) => if let Err(why) = r {
            stop_proxy(&mut proxy).await;
            return fail(format!("the sidecar did not become ready: {why}"));
        },
        _ = term.recv() => {
            stop_proxy(&mut proxy).await;
            return code_for_signal(SignalKind::terminate());
        }
        _ = int.recv() => {
            stop_proxy(&mut proxy).await;
            return code_for_signal(SignalKind::interrupt());
        }
        _ = hup.recv() => {
            stop_proxy(&mut proxy).await;
            return code_for_signal(SignalKind::hangup());
        }
    }
    // Removed when this goes out of scope, whatever the way out.
    let _rules = match &mode {
        Mode::Capture(families) => match iptables::install(&plan(&args), families) {
            Ok(installed) => {
                let tools: Vec<_> = families.iter().map(|f| f.tool()).collect();
                eprintln!(
                    "meshwork run: capturing traffic ({}): outbound TCP -> {}, {}{}",
                    tools.join(", "),
                    args.outbound_addr.port(),
                    if args.app_port.is_empty() {
                        "no inbound (no --app-port)".to_owned()
                    } else {
                        format!(
                            "inbound TCP to {} -> {}",
                            iptables::join(&args.app_port),
                            args.inbound_addr.port()
                        )
                    },
                    if args.capture_dns {
                        format!(", DNS -> {}", args.dns_addr.port())
                    } else {
                        String::new()
                    },
                );
                Some(installed)
            }
            Err(e) => {
                stop_proxy(&mut proxy).await;
                return fail(format!("installing the capture rules: {e}"));
            }
        },
        Mode::Explicit(_) => None,
    };

    let mut app = match spawn_app(&args) {
        Ok(app) => app,
        Err((code, why)) => {
            eprintln!("meshwork run: {why}");
            stop_proxy(&mut proxy).await;
            return ExitCode::from(code);
        }
    };
    let status = match wait_app(&mut app, &mut proxy, &mut term, &mut int, &mut hup).await {
        Ended::Exited(status) => status,
        Ended::Signaled(name) => {
            if registered(&args) {
                // Callers first: the control plane sends this workload as
                // DRAINING, and they stop picking it while it still accepts.
                match admin_request(admin, "POST", "/healthcheck/fail").await {
                    Ok((200, _)) => {
                        eprintln!(
                            "meshwork run: SIG{name}: announced the workload as draining; inbound stops in {} (--drain-delay)",
                            humantime(args.drain_delay)
                        );
                        tokio::time::sleep(args.drain_delay).await;
                    }
                    Ok((status, body)) => eprintln!(
                        "meshwork run: announcing the workload as draining: {status} {}",
                        body.trim()
                    ),
                    Err(e) => eprintln!("meshwork run: announcing the workload as draining: {e}"),
                }
            }
            // Inbound next: no new requests for an application about to stop.
            match admin_request(admin, "POST", "/drain_listeners?inboundonly").await {
                Ok((200, _)) => {}
                Ok((status, body)) => eprintln!(
                    "meshwork run: draining the sidecar's inbound listeners: {status} {}",
                    body.trim()
                ),
                Err(e) => {
                    eprintln!("meshwork run: draining the sidecar's inbound listeners: {e}")
                }
            }
            stop_app(
                &mut app,
                name,
                args.drain_timeout,
                &mut term,
                &mut int,
                &mut hup,
            )
            .await
        }
        Ended::ProxyDied(proxy_status) => {
            eprintln!(
                "meshwork run: the sidecar exited ({proxy_status}) while the application ran; stopping the application"
            );
            stop_app(
                &mut app,
                "TERM",
                args.drain_timeout,
                &mut term,
                &mut int,
                &mut hup,
            )
            .await;
            return ExitCode::from(FAILED);
        }
    };
    stop_proxy(&mut proxy).await;
    exit_code(status)
}

/// Whether the sidecar registers a workload with a control plane.
fn registered(args: &Args) -> bool {
    !args.sidecar.control.is_empty() && args.sidecar.service.is_some()
}

/// Capture if root and iptables can change the nat table; else why not.
fn mode(args: &Args) -> Mode {
    if args.explicit {
        return Mode::Explicit("--explicit".to_owned());
    }
    match effective_uid() {
        Some(0) => {}
        Some(_) => return Mode::Explicit("not root".to_owned()),
        None => return Mode::Explicit("cannot tell whether this is root".to_owned()),
    }
    if let Err(e) = iptables::usable(iptables::Family::V4) {
        return Mode::Explicit(format!("no usable iptables ({e})"));
    }
    let mut families = vec![iptables::Family::V4];
    // No IPv6 (kernel or tool) is fine: then there is no IPv6 to capture.
    if iptables::usable(iptables::Family::V6).is_ok() {
        families.push(iptables::Family::V6);
    }
    Mode::Capture(families)
}

/// The effective uid, from /proc (no `unsafe` for geteuid).
pub(crate) fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Real, effective, saved, filesystem.
    line.split_whitespace().nth(2)?.parse().ok()
}

fn plan(args: &Args) -> iptables::Plan {
    iptables::Plan {
        proxy_gid: args.proxy_gid,
        outbound_port: args.outbound_addr.port(),
        inbound_port: args.inbound_addr.port(),
        app_ports: args.app_port.clone(),
        dns_port: args.capture_dns.then_some(args.dns_addr.port()),
        exclude_ports: args.exclude_ports.clone(),
        exclude_cidrs: args.exclude_cidrs.clone(),
    }
}

/// `meshwork proxy ...` as this run's sidecar.
fn proxy_args(args: &Args, capture: bool) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["proxy".into()];
    a.extend(args.sidecar.to_proxy_flags());
    let mut flag = |name: &str, value: OsString| {
        a.push(format!("--{name}").into());
        a.push(value);
    };
    if registered(args) {
        if let Some(p) = args.app_port.first() {
            flag("app-port", p.to_string().into());
            // Out of the Service's endpoints until the application
            // accepts (the sidecar probes it).
            flag("workload-state", "starting".into());
        }
    }
    if let Some(w) = &args.workload {
        flag("workload", w.into());
    }
    flag("outbound-addr", args.outbound_addr.to_string().into());
    flag("inbound-addr", args.inbound_addr.to_string().into());
    flag("admin-addr", args.admin_addr.to_string().into());
    flag("log-level", (&args.log_level).into());
    flag("access-log", (&args.access_log).into());
    flag("drain-timeout-secs", PROXY_DRAIN_SECS.to_string().into());
    // A `meshwork run` killed with SIGKILL cannot stop its sidecar.
    a.push("--exit-with-parent".into());
    if capture {
        a.push("--capture".into());
        let dns = if args.capture_dns {
            args.dns_addr.to_string()
        } else {
            "off".to_owned()
        };
        a.push("--dns-addr".into());
        a.push(dns.into());
    }
    a.extend(args.proxy_arg.iter().map(OsString::from));
    a
}

fn spawn_proxy(args: &Args, mode: &Mode) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding this program (to start the sidecar)")?;
    let mut cmd = Command::new(exe);
    cmd.args(proxy_args(args, matches!(mode, Mode::Capture(_))))
        .stdin(Stdio::null())
        // The access log (`-`) goes to stderr: the application's stdout stays its own.
        .stdout(stderr()?)
        // Own process group: a terminal's Ctrl-C must not stop the sidecar
        // before the application is done with it.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(token) = &args.sidecar.token {
        cmd.env("MESHWORK_TOKEN", token);
    }
    if effective_uid() == Some(0) {
        // The capture rules let this gid's traffic through; the sidecar
        // needs no other privilege from it.
        cmd.gid(args.proxy_gid);
    }
    cmd.spawn().context("spawning `meshwork proxy`")
}

fn stderr() -> anyhow::Result<Stdio> {
    use std::os::fd::AsFd as _;
    let fd = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stderr")?;
    Ok(Stdio::from(fd))
}

fn spawn_app(args: &Args) -> Result<Child, (u8, String)> {
    let (program, rest) = args
        .command
        .split_first()
        .ok_or((FAILED, "no command to run after `--`".to_owned()))?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        // The join token is the sidecar's, not the application's.
        .env_remove("MESHWORK_TOKEN")
        .env(
            "MESHWORK_OUTBOUND_ADDR",
            connect_addr(args.outbound_addr).to_string(),
        )
        .env(
            "MESHWORK_ADMIN_ADDR",
            connect_addr(args.admin_addr).to_string(),
        );
    cmd.spawn().map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        (
            code,
            format!("cannot start {}: {e}", program.to_string_lossy()),
        )
    })
}

/// Polls `/ready` until 200; `Err` says what is missing.
async fn wait_ready(proxy: &mut Child, args: &Args) -> Result<(), String> {
    let admin = connect_addr(args.admin_addr);
    let deadline = tokio::time::Instant::now() + args.ready_timeout;
    let last = loop {
        let answer = tokio::select! {
            status = proxy.wait() => {
                return Err(match status {
                    Ok(s) => format!("it exited ({s}) before it was ready; its log is above"),
                    Err(e) => format!("waiting for it: {e}"),
                });
            }
            answer = admin_request(admin, "GET", "/ready") => answer,
        };
        if let Ok((200, _)) = answer {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            break answer;
        }
        tokio::time::sleep(READY_POLL).await;
    };
    let timeout = humantime(args.ready_timeout);
    let identity = args.sidecar.token.is_some()
        || args.sidecar.token_file.is_some()
        || args.sidecar.identity_dir.is_some()
        || std::env::var_os("MESHWORK_TOKEN").is_some();
    let control = args.sidecar.control.join(",");
    Err(match last {
        // With a token the admin server starts after the certificate is issued.
        Err(_) if identity => format!(
            "no workload certificate after {timeout}: the sidecar's admin server ({admin}) starts once the control plane at {control} has issued it; check that the control plane is reachable and the join token valid (or raise --ready-timeout)"
        ),
        Err(e) => format!("its admin server at {admin} did not answer within {timeout} ({e}); check --admin-addr"),
        Ok((status, _)) if !control.is_empty() => format!(
            "no config after {timeout} (/ready answers {status}): nothing from the control plane at {control} yet; check that it is reachable{} (or raise --ready-timeout)",
            args.sidecar.service.as_ref().map(|s| format!(" and knows service {s}.{}", args.sidecar.namespace)).unwrap_or_default()
        ),
        Ok((status, body)) => format!("/ready still answers {status} {} after {timeout}", body.trim()),
    })
}

/// Waits for the application, the sidecar and signals.
async fn wait_app(
    app: &mut Child,
    proxy: &mut Child,
    term: &mut Signal,
    int: &mut Signal,
    hup: &mut Signal,
) -> Ended {
    tokio::select! {
        status = app.wait() => Ended::Exited(status.unwrap_or_else(|_| ExitStatus::from_raw(FAILED as i32 * 256))),
        _ = term.recv() => Ended::Signaled("TERM"),
        _ = int.recv() => Ended::Signaled("INT"),
        _ = hup.recv() => Ended::Signaled("HUP"),
        status = proxy.wait() => Ended::ProxyDied(status.unwrap_or_else(|_| ExitStatus::from_raw(0))),
    }
}

/// Sends `signal` to the application and waits up to `deadline` for it
/// (more signals are passed on), then kills it.
async fn stop_app(
    app: &mut Child,
    signal: &str,
    deadline: Duration,
    term: &mut Signal,
    int: &mut Signal,
    hup: &mut Signal,
) -> ExitStatus {
    send_signal(app, signal);
    let timer = tokio::time::sleep(deadline);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            status = app.wait() => return status.unwrap_or_else(|_| ExitStatus::from_raw(FAILED as i32 * 256)),
            _ = term.recv() => send_signal(app, "TERM"),
            _ = int.recv() => send_signal(app, "INT"),
            _ = hup.recv() => send_signal(app, "HUP"),
            () = &mut timer => break,
        }
    }
    eprintln!(
        "meshwork run: the application did not exit within {} of SIG{signal} (--drain-timeout); killing it",
        humantime(deadline)
    );
    let _ = app.start_kill();
    app.wait()
        .await
        .unwrap_or_else(|_| ExitStatus::from_raw(FAILED as i32 * 256))
}

/// SIGINT to the sidecar (it drains), SIGKILL if it takes too long.
async fn stop_proxy(proxy: &mut Child) {
    if matches!(proxy.try_wait(), Ok(Some(_))) {
        return;
    }
    // SIGINT: the sidecar (`--exit-with-parent`) ignores SIGTERM from a
    // service manager signalling everyone; this is the parent's stop.
    send_signal(proxy, "INT");
    let limit = Duration::from_secs(PROXY_DRAIN_SECS) + PROXY_STOP_GRACE;
    if tokio::time::timeout(limit, proxy.wait()).await.is_err() {
        eprintln!(
            "meshwork run: the sidecar did not stop within {}; killing it",
            humantime(limit)
        );
        let _ = proxy.start_kill();
        let _ = proxy.wait().await;
    }
}

/// Signals a child that has not been waited for (so its pid is still its
/// own). kill(1) sends it: the workspace forbids `unsafe`, and this is not
/// worth a libc-binding dependency.
fn send_signal(child: &Child, signal: &str) {
    let Some(pid) = child.id() else { return };
    let sent = std::process::Command::new("kill")
        .args(["-s", signal, "--", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status();
    match sent {
        Ok(s) if s.success() => {}
        // Already gone: its exit is about to be seen.
        Ok(_) => {}
        Err(e) => {
            eprintln!(
                "meshwork run: cannot run kill(1) to send SIG{signal} ({e}); killing pid {pid}"
            );
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// One HTTP/1.1 request to the admin server: status and body.
async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!(
                    "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let mut reply = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut reply).await?;
        let reply = String::from_utf8_lossy(&reply);
        let status = reply
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(ADMIN_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))?
}

/// Where to connect to reach a listener bound at `addr`.
fn connect_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// A free port on `addr`'s IP (for an admin server asked for port 0: its
/// port must be known to ask it whether it is ready).
fn free_port(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("finding a free port for --admin-addr {addr}"))?;
    Ok(l.local_addr()?)
}

/// The application's exit code: its own, or 128+N if signal N killed it.
fn exit_code(status: ExitStatus) -> ExitCode {
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => i32::from(FAILED),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(FAILED))
}

fn code_for_signal(kind: SignalKind) -> ExitCode {
    ExitCode::from(u8::try_from(128 + kind.as_raw_value()).unwrap_or(FAILED))
}

fn fail(why: String) -> ExitCode {
    eprintln!("meshwork run: {why}");
    ExitCode::from(FAILED)
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: Args,
    }

    fn parse(argv: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("run").chain(argv.iter().copied()))
            .unwrap()
            .run
    }

    #[test]
    fn proxy_gets_the_control_plane_flags_and_capture() {
        let args = parse(&[
            "--service",
            "web",
            "--namespace",
            "shop",
            "--app-port",
            "8080,9090",
            "--control",
            "cp:15010",
            "--ca-bundle",
            "/r.pem",
            "--token",
            "secret",
            "--",
            "python3",
            "-m",
            "http.server",
        ]);
        let argv: Vec<String> = proxy_args(&args, true)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = argv.join(" ");
        assert!(
            line.starts_with("proxy --control cp:15010 --service web --namespace shop "),
            "{line}"
        );
        assert!(
            line.contains(" --app-port 8080 --workload-state starting "),
            "{line}"
        );
        assert!(line.contains("--ca-bundle /r.pem"), "{line}");
        assert!(
            line.contains("--capture --dns-addr 127.0.0.1:15053"),
            "{line}"
        );
        // The token travels in the environment, not on a command line `ps` shows.
        assert!(!line.contains("secret"), "{line}");
        assert_eq!(args.command, ["python3", "-m", "http.server"]);
        assert_eq!(args.app_port, [8080, 9090]);

        let explicit = proxy_args(&args, false);
        assert!(!explicit.iter().any(|a| a == "--capture"));
    }

    /// Every shared flag reaches the sidecar as `meshwork proxy` parses it
    /// (the token excepted: it goes through the environment).
    #[test]
    fn the_shared_sidecar_flags_round_trip_through_meshwork_proxy() {
        #[derive(clap::Parser)]
        struct Proxy {
            #[command(flatten)]
            proxy: crate::proxy_cmd::Args,
        }
        let args = parse(&[
            "--control",
            "cp:15010,cp2:15010",
            "--service",
            "web",
            "--namespace",
            "shop",
            "--name",
            "web-a",
            "--labels",
            "version=v2,track=canary",
            "--locality",
            "eu/eu-1a",
            "--address",
            "10.0.0.7",
            "--upstreams",
            "db,cache.infra",
            "--token-file",
            "/t",
            "--ca-bundle",
            "/r.pem",
            "--trust-domain",
            "example.org",
            "--identity-dir",
            "/id",
            "--cert-ttl",
            "2h",
            "--app-port",
            "8080",
            "--",
            "app",
        ]);
        let argv = proxy_args(&args, false);
        let parsed = Proxy::try_parse_from(&argv).unwrap().proxy;
        assert_eq!(
            format!("{:?}", parsed.sidecar),
            format!("{:?}", args.sidecar),
            "{argv:?}"
        );
    }

    #[test]
    fn the_command_needs_its_dashes_and_a_source() {
        let argv = ["run", "--config", "m.yaml", "sh"];
        assert!(Cli::try_parse_from(argv).is_err());
        assert!(Cli::try_parse_from(["run", "--", "sh"]).is_err());
        let args = parse(&[
            "--config",
            "m.yaml",
            "--capture-dns=false",
            "--exclude-cidrs",
            "10.0.0.0/8,fd00::/8",
            "--",
            "sh",
        ]);
        assert!(!args.capture_dns);
        assert_eq!(plan(&args).exclude_cidrs.len(), 2);
        assert_eq!(plan(&args).dns_port, None);
    }

    #[test]
    fn exit_codes_follow_the_application() {
        assert_eq!(
            format!("{:?}", exit_code(ExitStatus::from_raw(7 << 8))),
            format!("{:?}", ExitCode::from(7))
        );
        // Killed by SIGTERM (15): 143.
        assert_eq!(
            format!("{:?}", exit_code(ExitStatus::from_raw(15))),
            format!("{:?}", ExitCode::from(143))
        );
    }
}
