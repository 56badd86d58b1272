//! Envoy interop for automatic mTLS (`docs/mtls.md`, "Envoy interop"): a
//! real Envoy 1.40 sidecar, configured by a static bootstrap translated
//! from the same mesh (`api::envoy_bootstrap`, file-based SDS because the
//! proxy context names a `certs_dir`), exchanges mTLS traffic with meshwork
//! sidecars in both directions. Its certificates come from the `identity`
//! crate's CA, written as the SDS files Envoy watches (`default.yaml`,
//! `ROOTCA.yaml`).
//!
//! Needs `$MESHWORK_ENVOY` (`./scripts/test.sh` sets it): a missing Envoy
//! fails the test rather than skipping it.

use crate::mtls::Sidecar;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use api::ProxyContext;
use identity::{generate_key_and_csr, Ca, SpiffeId, TrustDomain, WorkloadIdentity};
use testkit::{Backend, H1Client};

use crate::harness::{scratch, sum_metric, EnvoyProcess};

const HEAD: &str = "apiVersion: meshwork.dev/v1alpha1";
const TD: &str = "mesh.test";

fn id(sa: &str) -> SpiffeId {
    id_in(TD, sa)
}

fn id_in(td: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TrustDomain::new(td).unwrap(), "default", sa).unwrap()
}

/// A leaf (chain PEM, key PEM) for `sa` from `ca`.
fn leaf(ca: &Ca, sa: &str) -> (String, String) {
    leaf_in(ca, TD, sa)
}

/// A leaf for `spiffe://<td>/ns/default/sa/<sa>` from `ca`.
fn leaf_in(ca: &Ca, td: &str, sa: &str) -> (String, String) {
    let id = id_in(td, sa);
    let kc = generate_key_and_csr(&id).unwrap();
    let svid = ca
        .sign_csr(&kc.csr_pem, &id, identity::DEFAULT_SVID_TTL)
        .unwrap();
    (svid.chain_pem(), kc.key_pem)
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The mesh: strict mTLS, Service `web` (service account `web`, HTTP port
/// 80) whose workload `web-0` is `app`, behind the sidecar at `inbound`;
/// `allowed`: the only principal an AuthorizationPolicy lets call `web`.
fn mesh_yaml(app: SocketAddr, inbound: SocketAddr, allowed: &str) -> String {
    format!(
        "{HEAD}\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{trustDomain: {TD}, mtls: {{mode: strict}}}}\n---\n\
{HEAD}\nkind: Service\nmetadata: {{name: web}}\nspec:\n  serviceAccount: web\n  ports: [{{name: p80, port: 80, appProtocol: http}}]\n---\n\
{HEAD}\nkind: Workload\nmetadata:\n  name: web-0\n  annotations: {{meshwork.dev/sidecar-inbound: \"{inbound}\"}}\nspec: {{service: web, address: \"{}\", ports: {{p80: {}}}}}\n---\n\
{HEAD}\nkind: AuthorizationPolicy\nmetadata: {{name: only-{sa}}}\nspec:\n  targetRef: {{kind: Service, name: web}}\n  action: ALLOW\n  rules:\n  - from: [{{principals: [\"{allowed}\"]}}]\n",
        app.ip(),
        app.port(),
        sa = allowed.rsplit('/').next().unwrap(),
    )
}

// ---------------------------------------------------------------- SDS files

/// `text` as the body of a YAML block scalar indented by `indent` spaces.
fn block(text: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    text.trim_end()
        .lines()
        .map(|l| format!("{pad}{l}\n"))
        .collect()
}

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Writes `name` into `dir` the way docs/mtls.md says to update SDS files:
/// a temporary name first, then a rename (what the watched directory sees).
fn publish(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The SDS files an Envoy sidecar reads from its `meshwork.certs_dir`:
/// `default.yaml` (chain + key) and `ROOTCA.yaml` (the trust bundle), each an
/// SDS discovery response holding one `Secret`.
fn write_sds_files(dir: &Path, chain_pem: &str, key_pem: &str, roots_pem: &str) {
    publish(
        dir,
        "default.yaml",
        &format!(
            "resources:\n- \"@type\": {SECRET_TYPE}\n  name: default\n  tls_certificate:\n    certificate_chain:\n      inline_string: |\n{}    private_key:\n      inline_string: |\n{}",
            block(chain_pem, 8),
            block(key_pem, 8),
        ),
    );
    publish(
        dir,
        "ROOTCA.yaml",
        &format!(
            "resources:\n- \"@type\": {SECRET_TYPE}\n  name: ROOTCA\n  validation_context:\n    trusted_ca:\n      inline_string: |\n{}",
            block(roots_pem, 8),
        ),
    );
}

// ---------------------------------------------------------------- Envoy

/// The value of Envoy stat `name` (a line `name: N`) in `stats`, else 0.
fn stat(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- meshwork

fn identity_of(ca: &Ca, sa: &str) -> Option<Arc<WorkloadIdentity>> {
    let (chain, key) = leaf(ca, sa);
    Some(WorkloadIdentity::with_cert(&chain, &key, ca.bundle()).unwrap())
}

/// An Envoy caller sidecar (no workload, outbound listener only) holding
/// `chain`/`key` and trusting `roots`.
async fn envoy_client(
    yaml: &str,
    chain: &str,
    key: &str,
    roots: &str,
) -> (EnvoyProcess, SocketAddr) {
    let certs = scratch();
    write_sds_files(&certs, chain, key, roots);
    let outbound = local(testkit::free_port());
    let ctx = ProxyContext {
        outbound_addr: outbound,
        inbound_addr: local(testkit::free_port()),
        workload: None,
        detect_timeout: Duration::from_millis(300),
        certs_dir: Some(certs.to_string_lossy().into_owned()),
        capture: false,
    };
    (EnvoyProcess::start(yaml, &ctx, &[outbound]).await, outbound)
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_envoy_client_to_meshwork_server_is_authenticated_as_its_spiffe_id() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    let inbound = local(testkit::free_port());
    // Only the Envoy sidecar's identity may call web: a 200 proves the
    // meshwork server verified Envoy's certificate and read its SPIFFE id.
    let envoy_id = id("envoy-client").to_string();
    let yaml = mesh_yaml(app.addr, inbound, &envoy_id);
    let server = Sidecar::start(&yaml, Some("web-0"), inbound, identity_of(&ca, "web")).await;

    let (chain, key) = leaf(&ca, "envoy-client");
    let (envoy, outbound) = envoy_client(&yaml, &chain, &key, &ca.cert_pem()).await;
    let mut c = H1Client::connect(outbound).await.unwrap();
    for i in 0..3 {
        let r = c.get("web", &format!("/from-envoy/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.text(), envoy.log());
        assert_eq!(r.backend(), Some("web-app"), "{}", r.text());
    }
    assert_eq!(app.hits(), 3);

    let m = server.metrics().await;
    assert_eq!(
        sum_metric(
            &m,
            "meshwork_requests_total",
            &[("direction", "inbound"), ("source_principal", &envoy_id)]
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        sum_metric(&m, "meshwork_tls_handshake_failures_total", &[]),
        0.0,
        "{m}"
    );
    // Envoy's side: the upstream connection was TLS, verified against ROOTCA
    // with the Service's SPIFFE id pinned.
    let s = envoy.stats("ssl").await;
    assert!(
        stat(&s, "cluster.outbound|80||web.default.ssl.handshake") >= 1,
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_meshwork_client_to_envoy_server() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    let inbound = local(testkit::free_port());
    // The Envoy server's RBAC (translated from the same policy) admits only
    // the meshwork client's SPIFFE id.
    let client_id = id("client").to_string();
    let yaml = mesh_yaml(app.addr, inbound, &client_id);

    let certs = scratch();
    let (chain, key) = leaf(&ca, "web");
    write_sds_files(&certs, &chain, &key, &ca.cert_pem());
    let ctx = ProxyContext {
        outbound_addr: local(testkit::free_port()),
        inbound_addr: inbound,
        workload: Some(("default".to_string(), "web-0".to_string())),
        detect_timeout: Duration::from_millis(300),
        certs_dir: Some(certs.to_string_lossy().into_owned()),
        capture: false,
    };
    let envoy = EnvoyProcess::start(&yaml, &ctx, &[inbound]).await;

    let client = Sidecar::start(&yaml, None, local(0), identity_of(&ca, "client")).await;
    let outbound = client.proxy.listener("outbound_http").unwrap();
    let mut c = H1Client::connect(outbound).await.unwrap();
    for i in 0..3 {
        let r = c.get("web", &format!("/to-envoy/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.text(), envoy.log());
        assert_eq!(r.backend(), Some("web-app"), "{}", r.text());
    }
    assert_eq!(app.hits(), 3);

    // Envoy terminated TLS with a verified client certificate.
    // Envoy names listener stats `listener.<ip>_<port>`.
    let prefix = format!("listener.{}_{}.ssl", inbound.ip(), inbound.port());
    let s = envoy.stats(&prefix).await;
    assert!(stat(&s, &format!("{prefix}.handshake")) >= 1, "{s}");
    assert_eq!(stat(&s, &format!("{prefix}.no_certificate")), 0, "{s}");
    let m = client.metrics().await;
    assert_eq!(
        sum_metric(&m, "meshwork_tls_handshake_failures_total", &[]),
        0.0,
        "{m}"
    );

    // Another identity of the same CA is authenticated by Envoy, then denied
    // by its RBAC: Envoy matched on the principal it verified.
    let intruder = Sidecar::start(&yaml, None, local(0), identity_of(&ca, "intruder")).await;
    let outbound = intruder.proxy.listener("outbound_http").unwrap();
    let r = H1Client::connect(outbound)
        .await
        .unwrap()
        .get("web", "/intruder")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(app.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_envoy_client_with_a_certificate_from_another_ca_is_refused() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    let inbound = local(testkit::free_port());
    let envoy_id = id("envoy-client").to_string();
    let yaml = mesh_yaml(app.addr, inbound, &envoy_id);
    let server = Sidecar::start(&yaml, Some("web-0"), inbound, identity_of(&ca, "web")).await;

    // Envoy trusts our root (it verifies the server fine) but presents a
    // certificate from another CA: first of another trust domain, then of
    // the same trust domain (another mesh's independently generated root).
    let cases = [
        ("other.test", Some("unknown_issuer")),
        // Same issuer name, another key: rustls reports a bad signature,
        // which the proxy counts as `bad_certificate` today.
        (TD, None),
    ];
    let mut refused = 0.0;
    for (td, reason) in cases {
        let other = Ca::generate(TrustDomain::new(td).unwrap()).unwrap();
        let (chain, key) = leaf_in(&other, td, "envoy-client");
        let (envoy, outbound) = envoy_client(&yaml, &chain, &key, &ca.cert_pem()).await;
        let r = H1Client::connect(outbound)
            .await
            .unwrap()
            .get("web", "/foreign")
            .await
            .unwrap();
        assert_eq!(r.status, 503, "{td}: {}\n{}", r.text(), envoy.log());
        assert_eq!(app.hits(), 0, "{td}");

        let m = server.metrics().await;
        let failures = sum_metric(
            &m,
            "meshwork_tls_handshake_failures_total",
            &[("direction", "inbound")],
        );
        assert!(failures > refused, "{td}: not counted:\n{m}");
        refused = failures;
        if let Some(reason) = reason {
            assert!(
                sum_metric(
                    &m,
                    "meshwork_tls_handshake_failures_total",
                    &[("direction", "inbound"), ("reason", reason)]
                ) >= 1.0,
                "{td}: {m}"
            );
        }
        assert_eq!(
            sum_metric(&m, "meshwork_requests_total", &[("direction", "inbound")]),
            0.0,
            "{m}"
        );
    }
}
