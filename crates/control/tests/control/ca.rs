//! The CA on the xDS port against real peers: a tonic client over
//! tokio-rustls built from `identity`, `openssl verify` / `s_client`,
//! py-spiffe, raw ADS clients for ROOTCA; plus the admin credential, root
//! rotation and what survives a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use control::app::{Control, Options};
use envoy_types::pb::envoy::config::core::v3::{data_source, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DiscoveryRequest, DiscoveryResponse,
};
use hyper_util::rt::TokioIo;
use identity::wire::{SignRequest, SignResponse, SIGN_PATH};
use identity::{Claims, SpiffeId, TokenIssuer, TrustBundle, TrustDomain, WorkloadIdentity};
use prost::Message;
use rustls_pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!(
            "meshwork-ca-{}-{tag}-{}",
            std::process::id(),
            fastrand_suffix()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

async fn start(data: &Path) -> Control {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Control::start(Options {
        plaintext_xds: true,
        ..Options::new(Some(data.to_path_buf()), local, local)
    })
    .await
    .unwrap()
}

/// One HTTP/1.1 request to the API; `admin`: the bearer token to send.
async fn api(
    c: &Control,
    method: &str,
    path: &str,
    body: Option<Value>,
    admin: Option<&str>,
) -> testkit::Reply {
    let mut client = testkit::H1Client::connect(c.api_addr()).await.unwrap();
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "control")
        .header("content-type", "application/json");
    if let Some(t) = admin {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    client
        .send(
            req.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap()
}

async fn token(c: &Control, ns: &str, sa: &str, ttl: u64) -> String {
    let r = api(
        c,
        "POST",
        "/api/v1/tokens",
        Some(json!({"namespace": ns, "serviceAccount": sa, "ttlSeconds": ttl})),
        Some(c.admin_token()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

async fn bundle(c: &Control) -> String {
    let r = api(c, "GET", "/api/v1/ca/bundle", None, None).await;
    assert_eq!(r.status, 200);
    r.text()
}

async fn status(c: &Control) -> Value {
    api(c, "GET", "/api/v1/ca", None, None).await.json()
}

/// A gRPC channel over TLS to the xDS port, verifying the control plane
/// against `identity`'s bundle and presenting its certificate if it has one.
async fn tls_channel(addr: SocketAddr, identity: &Arc<WorkloadIdentity>) -> Channel {
    let config = identity.control_client_config(&[b"h2"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    Endpoint::from_static("http://127.0.0.1")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("127.0.0.1").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

async fn plain_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn sign(ch: Channel, csr: &str, token: Option<&str>) -> Result<SignResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(SignRequest {
        csr_pem: csr.to_string(),
        ttl_seconds: 0,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    grpc.unary(
        req,
        http::uri::PathAndQuery::from_static(SIGN_PATH),
        tonic_prost::ProstCodec::<SignRequest, SignResponse>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TrustDomain::new("cluster.local").unwrap(), ns, sa).unwrap()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn bootstrap_identity(c: &Control) -> Arc<WorkloadIdentity> {
    WorkloadIdentity::new(TrustBundle::from_pem(&bundle(c).await).unwrap())
}

#[tokio::test]
async fn a_token_over_tls_gets_an_svid_that_openssl_and_py_spiffe_accept_and_renewal_works() {
    let dir = Scratch::new("sign");
    let c = start(&dir.0.join("data")).await;
    let web = id("default", "web");
    let t = token(&c, "default", "web", 600).await;
    let kc = identity::generate_key_and_csr(&web).unwrap();
    let boot = bootstrap_identity(&c).await;
    let got = sign(
        tls_channel(c.xds_addr(), &boot).await,
        &kc.csr_pem,
        Some(&t),
    )
    .await
    .unwrap();
    assert_eq!(got.spiffe_id, web.to_string());
    assert_eq!(got.bundle_pem, bundle(&c).await);

    let chain = dir.write("chain.pem", &got.chain_pem.concat());
    let key = dir.write("key.pem", &kc.key_pem);
    let roots = dir.write("bundle.pem", &got.bundle_pem);
    let (ok, out) = run(Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&roots)
        .arg(&chain));
    assert!(ok, "openssl verify: {out}");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../identity/tests/peers/svid_check.py");
    let (ok, out) = run(Command::new(testkit::python())
        .arg(&script)
        .arg(&chain)
        .arg(&key)
        .arg(&roots));
    assert!(ok, "py-spiffe refused the SVID: {out}");
    assert_eq!(out.trim(), web.to_string());

    // Renewal: no token, the SVID as client certificate, a new key.
    let me = WorkloadIdentity::with_cert(
        &got.chain_pem.concat(),
        &kc.key_pem,
        TrustBundle::from_pem(&got.bundle_pem).unwrap(),
    )
    .unwrap();
    let renew = identity::generate_key_and_csr(&web).unwrap();
    let ch = tls_channel(c.xds_addr(), &me).await;
    let again = sign(ch.clone(), &renew.csr_pem, None).await.unwrap();
    assert_eq!(again.spiffe_id, web.to_string());
    // ... but not for another identity.
    let other = identity::generate_key_and_csr(&id("default", "admin")).unwrap();
    let err = sign(ch, &other.csr_pem, None).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let s = status(&c).await;
    assert_eq!(s["counters"]["issued"]["token"], 1);
    assert_eq!(s["counters"]["issued"]["renewal"], 1);
    assert_eq!(s["counters"]["refused"]["identity_mismatch"], 1);
    assert_eq!(s["certificates"][0]["spiffe_id"], web.to_string());
    c.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn refusals_carry_the_right_code_and_are_counted() {
    let dir = Scratch::new("refuse");
    let c = start(&dir.0.join("data")).await;
    let web = id("default", "web");
    let kc = identity::generate_key_and_csr(&web).unwrap();
    let boot = bootstrap_identity(&c).await;
    let ch = tls_channel(c.xds_addr(), &boot).await;
    let expect = |r: Result<SignResponse, Status>, code: Code, words: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().contains(words),
            "{:?} lacks {words:?}",
            e.message()
        );
    };

    expect(
        sign(ch.clone(), &kc.csr_pem, None).await,
        Code::Unauthenticated,
        "meshwork token create",
    );
    // Forged: signed with another key.
    let forger = TokenIssuer::generate(TrustDomain::new("cluster.local").unwrap()).unwrap();
    let forged = forger
        .issue(&Claims::new(&web, std::time::SystemTime::now(), Duration::from_secs(60)).unwrap());
    expect(
        sign(ch.clone(), &kc.csr_pem, Some(&forged)).await,
        Code::Unauthenticated,
        "signature",
    );
    expect(
        sign(ch.clone(), &kc.csr_pem, Some("not-a-token")).await,
        Code::Unauthenticated,
        "malformed",
    );
    // Replayed.
    let t = token(&c, "default", "web", 600).await;
    sign(ch.clone(), &kc.csr_pem, Some(&t)).await.unwrap();
    expect(
        sign(ch.clone(), &kc.csr_pem, Some(&t)).await,
        Code::Unauthenticated,
        "already used",
    );
    // Another identity than the token's.
    let t = token(&c, "default", "web", 600).await;
    let admin = identity::generate_key_and_csr(&id("default", "admin")).unwrap();
    expect(
        sign(ch.clone(), &admin.csr_pem, Some(&t)).await,
        Code::PermissionDenied,
        "spiffe://cluster.local/ns/default/sa/admin",
    );
    // The failed attempt did not spend the token.
    sign(ch.clone(), &kc.csr_pem, Some(&t)).await.unwrap();
    // Malformed CSRs: garbage and truncated.
    let t = token(&c, "default", "web", 600).await;
    expect(
        sign(ch.clone(), "garbage", Some(&t)).await,
        Code::InvalidArgument,
        "CSR",
    );
    let half = &kc.csr_pem[..kc.csr_pem.len() / 2];
    expect(
        sign(ch.clone(), half, Some(&t)).await,
        Code::InvalidArgument,
        "CSR",
    );
    // Sign over plaintext.
    let t = token(&c, "default", "web", 600).await;
    expect(
        sign(plain_channel(c.xds_addr()).await, &kc.csr_pem, Some(&t)).await,
        Code::FailedPrecondition,
        "plaintext",
    );
    // Expired (token expiry has second precision).
    let t = token(&c, "default", "web", 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    expect(
        sign(ch.clone(), &kc.csr_pem, Some(&t)).await,
        Code::Unauthenticated,
        "expired",
    );

    let refused = status(&c).await["counters"]["refused"].clone();
    for (reason, n) in [
        ("no_credential", 1),
        ("forged_token", 1),
        ("malformed_token", 1),
        ("replayed_token", 1),
        ("identity_mismatch", 1),
        ("malformed_csr", 2),
        ("plaintext", 1),
        ("expired_token", 1),
    ] {
        assert_eq!(refused[reason], n, "{reason}: {refused}");
    }
    c.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn root_token_key_spent_ids_and_admin_token_survive_a_restart() {
    let dir = Scratch::new("restart");
    let data = dir.0.join("data");
    let c = start(&data).await;
    let web = id("default", "web");
    let kc = identity::generate_key_and_csr(&web).unwrap();
    let used = token(&c, "default", "web", 600).await;
    let unused = token(&c, "default", "web", 600).await;
    let ch = tls_channel(c.xds_addr(), &bootstrap_identity(&c).await).await;
    sign(ch, &kc.csr_pem, Some(&used)).await.unwrap();
    let (roots, admin) = (bundle(&c).await, c.admin_token().to_string());
    for f in [
        "ca/state.json",
        "ca/token.key",
        "ca/spent-tokens",
        "admin.token",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
    }
    c.shutdown(Duration::from_secs(2)).await;

    let c = start(&data).await;
    assert_eq!(bundle(&c).await, roots, "same root");
    assert_eq!(c.admin_token(), admin);
    let ch = tls_channel(c.xds_addr(), &bootstrap_identity(&c).await).await;
    let e = sign(ch.clone(), &kc.csr_pem, Some(&used))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "replay after restart: {e:?}"
    );
    // A token from before the restart still verifies: same key.
    sign(ch, &kc.csr_pem, Some(&unused)).await.unwrap();
    c.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn openssl_s_client_verifies_the_served_cert_and_broken_handshakes_hurt_no_one() {
    let dir = Scratch::new("sclient");
    let c = start(&dir.0.join("data")).await;
    let roots = dir.write("bundle.pem", &bundle(&c).await);
    let addr = c.xds_addr().to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr,
                "-verify_return_error",
                "-alpn",
                "h2",
                "-verify_ip",
                "127.0.0.1",
                "-CAfile",
            ])
            .arg(&roots)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The leaf's SANs: the SPIFFE id, the listen IP, localhost.
    let pem_start = text.find("-----BEGIN CERTIFICATE-----").unwrap();
    let pem_end =
        text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let leaf = dir.write("leaf.pem", &text[pem_start..pem_end]);
    let (ok, sans) = run(Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&leaf));
    assert!(ok, "{sans}");
    for want in [
        "URI:spiffe://cluster.local/ns/meshwork-system/sa/control",
        "IP Address:127.0.0.1",
        "DNS:localhost",
    ] {
        assert!(sans.contains(want), "{want} not in {sans}");
    }

    // Garbage after a TLS record header, a truncated ClientHello, and a
    // connection that says nothing: none of them disturbs a real client.
    let before = status(&c).await["counters"]["tls_handshake_failures"]
        .as_u64()
        .unwrap();
    let mut idle = tokio::net::TcpStream::connect(c.xds_addr()).await.unwrap();
    for junk in [
        &b"\x16\x03\x01\x00\x40garbage-garbage-garbage"[..],
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(c.xds_addr()).await.unwrap();
        s.write_all(junk).await.unwrap();
        s.shutdown().await.unwrap();
        drop(s);
    }
    let web = id("default", "web");
    let kc = identity::generate_key_and_csr(&web).unwrap();
    let t = token(&c, "default", "web", 600).await;
    let ch = tls_channel(c.xds_addr(), &bootstrap_identity(&c).await).await;
    sign(ch, &kc.csr_pem, Some(&t)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = status(&c).await["counters"]["tls_handshake_failures"]
            .as_u64()
            .unwrap();
        if n >= before + 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "handshake failures not counted: {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    idle.write_all(b"").await.unwrap();
    c.shutdown(Duration::from_secs(2)).await;
}

/// A SotW ADS stream subscribed to ROOTCA; ACKs every response when `ack`.
struct RootCaStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
    ack: bool,
}

impl RootCaStream {
    async fn open(addr: SocketAddr, node_id: &str, ack: bool) -> RootCaStream {
        let mut client = AggregatedDiscoveryServiceClient::new(plain_channel(addr).await);
        let (tx, rx) = mpsc::channel(8);
        tx.send(DiscoveryRequest {
            node: Some(Node {
                id: node_id.into(),
                cluster: "test".into(),
                ..Default::default()
            }),
            type_url: SECRET.into(),
            resource_names: vec!["ROOTCA".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        RootCaStream { tx, rx, ack }
    }

    /// The next ROOTCA bundle (PEM), ACKed when the stream ACKs.
    async fn next(&mut self) -> String {
        let r = tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(r.type_url, SECRET);
        assert_eq!(r.resources.len(), 1);
        let s = Secret::decode(r.resources[0].value.as_slice()).unwrap();
        assert_eq!(s.name, "ROOTCA");
        if self.ack {
            self.tx
                .send(DiscoveryRequest {
                    type_url: SECRET.into(),
                    resource_names: vec!["ROOTCA".into()],
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let Some(secret::Type::ValidationContext(vc)) = s.r#type else {
            panic!("ROOTCA is not a validation context")
        };
        match vc.trusted_ca.unwrap().specifier.unwrap() {
            data_source::Specifier::InlineString(pem) => pem,
            other => panic!("{other:?}"),
        }
    }
}

fn fingerprints(pem: &str) -> Vec<String> {
    identity::certs_from_pem(pem)
        .unwrap()
        .iter()
        .map(|c| control::ca::fingerprint(c))
        .collect()
}

#[tokio::test]
async fn rootca_is_served_over_sotw_and_delta_ads() {
    let dir = Scratch::new("rootca");
    let c = start(&dir.0.join("data")).await;
    let mut sotw = RootCaStream::open(c.xds_addr(), "sotw", true).await;
    assert_eq!(sotw.next().await, bundle(&c).await);

    let mut client = AggregatedDiscoveryServiceClient::new(plain_channel(c.xds_addr()).await);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "delta".into(),
            ..Default::default()
        }),
        type_url: SECRET.into(),
        resource_names_subscribe: vec!["ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rx = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = rx.message().await.unwrap().unwrap();
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "ROOTCA");
    assert_eq!(r.resources[0].version, "rootca-1");
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET.into(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Both show in proxy-status, ACKed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = api(&c, "GET", "/api/v1/proxies", None, None).await.json();
        let acked = p
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["types"]["secrets"]["acked_version"] == "rootca-1")
            .count();
        if acked == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{p:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn rotation_publishes_waits_for_acks_switches_retires_and_survives_a_restart() {
    let dir = Scratch::new("rotate");
    let data = dir.0.join("data");
    let c = start(&data).await;
    let old = fingerprints(&bundle(&c).await);
    assert_eq!(old.len(), 1);
    let mut acking = RootCaStream::open(c.xds_addr(), "acking", true).await;
    assert_eq!(fingerprints(&acking.next().await), old);

    // Rotation waits for the connected stream's ACK of [old, new].
    let rotate = {
        let (addr, admin) = (c.api_addr(), c.admin_token().to_string());
        tokio::spawn(async move {
            let mut client = testkit::H1Client::connect(addr).await.unwrap();
            let req = http::Request::post("/api/v1/ca/rotate")
                .header("host", "control")
                .header("authorization", format!("Bearer {admin}"))
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    json!({"graceSeconds": 4, "ackTimeoutSeconds": 20}).to_string(),
                )))
                .unwrap();
            client.send(req).await.unwrap()
        })
    };
    let phase1 = fingerprints(&acking.next().await);
    assert_eq!(phase1.len(), 2);
    assert_eq!(
        phase1[0], old[0],
        "phase 1: the old root still signs, first"
    );
    let new = phase1[1].clone();
    let r = tokio::time::timeout(Duration::from_secs(10), rotate)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json();
    assert_eq!(
        report["stragglers"],
        json!([]),
        "the stream ACKed: {report}"
    );
    assert_eq!(report["new_root"], new);
    assert_eq!(
        fingerprints(&acking.next().await),
        vec![new.clone(), old[0].clone()],
        "phase 2"
    );
    let s = status(&c).await;
    assert_eq!(s["phase"], "reissuing");
    assert_eq!(s["roots"][0]["signing"], true);
    assert_eq!(s["roots"][0]["fingerprint_sha256"], new);

    // New leaves come from the new root.
    let web = id("default", "web");
    let kc = identity::generate_key_and_csr(&web).unwrap();
    let t = token(&c, "default", "web", 600).await;
    let ch = tls_channel(c.xds_addr(), &bootstrap_identity(&c).await).await;
    let got = sign(ch, &kc.csr_pem, Some(&t)).await.unwrap();
    let chain = dir.write("chain.pem", &got.chain_pem.concat());
    let new_root_pem = split_pem(&got.bundle_pem)[0].clone();
    let new_root = dir.write("newroot.pem", &new_root_pem);
    let (ok, out) = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&new_root)
        .arg(&chain));
    assert!(ok, "leaf not from the new root: {out}");

    // A second rotation while one runs is refused.
    let busy = api(
        &c,
        "POST",
        "/api/v1/ca/rotate",
        Some(json!({})),
        Some(c.admin_token()),
    )
    .await;
    assert_eq!(busy.status, 409, "{}", busy.text());

    // Restart in phase 2: the phase resumes, then the grace ends.
    drop(acking);
    c.shutdown(Duration::from_secs(2)).await;
    let c = start(&data).await;
    let s = status(&c).await;
    assert_eq!(s["phase"], "reissuing", "{s:#}");
    assert_eq!(
        fingerprints(&bundle(&c).await),
        vec![new.clone(), old[0].clone()]
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if status(&c).await["phase"] == "stable" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "old root never retired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fingerprints(&bundle(&c).await),
        vec![new.clone()],
        "phase 3: new only"
    );
    let on_disk = std::fs::read_to_string(data.join("ca/bundle.pem")).unwrap();
    assert_eq!(fingerprints(&on_disk), vec![new.clone()]);

    // A stream that never ACKs is reported as a straggler, and the
    // rotation goes on after the bound.
    let mut silent = RootCaStream::open(c.xds_addr(), "silent", false).await;
    silent.next().await;
    let r = api(
        &c,
        "POST",
        "/api/v1/ca/rotate",
        Some(json!({"graceSeconds": 60, "ackTimeoutSeconds": 1})),
        Some(c.admin_token()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["stragglers"], json!(["silent"]));
    c.shutdown(Duration::from_secs(2)).await;
}

fn split_pem(pem: &str) -> Vec<String> {
    identity::certs_from_pem(pem)
        .unwrap()
        .iter()
        .map(|c| identity::cert::cert_to_pem(c))
        .collect()
}

#[tokio::test]
async fn mutations_need_the_admin_token_reads_do_not() {
    let dir = Scratch::new("admin");
    let c = start(&dir.0.join("data")).await;
    let svc = json!({"apiVersion": "meshwork.dev/v1alpha1", "kind": "Service",
        "metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}]}});
    let r = api(&c, "POST", "/api/v1/apply", Some(svc.clone()), None).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        msg.contains("admin token")
            && msg.contains("admin.token")
            && msg.contains("--admin-token-file"),
        "{msg}"
    );
    let r = api(
        &c,
        "POST",
        "/api/v1/apply",
        Some(svc.clone()),
        Some("wrong"),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("wrong admin token"), "{}", r.text());
    for (m, p) in [
        ("POST", "/api/v1/tokens"),
        ("POST", "/api/v1/ca/rotate"),
        ("DELETE", "/api/v1/resources/service/default/web"),
    ] {
        assert_eq!(
            api(&c, m, p, Some(json!({})), None).await.status,
            401,
            "{m} {p}"
        );
    }
    let r = api(
        &c,
        "POST",
        "/api/v1/apply",
        Some(svc),
        Some(c.admin_token()),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.text());
    for p in [
        "/api/v1/resources",
        "/api/v1/proxies",
        "/api/v1/ca",
        "/api/v1/ca/bundle",
    ] {
        assert_eq!(api(&c, "GET", p, None, None).await.status, 200, "{p}");
    }
    c.shutdown(Duration::from_secs(2)).await;
}

/// Applies a mesh YAML document through the API (as `meshwork apply`).
async fn apply_yaml(c: &Control, yaml: &str) {
    let mut client = testkit::H1Client::connect(c.api_addr()).await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri("/api/v1/apply?file=mesh.yaml")
        .header("host", "control")
        .header("authorization", format!("Bearer {}", c.admin_token()))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            yaml.to_owned(),
        )))
        .unwrap();
    let r = client.send(req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Over mTLS xDS, a proxy registers only a workload of its own identity:
/// its namespace, and a Service that runs as its service account.
#[tokio::test]
async fn a_proxy_registers_only_workloads_of_its_own_identity() {
    let dir = Scratch::new("register");
    let c = start(&dir.0.join("data")).await;
    apply_yaml(
        &c,
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {serviceAccount: web, ports: [{name: http, port: 80}]}\n---\n\
         apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: db}\nspec: {serviceAccount: db, ports: [{name: tcp, port: 5432, appProtocol: tcp}]}\n",
    )
    .await;
    let web = id("default", "web");
    let t = token(&c, "default", "web", 600).await;
    let kc = identity::generate_key_and_csr(&web).unwrap();
    let boot = bootstrap_identity(&c).await;
    let got = sign(
        tls_channel(c.xds_addr(), &boot).await,
        &kc.csr_pem,
        Some(&t),
    )
    .await
    .unwrap();
    let me = WorkloadIdentity::with_cert(
        &got.chain_pem.concat(),
        &kc.key_pem,
        TrustBundle::from_pem(&got.bundle_pem).unwrap(),
    )
    .unwrap();
    let register = |service: &str, namespace: &str| {
        let s = |v: &str| envoy_types::pb::google::protobuf::Value {
            kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                v.to_string(),
            )),
        };
        Node {
            id: format!("{service}-0.{namespace}"),
            cluster: service.into(),
            metadata: Some(envoy_types::pb::google::protobuf::Struct {
                fields: [
                    ("service", s(service)),
                    ("namespace", s(namespace)),
                    ("address", s("127.0.0.9")),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            }),
            ..Default::default()
        }
    };
    let first = |node: Node| {
        let me = me.clone();
        let addr = c.xds_addr();
        async move {
            let mut client = AggregatedDiscoveryServiceClient::new(tls_channel(addr, &me).await);
            let (tx, rx) = mpsc::channel(8);
            tx.send(DiscoveryRequest {
                node: Some(node),
                type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                ..Default::default()
            })
            .await
            .unwrap();
            let mut stream = client
                .stream_aggregated_resources(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let r = tokio::time::timeout(Duration::from_secs(20), stream.message())
                .await
                .unwrap();
            drop(tx);
            r
        }
    };
    // Its own: accepted. Once its config has the applied Services, the
    // xDS server knows them too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = first(register("web", "default")).await.unwrap().unwrap();
        if !r.resources.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Services never reached xDS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another Service's account: refused, naming the fix.
    let e = first(register("db", "default")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("runs as service account \"db\""),
        "{e:?}"
    );
    // Another namespace: refused.
    let e = first(register("web", "shop")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("own namespace"), "{e:?}");
    c.shutdown(Duration::from_secs(2)).await;
}
