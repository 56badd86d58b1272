//! `meshwork demo --transparent`, end to end: the demo builds its virtual
//! network, runs every instance in a network namespace of its own under
//! `meshwork run`, and its traffic reaches both catalog versions by name,
//! with no errors. While it runs, the catalog's sidecar (its admin server,
//! on 127.0.0.1 in its host, reached with `ip netns exec`) shows the
//! frontend's SPIFFE id as the caller of its inbound requests (mTLS),
//! plaintext from outside the mesh to the catalog's port is refused, and
//! the admin server cannot be reached from the virtual network, neither
//! from the root namespace nor from another host. After it stops, none of
//! its namespaces, interfaces or resolv.conf directories remain.
//!
//! Needs root (network namespaces, iptables); skipped with a message
//! otherwise. If the test fails midway, the demo is stopped with SIGTERM
//! (so it cleans up itself), and whatever it left is removed.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::hosts::*;
use super::{scratch, BIN};

/// A subnet no other test uses.
const SUBNET: &str = "10.77.201.0/24";

/// The demo, stopped with SIGTERM on drop (then killed, and its network
/// removed by hand, if it does not stop).
struct Demo {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Demo {
    fn tag(&self) -> String {
        format!("mwd{}", self.child.id())
    }

    fn out(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn err(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for ns in leftovers(&self.tag()) {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&ns));
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.tag()])
            .output();
    }
}

/// The network namespaces whose name starts with `tag-`.
fn leftovers(tag: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{tag}-")))
        .map(str::to_owned)
        .collect()
}

fn collect(r: impl std::io::Read + Send + 'static, echo: bool) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("{line}");
            }
            let mut b = b.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    buf
}

/// `curl -sS -m 5 URL` from the root namespace: success and body.
fn curl(url: &str) -> (bool, String) {
    curl_in(None, url)
}

/// `curl -sS -m 5 URL`, in network namespace `ns` (`ip netns exec`) or the
/// root one: success and body.
fn curl_in(ns: Option<&str>, url: &str) -> (bool, String) {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let o = cmd.args(["-sS", "-m", "5", url]).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// The value of the first metric line starting with `name` and containing `label`.
fn metric(metrics: &str, name: &str, label: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn transparent_demo_runs_every_hop_by_name_over_mtls_and_cleans_up() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and iptables (CI runs as root)");
        return;
    }
    let _network = one_network_at_a_time();
    let dir = scratch("demo-transparent");
    let mut child = Command::new(BIN)
        .args(["demo", "--transparent", "--seconds", "12", "--rps", "20"])
        .args(["--every", "3", "--subnet", SUBNET, "--control-port", "0"])
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = collect(child.stdout.take().unwrap(), false);
    let stderr = collect(child.stderr.take().unwrap(), true);
    let mut demo = Demo {
        child,
        stdout,
        stderr,
    };
    let tag = demo.tag();

    // The banner: printed once both catalog versions answered the traffic.
    wait_until("the demo's banner", Duration::from_secs(45), || {
        demo.out().contains("Running 12s of traffic")
    });
    let banner = demo.out();
    assert!(
        banner.contains(&format!("{tag}-catalog-v1-0")) && banner.contains("10.77.201.1"),
        "{banner}"
    );
    // The catalog-v1-0 row of the table: its host and address; its admin
    // server is on loopback in that host, as the banner says.
    let host = format!("{tag}-catalog-v1-0");
    let row = banner
        .lines()
        .find(|l| l.contains(&format!("{host} ")))
        .unwrap_or_else(|| panic!("no catalog-v1-0 row: {banner}"));
    let ip = row.split_whitespace().nth(1).unwrap().to_owned();
    assert!(
        banner.contains(&format!(
            "ip netns exec {host} curl -s http://127.0.0.1:15000/metrics"
        )),
        "{banner}"
    );
    let admin = "http://127.0.0.1:15000";
    let admin_metrics = || curl_in(Some(&host), &format!("{admin}/metrics")).1;

    // mTLS: the catalog's sidecar knows its caller is the frontend.
    let frontend = "source_principal=\"spiffe://cluster.local/ns/default/sa/frontend\"";
    wait_until(
        "the frontend's calls in catalog-v1-0's metrics",
        Duration::from_secs(10),
        || metric(&admin_metrics(), "meshwork_requests_total", frontend) > 0,
    );
    // Plaintext from outside the mesh to the catalog's port: refused by its
    // strict sidecar.
    let refused = |m: &str| {
        metric(
            m,
            "meshwork_tls_handshake_failures_total",
            "reason=\"plaintext_refused\"",
        )
    };
    let before = refused(&admin_metrics());
    let (ok, body) = curl(&format!("http://{ip}:50051/"));
    assert!(!ok && body.is_empty(), "plaintext got an answer: {body}");
    let m = admin_metrics();
    assert_eq!(refused(&m), before + 1, "{m}");

    // The admin server is on loopback only: not reachable at the host's
    // address, from the root namespace nor from another host (whose own
    // sidecar would pass the connection through to it if it listened).
    let (ok, body) = curl(&format!("http://{ip}:15000/ready"));
    assert!(
        !ok,
        "catalog-v1-0's admin server answered the root namespace: {body}"
    );
    let (ok, body) = curl_in(
        Some(&format!("{tag}-frontend-0")),
        &format!("http://{ip}:15000/ready"),
    );
    assert!(
        !ok,
        "catalog-v1-0's admin server answered frontend-0: {body}"
    );

    // The end: the closing line, both versions, no errors.
    let status = wait(&mut demo.child, Duration::from_secs(50));
    // Let the reader threads take the last lines.
    wait_until("the demo's closing line", Duration::from_secs(5), || {
        demo.out().contains("demo finished after")
    });
    let out = demo.out();
    assert!(status.success(), "{out}{}", demo.err());
    let total = out
        .lines()
        .find(|l| l.starts_with("demo finished after"))
        .unwrap()
        .to_owned();
    let count = |what: &str| -> u64 {
        total
            .split(", ")
            .find_map(|p| p.strip_prefix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {what:?} in {total:?}"))
    };
    assert!(count("catalog-v1 ") > 0, "{out}");
    assert!(count("catalog-v2 ") > 0, "{out}");
    assert_eq!(count("errors "), 0, "{out}{}", demo.err());
    assert!(
        out.lines()
            .any(|l| l.contains("last") && l.contains("catalog-v2")),
        "the summary lines show the split: {out}"
    );

    // Nothing left behind, and no false alarm about it.
    assert!(!demo.err().contains("could not delete"), "{}", demo.err());
    assert_eq!(leftovers(&tag), Vec::<String>::new());
    assert!(
        !Path::new("/sys/class/net").join(&tag).exists(),
        "interface {tag} left behind"
    );
    for entry in std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(&format!("{tag}-")),
            "/etc/netns/{name} left behind"
        );
    }
    drop(demo);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn transparent_demo_without_root_says_so_and_points_to_the_plain_demo() {
    // As root, drop to `nobody` for the run (setpriv, util-linux).
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    let out = match cmd
        .args(["demo", "--transparent", "--seconds", "1"])
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: cannot run setpriv ({e})");
            return;
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Permission denied") && !err.contains("needs root") {
        eprintln!("skipped: nobody cannot run {BIN}: {err}");
        return;
    }
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("meshwork demo --transparent needs root")
            && err.contains("Plain `meshwork demo` needs no root"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
