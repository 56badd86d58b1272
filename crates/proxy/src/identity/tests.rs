#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use ::identity::{Ca, TokenIssuer, TrustDomain};

fn td() -> TrustDomain {
    TrustDomain::new("test.local").unwrap()
}

fn web() -> SpiffeId {
    SpiffeId::new(td(), "default", "web").unwrap()
}

fn options(bundle_pem: String, token: Option<Token>, dir: Option<PathBuf>) -> Options {
    Options {
        // Nothing listens on port 1: a test that reaches the network fails.
        servers: vec!["127.0.0.1:1".into()],
        token,
        bundle_pem,
        bundle_source: "root.pem".into(),
        trust_domain: None,
        identity_dir: dir,
        ttl: None,
        connect_timeout: Duration::from_millis(200),
        max_backoff: Duration::from_secs(1),
    }
}

/// A manager with no certificate yet, built without bootstrap (no network).
fn manager(bundle: TrustBundle, expected: SpiffeId, dir: Option<PathBuf>) -> Manager {
    let identity = WorkloadIdentity::new(bundle.clone());
    Manager {
        opts: options(bundle.to_pem(), None, dir),
        connector: ControlConnector::new(&identity).unwrap(),
        identity,
        expected,
        cert: Mutex::new(None),
        issued: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        last_error: Mutex::new(None),
        next_server: AtomicUsize::new(0),
        reissue: Notify::new(),
    }
}

/// What the control plane would answer for `id`, and the key it goes with.
fn answer(ca: &Ca, bundle: &TrustBundle, id: &SpiffeId) -> (SignResponse, String) {
    let k = generate_key_and_csr(id).unwrap();
    let svid = ca
        .sign_csr(&k.csr_pem, id, Duration::from_secs(3600))
        .unwrap();
    (
        SignResponse {
            chain_pem: svid.chain,
            bundle_pem: bundle.to_pem(),
            spiffe_id: id.to_string(),
        },
        k.key_pem,
    )
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "meshwork-identity-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn token_claims_are_read_without_verifying() {
    let issuer = TokenIssuer::generate(td()).unwrap();
    let claims = Claims::new(&web(), SystemTime::now(), Duration::from_secs(600)).unwrap();
    let token = Token::new(&format!("{}\n", issuer.issue(&claims)));
    assert_eq!(token.claims().unwrap(), claims);
    assert_eq!(format!("{token:?}"), "Token([secret])");
    for bad in ["", "abc", "mwt1.!!!.x", "mwt2.e30.x", "mwt1.e30.x.y"] {
        assert!(Token::new(bad).claims().is_err(), "{bad:?}");
    }
}

#[test]
fn rfc3339_is_utc() {
    let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
    assert_eq!(at(0), "1970-01-01T00:00:00Z");
    assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(at(1_709_164_800), "2024-02-29T00:00:00Z");
    assert_eq!(at(951_868_799), "2000-02-29T23:59:59Z");
}

#[test]
fn issued_by_tells_two_roots_of_one_domain_apart() {
    let old = Ca::generate(td()).unwrap();
    let new = Ca::generate(td()).unwrap();
    let (resp, _) = answer(&old, &old.bundle(), &web());
    let chain = resp.chain_pem.concat();
    assert!(issued_by(&chain, &old.bundle().roots()[0]));
    assert!(!issued_by(&chain, &new.bundle().roots()[0]));
    assert!(!issued_by("garbage", &old.bundle().roots()[0]));
}

#[test]
fn an_answer_is_checked_before_it_is_installed() {
    let ca = Ca::generate(td()).unwrap();
    let other = Ca::generate(td()).unwrap();
    let m = manager(ca.bundle(), web(), None);

    let (mut resp, key) = answer(&ca, &ca.bundle(), &web());
    resp.spiffe_id = "spiffe://test.local/ns/default/sa/db".into();
    assert!(m.accept(resp, &key).unwrap_err().contains("asked for"));

    let db = SpiffeId::new(td(), "default", "db").unwrap();
    let (mut resp, key) = answer(&ca, &ca.bundle(), &db);
    resp.spiffe_id = web().to_string();
    let e = m.accept(resp, &key).unwrap_err();
    assert!(e.contains("leaf is for"), "{e}");

    let (mut resp, key) = answer(&ca, &ca.bundle(), &web());
    resp.chain_pem.clear();
    assert!(m.accept(resp, &key).unwrap_err().contains("empty"));

    let (mut resp, key) = answer(&ca, &ca.bundle(), &web());
    resp.bundle_pem = String::new();
    assert!(m.accept(resp, &key).unwrap_err().contains("trust bundle"));

    // A chain that does not lead to the bundle sent with it.
    let (resp, key) = answer(&ca, &other.bundle(), &web());
    let e = m.accept(resp, &key).unwrap_err();
    assert!(e.contains("does not lead"), "{e}");

    // A key that is not the certificate's.
    let (resp, _) = answer(&ca, &ca.bundle(), &web());
    let (_, wrong_key) = answer(&ca, &ca.bundle(), &web());
    assert!(m.accept(resp, &wrong_key).is_err());

    assert!(m.identity.id().is_none(), "nothing was installed");
    assert_eq!(m.issued.load(Ordering::Relaxed), 0);

    let (resp, key) = answer(&ca, &ca.bundle(), &web());
    m.accept(resp, &key).unwrap();
    assert_eq!(m.identity.id(), Some(web()));
    let status = m.status();
    assert_eq!(status["spiffe_id"], web().to_string());
    assert_eq!(status["issued"], 1);
    assert_eq!(status["issued_by_signing_root"], true);
    assert!(status["serial"].as_str().unwrap().len() > 8, "{status}");
    assert_eq!(
        status["fingerprint_sha256"].as_str().unwrap().len(),
        64,
        "{status}"
    );
    // Renewal is scheduled between 40% and 50% of the hour from now.
    let cert = lock(&m.cert).clone().unwrap();
    let wait = until(cert.renew_at);
    assert!(
        wait > Duration::from_secs(1400) && wait <= Duration::from_secs(1800),
        "{wait:?}"
    );
    let mut metrics = String::new();
    m.render_metrics(&mut metrics);
    assert!(
        metrics.contains(
            "meshwork_identity_certificates_issued_total{spiffe_id=\"spiffe://test.local/ns/default/sa/web\"} 1"
        ),
        "{metrics}"
    );
}

#[test]
fn a_new_signing_root_asks_for_a_renewal() {
    let old = Ca::generate(td()).unwrap();
    let new = Ca::generate(td()).unwrap();
    let m = manager(old.bundle(), web(), None);
    let (resp, key) = answer(&old, &old.bundle(), &web());
    m.accept(resp, &key).unwrap();

    let e = m.on_bundle("not pem").unwrap_err();
    assert!(e.contains("ROOTCA"), "{e}");
    assert_eq!(m.identity.bundle().roots(), old.bundle().roots());

    // Phase 1: [old (signing), new]: trusted, nothing to renew.
    m.on_bundle(&old.bundle().merged(&new.bundle()).to_pem())
        .unwrap();
    assert_eq!(m.identity.bundle().roots().len(), 2);
    assert!(!m.needs_reissue());
    // Phase 2: [new (signing), old]: the leaf is from the old root.
    m.on_bundle(&new.bundle().merged(&old.bundle()).to_pem())
        .unwrap();
    assert!(m.needs_reissue());
    assert_eq!(m.status()["issued_by_signing_root"], false);
    // The renewal (from the new root) settles it.
    let (resp, key) = answer(&new, &new.bundle().merged(&old.bundle()), &web());
    m.accept(resp, &key).unwrap();
    assert!(!m.needs_reissue());
}

#[tokio::test]
async fn a_restarted_proxy_resumes_from_its_identity_dir_without_a_token() {
    let ca = Ca::generate(td()).unwrap();
    let dir = scratch("resume");
    let first = manager(ca.bundle(), web(), Some(dir.clone()));
    let (resp, key) = answer(&ca, &ca.bundle(), &web());
    first.accept(resp, &key).unwrap();
    let serial = first.status()["serial"].clone();
    for file in [KEY_FILE, CHAIN_FILE, BUNDLE_FILE] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }

    // No token, no network (port 1): the saved certificate is enough.
    let resumed = Manager::bootstrap(options(ca.bundle().to_pem(), None, Some(dir.clone())))
        .await
        .unwrap();
    assert_eq!(resumed.identity().id(), Some(web()));
    assert_eq!(resumed.status()["serial"], serial);

    // A token for another identity does not resume the saved one: it asks
    // the control plane (here: nobody) for the token's identity.
    let issuer = TokenIssuer::generate(td()).unwrap();
    let db = SpiffeId::new(td(), "default", "db").unwrap();
    let token =
        issuer.issue(&Claims::new(&db, SystemTime::now(), Duration::from_secs(60)).unwrap());
    let pending = Manager::bootstrap(options(
        ca.bundle().to_pem(),
        Some(Token::new(&token)),
        Some(dir.clone()),
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), pending)
            .await
            .is_err(),
        "keeps retrying an unreachable control plane"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bootstrap_errors_name_the_fix() {
    let ca = Ca::generate(td()).unwrap();
    let issuer = TokenIssuer::generate(td()).unwrap();
    let message = |r: Result<Arc<Manager>, Error>| r.unwrap_err().to_string();

    let e = message(Manager::bootstrap(options(ca.bundle().to_pem(), None, None)).await);
    assert!(
        e.contains("--token") && e.contains("meshwork token create"),
        "{e}"
    );

    let e = message(
        Manager::bootstrap(options(ca.bundle().to_pem(), None, Some(scratch("empty")))).await,
    );
    assert!(e.contains("no saved certificate"), "{e}");

    let mut claims = Claims::new(&web(), SystemTime::now(), Duration::from_secs(60)).unwrap();
    claims.exp = 1_000;
    let expired = Token::new(&issuer.issue(&claims));
    let e = message(Manager::bootstrap(options(ca.bundle().to_pem(), Some(expired), None)).await);
    assert!(
        e.contains("expired at 1970-01-01T00:16:40Z") && e.contains("meshwork token create"),
        "{e}"
    );

    let e = message(
        Manager::bootstrap(options(
            "garbage".into(),
            Some(Token::new("mwt1.e30.x")),
            None,
        ))
        .await,
    );
    assert!(
        e.contains("--ca-bundle root.pem") && e.contains("meshwork ca bundle"),
        "{e}"
    );

    let e = message(
        Manager::bootstrap(options(
            ca.bundle().to_pem(),
            Some(Token::new("not-a-token")),
            None,
        ))
        .await,
    );
    assert!(e.contains("not a meshwork join token"), "{e}");

    let claims = Claims::new(&web(), SystemTime::now(), Duration::from_secs(60)).unwrap();
    let mut opts = options(
        ca.bundle().to_pem(),
        Some(Token::new(&issuer.issue(&claims))),
        None,
    );
    opts.trust_domain = Some(TrustDomain::new("other.local").unwrap());
    let e = message(Manager::bootstrap(opts).await);
    assert!(e.contains("other.local"), "{e}");
}
