//! Several test hosts on a virtual network, end to end: a control-plane
//! host and three workload hosts (network namespaces whose veths meet on a
//! bridge). Each workload host runs `meshwork run` with a join token: an
//! unmodified HTTP server (`catalog`), grpcio's health service (`health`),
//! and a client host where an unmodified curl calls `http://catalog:8080/`
//! and an unmodified grpcio client calls `health:50051`, by name. The names
//! resolve through captured DNS; the calls are captured, routed by mesh
//! policy (an `HTTPRoute` rewrite) and sent over mTLS (`Mesh` `mtls:
//! strict`) to the server hosts, whose sidecars see the caller's SPIFFE id.
//! Plain TCP from the client host to the server host (its application port,
//! and its sidecar's inbound port) gets no answer and is counted as
//! `plaintext_refused`: between hosts, only mTLS gets through.
//!
//! Needs root (network namespaces, iptables); skipped with a message
//! otherwise. Namespaces, and every process left in them, are removed when
//! the test ends, pass or fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::hosts::*;
use super::{scratch, BIN};

const CP_IP: &str = "10.125.0.1";
const SERVER_IP: &str = "10.125.0.2";
const GRPC_IP: &str = "10.125.0.3";
const CLIENT_IP: &str = "10.125.0.4";
const APP_PORT: &str = "8080";
const GRPC_PORT: &str = "50051";

/// The test hosts: `cp` (the control plane, and the bridge `br0` joining
/// everything), `server` (HTTP), `grpc` (a gRPC server) and `client`. Dropping it kills every process left
/// in them and deletes them (with their interfaces and iptables rules).
struct Hosts {
    names: Vec<String>,
}

impl Hosts {
    /// `tag` keeps the hosts of tests running at once apart.
    fn create(tag: &str) -> Hosts {
        let pid = std::process::id();
        let hosts = Hosts {
            names: ["cp", "srv", "grpc", "cli"]
                .iter()
                .map(|h| format!("mw{tag}{h}{pid}"))
                .collect(),
        };
        for name in &hosts.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            run("ip", &["netns", "add", name]);
            run("ip", &["-n", name, "link", "set", "lo", "up"]);
        }
        let cp = hosts.cp();
        run("ip", &["-n", cp, "link", "add", "br0", "type", "bridge"]);
        run(
            "ip",
            &[
                "-n",
                cp,
                "addr",
                "add",
                &format!("{CP_IP}/24"),
                "dev",
                "br0",
            ],
        );
        run("ip", &["-n", cp, "link", "set", "br0", "up"]);
        for (name, ip, port) in [
            (hosts.server(), SERVER_IP, "vsrv"),
            (hosts.grpc(), GRPC_IP, "vgrpc"),
            (hosts.client(), CLIENT_IP, "vcli"),
        ] {
            run(
                "ip",
                &[
                    "-n", cp, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                    name,
                ],
            );
            run("ip", &["-n", cp, "link", "set", port, "master", "br0"]);
            run("ip", &["-n", cp, "link", "set", port, "up"]);
            run(
                "ip",
                &[
                    "-n",
                    name,
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", name, "link", "set", "eth0", "up"]);
            // connect() to a VIP needs a route before the nat hook redirects it.
            run(
                "ip",
                &["-n", name, "route", "add", "240.240.0.0/16", "dev", "eth0"],
            );
            // Mounted over /etc/resolv.conf by `ip netns exec`: a resolver
            // that does not exist (captured DNS answers mesh names) and no
            // search domains.
            let etc = Path::new("/etc/netns").join(name);
            std::fs::create_dir_all(&etc).unwrap();
            std::fs::write(etc.join("resolv.conf"), format!("nameserver {CP_IP}\n")).unwrap();
        }
        hosts
    }

    fn cp(&self) -> &str {
        &self.names[0]
    }
    fn server(&self) -> &str {
        &self.names[1]
    }
    fn grpc(&self) -> &str {
        &self.names[2]
    }
    fn client(&self) -> &str {
        &self.names[3]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Workload hosts first, so their sidecars never see the control
        // plane go away.
        for name in self.names.iter().rev() {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
        }
    }
}

/// `ip netns exec <ns> program args...`.
fn exec(ns: &str, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]).args(args);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The application on the server host: HTTP on 0.0.0.0:8080 (so without
/// the mesh a plaintext caller would reach it), answers `catalog <path>`.
const CATALOG: &str = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("catalog %s" % self.path).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"#;

/// `catalog` (port 8080, HTTP, identity `sa/catalog`), `health` (port
/// 50051, gRPC, identity `sa/health`), strict mTLS mesh-wide,
/// and a route that sends `/items` to the application's `/v1/items`: the
/// path the server sees proves the client sidecar's mesh routing ran.
const MESH: &str = "apiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  mtls: {mode: strict}\n---\n\
apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: catalog}\nspec:\n  serviceAccount: catalog\n  ports: [{name: http, port: 8080, appProtocol: http}]\n---\n\
apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: catalog}\nspec:\n  parentRefs: [{kind: Service, name: catalog, port: 8080}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /items}}]\n    filters:\n    - type: URLRewrite\n      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1/items}}\n    backendRefs: [{name: catalog, port: 8080}]\n---\n\
apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: health}\nspec:\n  serviceAccount: health\n  ports: [{name: grpc, port: 50051, appProtocol: grpc}]\n";

/// A control plane on the `cp` host, reachable from the others over the bridge.
struct ControlPlane {
    ns: String,
    dir: PathBuf,
    _child: Killed,
}

impl ControlPlane {
    fn start(ns: &str, dir: &Path) -> ControlPlane {
        let data = dir.join("data");
        let child = Killed(
            exec(
                ns,
                BIN,
                &[
                    "control",
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--xds-addr",
                    &format!("{CP_IP}:15010"),
                    "--api-addr",
                    &format!("{CP_IP}:15011"),
                    "--log-level",
                    "warn",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
        );
        let cp = ControlPlane {
            ns: ns.to_owned(),
            dir: dir.to_owned(),
            _child: child,
        };
        wait_until("the control plane", Duration::from_secs(20), || {
            cp.admin_cmd(&["ca", "bundle"]).status.success()
        });
        cp
    }

    /// `meshwork ARGS --control <api> --admin-token-file ...` on the cp host.
    fn admin_cmd(&self, args: &[&str]) -> Output {
        let token = self.dir.join("data").join("admin.token");
        let mut a = args.to_vec();
        let api = format!("{CP_IP}:15011");
        a.extend_from_slice(&["--control", &api, "--admin-token-file"]);
        a.push(token.to_str().unwrap());
        exec(&self.ns, BIN, &a).output().unwrap()
    }

    fn admin(&self, args: &[&str]) -> String {
        let out = self.admin_cmd(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn token(&self, service_account: &str) -> String {
        self.admin(&["token", "create", "--service-account", service_account])
            .trim()
            .to_owned()
    }
}

/// The application on the gRPC host: grpcio's standard health service on
/// 0.0.0.0:50051.
const HEALTH_SERVER: &str = r#"
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
srv.add_insecure_port("0.0.0.0:50051")
srv.start()
srv.wait_for_termination()
"#;

/// An unmodified grpcio client on the client host: `Check` on
/// `health:50051` (retried while the endpoint reaches the client's sidecar),
/// prints the status.
const HEALTH_CLIENT: &str = r#"
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
err = None
for _ in range(100):
    try:
        with grpc.insecure_channel("health:50051") as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
        sys.exit(0)
    except grpc.RpcError as e:
        err = e
        time.sleep(0.2)
print(err, file=sys.stderr)
sys.exit(1)
"#;

/// `meshwork run ARGS -- APP` on `ns` with a join token for
/// `service_account` (workload `(name, service, address, port)` when given).
fn meshwork_run(
    ns: &str,
    cp: &ControlPlane,
    service_account: &str,
    service: Option<(&str, &str, &str, &str)>,
    app: &[&str],
) -> Command {
    let token = cp.token(service_account);
    let xds = format!("{CP_IP}:15010");
    let bundle = cp.dir.join("root.pem");
    let mut a = vec![
        "run",
        "--control",
        &xds,
        "--token",
        &token,
        "--ca-bundle",
        bundle.to_str().unwrap(),
        "--log-level",
        "warn",
    ];
    if let Some((name, service, address, port)) = service {
        a.extend_from_slice(&[
            "--service",
            service,
            "--name",
            name,
            "--address",
            address,
            "--app-port",
            port,
        ]);
    }
    a.push("--");
    a.extend_from_slice(app);
    exec(ns, BIN, &a)
}

/// The sidecar's `/metrics` on host `ns`.
fn metrics(ns: &str) -> String {
    text(
        &exec(
            ns,
            "curl",
            &["-sS", "-m", "5", "http://127.0.0.1:15000/metrics"],
        )
        .output()
        .unwrap()
        .stdout,
    )
}

/// Waits until `meshwork run` on `ns` installed its rules and the
/// application answers on `port` (`probe`: a command that succeeds then).
fn wait_for_workload(ns: &str, probe: &[&str]) {
    wait_until(
        "a workload host's application and capture rules",
        Duration::from_secs(30),
        || {
            let rules = exec(ns, "iptables", &["-t", "nat", "-S"]).output().unwrap();
            text(&rules.stdout).contains("MESHWORK_INBOUND")
                && exec(ns, probe[0], &probe[1..])
                    .output()
                    .is_ok_and(|o| o.status.success())
        },
    );
}

fn called_by_frontend(m: &str) -> bool {
    m.lines().any(|l| {
        l.starts_with("meshwork_requests_total")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/frontend\"")
    })
}

#[test]
fn unmodified_clients_call_services_by_name_across_hosts_over_mtls_only() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and iptables (CI runs as root)");
        return;
    }
    let python = testkit::python();
    let python = python.to_str().unwrap();
    let _network = one_network_at_a_time();
    let dir = scratch("mesh-hosts");
    let hosts = Hosts::create("mh");
    let cp = ControlPlane::start(hosts.cp(), &dir);
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();
    cp.admin(&["apply", "-f", mesh.to_str().unwrap()]);
    std::fs::write(dir.join("root.pem"), cp.admin(&["ca", "bundle"])).unwrap();

    // The server hosts: `meshwork run` registers the workload at its host
    // address; inbound TCP to the application port is captured by its
    // sidecar.
    let spawn = |mut c: Command| {
        Killed(
            c.stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    };
    let _catalog = spawn(meshwork_run(
        hosts.server(),
        &cp,
        "catalog",
        Some(("catalog-0", "catalog", SERVER_IP, APP_PORT)),
        &["python3", "-c", CATALOG],
    ));
    let _health = spawn(meshwork_run(
        hosts.grpc(),
        &cp,
        "health",
        Some(("health-0", "health", GRPC_IP, GRPC_PORT)),
        &[python, "-c", HEALTH_SERVER],
    ));
    wait_for_workload(
        hosts.server(),
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "2",
            "http://127.0.0.1:8080/",
        ],
    );
    wait_for_workload(
        hosts.grpc(),
        &[
            "python3",
            "-c",
            "import socket; socket.create_connection(('127.0.0.1', 50051), 2)",
        ],
    );

    // The client host: an unmodified curl, by name. Retried while the
    // control plane pushes catalog-0's endpoint to the client's sidecar.
    let job = "for i in $(seq 100); do curl -fsS -m 3 http://catalog:8080/items && exit 0; sleep 0.2; done; curl -sS -m 3 -i http://catalog:8080/items; exit 1";
    let out = finish(
        meshwork_run(hosts.client(), &cp, "frontend", None, &["sh", "-c", job]),
        Duration::from_secs(40),
    );
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // `/items` -> `/v1/items`: the HTTPRoute ran in the client's sidecar.
    assert_eq!(
        text(&out.stdout),
        "catalog /v1/items",
        "{}",
        text(&out.stderr)
    );
    // Over mTLS: the server's sidecar knows who called.
    let m = metrics(hosts.server());
    assert!(called_by_frontend(&m), "{m}");

    // An unmodified grpcio client, by name.
    let out = finish(
        meshwork_run(
            hosts.client(),
            &cp,
            "frontend",
            None,
            &[python, "-c", HEALTH_CLIENT],
        ),
        Duration::from_secs(40),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "SERVING\n", "{}", text(&out.stderr));
    let m = metrics(hosts.grpc());
    assert!(called_by_frontend(&m), "{m}");

    // Plaintext from the client host (no sidecar there now: its `meshwork
    // run` ended and removed its rules) straight to the server host is
    // refused by the server's strict sidecar: both the application port
    // (redirected to the sidecar) and the sidecar's inbound port itself.
    let rules = exec(hosts.client(), "iptables", &["-t", "nat", "-S"])
        .output()
        .unwrap();
    assert!(!text(&rules.stdout).contains("MESHWORK"));
    let refused = |m: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("meshwork_tls_handshake_failures_total")
                    && l.contains("reason=\"plaintext_refused\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = refused(&metrics(hosts.server()));
    for port in [APP_PORT, "15006"] {
        let plain = exec(
            hosts.client(),
            "curl",
            &[
                "-sS",
                "-m",
                "5",
                &format!("http://{SERVER_IP}:{port}/items"),
            ],
        )
        .output()
        .unwrap();
        assert!(
            !plain.status.success() && plain.stdout.is_empty(),
            "plaintext to port {port} got an answer: {}",
            text(&plain.stdout)
        );
    }
    let m = metrics(hosts.server());
    assert_eq!(refused(&m), before + 2, "{m}");
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An instance of `catalog` for the rolling restart: answers every GET with
/// its name (`argv[1]`); dies at once on SIGTERM, as many applications do.
const ID_SERVER: &str = r#"
import http.server, sys
me = sys.argv[1].encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(me)))
        self.end_headers()
        self.wfile.write(me)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"#;

/// Steady load on `http://catalog:8080/` by name, from 4 keep-alive
/// clients, until the file `argv[1]` exists. It first waits (uncounted)
/// until both instances answered, then creates `argv[2]`. Prints `ok NAME
/// COUNT` per instance, `failed N`, and the first failures.
const LOAD: &str = r#"
import http.client, os, sys, threading, time
stop, started = sys.argv[1], sys.argv[2]
def get(conn):
    conn.request("GET", "/")
    r = conn.getresponse()
    return r.status, r.read().decode()
# Concurrent, like the load itself.
seen, errors, deadline = set(), {}, time.time() + 60
def warm():
    while len(seen) < 2 and time.time() < deadline:
        try:
            c = http.client.HTTPConnection("catalog", 8080, timeout=5)
            status, body = get(c)
            c.close()
            if status == 200:
                seen.add(body)
            else:
                errors["%d %s" % (status, body[:200])] = 1
        except Exception as e:
            errors[repr(e)] = 1
        time.sleep(0.01)
warmers = [threading.Thread(target=warm) for _ in range(4)]
for t in warmers:
    t.start()
for t in warmers:
    t.join()
if len(seen) < 2:
    print("warm-up: only %s answered; errors: %s" % (sorted(seen), sorted(errors)), file=sys.stderr)
    sys.exit(3)
open(started, "w").close()
ok, fails, lock = {}, [], threading.Lock()
def worker():
    conn = None
    while not os.path.exists(stop):
        try:
            if conn is None:
                conn = http.client.HTTPConnection("catalog", 8080, timeout=5)
            status, body = get(conn)
            with lock:
                if status == 200:
                    ok[body] = ok.get(body, 0) + 1
                else:
                    fails.append("%d %s" % (status, body[:200]))
        except Exception as e:
            with lock:
                fails.append(repr(e))
            conn = None
        time.sleep(0.005)
threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for name in sorted(ok):
    print("ok %s %d" % (name, ok[name]))
print("failed %d" % len(fails))
for f in fails[:10]:
    print("failure: %s" % f)
"#;

const CATALOG_MESH: &str = "apiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  mtls: {mode: strict}\n---\n\
apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: catalog}\nspec:\n  serviceAccount: catalog\n  ports: [{name: http, port: 8080, appProtocol: http}]\n";

/// A rolling restart of both instances of `catalog`, one after the other,
/// under steady load from a client calling it by name: `meshwork run`
/// announces each instance as draining (its callers stop picking it), only
/// then stops its inbound side and the application, and a new instance is
/// an endpoint only once its application accepts. Not one request fails.
#[test]
fn a_rolling_restart_under_load_fails_no_request() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and iptables (CI runs as root)");
        return;
    }
    let _network = one_network_at_a_time();
    let dir = scratch("rolling");
    let hosts = Hosts::create("rr");
    let cp = ControlPlane::start(hosts.cp(), &dir);
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, CATALOG_MESH).unwrap();
    cp.admin(&["apply", "-f", mesh.to_str().unwrap()]);
    std::fs::write(dir.join("root.pem"), cp.admin(&["ca", "bundle"])).unwrap();

    let instances = [
        (hosts.server(), SERVER_IP, "catalog-a"),
        (hosts.grpc(), GRPC_IP, "catalog-b"),
    ];
    // The application answers `<workload>.<generation>`: which instance,
    // old or new, served each request.
    let start = |(ns, ip, name): (&str, &str, &str), generation: u32| {
        let id = format!("{name}.{generation}");
        Killed(
            meshwork_run(
                ns,
                &cp,
                "catalog",
                Some((name, "catalog", ip, APP_PORT)),
                &["python3", "-c", ID_SERVER, &id],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
        )
    };
    let mut running: Vec<Killed> = instances.iter().map(|i| start(*i, 1)).collect();

    let stop = dir.join("stop");
    let started = dir.join("started");
    let report = dir.join("load.out");
    let mut load = Killed(
        meshwork_run(
            hosts.client(),
            &cp,
            "frontend",
            None,
            &[
                "python3",
                "-c",
                LOAD,
                stop.to_str().unwrap(),
                started.to_str().unwrap(),
            ],
        )
        .stdout(std::fs::File::create(&report).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap(),
    );
    wait_until(
        "the load to reach both instances",
        Duration::from_secs(90),
        || started.exists(),
    );

    for (i, &(ns, _, name)) in instances.iter().enumerate() {
        // What an orchestrator does: SIGTERM, wait, start the new version.
        let old = &mut running[i];
        run("kill", &["-TERM", &old.0.id().to_string()]);
        let status = wait(&mut old.0, Duration::from_secs(60));
        eprintln!("{name}: the old instance's `meshwork run` exited: {status}");
        running[i] = start(instances[i], 2);
        wait_until(
            &format!("{name}'s new instance to serve the client"),
            Duration::from_secs(60),
            || called_by_frontend(&metrics(ns)),
        );
    }
    std::fs::write(&stop, "").unwrap();
    let status = wait(&mut load.0, Duration::from_secs(60));
    let out = std::fs::read_to_string(&report).unwrap();
    assert!(status.success(), "the load client failed: {status}\n{out}");
    let count = |prefix: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        count("failed "),
        0,
        "requests failed during the rolling restart:\n{out}"
    );
    // Both new instances took part of the load.
    for id in ["catalog-a.2", "catalog-b.2"] {
        assert!(
            count(&format!("ok {id} ")) > 0,
            "{id} never answered:\n{out}"
        );
    }
    eprintln!("rolling restart under load:\n{out}");
    drop(running);
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
}
