//! `meshwork control` with its CA, driven by `meshwork token create`,
//! `meshwork ca bundle|status|rotate` and the admin-token lookup of every
//! mutating command.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_meshwork");

struct Guard(Child, PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// Runs the binary in `cwd` with no admin token in the environment.
fn meshwork(cwd: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(cwd)
        .args(args)
        .env_remove("MESHWORK_ADMIN_TOKEN")
        .env_remove("MESHWORK_CONTROL")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn tokens_bundle_status_rotate_and_the_admin_token() {
    let dir = std::env::temp_dir().join(format!("meshwork-ca-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let api: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let child = Command::new(BIN)
        .args(["control", "--data-dir", data.to_str().unwrap()])
        .args(["--xds-addr", "127.0.0.1:0", "--api-addr", &api.to_string()])
        .args(["--log-level", "warn", "--tls-san", "cp.example"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Guard(child, dir.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(api).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "control never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = api.to_string();
    let token_file = data.join("admin.token");
    let tf = token_file.to_str().unwrap();
    let svc = dir.join("svc.yaml");
    std::fs::write(
        &svc,
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{name: http, port: 80}]\n",
    )
    .unwrap();
    let svc = svc.to_str().unwrap();

    // Without the token: refused, saying where it is and how to pass it.
    let o = meshwork(&dir, &["apply", "-f", svc, "--control", &a]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("admin token") && t.contains(tf), "{t}");
    // With it: by flag, by environment, and from ./meshwork-data/.
    let o = meshwork(
        &dir,
        &[
            "apply",
            "-f",
            svc,
            "--control",
            &a,
            "--admin-token-file",
            tf,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let token = std::fs::read_to_string(&token_file).unwrap();
    let o = Command::new(BIN)
        .current_dir(&dir)
        .args(["delete", "service", "web", "--control", &a])
        .env("MESHWORK_ADMIN_TOKEN", token.trim())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = meshwork(&data.join(".."), &["get", "services", "--control", &a]);
    assert!(o.status.success(), "reads need no token: {}", text(&o));

    // Join tokens.
    let o = meshwork(
        &dir,
        &[
            "token",
            "create",
            "--service-account",
            "web",
            "--ttl",
            "10m",
            "--control",
            &a,
            "--admin-token-file",
            tf,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let join = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(join.starts_with("mwt1."), "{join}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("spiffe://cluster.local/ns/default/sa/web"));
    let o = meshwork(
        &dir,
        &[
            "token",
            "create",
            "--service-account",
            "web",
            "--control",
            &a,
        ],
    );
    assert!(!o.status.success(), "token create needs the admin token");

    // The bundle, as on disk; openssl reads it.
    let o = meshwork(&dir, &["ca", "bundle", "--control", &a]);
    assert!(o.status.success(), "{}", text(&o));
    let pem = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(
        pem,
        std::fs::read_to_string(data.join("ca/bundle.pem")).unwrap()
    );
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(data.join("ca/bundle.pem"))
        .output()
        .unwrap();
    assert!(
        text(&o).contains("meshwork root CA cluster.local"),
        "{}",
        text(&o)
    );

    // Status, then a rotation, then status again.
    let o = meshwork(&dir, &["ca", "status", "--control", &a]);
    assert!(text(&o).contains("phase         stable"), "{}", text(&o));
    let o = meshwork(
        &dir,
        &[
            "ca",
            "rotate",
            "--grace",
            "60s",
            "--ack-timeout",
            "1s",
            "--control",
            &a,
            "--admin-token-file",
            tf,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("now signs"), "{}", text(&o));
    let o = meshwork(&dir, &["ca", "status", "-o", "json", "--control", &a]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["phase"], "reissuing");
    assert_eq!(v["roots"].as_array().unwrap().len(), 2);
    let o = meshwork(
        &dir,
        &["ca", "rotate", "--control", &a, "--admin-token-file", tf],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("already in progress"), "{}", text(&o));
}
