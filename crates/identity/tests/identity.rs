//! End-to-end checks of the identity crate against real peers: openssl,
//! py-spiffe, and TLS 1.3 handshakes over loopback TCP with tokio-rustls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use identity::{
    certs_from_pem, generate_key_and_csr, peer_identity, Ca, SpiffeId, Svid, TrustDomain,
    WorkloadIdentity, ALPN_H2, ALPN_MESH_TCP, DEFAULT_MESH_ALPN, DEFAULT_SVID_TTL,
};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

// ---------- helpers ----------

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn id(domain: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td(domain), "default", sa).unwrap()
}

/// A leaf chain and its key, as a proxy would hold them.
struct Leaf {
    svid: Svid,
    key_pem: String,
}

fn issue(ca: &Ca, id: &SpiffeId) -> Leaf {
    let kc = generate_key_and_csr(id).unwrap();
    let svid = ca.sign_csr(&kc.csr_pem, id, DEFAULT_SVID_TTL).unwrap();
    Leaf {
        svid,
        key_pem: kc.key_pem,
    }
}

fn issue_expired(ca: &Ca, id: &SpiffeId) -> Leaf {
    let kc = generate_key_and_csr(id).unwrap();
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86400);
    let svid = ca
        .sign_csr_at(&kc.csr_pem, id, Duration::from_secs(3600), two_days_ago)
        .unwrap();
    Leaf {
        svid,
        key_pem: kc.key_pem,
    }
}

fn workload(leaf: &Leaf, ca: &Ca) -> Arc<WorkloadIdentity> {
    WorkloadIdentity::with_cert(&leaf.svid.chain_pem(), &leaf.key_pem, ca.bundle()).unwrap()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "meshwork-identity-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// What each side saw of one handshake plus a one-byte exchange.
#[derive(Debug)]
struct Outcome {
    /// Client: the server's SPIFFE id and the negotiated ALPN, or the error.
    client: Result<(Option<SpiffeId>, Option<Vec<u8>>), String>,
    /// Server: the client's SPIFFE id, or the error.
    server: Result<Option<SpiffeId>, String>,
}

async fn exchange(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1);
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("web.default.svc").unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let peer = peer_identity(conn);
        let alpn = conn.alpn_protocol().map(|p| p.to_vec());
        tls.write_all(b"?").await.map_err(|e| e.to_string())?;
        let mut reply = [0u8; 2];
        // TLS 1.3: a refused client certificate shows up here, as an alert.
        tls.read_exact(&mut reply)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(&reply, b"ok");
        Ok::<_, String>((peer, alpn))
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .expect("client finishes");
    let server = tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .expect("server finishes")
        .unwrap();
    Outcome { client, server }
}

fn mesh_pair(
    server: &Arc<WorkloadIdentity>,
    client: &Arc<WorkloadIdentity>,
    expected: SpiffeId,
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    (
        server.mesh_server_config(DEFAULT_MESH_ALPN).unwrap(),
        client
            .mesh_client_config(vec![expected], &[ALPN_H2])
            .unwrap(),
    )
}

// ---------- openssl ----------

#[test]
fn openssl_verify_accepts_svid_and_rejects_another_ca() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let other = Ca::generate(td("cluster.local")).unwrap();
    let leaf = issue(&ca, &id("cluster.local", "web"));
    let dir = Scratch::new();
    let root = dir.write("root.pem", &ca.bundle().to_pem());
    let other_root = dir.write("other.pem", &other.bundle().to_pem());
    let leaf_path = dir.write("leaf.pem", &leaf.svid.chain_pem());

    let (ok, out) = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&root)
        .arg(&leaf_path));
    assert!(ok, "openssl verify failed: {out}");
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = run(Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(&root)
            .arg(&leaf_path));
        assert!(ok, "openssl verify -purpose {purpose} failed: {out}");
    }
    let (ok, out) = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&other_root)
        .arg(&leaf_path));
    assert!(!ok, "leaf verified against an unrelated CA: {out}");
}

#[test]
fn openssl_text_shows_the_svid_profile() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let leaf = issue(&ca, &id("cluster.local", "web"));
    let dir = Scratch::new();
    let leaf_path = dir.write("leaf.pem", &leaf.svid.chain_pem());
    let (ok, text) = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf_path));
    assert!(ok, "{text}");
    let after = |header: &str| -> String {
        let mut lines = text.lines();
        lines
            .find(|l| l.contains(header))
            .unwrap_or_else(|| panic!("{header} missing:\n{text}"));
        lines.next().unwrap_or_default().trim().to_string()
    };
    assert!(
        text.contains("X509v3 Basic Constraints: critical")
            || text.contains("X509v3 Basic Constraints:")
    );
    assert_eq!(after("X509v3 Basic Constraints"), "CA:FALSE", "{text}");
    assert!(text.contains("X509v3 Key Usage: critical"), "{text}");
    assert!(
        after("X509v3 Key Usage").contains("Digital Signature"),
        "{text}"
    );
    assert!(
        !after("X509v3 Key Usage").contains("Certificate Sign"),
        "{text}"
    );
    let eku = after("X509v3 Extended Key Usage");
    assert!(
        eku.contains("TLS Web Server Authentication")
            && eku.contains("TLS Web Client Authentication"),
        "{text}"
    );
    let san = after("X509v3 Subject Alternative Name");
    assert_eq!(
        san, "URI:spiffe://cluster.local/ns/default/sa/web",
        "{text}"
    );
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
}

#[test]
fn py_spiffe_accepts_the_svid() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let leaf = issue(&ca, &id("cluster.local", "web"));
    let dir = Scratch::new();
    let chain = dir.write("chain.pem", &leaf.svid.chain_pem());
    let key = dir.write("key.pem", &leaf.key_pem);
    let bundle = dir.write("bundle.pem", &ca.bundle().to_pem());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/svid_check.py");
    let (ok, out) = run(Command::new(testkit::python())
        .arg(&script)
        .arg(&chain)
        .arg(&key)
        .arg(&bundle));
    assert!(ok, "py-spiffe refused the SVID: {out}");
    assert_eq!(out.trim(), "spiffe://cluster.local/ns/default/sa/web");

    // And it refuses a chain that does not lead to the bundle.
    let other = Ca::generate(td("cluster.local")).unwrap();
    let other_bundle = dir.write("other.pem", &other.bundle().to_pem());
    let (ok, out) = run(Command::new(testkit::python())
        .arg(&script)
        .arg(&chain)
        .arg(&key)
        .arg(&other_bundle));
    assert!(!ok, "py-spiffe check passed with the wrong bundle: {out}");
}

// ---------- mTLS handshakes ----------

#[tokio::test]
async fn mtls_succeeds_with_the_expected_identity() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let server_id = id("cluster.local", "web");
    let client_id = id("cluster.local", "frontend");
    let server = workload(&issue(&ca, &server_id), &ca);
    let client = workload(&issue(&ca, &client_id), &ca);
    let (s, c) = mesh_pair(&server, &client, server_id.clone());
    let out = exchange(s, c).await;
    let (seen_server, alpn) = out.client.expect("client side succeeds");
    assert_eq!(seen_server, Some(server_id));
    assert_eq!(alpn.as_deref(), Some(ALPN_H2));
    assert_eq!(out.server.expect("server side succeeds"), Some(client_id));

    // Opaque TCP ALPN negotiates too.
    let s = server.mesh_server_config(DEFAULT_MESH_ALPN).unwrap();
    let c = client
        .mesh_client_config(vec![id("cluster.local", "web")], &[ALPN_MESH_TCP])
        .unwrap();
    let out = exchange(s, c).await;
    assert_eq!(out.client.unwrap().1.as_deref(), Some(ALPN_MESH_TCP));
}

#[tokio::test]
async fn mtls_fails_when_the_server_is_not_the_expected_identity() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let server = workload(&issue(&ca, &id("cluster.local", "web")), &ca);
    let client = workload(&issue(&ca, &id("cluster.local", "frontend")), &ca);
    let (s, c) = mesh_pair(&server, &client, id("cluster.local", "payments"));
    let out = exchange(s, c).await;
    let err = out.client.expect_err("wrong server identity must fail");
    assert!(
        err.contains("spiffe://cluster.local/ns/default/sa/web")
            && err.contains("spiffe://cluster.local/ns/default/sa/payments"),
        "error names expected and presented ids: {err}"
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn mtls_fails_across_cas_and_trust_domains() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let rogue = Ca::generate(td("cluster.local")).unwrap();
    let foreign = Ca::generate(td("other.example")).unwrap();
    let server_id = id("cluster.local", "web");
    let server = workload(&issue(&ca, &server_id), &ca);

    // Client cert from another CA of the same name: the server refuses it.
    let rogue_client = WorkloadIdentity::with_cert(
        &issue(&rogue, &id("cluster.local", "frontend"))
            .svid
            .chain_pem(),
        &issue(&rogue, &id("cluster.local", "x")).key_pem,
        ca.bundle(),
    );
    assert!(rogue_client.is_err(), "key of another leaf must not load");
    let leaf = issue(&rogue, &id("cluster.local", "frontend"));
    let rogue_client =
        WorkloadIdentity::with_cert(&leaf.svid.chain_pem(), &leaf.key_pem, ca.bundle()).unwrap();
    let (s, c) = mesh_pair(&server, &rogue_client, server_id.clone());
    let out = exchange(s, c).await;
    // Same issuer name as the real root, so webpki tries that anchor and
    // finds the signature does not verify.
    let err = out
        .server
        .expect_err("server refuses a client from another CA");
    assert!(
        err.contains("BadSignature") || err.contains("UnknownIssuer"),
        "{err}"
    );
    assert!(out.client.is_err());

    // Server cert from a foreign trust domain: the client refuses it.
    let foreign_server = workload(&issue(&foreign, &id("other.example", "web")), &foreign);
    let client = workload(&issue(&ca, &id("cluster.local", "frontend")), &ca);
    let (s, c) = mesh_pair(&foreign_server, &client, server_id);
    let out = exchange(s, c).await;
    let err = out
        .client
        .expect_err("client refuses a server from another CA");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn mtls_fails_with_an_expired_certificate() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let server_id = id("cluster.local", "web");
    let good_server = workload(&issue(&ca, &server_id), &ca);
    let expired_client = workload(&issue_expired(&ca, &id("cluster.local", "frontend")), &ca);
    let (s, c) = mesh_pair(&good_server, &expired_client, server_id.clone());
    let out = exchange(s, c).await;
    let err = out
        .server
        .expect_err("server refuses an expired client cert");
    assert!(err.to_lowercase().contains("expired"), "{err}");

    let expired_server = workload(&issue_expired(&ca, &server_id), &ca);
    let good_client = workload(&issue(&ca, &id("cluster.local", "frontend")), &ca);
    let (s, c) = mesh_pair(&expired_server, &good_client, server_id);
    let out = exchange(s, c).await;
    let err = out
        .client
        .expect_err("client refuses an expired server cert");
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn rotation_swaps_certs_and_bundles_without_rebuilding_configs() {
    let old = Ca::generate(td("cluster.local")).unwrap();
    let new = Ca::generate(td("cluster.local")).unwrap();
    let server_id = id("cluster.local", "web");
    let client_id = id("cluster.local", "frontend");
    let server = workload(&issue(&old, &server_id), &old);
    let client = workload(&issue(&old, &client_id), &old);
    // Built once; every step below reuses these configs.
    let (s, c) = mesh_pair(&server, &client, server_id.clone());
    assert!(exchange(s.clone(), c.clone()).await.client.is_ok());

    // Renewal from the same CA: the next handshake presents the new leaf.
    let renewed = issue(&old, &server_id);
    server
        .update(&renewed.svid.chain_pem(), &renewed.key_pem)
        .unwrap();
    let presented = server.certified_key().unwrap().cert[0].clone();
    assert_eq!(
        presented,
        certs_from_pem(&renewed.svid.chain_pem()).unwrap()[0]
    );
    let out = exchange(s.clone(), c.clone()).await;
    assert!(out.client.is_ok() && out.server.is_ok(), "{out:?}");

    // Step 1: both sides trust old+new.
    let both = old.bundle().merged(&new.bundle());
    assert_eq!(both.roots().len(), 2);
    server.set_bundle(both.clone());
    client.set_bundle(both.clone());
    // Step 2: the server gets a leaf from the new root; the client still
    // has an old-root leaf. Both are accepted.
    let from_new = issue(&new, &server_id);
    server
        .update(&from_new.svid.chain_pem(), &from_new.key_pem)
        .unwrap();
    let out = exchange(s.clone(), c.clone()).await;
    assert!(out.client.is_ok() && out.server.is_ok(), "{out:?}");

    // Step 3: the server retires the old root; the client's old leaf is
    // now refused until it is reissued from the new root.
    server.set_bundle(both.without(&old.bundle()).unwrap());
    let out = exchange(s.clone(), c.clone()).await;
    assert!(
        out.server.is_err(),
        "old-root client accepted after retirement"
    );
    let client_new = issue(&new, &client_id);
    client
        .update(&client_new.svid.chain_pem(), &client_new.key_pem)
        .unwrap();
    client.set_bundle(new.bundle());
    let out = exchange(s, c).await;
    assert_eq!(out.server.unwrap(), Some(client_id));
    assert_eq!(out.client.unwrap().0, Some(server_id));
}

#[tokio::test]
async fn an_identity_without_a_cert_cannot_serve_or_join_the_mesh() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let server_id = id("cluster.local", "web");
    let server = workload(&issue(&ca, &server_id), &ca);
    let bootstrapping = WorkloadIdentity::new(ca.bundle());
    assert_eq!(bootstrapping.id(), None);
    let (s, c) = mesh_pair(&server, &bootstrapping, server_id.clone());
    let out = exchange(s, c).await;
    assert!(
        out.server.is_err(),
        "mesh server must require a client cert"
    );
    assert!(bootstrapping
        .mesh_client_config(vec![], &[ALPN_H2])
        .is_err());
}

// ---------- control-plane channel ----------

#[tokio::test]
async fn control_plane_accepts_bootstrap_and_renewal_clients() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let serving = ca
        .issue_server_cert(&["web.default.svc", "127.0.0.1"], DEFAULT_SVID_TTL)
        .unwrap();
    let control =
        WorkloadIdentity::with_cert(&serving.svid.chain_pem(), &serving.key_pem, ca.bundle())
            .unwrap();
    let server = control.control_server_config(&[ALPN_H2]).unwrap();

    // Bootstrap: no client cert yet, still accepted; the peer id is None.
    let proxy = WorkloadIdentity::new(ca.bundle());
    let out = exchange(
        server.clone(),
        proxy.control_client_config(&[ALPN_H2]).unwrap(),
    )
    .await;
    let (control_id, _) = out.client.expect("bootstrap connects");
    assert_eq!(
        control_id,
        Some(SpiffeId::control_plane(td("cluster.local")))
    );
    assert_eq!(out.server.unwrap(), None);

    // Renewal: the proxy's SVID is presented and verified.
    let proxy_id = id("cluster.local", "frontend");
    let leaf = issue(&ca, &proxy_id);
    proxy.update(&leaf.svid.chain_pem(), &leaf.key_pem).unwrap();
    let out = exchange(
        server.clone(),
        proxy.control_client_config(&[ALPN_H2]).unwrap(),
    )
    .await;
    assert_eq!(out.server.unwrap(), Some(proxy_id));

    // A workload SVID cannot pose as the control plane (no DNS SAN, wrong id).
    let impostor = workload(&issue(&ca, &id("cluster.local", "web")), &ca);
    let out = exchange(
        impostor.control_server_config(&[ALPN_H2]).unwrap(),
        proxy.control_client_config(&[ALPN_H2]).unwrap(),
    )
    .await;
    assert!(out.client.is_err(), "{out:?}");
}

// ---------- openssl s_client against the mesh server ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_needs_a_client_svid() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let server_id = id("cluster.local", "web");
    let server = workload(&issue(&ca, &server_id), &ca);
    let config = server.mesh_server_config(DEFAULT_MESH_ALPN).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = async {
                    let mut tls = acceptor.accept(tcp).await?;
                    let peer = peer_identity(tls.get_ref().1);
                    tls.write_all(b"hello-from-mesh\n").await?;
                    tls.shutdown().await?;
                    Ok::<_, std::io::Error>(peer)
                }
                .await;
                let _ = tx.send(result.map_err(|e| e.to_string()));
            });
        }
    });

    let dir = Scratch::new();
    let root = dir.write("root.pem", &ca.bundle().to_pem());
    let client = issue(&ca, &id("cluster.local", "frontend"));
    let cert = dir.write("client.pem", &client.svid.chain_pem());
    let key = dir.write("client.key", &client.key_pem);
    let s_client = move |with_cert: bool| {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-tls1_3",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(&root)
        .args(["-verify_return_error", "-alpn", "h2"]);
        if with_cert {
            cmd.arg("-cert").arg(&cert).arg("-key").arg(&key);
        }
        cmd.stdin(std::process::Stdio::null());
        run(&mut cmd)
    };

    let (_, out) = tokio::task::spawn_blocking({
        let s_client = s_client.clone();
        move || s_client(false)
    })
    .await
    .unwrap();
    assert!(
        !out.contains("hello-from-mesh"),
        "served without a client cert: {out}"
    );
    let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        seen.is_err(),
        "server accepted a client without a certificate"
    );

    let (_, out) = tokio::task::spawn_blocking(move || s_client(true))
        .await
        .unwrap();
    assert!(out.contains("hello-from-mesh"), "valid SVID refused: {out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.unwrap(), Some(id("cluster.local", "frontend")));
}
