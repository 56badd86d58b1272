//! `meshwork run` end to end, each test in a network namespace of its own
//! (so the host's iptables rules and ports are never touched): the exit code
//! is the application's, the capture rules exist while it runs and are gone
//! after (also after a failed start), stale chains are replaced, the first
//! request succeeds (explicit mode, and by name through capture and mesh
//! DNS, also when the resolver is an IPv6 nameserver), SIGTERM drains inbound while outbound keeps working, and without
//! root it falls back to explicit mode.
//!
//! Needs root (network namespaces, iptables); skipped with a message
//! otherwise. Namespaces, and every process left in them, are removed when a
//! test ends, pass or fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::hosts::*;
use super::{scratch, BIN};

const WEB_VIP: &str = "240.240.9.1";

/// A test host: a network namespace with loopback, a veth pair (a
/// route for the VIP range: connect() needs one before the nat hook
/// redirects it) and a resolv.conf of its own. Deleted on drop, with every
/// process still in it.
struct Netns {
    name: String,
    etc: PathBuf,
}

impl Netns {
    fn create(tag: &str) -> Netns {
        let name = format!("mwrun{tag}{}", std::process::id());
        let etc = Path::new("/etc/netns").join(&name);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name, etc };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "add", "mw0", "type", "veth", "peer", "name", "mw1"]);
        ns.ip(&["addr", "add", "10.124.0.1/24", "dev", "mw0"]);
        ns.ip(&["link", "set", "mw0", "up"]);
        ns.ip(&["link", "set", "mw1", "up"]);
        ns.ip(&["route", "add", "240.240.0.0/16", "dev", "mw0"]);
        // `ip netns exec` mounts this over /etc/resolv.conf: a resolver that
        // does not exist (captured DNS never reaches it for mesh names) and
        // no search domains, so lookups are deterministic.
        std::fs::create_dir_all(&ns.etc).unwrap();
        std::fs::write(ns.etc.join("resolv.conf"), "nameserver 10.124.0.53\n").unwrap();
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a);
    }

    /// `ip netns exec <ns> program args...` (exec'd: the child's pid is the program's).
    fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }

    /// The nat table, IPv4 and IPv6.
    fn nat_rules(&self) -> String {
        let mut all = String::new();
        for tool in ["iptables", "ip6tables"] {
            if let Ok(o) = self.cmd(tool, &["-t", "nat", "-S"]).output() {
                all += &String::from_utf8_lossy(&o.stdout);
            }
        }
        all
    }

    /// `meshwork run ARGS` in the namespace, as root.
    fn meshwork_run(&self, args: &[&str]) -> Command {
        let mut a = vec!["run"];
        a.extend_from_slice(args);
        self.cmd(BIN, &a)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A killed `meshwork run` cannot stop its sidecar: do it here.
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root for network namespaces and iptables (CI runs as root)");
            return;
        }
    };
}

/// The mesh service `web` on 127.0.0.1:18080 inside the namespace
/// (answers `web <path>`); returns once it accepts.
fn start_web(ns: &Netns) -> Killed {
    const WEB: &str = r#"
import http.server
class Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("web %s" % self.path).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 18080), Web)
print("ready", flush=True)
s.serve_forever()
"#;
    spawn_ready(ns.cmd(python(), &["-c", WEB]))
}

/// Service `web` (VIP pinned) served on 127.0.0.1:18080, and the
/// application's own Service `app` (its sidecar's inbound listener).
fn mesh(dir: &Path) -> PathBuf {
    let svc = |name: &str, vip: &str, port: u16| {
        format!(
            "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  vip: {vip}\n  ports: [{{name: http, port: 80, appProtocol: http}}]\n---\n\
             apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}-0}}\nspec: {{service: {name}, address: 127.0.0.1, ports: {{http: {port}}}}}\n---\n"
        )
    };
    let path = dir.join("mesh.yaml");
    std::fs::write(
        &path,
        svc("web", WEB_VIP, 18080) + &svc("app", "240.240.9.2", 18090),
    )
    .unwrap();
    path
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn run_job_exits_with_the_app_code_and_its_rules_come_and_go() {
    require_root!();
    let ns = Netns::create("job");
    let dir = scratch("run-job");
    let cfg = mesh(&dir);
    let cfg = cfg.to_str().unwrap();
    // What a crashed run would leave: a stale chain with a wrong rule.
    for args in [
        ["-N", "MESHWORK_OUTPUT"].as_slice(),
        &[
            "-A",
            "MESHWORK_OUTPUT",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "1",
        ],
        &["-A", "OUTPUT", "-p", "tcp", "-j", "MESHWORK_OUTPUT"],
    ] {
        let mut a = vec!["-t", "nat"];
        a.extend_from_slice(args);
        assert!(ns.cmd("iptables", &a).status().unwrap().success());
    }

    let rules = dir.join("rules");
    let job = format!("iptables -t nat -S > {}; exit 7", rules.display());
    let out = finish(
        ns.meshwork_run(&[
            "--config",
            cfg,
            "--workload",
            "app-0",
            "--app-port",
            "18090",
            "--",
            "sh",
            "-c",
            &job,
        ]),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("capturing traffic"),
        "{}",
        stderr(&out)
    );

    let during = std::fs::read_to_string(&rules).unwrap();
    for want in [
        "-A MESHWORK_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A MESHWORK_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "-A MESHWORK_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "--dports 18090 -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j MESHWORK_INBOUND",
        "-A MESHWORK_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
    ] {
        assert!(during.contains(want), "missing {want:?} in:\n{during}");
    }
    // The stale chain was replaced, not added to.
    assert_eq!(during.matches("-j MESHWORK_OUTPUT").count(), 1, "{during}");
    assert!(!during.contains("--to-ports 1\n"), "{during}");

    let after = ns.nat_rules();
    assert!(!after.contains("MESHWORK"), "rules left behind:\n{after}");
}

#[test]
fn run_fails_clearly_when_the_sidecar_cannot_start_and_leaves_no_rules() {
    require_root!();
    let ns = Netns::create("bad");
    let dir = scratch("run-bad");
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, "kind: Service\nmetadata: {name: [\n").unwrap();
    let marker = dir.join("started");
    let app = format!("touch {}", marker.display());
    let out = finish(
        ns.meshwork_run(&[
            "--config",
            cfg.to_str().unwrap(),
            "--ready-timeout",
            "20s",
            "--",
            "sh",
            "-c",
            &app,
        ]),
        Duration::from_secs(60),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("meshwork run: the sidecar did not become ready: it exited"),
        "{err}"
    );
    assert!(
        !marker.exists(),
        "the application started without its sidecar"
    );
    let after = ns.nat_rules();
    assert!(!after.contains("MESHWORK"), "rules left behind:\n{after}");

    // A missing application: 127, and still no rules.
    let cfg = mesh(&dir);
    let out = finish(
        ns.meshwork_run(&["--config", cfg.to_str().unwrap(), "--", "/nonexistent/app"]),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot start /nonexistent/app"),
        "{}",
        stderr(&out)
    );
    let after = ns.nat_rules();
    assert!(!after.contains("MESHWORK"), "rules left behind:\n{after}");
}

#[test]
fn run_first_request_succeeds_explicit_and_captured_by_name() {
    require_root!();
    let ns = Netns::create("first");
    let dir = scratch("run-first");
    let cfg = mesh(&dir);
    let cfg = cfg.to_str().unwrap();
    let _web = start_web(&ns);

    // Explicit mode: the application addresses the sidecar itself.
    let out = finish(
        ns.meshwork_run(&[
            "--explicit",
            "--config",
            cfg,
            "--",
            "sh",
            "-c",
            "curl -sS -m 5 -H 'Host: web' http://$MESHWORK_OUTBOUND_ADDR/first",
        ]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "web /first");
    assert!(
        stderr(&out).contains("--explicit: running in explicit mode"),
        "{}",
        stderr(&out)
    );

    // Captured: an unmodified client calls the Service by name; the name
    // resolves (captured DNS) to the VIP, which only the sidecar serves.
    let out = finish(
        ns.meshwork_run(&[
            "--config",
            cfg,
            "--",
            "curl",
            "-sS",
            "-m",
            "5",
            "http://web/first",
        ]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "web /first");
    let out = finish(
        ns.meshwork_run(&[
            "--config",
            cfg,
            "--",
            "curl",
            "-sS",
            "-m",
            "5",
            &format!("http://{WEB_VIP}/vip"),
        ]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "web /vip");
    assert!(!ns.nat_rules().contains("MESHWORK"));
}

/// DNS to an IPv6 nameserver is captured too (ip6tables `MESHWORK_DNS`,
/// the DNS server's `[::1]` twin): `dig` to an arbitrary IPv6 address, over
/// UDP and TCP, and to `::1`, gets the Service VIP from the sidecar, and an
/// application whose resolv.conf names only an IPv6 nameserver reaches the
/// Service by name.
#[test]
fn run_captures_dns_sent_to_ipv6_nameservers() {
    require_root!();
    let ns = Netns::create("dns6");
    let usable = ns
        .cmd("ip6tables", &["-t", "nat", "-S", "OUTPUT"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        eprintln!("skipped: no usable ip6tables nat table here");
        return;
    }
    // A route to the (nonexistent) IPv6 nameserver: without one the query
    // fails before the nat hook sees it. `nodad`: usable at once.
    ns.ip(&["addr", "add", "fd00:53::1/64", "dev", "mw0", "nodad"]);
    std::fs::write(ns.etc.join("resolv.conf"), "nameserver fd00:53::53\n").unwrap();
    let dir = scratch("run-dns6");
    let cfg = mesh(&dir);
    let _web = start_web(&ns);
    let rules = dir.join("rules6");
    let job = format!(
        "ip6tables -t nat -S > {rules}
         d='dig +short +time=2 +tries=1'
         echo udp $($d @fd00:53::53 web.default.svc.cluster.local A)
         echo tcp $($d +tcp @fd00:53::53 web.default.svc.cluster.local A)
         echo lo $($d @::1 web A)
         echo aaaa $(dig +time=2 +tries=1 @fd00:53::53 web AAAA | grep -o 'status: [A-Z]*')
         curl -sS -m 5 http://web/dns6",
        rules = rules.display()
    );
    let out = finish(
        ns.meshwork_run(&["--config", cfg.to_str().unwrap(), "--", "sh", "-c", &job]),
        Duration::from_secs(60),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        stdout(&out),
        format!("udp {WEB_VIP}\ntcp {WEB_VIP}\nlo {WEB_VIP}\naaaa status: NOERROR\nweb /dns6"),
        "{err}"
    );
    let during = std::fs::read_to_string(&rules).unwrap();
    for want in [
        "-A MESHWORK_DNS -m owner --gid-owner 1337 -j RETURN",
        "-A MESHWORK_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "-A MESHWORK_DNS -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053",
        "-A OUTPUT -p udp -m udp --dport 53 -j MESHWORK_DNS",
    ] {
        assert!(during.contains(want), "missing {want:?} in:\n{during}");
    }
    let after = ns.nat_rules();
    assert!(!after.contains("MESHWORK"), "rules left behind:\n{after}");
}

/// On SIGTERM it records it, waits a second (outbound must still work) and
/// calls again, then exits 3.
const DRAINING_APP: &str = r#"
import json, os, signal, sys, time, urllib.request
out = open(sys.argv[1], "w")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def get(url, host=None):
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    return opener.open(req, timeout=5).read().decode()
base = "http://" + os.environ["MESHWORK_OUTBOUND_ADDR"]
admin = "http://" + os.environ["MESHWORK_ADMIN_ADDR"]
term = []
signal.signal(signal.SIGTERM, lambda *a: term.append(1))
out.write("before %s\n" % sorted(json.loads(get(admin + "/listeners"))))
out.write("first %s\n" % get(base + "/first", "web"))
out.flush()
while not term:
    time.sleep(0.05)
time.sleep(1)
out.write("after %s\n" % get(base + "/after", "web"))
out.write("listeners %s\n" % sorted(json.loads(get(admin + "/listeners"))))
out.close()
sys.exit(3)
"#;

#[test]
fn run_sigterm_drains_inbound_keeps_outbound_until_the_app_exits() {
    require_root!();
    let ns = Netns::create("term");
    let dir = scratch("run-term");
    let cfg = mesh(&dir);
    let cfg = cfg.to_str().unwrap();
    let _web = start_web(&ns);
    let script = dir.join("app.py");
    std::fs::write(&script, DRAINING_APP).unwrap();
    let log = dir.join("app.log");

    let mut child = Killed(
        ns.meshwork_run(&[
            "--config",
            cfg,
            "--workload",
            "app-0",
            "--app-port",
            "18090",
            "--",
            python(),
            script.to_str().unwrap(),
            log.to_str().unwrap(),
        ])
        .spawn()
        .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("first ")) {
        assert!(
            Instant::now() < deadline,
            "the app never made its first call"
        );
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "`meshwork run` ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    run("kill", &["-TERM", &child.0.id().to_string()]);
    let status = wait(&mut child.0, Duration::from_secs(30));
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(3), "{log}");
    let line = |p: &str| {
        log.lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p:?} line in:\n{log}"))
            .to_owned()
    };
    assert!(line("before").contains("'inbound"), "{log}");
    assert_eq!(line("first"), "first web /first");
    // After SIGTERM: outbound still served, inbound no longer accepting.
    assert_eq!(line("after"), "after web /after");
    let listeners = line("listeners");
    assert!(!listeners.contains("'inbound"), "{log}");
    assert!(listeners.contains("outbound"), "{log}");
    assert!(!ns.nat_rules().contains("MESHWORK"));

    // An application that ignores SIGTERM is killed at --drain-timeout: 128+9.
    let started = dir.join("started");
    let stubborn = format!(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nopen({:?}, 'w').close()\ntime.sleep(60)\n",
        started.to_str().unwrap()
    );
    let mut child = Killed(
        ns.meshwork_run(&[
            "--config",
            cfg,
            "--drain-timeout",
            "1s",
            "--",
            python(),
            "-c",
            &stubborn,
        ])
        .spawn()
        .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the app never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = Instant::now();
    run("kill", &["-TERM", &child.0.id().to_string()]);
    let status = wait(&mut child.0, Duration::from_secs(30));
    assert_eq!(status.code(), Some(137));
    assert!(
        sent.elapsed() < Duration::from_secs(15),
        "{:?}",
        sent.elapsed()
    );
    assert!(!ns.nat_rules().contains("MESHWORK"));
}

/// SIGHUP (a closed terminal or session) is a way out too: the signal
/// goes to the application, the rules are removed, the exit code is 128+1.
#[test]
fn run_sighup_removes_the_rules_and_exits_129() {
    require_root!();
    let ns = Netns::create("hup");
    let dir = scratch("run-hup");
    let cfg = mesh(&dir);
    let cfg = cfg.to_str().unwrap();
    let started = dir.join("started");
    let job = format!("touch {:?}; exec sleep 60", started.to_str().unwrap());
    let mut child = Killed(
        ns.meshwork_run(&[
            "--config",
            cfg,
            "--workload",
            "app-0",
            "--app-port",
            "18090",
            "--",
            "sh",
            "-c",
            &job,
        ])
        .spawn()
        .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the app never started");
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "`meshwork run` ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ns.nat_rules().contains("MESHWORK"), "no capture rules");
    run("kill", &["-HUP", &child.0.id().to_string()]);
    let status = wait(&mut child.0, Duration::from_secs(30));
    assert_eq!(status.code(), Some(129), "{status:?}");
    let after = ns.nat_rules();
    assert!(!after.contains("MESHWORK"), "rules left behind:\n{after}");
}

/// Pids of the live children of `parent` whose command line contains `needle`.
fn children_of(parent: u32, needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces, so after the last ')'.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn run_killed_with_sigkill_takes_its_sidecar_along_and_fails_closed() {
    require_root!();
    let ns = Netns::create("kill");
    let (mut child, sidecar) = run_sleeping_app(&ns, "run-kill");
    let run_pid = child.0.id();
    run("kill", &["-KILL", &run_pid.to_string()]);
    let _ = wait(&mut child.0, Duration::from_secs(10));
    // The orphaned sidecar notices (--exit-with-parent) and exits.
    wait_exited(sidecar, "the orphaned sidecar to exit");
    // The rules stay: the application's traffic is refused, not let out
    // of the mesh unseen; the next `meshwork run` replaces them.
    assert!(
        ns.nat_rules().contains("MESHWORK_OUTPUT"),
        "{}",
        ns.nat_rules()
    );
}

/// `meshwork run` killed while its sidecar is still getting its certificate
/// (the control plane unreachable): the sidecar, which retries forever, must
/// still notice that its parent is gone and exit.
#[test]
fn run_killed_before_its_sidecar_is_ready_takes_the_sidecar_along() {
    require_root!();
    let ns = Netns::create("early");
    let dir = scratch("run-early");
    let key = dir.join("k.pem");
    let bundle = dir.join("root.pem");
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=nobody",
            "-days",
            "1",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            bundle.to_str().unwrap(),
        ],
    );
    let mut child = Killed(
        ns.meshwork_run(&[
            // Nothing listens there: the bootstrap retries.
            "--control",
            "127.0.0.1:1",
            // Well-formed (claims for sa/web until 2100), signed by nobody:
            // only a control plane could refuse it.
            "--token",
            "mwt1.eyJ0cnVzdF9kb21haW4iOiJjbHVzdGVyLmxvY2FsIiwibmFtZXNwYWNlIjoiZGVmYXVsdCIsInNlcnZpY2VfYWNjb3VudCI6IndlYiIsImV4cCI6NDEwMjQ0NDgwMCwianRpIjoiMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAifQ.AAAA",
            "--ca-bundle",
            bundle.to_str().unwrap(),
            "--",
            "true",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let run_pid = child.0.id();
    let mut sidecar = None;
    wait_until("the sidecar to start", Duration::from_secs(30), || {
        sidecar = children_of(run_pid, "proxy").first().copied();
        sidecar.is_some()
    });
    let sidecar = sidecar.unwrap();
    std::thread::sleep(Duration::from_millis(500));
    run("kill", &["-KILL", &run_pid.to_string()]);
    let _ = wait(&mut child.0, Duration::from_secs(10));
    wait_exited(sidecar, "the orphaned sidecar to exit");
}

/// A service manager signalling the whole control group (systemd's default
/// `KillMode`) must not stop the sidecar before `meshwork run` is done with
/// it: the sidecar ignores a SIGTERM that does not come from its parent.
#[test]
fn run_sidecar_ignores_a_stray_sigterm_and_stops_with_the_run() {
    require_root!();
    let ns = Netns::create("stray");
    let (mut child, sidecar) = run_sleeping_app(&ns, "run-stray");
    run("kill", &["-TERM", &sidecar.to_string()]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!exited(sidecar), "the sidecar stopped on a stray SIGTERM");
    let ready = ns
        .cmd("curl", &["-sS", "-m", "3", "http://127.0.0.1:15000/ready"])
        .output()
        .unwrap();
    assert_eq!(stdout(&ready), "ready\n", "{}", stderr(&ready));
    // The run's own stop takes it along.
    run("kill", &["-TERM", &child.0.id().to_string()]);
    let status = wait(&mut child.0, Duration::from_secs(60));
    assert_eq!(status.code(), Some(143), "{status:?}");
    assert!(exited(sidecar));
}

/// `meshwork run --config <mesh> -- <an app that sleeps>` in `ns`, once the
/// app runs: the run and its sidecar's pid.
fn run_sleeping_app(ns: &Netns, tag: &str) -> (Killed, u32) {
    let dir = scratch(tag);
    let cfg = mesh(&dir);
    let started = dir.join("started");
    let job = format!("touch {:?}; exec sleep 60", started.to_str().unwrap());
    let child = Killed(
        ns.meshwork_run(&["--config", cfg.to_str().unwrap(), "--", "sh", "-c", &job])
            .spawn()
            .unwrap(),
    );
    wait_until("the app to start", Duration::from_secs(30), || {
        started.exists()
    });
    let sidecars = children_of(child.0.id(), "proxy");
    assert_eq!(sidecars.len(), 1, "one sidecar child: {sidecars:?}");
    (child, sidecars[0])
}

/// Gone, or exited and not reaped yet (its parent is init now).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

fn wait_exited(pid: u32, what: &str) {
    wait_until(what, Duration::from_secs(30), || exited(pid));
}

#[test]
fn run_without_root_says_so_and_uses_explicit_mode() {
    require_root!();
    if !Path::new("/usr/bin/setpriv").exists()
        && Command::new("setpriv").arg("--help").output().is_err()
    {
        eprintln!("skipped: needs setpriv (util-linux) to run as an unprivileged user");
        return;
    }
    let ns = Netns::create("user");
    let dir = scratch("run-user");
    let cfg = mesh(&dir);
    let _web = start_web(&ns);
    let out = finish(
        {
            ns.cmd(
                "setpriv",
                &[
                    "--reuid",
                    "65534",
                    "--regid",
                    "65534",
                    "--clear-groups",
                    BIN,
                    "run",
                    "--config",
                    cfg.to_str().unwrap(),
                    "--",
                    "sh",
                    "-c",
                    "curl -sS -m 5 -H 'Host: web' http://$MESHWORK_OUTBOUND_ADDR/user",
                ],
            )
        },
        Duration::from_secs(60),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("meshwork run: not root: running in explicit mode (no capture rules); the application must address the sidecar at 127.0.0.1:15001"),
        "{err}"
    );
    assert_eq!(stdout(&out), "web /user");
    assert!(!ns.nat_rules().contains("MESHWORK"));
}
