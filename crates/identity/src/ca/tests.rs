#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use rcgen::{CertificateParams, KeyPair, SanType};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::cert::{certs_from_pem, spiffe_id_of};
use crate::renew::generate_key_and_csr;

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn web(domain: &str) -> SpiffeId {
    SpiffeId::new(td(domain), "default", "web").unwrap()
}

fn csr_with(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_string().try_into().unwrap())
}

fn to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn csr_der(pem: &str) -> Vec<u8> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn openssl_csr(newkey: &[&str]) -> String {
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-nodes",
            "-subj",
            "/CN=x",
            "-keyout",
            "/dev/null",
        ])
        .args(newkey)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn generated_root_is_a_ca() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let certs = certs_from_pem(&ca.cert_pem()).unwrap();
    assert_eq!(certs.len(), 1);
    let (_, cert) = X509Certificate::from_der(&certs[0]).unwrap();
    assert!(cert.is_ca());
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(cert
        .subject()
        .to_string()
        .contains("meshwork root CA cluster.local"));
    let lifetime = ca
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs();
    assert!(lifetime > 9 * 365 * 86400 && lifetime <= 10 * 365 * 86400);
    assert_eq!(ca.bundle().roots(), &certs[..]);
    // Persisted and reloaded, it keeps issuing into the same bundle.
    let again = Ca::from_pem(td("cluster.local"), &ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(again.bundle(), ca.bundle());
}

#[test]
fn issued_leaf_is_an_x509_svid() {
    let ca = Ca::generate(td("cluster.local")).unwrap();
    let id = web("cluster.local");
    let kc = generate_key_and_csr(&id).unwrap();
    let now = SystemTime::now();
    let svid = ca
        .sign_csr_at(&kc.csr_pem, &id, DEFAULT_SVID_TTL, now)
        .unwrap();
    assert_eq!(svid.id, id);
    assert_eq!(svid.chain.len(), 1, "root CA: chain is the leaf only");
    let der = certs_from_pem(&svid.chain[0]).unwrap().remove(0);
    assert_eq!(spiffe_id_of(&der).unwrap(), id);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();

    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("explicit BasicConstraints");
    assert!(!bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);

    let secs = |t: SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let v = cert.validity();
    assert_eq!(v.not_before.timestamp(), secs(now) - 60);
    assert_eq!(v.not_after.timestamp(), secs(now) + 24 * 3600);
    assert_eq!(secs(svid.not_after), secs(now) + 24 * 3600);

    // The key the workload generated is the one certified.
    let key = KeyPair::from_pem(&kc.key_pem).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    // Serials are random.
    let other = ca.sign_csr(&kc.csr_pem, &id, DEFAULT_SVID_TTL).unwrap();
    let der2 = certs_from_pem(&other.chain[0]).unwrap().remove(0);
    let (_, cert2) = X509Certificate::from_der(&der2).unwrap();
    assert_ne!(cert.raw_serial(), cert2.raw_serial());
}

#[test]
fn csr_without_san_gets_the_expected_identity() {
    let ca = Ca::generate(td("t")).unwrap();
    let svid = ca
        .sign_csr(&csr_with(vec![]), &web("t"), DEFAULT_SVID_TTL)
        .unwrap();
    let der = certs_from_pem(&svid.chain_pem()).unwrap().remove(0);
    assert_eq!(spiffe_id_of(&der).unwrap(), web("t"));
}

#[test]
fn leaf_never_outlives_the_ca() {
    let now = SystemTime::now();
    let ca = Ca::generate_at(td("t"), now, Duration::from_secs(3600)).unwrap();
    let svid = ca
        .sign_csr_at(
            &csr_with(vec![]),
            &web("t"),
            Duration::from_secs(86400),
            now,
        )
        .unwrap();
    let ca_end = ca
        .not_after()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let leaf_end = svid
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(leaf_end, ca_end);
}

#[test]
fn refuses_csr_for_another_identity() {
    let ca = Ca::generate(td("t")).unwrap();
    let csr = csr_with(vec![uri("spiffe://t/ns/default/sa/admin")]);
    let err = ca.sign_csr(&csr, &web("t"), DEFAULT_SVID_TTL).unwrap_err();
    assert_eq!(err.reason(), "identity_mismatch");
    let msg = err.to_string();
    assert!(msg.contains("sa/admin") && msg.contains("sa/web"), "{msg}");
    // A DNS SAN is another identity too.
    let csr = csr_with(vec![SanType::DnsName("web.default".try_into().unwrap())]);
    assert!(matches!(
        ca.sign_csr(&csr, &web("t"), DEFAULT_SVID_TTL),
        Err(IssueError::IdentityMismatch { .. })
    ));
}

#[test]
fn refuses_csr_with_two_sans() {
    let ca = Ca::generate(td("t")).unwrap();
    let csr = csr_with(vec![
        uri("spiffe://t/ns/default/sa/web"),
        uri("spiffe://t/ns/default/sa/admin"),
    ]);
    assert_eq!(
        ca.sign_csr(&csr, &web("t"), DEFAULT_SVID_TTL),
        Err(IssueError::TooManySans(2))
    );
    let csr = csr_with(vec![
        uri("spiffe://t/ns/default/sa/web"),
        SanType::DnsName("web".try_into().unwrap()),
    ]);
    assert_eq!(
        ca.sign_csr(&csr, &web("t"), DEFAULT_SVID_TTL),
        Err(IssueError::TooManySans(2))
    );
}

#[test]
fn refuses_tampered_csr_signature() {
    let ca = Ca::generate(td("t")).unwrap();
    // Ask for the right id, then rewrite "web" to "wex" in the signed body:
    // the DER stays well-formed, only the signature no longer matches.
    let pem = csr_with(vec![uri("spiffe://t/ns/default/sa/web")]);
    let mut der = csr_der(&pem);
    let pos = der.windows(6).position(|w| w == b"sa/web").unwrap();
    der[pos + 5] = b'x';
    let tampered = to_pem("CERTIFICATE REQUEST", &der);
    let expected = SpiffeId::new(td("t"), "default", "wex").unwrap();
    assert_eq!(
        ca.sign_csr(&tampered, &expected, DEFAULT_SVID_TTL),
        Err(IssueError::BadSignature)
    );
    // Flipping a bit of the signature value itself.
    let mut der = csr_der(&pem);
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let err = ca
        .sign_csr(
            &to_pem("CERTIFICATE REQUEST", &der),
            &web("t"),
            DEFAULT_SVID_TTL,
        )
        .unwrap_err();
    assert!(
        matches!(err, IssueError::BadSignature | IssueError::MalformedCsr(_)),
        "{err:?}"
    );
}

#[test]
fn refuses_garbage() {
    let ca = Ca::generate(td("t")).unwrap();
    for garbage in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n",
        &ca.cert_pem(),
    ] {
        let err = ca
            .sign_csr(garbage, &web("t"), DEFAULT_SVID_TTL)
            .unwrap_err();
        assert_eq!(err.reason(), "malformed_csr", "{garbage:?}: {err:?}");
    }
    // Truncations of a valid CSR never panic.
    let pem = csr_with(vec![]);
    let der = csr_der(&pem);
    for n in 0..der.len() {
        let pem = to_pem("CERTIFICATE REQUEST", &der[..n]);
        assert!(ca.sign_csr(&pem, &web("t"), DEFAULT_SVID_TTL).is_err());
    }
    // Random bytes.
    let mut rng = fastrand::Rng::with_seed(42);
    for _ in 0..500 {
        let mut der = der.clone();
        for _ in 0..rng.usize(1..4) {
            let i = rng.usize(0..der.len());
            der[i] = rng.u8(..);
        }
        let _ = ca.sign_csr(
            &to_pem("CERTIFICATE REQUEST", &der),
            &web("t"),
            DEFAULT_SVID_TTL,
        );
    }
}

#[test]
fn refuses_weak_and_unsupported_keys() {
    let ca = Ca::generate(td("t")).unwrap();
    let weak = openssl_csr(&["-newkey", "rsa:1024"]);
    let err = ca.sign_csr(&weak, &web("t"), DEFAULT_SVID_TTL).unwrap_err();
    assert!(matches!(err, IssueError::WeakKey { bits: 1024 }), "{err:?}");
    assert!(err.to_string().contains("2048"));
    let p521 = openssl_csr(&["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"]);
    let err = ca.sign_csr(&p521, &web("t"), DEFAULT_SVID_TTL).unwrap_err();
    assert_eq!(err.reason(), "unsupported_key", "{err:?}");
    // RSA 2048 and Ed25519 are fine, and the leaf certifies exactly the
    // CSR's public key (algorithm identifier included).
    for newkey in [&["-newkey", "rsa:2048"][..], &["-newkey", "ed25519"][..]] {
        let pem = openssl_csr(newkey);
        let svid = ca.sign_csr(&pem, &web("t"), DEFAULT_SVID_TTL).unwrap();
        let der = certs_from_pem(&svid.chain_pem()).unwrap().remove(0);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let csr_der = csr_der(&pem);
        let (_, csr) = X509CertificationRequest::from_der(&csr_der).unwrap();
        assert_eq!(
            cert.public_key().raw,
            csr.certification_request_info.subject_pki.raw,
            "{newkey:?}"
        );
    }
}

#[test]
fn refuses_foreign_trust_domain_zero_ttl_and_expired_ca() {
    let ca = Ca::generate(td("t")).unwrap();
    let csr = csr_with(vec![]);
    assert_eq!(
        ca.sign_csr(&csr, &web("other"), DEFAULT_SVID_TTL)
            .unwrap_err()
            .reason(),
        "foreign_trust_domain"
    );
    assert_eq!(
        ca.sign_csr(&csr, &web("t"), Duration::ZERO),
        Err(IssueError::InvalidTtl)
    );
    let now = SystemTime::now();
    let old = Ca::generate_at(
        td("t"),
        now - Duration::from_secs(7200),
        Duration::from_secs(3600),
    )
    .unwrap();
    assert_eq!(
        old.sign_csr_at(&csr, &web("t"), DEFAULT_SVID_TTL, now),
        Err(IssueError::CaExpired)
    );
}

#[test]
fn from_pem_refusals() {
    let ca = Ca::generate(td("t")).unwrap();
    let other = Ca::generate(td("t")).unwrap();
    let err = Ca::from_pem(td("t"), &ca.cert_pem(), &other.key_pem()).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch), "{err}");

    let leaf = ca
        .issue_server_cert(&["localhost"], DEFAULT_SVID_TTL)
        .unwrap();
    let err = Ca::from_pem(td("t"), &leaf.svid.chain_pem(), &leaf.key_pem).unwrap_err();
    assert!(matches!(err, CaError::NotCa(_)), "{err}");

    let now = SystemTime::now();
    let old = Ca::generate_at(
        td("t"),
        now - Duration::from_secs(7200),
        Duration::from_secs(3600),
    )
    .unwrap();
    let err = Ca::from_pem(td("t"), &old.cert_pem(), &old.key_pem()).unwrap_err();
    assert!(matches!(err, CaError::Expired { .. }), "{err}");

    assert!(matches!(
        Ca::from_pem(td("t"), "garbage", &ca.key_pem()),
        Err(CaError::Cert(_))
    ));
    assert!(matches!(
        Ca::from_pem(td("t"), &ca.cert_pem(), "garbage"),
        Err(CaError::Key(_))
    ));
}

/// An intermediate CA signed by `root`, as (cert PEM, key PEM).
fn intermediate(root: &Ca) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "meshwork intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
    params.not_after = (SystemTime::now() + Duration::from_secs(86400 * 30)).into();
    let cert = params.signed_by(&key, &root.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn intermediate_ca_returns_its_chain() {
    let root = Ca::generate(td("t")).unwrap();
    let (inter_pem, inter_key) = intermediate(&root);
    let err = Ca::from_pem(td("t"), &inter_pem, &inter_key).unwrap_err();
    assert!(matches!(err, CaError::NoRoot), "{err}");

    let ca = Ca::from_pem(
        td("t"),
        &format!("{inter_pem}{}", root.cert_pem()),
        &inter_key,
    )
    .unwrap();
    assert_eq!(ca.bundle(), root.bundle());
    let svid = ca
        .sign_csr(&csr_with(vec![]), &web("t"), DEFAULT_SVID_TTL)
        .unwrap();
    assert_eq!(svid.chain.len(), 2);
    assert_eq!(svid.chain[1].trim(), inter_pem.trim());

    // The chain verifies against the root alone.
    let chain = certs_from_pem(&svid.chain_pem()).unwrap();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    let provider = rustls::crypto::ring::default_provider();
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        root.bundle().anchors(),
        &chain[1..],
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .unwrap();
}

#[test]
fn server_cert_has_control_id_and_names() {
    let ca = Ca::generate(td("t")).unwrap();
    let issued = ca
        .issue_server_cert(&["control.meshwork", "127.0.0.1"], DEFAULT_SVID_TTL)
        .unwrap();
    assert_eq!(
        issued.svid.id.to_string(),
        "spiffe://t/ns/meshwork-system/sa/control"
    );
    let der = certs_from_pem(&issued.svid.chain_pem()).unwrap().remove(0);
    assert_eq!(spiffe_id_of(&der).unwrap(), issued.svid.id);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(names.contains(&GeneralName::DNSName("control.meshwork")));
    assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
    assert!(KeyPair::from_pem(&issued.key_pem).is_ok());
    assert!(ca
        .issue_server_cert(&["bad name!"], DEFAULT_SVID_TTL)
        .is_err());
    // Unused import guard: ParsedExtension is used by the CSR checks.
    let _ = std::mem::size_of::<ParsedExtension<'_>>();
}

#[test]
fn requested_extensions_are_ignored() {
    // A CSR asking to be a CA with keyCertSign still gets a plain leaf.
    let ca = Ca::generate(td("t")).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let svid = ca.sign_csr(&csr, &web("t"), DEFAULT_SVID_TTL).unwrap();
    let der = certs_from_pem(&svid.chain_pem()).unwrap().remove(0);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(!cert.is_ca());
    assert!(!cert.key_usage().unwrap().unwrap().value.key_cert_sign());
}
