//! Transparent capture through real iptables: a network namespace (a test
//! host) where a nat OUTPUT rule redirects the TCP connections of a test uid
//! to `meshwork proxy --capture`. Unmodified clients (curl, a Python socket)
//! call mesh Services by VIP; other destinations pass through, or are
//! refused under `outboundTrafficPolicy: REGISTRY_ONLY`.
//!
//! IPv6: `meshwork run` (its ip6tables rules) on a host whose only link to
//! a peer host is IPv6: captured IPv6 connections reach the sidecar on its
//! `[::1]` and `[::]` twins, pass through to an IPv6 destination (or are
//! refused), and the peer reaches the application over IPv6 through the
//! inbound listener; on a host with IPv6 disabled the sidecar warns and
//! serves IPv4.
//!
//! Needs root (network namespaces, iptables); skipped with a message
//! otherwise. The namespaces (and with them every rule and process in them)
//! are deleted when the test ends, pass or fail.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::hosts::*;
use super::{scratch, Guard, BIN};

/// The uid/gid whose connections the test redirects (the "application").
const APP_UID: &str = "4321";
const WEB_VIP: &str = "240.240.7.1";
const ECHO_VIP: &str = "240.240.7.2";
const GREET_VIP: &str = "240.240.7.3";
/// A host outside the mesh, on the namespace's veth.
const EXTERNAL: &str = "10.123.0.1";

/// Deletes the namespace (and so its interfaces and iptables rules) on drop.
struct Netns(String);

impl Netns {
    /// A namespace with loopback up and nothing else.
    fn bare(tag: &str) -> Netns {
        let name = format!("mwcap{tag}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn create(tag: &str) -> Netns {
        let ns = Netns::bare(tag);
        // A second interface with a non-loopback address (the "external"
        // host) and a route for the VIP network: a connect() needs a route
        // before the nat OUTPUT hook can redirect it.
        ns.ip(&["link", "add", "mw0", "type", "veth", "peer", "name", "mw1"]);
        ns.ip(&["addr", "add", &format!("{EXTERNAL}/24"), "dev", "mw0"]);
        ns.ip(&["link", "set", "mw0", "up"]);
        ns.ip(&["link", "set", "mw1", "up"]);
        ns.ip(&["route", "add", "240.240.0.0/16", "dev", "mw0"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.0.as_str()];
        a.extend_from_slice(args);
        run("ip", &a);
    }

    /// `ip netns exec <ns> program args...`.
    fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]).args(args);
        c
    }

    /// Runs `program` as the redirected application uid.
    fn as_app(&self, program: &str, args: &[&str]) -> Output {
        let mut a = vec![
            "--reuid",
            APP_UID,
            "--regid",
            APP_UID,
            "--clear-groups",
            program,
        ];
        a.extend_from_slice(args);
        self.cmd("setpriv", &a).output().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A killed `meshwork run` cannot stop its sidecar: do it here.
        if let Ok(o) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Backends inside the namespace: HTTP on 18080 (answers
/// `web <path> <host>`), a client-first echo on 18081, a server-first
/// greeter on 18082 (`HELLO\n`, then echo), and the external HTTP server on
/// `EXTERNAL:8081` (answers `external`).
const SERVERS: &str = r#"
import socket, socketserver, threading, http.server
class Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s %s %s" % (self.server.tag, self.path, self.headers.get("host"))).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class Echo(socketserver.BaseRequestHandler):
    greet = False
    def handle(self):
        if self.greet:
            self.request.sendall(b"HELLO\n")
        while True:
            d = self.request.recv(4096)
            if not d:
                return
            self.request.sendall(d)
class Greet(Echo):
    greet = True
socketserver.ThreadingTCPServer.allow_reuse_address = True
servers = []
for addr, handler, tag in [(("127.0.0.1", 18080), Web, "web"), (("10.123.0.1", 8081), Web, "external")]:
    s = http.server.ThreadingHTTPServer(addr, handler)
    s.tag = tag
    servers.append(s)
servers.append(socketserver.ThreadingTCPServer(("127.0.0.1", 18081), Echo))
servers.append(socketserver.ThreadingTCPServer(("127.0.0.1", 18082), Greet))
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// A TCP client: connects to `addr`, optionally sends `send`, and prints
/// what it reads until `expect_len` bytes arrived (or 5 s passed).
const TCP_CLIENT: &str = r#"
import socket, sys
host, port, send, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port), timeout=5)
if send:
    s.sendall(send.encode())
got = b""
while len(got) < n:
    d = s.recv(4096)
    if not d:
        break
    got += d
print(got.decode(), end="")
"#;

fn mesh_yaml(extra: &str) -> String {
    let svc = |name: &str, vip: &str, port: &str, proto: &str, wport: u16| {
        // Explicit-mode TCP listeners on any free port: capture uses the VIP.
        let local = if proto == "tcp" { ", localPort: 0" } else { "" };
        format!(
            "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  vip: {vip}\n  ports: [{{name: p, port: {port}, appProtocol: {proto}{local}}}]\n---\n\
             apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}-0}}\nspec: {{service: {name}, address: 127.0.0.1, ports: {{p: {wport}}}}}\n---\n"
        )
    };
    let mut y = String::new();
    y += &svc("web", WEB_VIP, "80", "http", 18080);
    y += &svc("echo", ECHO_VIP, "7000", "tcp", 18081);
    y += &svc("greet", GREET_VIP, "7001", "tcp", 18082);
    y += extra;
    y
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn curl_app(ns: &Netns, url: &str) -> Output {
    ns.as_app("curl", &["-sS", "-m", "5", url])
}

fn metrics(ns: &Netns) -> String {
    // As root: not redirected.
    text(
        &ns.cmd(
            "curl",
            &["-sS", "-m", "5", "http://127.0.0.1:15000/metrics"],
        )
        .output()
        .unwrap(),
    )
}

#[test]
fn captured_clients_reach_mesh_services_by_vip_and_other_hosts_by_policy() {
    captured_clients(&Listen {
        tag: "",
        outbound: "127.0.0.1:15001",
    });
}

/// A dual-stack outbound listener (`[::]:15001`) sees IPv4 captured
/// connections with v4-mapped addresses; their original destination is
/// still found (SOL_IP, not SOL_IPV6).
#[test]
fn captured_clients_on_a_dual_stack_listener() {
    captured_clients(&Listen {
        tag: "6",
        outbound: "[::]:15001",
    });
}

struct Listen {
    tag: &'static str,
    outbound: &'static str,
}

fn captured_clients(listen: &Listen) {
    if !is_root() {
        eprintln!("skipped: transparent capture needs root (network namespaces and iptables); CI runs it as root");
        return;
    }
    let dir = scratch(&format!("capture{}", listen.tag));
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, mesh_yaml("")).unwrap();
    let access_log = dir.join("access.log");
    // Readable by the application uid's Python.
    let client = dir.join("tcp_client.py");
    std::fs::write(&client, TCP_CLIENT).unwrap();
    let _ = Command::new("chmod")
        .args(["-R", "a+rx"])
        .arg(&dir)
        .output();

    let ns = Netns::create(listen.tag);
    let _servers = spawn_ready(ns.cmd("python3", &["-c", SERVERS]));
    let mut proxy = Guard(
        ns.cmd(
            BIN,
            &[
                "proxy",
                "--capture",
                "--config",
                config.to_str().unwrap(),
                "--outbound-addr",
                listen.outbound,
                "--inbound-addr",
                "127.0.0.1:15006",
                "--admin-addr",
                "127.0.0.1:15000",
                "--access-log",
                access_log.to_str().unwrap(),
                "--poll-ms",
                "100",
                "--log-level",
                "warn",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap(),
    );
    wait_until("the proxy to be ready", Duration::from_secs(15), || {
        if let Ok(Some(status)) = proxy.0.try_wait() {
            panic!("the proxy exited: {status}");
        }
        ns.cmd("curl", &["-sf", "-m", "1", "http://127.0.0.1:15000/ready"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    // The application's TCP goes to the proxy; the proxy's own (root) does not.
    let redirect = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-m",
        "owner",
        "--uid-owner",
        APP_UID,
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ];
    let out = ns.cmd("iptables", &redirect).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // HTTP by VIP: an unmodified curl; the backend sees the request, the
    // proxy counts it for the service.
    let out = curl_app(&ns, &format!("http://{WEB_VIP}/hello"));
    assert_eq!(
        text(&out),
        format!("web /hello {WEB_VIP}"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = metrics(&ns);
    assert!(
        m.lines().any(|l| l.starts_with("meshwork_requests_total")
            && l.contains("destination_service=\"web.default\"")),
        "{m}"
    );

    // TCP by VIP: client-first (echo) and server-first (greeting).
    let py = |args: &[&str]| {
        let mut a = vec![client.to_str().unwrap()];
        a.extend_from_slice(args);
        text(&ns.as_app(python(), &a))
    };
    assert_eq!(py(&[ECHO_VIP, "7000", "ping\n", "5"]), "ping\n");
    assert_eq!(py(&[GREET_VIP, "7001", "", "6"]), "HELLO\n");
    assert_eq!(py(&[GREET_VIP, "7001", "hi\n", "9"]), "HELLO\nhi\n");

    // Outside the mesh: passed through to the original destination.
    let out = curl_app(&ns, &format!("http://{EXTERNAL}:8081/out"));
    assert_eq!(text(&out), format!("external /out {EXTERNAL}:8081"));
    let m = metrics(&ns);
    assert!(
        m.lines()
            .any(|l| l.starts_with("meshwork_tcp_connections_opened_total")
                && l.contains("destination_service=\"PassthroughCluster\"")),
        "{m}"
    );

    // REGISTRY_ONLY: the same call is refused; mesh services still work.
    std::fs::write(
        &config,
        mesh_yaml("apiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n"),
    )
    .unwrap();
    wait_until("REGISTRY_ONLY to apply", Duration::from_secs(15), || {
        !curl_app(&ns, &format!("http://{EXTERNAL}:8081/out"))
            .status
            .success()
    });
    assert_eq!(
        text(&curl_app(&ns, &format!("http://{WEB_VIP}/again"))),
        format!("web /again {WEB_VIP}")
    );
    let m = metrics(&ns);
    assert!(
        m.lines()
            .any(|l| l.starts_with("meshwork_tcp_connections_opened_total")
                && l.contains("destination_service=\"BlackHoleCluster\"")),
        "{m}"
    );
    // The access log is written in the background.
    wait_until(
        "the blackholed connection in the access log",
        Duration::from_secs(15),
        || {
            std::fs::read_to_string(&access_log)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("BlackHoleCluster") && l.contains("\"UH\""))
        },
    );
    drop(ns);
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}

/// The application host's and the peer's addresses on their IPv6-only link.
const APP6: &str = "fd00:6::1";
const PEER6: &str = "fd00:6::2";

/// Two hosts joined by a veth pair that carries IPv6 only: `app`
/// (`APP6`, and a route for the VIP range) and `peer` (`PEER6`).
fn ipv6_hosts(tag: &str) -> (Netns, Netns) {
    let app = Netns::bare(&format!("{tag}a"));
    let peer = Netns::bare(&format!("{tag}p"));
    app.ip(&["link", "add", "mw0", "type", "veth", "peer", "name", "mw1"]);
    app.ip(&["link", "set", "mw1", "netns", &peer.0]);
    // nodad: usable at once, no duplicate address detection to wait for.
    app.ip(&["addr", "add", &format!("{APP6}/64"), "dev", "mw0", "nodad"]);
    peer.ip(&["addr", "add", &format!("{PEER6}/64"), "dev", "mw1", "nodad"]);
    app.ip(&["link", "set", "mw0", "up"]);
    peer.ip(&["link", "set", "mw1", "up"]);
    app.ip(&["route", "add", "240.240.0.0/16", "dev", "mw0"]);
    (app, peer)
}

/// The application of `meshwork run` in the IPv6 tests: HTTP on
/// `0.0.0.0:18090`, IPv4 only (answers `app <path>`), so an IPv6 client
/// reaches it only through the sidecar's inbound listener.
const APP: &str = r#"
import http.server
class App(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("app %s" % self.path).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 18090), App).serve_forever()
"#;

/// The peer host's servers, IPv6 only: HTTP on `[PEER6]:8081` (answers
/// `external <path> <host>`) and a client-first echo on `[PEER6]:8082`.
const PEER_SERVERS: &str = r#"
import socket, socketserver, threading, http.server
class Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("external %s %s" % (self.path, self.headers.get("host"))).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(4096)
            if not d:
                return
            self.request.sendall(d)
class Web6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
class Echo6(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
servers = [Web6(("fd00:6::2", 8081), Web), Echo6(("fd00:6::2", 8082), Echo)]
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// The mesh of the IPv6 tests: `mesh_yaml`'s services plus the
/// application's own Service `app` (its workload on 127.0.0.1:18090).
fn ipv6_mesh(extra: &str) -> String {
    mesh_yaml(&format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: app}}\nspec:\n  vip: 240.240.7.9\n  ports: [{{name: http, port: 80, appProtocol: http}}]\n---\n\
         apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: app-0}}\nspec: {{service: app, address: 127.0.0.1, ports: {{http: 18090}}}}\n---\n{extra}"
    ))
}

const REGISTRY_ONLY: &str = "apiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";

/// A metrics line `name{...}` with every label in `labels`, and a value
/// above 0.
fn counted(metrics: &str, name: &str, labels: &[&str]) -> bool {
    metrics.lines().any(|l| {
        l.starts_with(name)
            && labels.iter().all(|want| l.contains(want))
            && l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
    })
}

/// `meshwork run` with its ip6tables rules: IPv6 outbound connections are
/// captured ([::1] twin of the outbound listener), pass through to an IPv6
/// destination outside the mesh (HTTP and client-first TCP), or are refused
/// under REGISTRY_ONLY; a peer calling the application's IPv6 address is
/// redirected to the inbound listener ([::] twin) and reaches the
/// application, which listens on IPv4 only.
#[test]
fn run_captures_ipv6_outbound_passthrough_and_inbound() {
    if !is_root() {
        eprintln!("skipped: transparent capture needs root (network namespaces and iptables); CI runs it as root");
        return;
    }
    let (app, peer) = ipv6_hosts("v6");
    let ip6tables_nat = app
        .cmd("ip6tables", &["-t", "nat", "-S", "OUTPUT"])
        .output()
        .map(|o| o.status.success());
    if ip6tables_nat.is_err() || ip6tables_nat.is_ok_and(|ok| !ok) {
        eprintln!("skipped: no usable ip6tables nat table here");
        return;
    }
    let dir = scratch("capture-v6");
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, ipv6_mesh("")).unwrap();
    let client = dir.join("tcp_client.py");
    std::fs::write(&client, TCP_CLIENT).unwrap();

    let _servers = spawn_ready(peer.cmd(python(), &["-c", PEER_SERVERS]));
    let mut run = Guard(
        app.cmd(
            BIN,
            &[
                "run",
                "--config",
                config.to_str().unwrap(),
                "--workload",
                "app-0",
                "--app-port",
                "18090",
                "--admin-addr",
                "127.0.0.1:15000",
                "--",
                python(),
                "-c",
                APP,
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap(),
    );
    // Loopback is never captured: these reach the sidecar's admin and the
    // application directly.
    wait_until(
        "the application behind its sidecar",
        Duration::from_secs(30),
        || {
            if let Ok(Some(status)) = run.0.try_wait() {
                panic!("`meshwork run` exited: {status}");
            }
            app.cmd("curl", &["-sf", "-m", "1", "http://127.0.0.1:18090/"])
                .output()
                .is_ok_and(|o| o.status.success())
        },
    );
    let rules = text(&app.cmd("ip6tables", &["-t", "nat", "-S"]).output().unwrap());
    for want in [
        "-A MESHWORK_OUTPUT -d ::1/128 -j RETURN",
        "-A MESHWORK_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "--dports 18090 -j REDIRECT --to-ports 15006",
    ] {
        assert!(rules.contains(want), "missing {want:?} in:\n{rules}");
    }

    // Outbound, captured (root's gid is not the sidecar's): passed through
    // to the IPv6 original destination.
    let curl6 = |ns: &Netns, url: &str| {
        ns.cmd("curl", &["-6", "-sS", "-m", "5", url])
            .output()
            .unwrap()
    };
    let out = curl6(&app, &format!("http://[{PEER6}]:8081/out"));
    assert_eq!(
        text(&out),
        format!("external /out [{PEER6}]:8081"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echoed = app
        .cmd(
            python(),
            &[client.to_str().unwrap(), PEER6, "8082", "ping6\n", "6"],
        )
        .output()
        .unwrap();
    assert_eq!(
        text(&echoed),
        "ping6\n",
        "{}",
        String::from_utf8_lossy(&echoed.stderr)
    );
    let m = metrics(&app);
    assert!(
        counted(
            &m,
            "meshwork_tcp_connections_opened_total",
            &["destination_service=\"PassthroughCluster\""]
        ),
        "the IPv6 connections did not go through the sidecar:\n{m}"
    );

    // Inbound: the peer calls the application's IPv6 address; the
    // redirect hands it to the sidecar's inbound listener, which calls the
    // (IPv4-only) application.
    let out = curl6(&peer, &format!("http://[{APP6}]:18090/in"));
    assert_eq!(
        text(&out),
        "app /in",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = metrics(&app);
    assert!(
        counted(&m, "meshwork_requests_total", &["direction=\"inbound\""]),
        "no inbound request counted:\n{m}"
    );

    // REGISTRY_ONLY: IPv6 destinations outside the mesh are refused too.
    std::fs::write(&config, ipv6_mesh(REGISTRY_ONLY)).unwrap();
    wait_until("REGISTRY_ONLY to apply", Duration::from_secs(15), || {
        !curl6(&app, &format!("http://[{PEER6}]:8081/out"))
            .status
            .success()
    });
    let m = metrics(&app);
    assert!(
        counted(
            &m,
            "meshwork_tcp_connections_opened_total",
            &["destination_service=\"BlackHoleCluster\""]
        ),
        "{m}"
    );
    // Inbound is not outbound policy: still served.
    assert_eq!(
        text(&curl6(&peer, &format!("http://[{APP6}]:18090/again"))),
        "app /again"
    );

    run_cmd_stop(&mut run);
    let after = text(&app.cmd("ip6tables", &["-t", "nat", "-S"]).output().unwrap());
    assert!(!after.contains("MESHWORK"), "rules left behind:\n{after}");
    drop((app, peer));
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM to `meshwork run`; it must end (and remove its rules) in time.
fn run_cmd_stop(run: &mut Guard) {
    super::hosts::run("kill", &["-TERM", &run.0.id().to_string()]);
    wait(&mut run.0, Duration::from_secs(40));
}

/// A host with IPv6 disabled: the sidecar cannot bind its `[::1]` twin,
/// says so naming the address, and captures IPv4 as always.
#[test]
fn run_on_a_host_without_ipv6_warns_and_captures_ipv4() {
    if !is_root() {
        eprintln!("skipped: transparent capture needs root (network namespaces and iptables); CI runs it as root");
        return;
    }
    let ns = Netns::create("no6");
    let out = ns
        .cmd(
            "sysctl",
            &[
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
                "net.ipv6.conf.lo.disable_ipv6=1",
            ],
        )
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "skipped: cannot disable IPv6 here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let dir = scratch("capture-no6");
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, ipv6_mesh("")).unwrap();
    let _servers = spawn_ready(ns.cmd("python3", &["-c", SERVERS]));
    let out = finish(
        ns.cmd(
            BIN,
            &[
                "run",
                "--config",
                config.to_str().unwrap(),
                "--",
                "curl",
                "-sS",
                "-m",
                "5",
                &format!("http://{WEB_VIP}/v4"),
            ],
        ),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out), format!("web /v4 {WEB_VIP}"), "{err}");
    assert!(
        err.lines().any(|l| l.contains("WARN")
            && l.contains("[::1]:15001")
            && l.contains("IPv6 is not available")),
        "no warning naming [::1]:15001:\n{err}"
    );
    // Mesh DNS keeps IPv4 too, with one warning naming its IPv6 twin.
    let dns_warnings = err
        .lines()
        .filter(|l| {
            l.contains("WARN") && l.contains("[::1]:15053") && l.contains("IPv6 is not available")
        })
        .count();
    assert_eq!(dns_warnings, 1, "one warning naming [::1]:15053:\n{err}");
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
