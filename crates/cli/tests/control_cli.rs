//! `meshwork apply/get/delete/describe` end to end: the real binary against
//! the resource API (served in-process on 127.0.0.1:0 over a redb store in a
//! temporary directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use control::api::{self, NoProxies};
use control::store::{RedbStore, Store};

const BIN: &str = env!("CARGO_BIN_EXE_meshwork");

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("meshwork-control-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the API over a fresh store; the server lives as long as the runtime.
async fn start(dir: &Path) -> (SocketAddr, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.join("data")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve(
        listener,
        Arc::clone(&store),
        Arc::new(NoProxies),
        std::future::pending(),
    ));
    (addr, store)
}

/// Runs the binary off the runtime's threads.
async fn meshwork(args: Vec<String>, env: Option<(&'static str, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(BIN);
        cmd.args(&args).env_remove("MESHWORK_CONTROL");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    })
    .await
    .unwrap()
}

async fn ok(args: &[&str], addr: SocketAddr) -> String {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend(["--control".to_string(), addr.to_string()]);
    let out = meshwork(a, None).await;
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn fails(args: &[&str], addr: SocketAddr) -> String {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend(["--control".to_string(), addr.to_string()]);
    let out = meshwork(a, None).await;
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

const SERVICE: &str = "apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata:
  name: reviews
spec:
  ports:
  - name: http
    port: 80
";

const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
spec:
  parentRefs:
  - kind: Service
    name: reviews
    port: 80
  rules:
  - backendRefs:
    - name: reviews
      port: 80
";

const WORKLOAD: &str = "apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata:
  name: reviews-0
spec:
  service: reviews
  address: 10.1.2.3
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_describe_delete() {
    let dir = Scratch::new("flow");
    let (addr, store) = start(dir.path()).await;
    let d = dir.path().join("mesh");
    dir.write("mesh/1-service.yaml", SERVICE);
    dir.write("mesh/2-route.yaml", ROUTE);
    dir.write("mesh/3-workload.yml", WORKLOAD);
    dir.write("mesh/notes.txt", "not a manifest");
    let d = d.display().to_string();

    let out = ok(&["apply", "-f", &d, "--dry-run"], addr).await;
    assert!(
        out.contains("Service default/reviews created (dry run)"),
        "{out}"
    );
    assert!(store.list(None).is_empty());

    let out = ok(&["apply", "-f", &d], addr).await;
    assert_eq!(
        out,
        "Service default/reviews created\nHTTPRoute default/reviews created\nWorkload default/reviews-0 created\n"
    );
    let out = ok(&["apply", "-f", &d], addr).await;
    assert!(out.contains("HTTPRoute default/reviews unchanged"), "{out}");

    let out = ok(&["get", "services"], addr).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("NAMESPACE")
            && lines[0].contains("VERSION")
            && lines[0].contains("PORTS")
    );
    assert!(
        lines[1].contains("reviews") && lines[1].contains("http:80/http"),
        "{out}"
    );
    let out = ok(&["get", "httproute"], addr).await;
    assert!(
        out.contains("PARENTS") && out.contains("reviews:80"),
        "{out}"
    );
    let out = ok(&["get", "all"], addr).await;
    assert_eq!(out.lines().count(), 4, "{out}");

    let yaml = ok(&["get", "svc", "reviews", "-o", "yaml"], addr).await;
    assert!(
        yaml.contains("resourceVersion: '1'") || yaml.contains("resourceVersion: \"1\""),
        "{yaml}"
    );
    let json = ok(&["get", "workloads", "-o", "json"], addr).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["items"][0]["spec"]["address"], "10.1.2.3");

    let out = ok(&["describe", "service", "reviews"], addr).await;
    assert!(out.contains("HTTPRoute default/reviews (port 80)"), "{out}");
    assert!(out.contains("static") && out.contains("10.1.2.3"), "{out}");

    // Edit what `get -o yaml` printed, after someone else changed it: refused.
    let stale = dir.write("stale.yaml", &yaml.replace("port: 80", "port: 81"));
    dir.write(
        "other.yaml",
        &SERVICE.replace("  ports:", "  serviceAccount: other\n  ports:"),
    );
    ok(
        &[
            "apply",
            "-f",
            &dir.path().join("other.yaml").display().to_string(),
        ],
        addr,
    )
    .await;
    let err = fails(&["apply", "-f", &stale], addr).await;
    assert!(err.contains("current resourceVersion is 2"), "{err}");
    assert!(err.contains("re-read and retry"), "{err}");

    // The service cannot go while its route and workload point at it.
    let err = fails(&["delete", "service", "reviews"], addr).await;
    assert!(err.contains("HTTPRoute default/reviews"), "{err}");
    ok(&["delete", "httproute", "reviews"], addr).await;
    ok(&["delete", "workload", "reviews-0"], addr).await;
    let out = ok(&["delete", "svc", "reviews", "-n", "default"], addr).await;
    assert_eq!(out, "Service default/reviews deleted\n");
    let err = fails(&["get", "service", "reviews"], addr).await;
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_where_and_what_to_do() {
    let dir = Scratch::new("errors");
    let (addr, store) = start(dir.path()).await;
    let bad = dir.write(
        "bad.yaml",
        &format!(
            "{SERVICE}---\n{}",
            ROUTE.replace("    port: 80\n  rules", "    port: 8080\n  rules")
        ),
    );
    let err = fails(&["apply", "-f", &bad], addr).await;
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(err.contains("bad.yaml:"), "{err}");
    assert!(err.contains("spec.parentRefs[0]"), "{err}");
    assert!(store.list(None).is_empty());

    let err = fails(&["get", "pods"], addr).await;
    assert!(err.contains("unknown kind"), "{err}");

    // Nothing listens there (a port we just closed).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = fails(&["get", "services"], closed).await;
    assert!(
        err.contains(&format!("cannot reach the control plane at {closed}")),
        "{err}"
    );
    assert!(err.contains("meshwork control"), "{err}");

    // The environment variable selects the control plane too.
    let out = meshwork(
        vec!["get".into(), "services".into()],
        Some(("MESHWORK_CONTROL", addr.to_string())),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `meshwork demo`: control plane, sample app and sidecars in one process;
/// its traffic reaches both catalog versions through the mesh, error-free.
#[test]
fn demo_runs_traffic_through_both_catalog_versions() {
    let dir = Scratch::new("demo");
    let out = Command::new(BIN)
        .args(["demo", "--seconds", "8", "--rps", "20", "--every", "2"])
        .args(["--control-port", "0", "--mesh-port", "0"])
        .args(["--dir", dir.path().to_str().unwrap()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    // It says how to change the split, with the file it wrote.
    let split = dir.path().join("catalog-split.yaml");
    assert!(
        stdout.contains(&format!("meshwork apply -f {}", split.display())),
        "{stdout}"
    );
    assert!(std::fs::read_to_string(&split)
        .unwrap()
        .contains("kind: GRPCRoute"));
    // `demo finished after 8s of traffic: N requests, catalog-v1 A, catalog-v2 B, errors E`
    let last = stdout
        .lines()
        .find(|l| l.starts_with("demo finished"))
        .unwrap_or_else(|| panic!("no closing line:\n{stdout}\n{stderr}"));
    let count = |what: &str| -> u64 {
        let rest = &last[last.find(what).unwrap() + what.len()..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(count("catalog-v1") > 0, "{last}");
    assert!(count("catalog-v2") > 0, "{last}");
    assert_eq!(count("errors"), 0, "{last}\n{stdout}");
    assert_eq!(
        count("catalog-v1") + count("catalog-v2"),
        count("traffic:"),
        "{last}"
    );
}
