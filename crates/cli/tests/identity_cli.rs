//! The proxy side of workload identity, end to end: real `meshwork control`
//! (CA, Sign, ROOTCA over ADS, TLS-only xDS) and real `meshwork proxy`
//! processes joined with tokens from `meshwork token create`, real HTTP
//! through the sidecars meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::{Backend, H1Client};

const BIN: &str = env!("CARGO_BIN_EXE_meshwork");

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshwork-id-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Kills the child when the test ends, pass or fail.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for_port(addr: SocketAddr) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

/// Runs the binary to completion (off the runtime's threads); stdout on
/// success, panics with stderr otherwise.
async fn meshwork(args: Vec<String>) -> String {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_remove("MESHWORK_CONTROL")
            .env_remove("MESHWORK_TOKEN")
            .env_remove("MESHWORK_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "meshwork failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A control plane in `dir/data` with its ports.
struct ControlPlane {
    dir: PathBuf,
    xds: String,
    api: SocketAddr,
    extra: Vec<String>,
}

impl ControlPlane {
    fn new(dir: &Path, extra: &[&str]) -> ControlPlane {
        ControlPlane {
            dir: dir.to_path_buf(),
            xds: format!("127.0.0.1:{}", testkit::free_port()),
            api: format!("127.0.0.1:{}", testkit::free_port())
                .parse()
                .unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    async fn start(&self) -> Guard {
        let child = Command::new(BIN)
            .args(["control", "--data-dir", self.data().to_str().unwrap()])
            .args(["--xds-addr", &self.xds, "--api-addr", &self.api.to_string()])
            .args(["--log-level", "warn"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let guard = Guard(child);
        wait_for_port(self.api).await;
        guard
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn admin(&self) -> Vec<String> {
        vec![
            "--control".into(),
            self.api.to_string(),
            "--admin-token-file".into(),
            self.data().join("admin.token").display().to_string(),
        ]
    }

    async fn token(&self, sa: &str, extra: &[&str]) -> String {
        let mut args: Vec<String> = ["token", "create", "--service-account", sa]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.admin());
        meshwork(args).await.trim().to_owned()
    }

    /// `meshwork ca bundle > root.pem`.
    async fn bundle(&self) -> PathBuf {
        let mut args = vec!["ca".to_string(), "bundle".to_string()];
        args.extend(self.admin());
        let pem = meshwork(args).await;
        let path = self.dir.join("root.pem");
        std::fs::write(&path, pem).unwrap();
        path
    }

    async fn apply(&self, name: &str, yaml: &str) {
        let file = self.dir.join(name);
        std::fs::write(&file, yaml).unwrap();
        let mut args = vec!["apply".into(), "-f".into(), file.display().to_string()];
        args.extend(self.admin());
        meshwork(args).await;
    }

    async fn proxy_status(&self) -> String {
        meshwork(vec![
            "proxy-status".into(),
            "--control".into(),
            self.api.to_string(),
            "-o".into(),
            "json".into(),
        ])
        .await
    }
}

const WEB: &str = "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  serviceAccount: web\n  ports: [{name: http, port: 80, appProtocol: http}]\n";

/// A `meshwork proxy` with a token: `service` registers a workload.
struct Sidecar {
    _child: Guard,
    admin: SocketAddr,
    outbound: SocketAddr,
}

fn sidecar(
    cp: &ControlPlane,
    token: &str,
    bundle: &Path,
    service: Option<(&str, u16)>,
    extra: &[&str],
) -> Sidecar {
    let admin: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let outbound: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["proxy", "--control", &cp.xds])
        .args(["--token", token, "--ca-bundle", bundle.to_str().unwrap()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--outbound-addr", &outbound.to_string()])
        .args([
            "--inbound-addr",
            &format!("127.0.0.1:{}", testkit::free_port()),
        ])
        .args(["--access-log", "off", "--log-level", "warn"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((name, port)) = service {
        cmd.args(["--service", name, "--name", &format!("{name}-0")])
            .args(["--app-port", &port.to_string()]);
    }
    Sidecar {
        _child: Guard(cmd.spawn().unwrap()),
        admin,
        outbound,
    }
}

impl Sidecar {
    /// `/certs`, once the admin server answers.
    async fn certs(&self) -> serde_json::Value {
        wait_for_port(self.admin).await;
        let mut c = H1Client::connect(self.admin).await.unwrap();
        let r = c.get("localhost", "/certs").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    async fn metrics(&self) -> String {
        let mut c = H1Client::connect(self.admin).await.unwrap();
        c.get("localhost", "/metrics").await.unwrap().text()
    }
}

/// GETs `web` through `out` until one answers from the backend.
async fn reachable(out: SocketAddr) {
    for _ in 0..300 {
        if let Ok(mut c) = H1Client::connect(out).await {
            if let Ok(r) = c.get("web", "/").await {
                if r.status == 200 && r.backend() == Some("web-app") {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("web never answered through {out}");
}

/// Steady HTTP through `out` until `stop`: (ok, failed, first failure).
fn load(out: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64, String)> {
    tokio::spawn(async move {
        let (mut ok, mut failed, mut first) = (0, 0, String::new());
        let mut client = H1Client::connect(out).await.unwrap();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            // A fresh connection now and then: new connections exercise
            // new handshakes with the current certificates.
            if n.is_multiple_of(20) {
                client = H1Client::connect(out).await.unwrap();
            }
            match client.get("web", "/").await {
                Ok(r) if r.status == 200 => ok += 1,
                other => {
                    failed += 1;
                    if first.is_empty() {
                        first = format!("{:?}", other.map(|r| (r.status, r.text())));
                    }
                    client = H1Client::connect(out).await.unwrap();
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ok, failed, first)
    })
}

/// Polls `/certs` until `want` holds.
async fn certs_until(
    s: &Sidecar,
    what: &str,
    within: Duration,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let c = s.certs().await;
        if want(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {c:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A token gets each sidecar its SVID (visible in `/certs`), xDS runs over
/// TLS to a control plane that serves nothing else, traffic flows; with 4 s
/// SVIDs the certificates renew several times under steady load with no
/// failed request and no new token; `meshwork ca rotate` reaches the
/// proxies as ROOTCA and they renew from the new root, still with no
/// failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_join_renewal_and_root_rotation_under_load() {
    let app = Backend::http("web-app").await;
    let dir = scratch("renew");
    let cp = ControlPlane::new(&dir, &["--svid-ttl", "4s", "--max-svid-ttl", "4s"]);
    let _control = cp.start().await;
    cp.apply("web.yaml", WEB).await;
    let bundle = cp.bundle().await;

    let web = sidecar(
        &cp,
        &cp.token("web", &[]).await,
        &bundle,
        Some(("web", app.port())),
        &[],
    );
    let client = sidecar(&cp, &cp.token("client", &[]).await, &bundle, None, &[]);

    let c = web.certs().await;
    assert_eq!(c["spiffe_id"], "spiffe://cluster.local/ns/default/sa/web");
    let not_after = c["not_after_unix"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(not_after > now && not_after <= now + 6, "a 4s SVID: {c:#}");
    let c = client.certs().await;
    assert_eq!(
        c["spiffe_id"],
        "spiffe://cluster.local/ns/default/sa/client"
    );

    // Connected over TLS: this control plane has no plaintext xDS.
    reachable(client.outbound).await;
    let status = cp.proxy_status().await;
    assert!(status.contains("web-0.default"), "{status}");

    // Renewal under load.
    let first = web.certs().await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(client.outbound, stop.clone());
    let renewed = certs_until(&web, "three renewals", Duration::from_secs(20), |c| {
        c["issued"].as_u64().unwrap() >= first["issued"].as_u64().unwrap() + 3
    })
    .await;
    assert_ne!(renewed["serial"], first["serial"]);
    assert_eq!(renewed["renewal_failures"], 0, "{renewed:#}");
    let c = client.certs().await;
    assert!(c["issued"].as_u64().unwrap() >= 3, "{c:#}");

    // Root rotation under the same load.
    let old_root = first["trust_bundle"][0]["fingerprint_sha256"].clone();
    let mut rotate = vec![
        "ca".to_string(),
        "rotate".into(),
        "--grace".into(),
        "3s".into(),
        "--ack-timeout".into(),
        "10s".into(),
    ];
    rotate.extend(cp.admin());
    meshwork(rotate).await;
    let rotated = certs_until(
        &web,
        "a certificate from the new root",
        Duration::from_secs(15),
        |c| {
            c["trust_bundle"][0]["fingerprint_sha256"] != old_root
                && c["issued_by_signing_root"] == true
        },
    )
    .await;
    // Phase 3: the old root retired from the bundle.
    certs_until(
        &client,
        "the old root retired",
        Duration::from_secs(15),
        |c| {
            c["trust_bundle"].as_array().unwrap().len() == 1
                && c["trust_bundle"][0]["fingerprint_sha256"]
                    == rotated["trust_bundle"][0]["fingerprint_sha256"]
                && c["issued_by_signing_root"] == true
        },
    )
    .await;
    // A couple more renewals from the new root.
    let after = rotated["issued"].as_u64().unwrap();
    certs_until(
        &web,
        "renewals after rotation",
        Duration::from_secs(15),
        |c| c["issued"].as_u64().unwrap() >= after + 2,
    )
    .await;

    stop.store(true, Ordering::SeqCst);
    let (ok, failed, first_failure) = traffic.await.unwrap();
    assert!(ok > 100, "only {ok} requests");
    assert_eq!(
        failed, 0,
        "no request fails during renewal and rotation: {first_failure}"
    );
    let metrics = web.metrics().await;
    assert!(
        metrics.contains("meshwork_identity_renewal_failures_total{spiffe_id=\"spiffe://cluster.local/ns/default/sa/web\"} 0"),
        "{metrics}"
    );
    drop(dir);
}

/// Starts a proxy that should fail; its exit status and stderr.
async fn proxy_fails(cp: &ControlPlane, args: &[&str]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["proxy", "--control", &cp.xds])
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--inbound-addr", "127.0.0.1:0", "--access-log", "off"])
        .args(args)
        .env_remove("MESHWORK_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await
    .expect("the proxy should exit by itself")
    .unwrap();
    assert!(!out.status.success());
    String::from_utf8(out.stderr).unwrap()
}

/// Bad, expired and replayed tokens, a bundle that does not verify the
/// control plane, and a missing --ca-bundle: the proxy exits non-zero with
/// a message that names the problem and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_end_the_proxy_with_the_fix() {
    let dir = scratch("bad");
    let cp = ControlPlane::new(&dir, &[]);
    let _control = cp.start().await;
    let bundle = cp.bundle().await;
    let bundle_arg = bundle.to_str().unwrap();

    // Not a token at all: refused before anything is sent.
    let e = proxy_fails(
        &cp,
        &["--token", "mwt1.e30.AAAA", "--ca-bundle", bundle_arg],
    )
    .await;
    assert!(
        e.contains("join token") && e.contains("meshwork token create"),
        "{e}"
    );

    // A forged token: right shape, claims of a real identity, wrong MAC.
    let good = cp.token("web", &[]).await;
    let forged = format!("{}.AAAA", good.rsplit_once('.').unwrap().0);
    let e = proxy_fails(&cp, &["--token", &forged, "--ca-bundle", bundle_arg]).await;
    assert!(e.contains("Unauthenticated"), "{e}");
    assert!(e.contains("signature") || e.contains("forged"), "{e}");

    // Used once (by a proxy that then stops), then replayed.
    let once = cp.token("web", &[]).await;
    {
        let first = sidecar(&cp, &once, &bundle, None, &[]);
        first.certs().await;
    }
    let e = proxy_fails(&cp, &["--token", &once, "--ca-bundle", bundle_arg]).await;
    assert!(e.contains("already used") || e.contains("replay"), "{e}");
    assert!(e.contains("meshwork token create"), "{e}");

    // Expired before use.
    let short = cp.token("web", &["--ttl", "1s"]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = proxy_fails(&cp, &["--token", &short, "--ca-bundle", bundle_arg]).await;
    assert!(e.contains("expired"), "{e}");

    // A bundle from another control plane: the control plane is not trusted.
    let other_dir = scratch("bad-other");
    let other = ControlPlane::new(&other_dir, &[]);
    let other_control = other.start().await;
    let other_bundle = other.bundle().await;
    drop(other_control);
    let token = cp.token("web", &[]).await;
    let e = proxy_fails(
        &cp,
        &[
            "--token",
            &token,
            "--ca-bundle",
            other_bundle.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        e.contains("could not be verified") && e.contains("meshwork ca bundle"),
        "{e}"
    );

    // A token without --ca-bundle.
    let e = proxy_fails(&cp, &["--token", &token]).await;
    assert!(
        e.contains("--ca-bundle") && e.contains("meshwork ca bundle"),
        "{e}"
    );
}

/// The control plane goes away: the proxy keeps serving with its
/// certificate; when it is back (same data dir, same CA) the proxy
/// reconnects over TLS and renews. A restarted proxy with --identity-dir
/// resumes from its saved certificate although its token is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_and_proxy_restart_keep_the_identity() {
    let app = Backend::http("web-app").await;
    let dir = scratch("restart");
    let cp = ControlPlane::new(&dir, &["--svid-ttl", "30s", "--max-svid-ttl", "30s"]);
    let mut control = cp.start().await;
    cp.apply("web.yaml", WEB).await;
    let bundle = cp.bundle().await;
    let web_dir = dir.join("web-identity");
    let web_token = cp.token("web", &[]).await;
    let web_dir_arg = web_dir.display().to_string();
    let web = sidecar(
        &cp,
        &web_token,
        &bundle,
        Some(("web", app.port())),
        &["--identity-dir", &web_dir_arg],
    );
    let client = sidecar(&cp, &cp.token("client", &[]).await, &bundle, None, &[]);
    reachable(client.outbound).await;
    let before = web.certs().await;

    drop(control);
    for _ in 0..20 {
        let mut c = H1Client::connect(client.outbound).await.unwrap();
        let r = c.get("web", "/").await.unwrap();
        assert_eq!(r.status, 200, "serves while the control plane is down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(web.certs().await["spiffe_id"], before["spiffe_id"]);

    control = cp.start().await;
    // Reconnected over TLS (the only kind this control plane accepts) and
    // registered again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = cp.proxy_status().await;
        if status.contains("web-0.default") {
            break;
        }
        assert!(Instant::now() < deadline, "web never reconnected: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And renews from the restarted control plane (30s SVIDs: within ~15s).
    let issued = before["issued"].as_u64().unwrap();
    certs_until(
        &web,
        "a renewal after the restart",
        Duration::from_secs(25),
        |c| c["issued"].as_u64().unwrap() > issued && c["last_error"].is_null(),
    )
    .await;
    reachable(client.outbound).await;

    // The web proxy restarts with the same (spent, single-use) token and its
    // identity dir: it resumes from the saved certificate.
    drop(web);
    let web = sidecar(
        &cp,
        &web_token,
        &bundle,
        Some(("web", app.port())),
        &["--identity-dir", &web_dir_arg],
    );
    let c = web.certs().await;
    assert_eq!(c["spiffe_id"], "spiffe://cluster.local/ns/default/sa/web");
    reachable(client.outbound).await;
    drop(control);
}
