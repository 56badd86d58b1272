//! Transparent capture through real iptables: a network namespace (a test
//! host) where a nat OUTPUT rule redirects the TCP connections of a test uid
//! to `meshwork proxy --capture`. Unmodified clients (curl, a Python socket)
//! call mesh Services by VIP; other destinations pass through, or are
//! refused under `outboundTrafficPolicy: REGISTRY_ONLY`.
//!
//! Needs root (network namespaces, iptables); skipped with a message
//! otherwise. The namespace (and with it every rule in it) is deleted when
//! the test ends, pass or fail.

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
    fn create(tag: &str) -> Netns {
        let name = format!("mwcap{tag}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
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
    let mut servers = Guard(
        ns.cmd("python3", &["-c", SERVERS])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    {
        use std::io::BufRead;
        let mut line = String::new();
        let out = servers.0.stdout.as_mut().unwrap();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
    }
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
