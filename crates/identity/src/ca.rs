//! The mesh certificate authority: issues X.509-SVIDs from CSRs.
//!
//! # Root rotation
//!
//! A [`Ca`] signs with one key; rotation runs two side by side:
//!
//! 1. Create the new root (`Ca::generate` or `Ca::from_pem`) but keep
//!    issuing from the old one. Publish `old.bundle().merged(&new.bundle())`
//!    to every workload ([`crate::WorkloadIdentity::set_bundle`]). From now
//!    on a leaf from either root verifies everywhere.
//! 2. Once every workload has the two-root bundle, switch issuing to the new
//!    `Ca`. Workloads pick up leaves from the new root at their next renewal
//!    (half-life, so within 12 h for the 24 h default), or sooner if the
//!    control plane asks them to renew.
//! 3. After a grace period of at least one full leaf lifetime, publish
//!    `bundle.without(&old.bundle())`. Old-root leaves, all expired by now,
//!    stop verifying; the old key can be destroyed.
//!
//! Nothing here persists keys or decides when to rotate: the control plane
//! owns that, using [`Ca::cert_pem`] / [`Ca::key_pem`] to store the root.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::bundle::TrustBundle;
use crate::cert::{cert_to_pem, certs_from_pem, parse, unix_to_system, CertError};
use crate::id::{SpiffeId, TrustDomain};

/// Default lifetime of a generated root: 10 years.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of a workload SVID: 24 hours.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far `not_before` is backdated to tolerate clock skew between hosts.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);
/// Smallest RSA modulus accepted in a CSR.
const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted (ring/webpki's verification limit).
const MAX_RSA_BITS: usize = 8192;

/// Why a CA could not be created or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CA certificate PEM could not be parsed.
    #[error("CA certificate: {0}")]
    Cert(#[from] CertError),
    /// The CA key PEM could not be parsed or uses an unsupported algorithm.
    #[error("CA private key could not be loaded ({0}); supply a PKCS#8 PEM key (ECDSA P-256/P-384, Ed25519 or RSA)")]
    Key(String),
    /// The certificate is not a CA (BasicConstraints CA:TRUE missing) or may not sign certificates.
    #[error("the supplied certificate is not a CA: {0}; supply a root or intermediate with CA:TRUE and keyCertSign")]
    NotCa(&'static str),
    /// The private key does not belong to the certificate.
    #[error("the CA private key does not match the CA certificate's public key; check that the two files belong together")]
    KeyMismatch,
    /// The CA certificate's validity window does not include now.
    #[error("the CA certificate is outside its validity window (valid {not_before:?} to {not_after:?}); supply a current CA or rotate the root")]
    Expired {
        /// Start of the CA's validity.
        not_before: SystemTime,
        /// End of the CA's validity.
        not_after: SystemTime,
    },
    /// An intermediate was supplied without the chain up to a self-signed root.
    #[error("the CA certificate is an intermediate but the PEM does not end with its self-signed root; append the issuing chain up to and including the root")]
    NoRoot,
    /// Certificate or key generation failed inside rcgen/ring.
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

/// Why a CSR was refused or could not be signed. [`IssueError::reason`]
/// gives a stable label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The CSR is not parseable PEM/DER PKCS#10.
    #[error("malformed CSR: {0}; send one PEM CERTIFICATE REQUEST block")]
    MalformedCsr(String),
    /// The CSR's self-signature does not verify against its public key.
    #[error("CSR signature does not verify against its own public key; the CSR was altered or signed with another key")]
    BadSignature,
    /// The CSR's key type is not supported.
    #[error("unsupported CSR key type: {0}; use ECDSA P-256 (recommended), P-384, Ed25519 or RSA 2048-8192")]
    UnsupportedKey(String),
    /// The CSR's key is too weak.
    #[error("CSR key is too weak: RSA {bits} bits; use at least 2048 bits or ECDSA P-256")]
    WeakKey {
        /// Modulus size found.
        bits: usize,
    },
    /// The CSR asks for an identity other than the one the caller proved.
    #[error("CSR requests {requested} but the caller is authorized for {expected}; request exactly that URI SAN or none")]
    IdentityMismatch {
        /// The identity the caller proved (token or current SVID).
        expected: String,
        /// What the CSR asked for.
        requested: String,
    },
    /// The CSR asks for more than one SAN.
    #[error("CSR requests {0} subject alternative names; an SVID carries exactly one URI SAN, so request one or none")]
    TooManySans(usize),
    /// The identity to issue is in another trust domain than this CA.
    #[error("cannot issue {id}: this CA serves trust domain {ca_trust_domain}")]
    ForeignTrustDomain {
        /// The requested id.
        id: String,
        /// The CA's trust domain.
        ca_trust_domain: String,
    },
    /// A server name is neither an IP address nor a valid DNS name.
    #[error("server name {0:?} is neither an IP address nor a DNS name (letters, digits, '-' in dot-separated labels)")]
    InvalidServerName(String),
    /// A zero TTL was requested.
    #[error("requested certificate TTL is zero; use a positive TTL such as 24h")]
    InvalidTtl,
    /// The CA itself is expired or expires before the leaf could start.
    #[error("the CA certificate is expired or about to expire; rotate the root")]
    CaExpired,
    /// rcgen/ring failed while signing.
    #[error("signing failed: {0}")]
    Internal(String),
}

/// An issued certificate chain, leaf first, as PEM blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Svid {
    /// The identity in the leaf's URI SAN.
    pub id: SpiffeId,
    /// PEM certificates, leaf first, then intermediates (never the root:
    /// that comes from the trust bundle).
    pub chain: Vec<String>,
    /// Start of the leaf's validity (backdated for clock skew).
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

/// A certificate issued together with a locally generated key (for the
/// control plane's own serving certificate).
#[derive(Clone)]
pub struct IssuedKey {
    /// The chain, leaf first.
    pub svid: Svid,
    /// PKCS#8 PEM private key of the leaf.
    pub key_pem: String,
}

/// A signing CA for one trust domain: a root, or an intermediate with its
/// chain. See the module docs for rotation.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// Certificates between this CA and the root (exclusive of both).
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    bundle: TrustBundle,
    not_after: SystemTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("intermediate", &(self.cert != self.root))
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a self-signed ECDSA P-256 root for `trust_domain`, valid for
    /// [`DEFAULT_CA_VALIDITY`] from now (backdated for clock skew).
    pub fn generate(trust_domain: TrustDomain) -> Result<Self, CaError> {
        Self::generate_at(trust_domain, SystemTime::now(), DEFAULT_CA_VALIDITY)
    }

    /// Like [`Ca::generate`] with an explicit clock and validity (tests,
    /// short-lived roots).
    pub fn generate_at(
        trust_domain: TrustDomain,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, CaError> {
        let gen = |e: rcgen::Error| CaError::Generate(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        let mut params = CertificateParams::default();
        let not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_before = not_before.into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial().map_err(CaError::Generate)?);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshwork");
        dn.push(
            DnType::CommonName,
            format!("meshwork root CA {}", trust_domain),
        );
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(trust_domain.id_uri().try_into().map_err(gen)?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(gen)?;
        let der = cert.der().clone();
        let bundle =
            TrustBundle::new(vec![der.clone()]).map_err(|e| CaError::Generate(e.to_string()))?;
        Ok(Self {
            trust_domain,
            issuer: Issuer::new(params, key),
            bundle,
            root: der.clone(),
            cert: der,
            intermediates: Vec::new(),
            not_after: now + validity,
        })
    }

    /// Loads an operator-supplied CA.
    ///
    /// `cert_pem` holds the CA certificate first; for an intermediate CA it
    /// continues with the issuing chain up to and including the self-signed
    /// root. `key_pem` is the CA's PKCS#8 private key. Refused: a
    /// certificate without CA:TRUE or keyCertSign, a key that does not match,
    /// a certificate outside its validity window.
    pub fn from_pem(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, CaError> {
        Self::from_pem_at(trust_domain, cert_pem, key_pem, SystemTime::now())
    }

    /// [`Ca::from_pem`] with an explicit clock.
    pub fn from_pem_at(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let certs = certs_from_pem(cert_pem)?;
        let Some((cert_der, rest)) = certs.split_first() else {
            return Err(CaError::Cert(CertError::Pem("no CERTIFICATE block".into())));
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Key(e.to_string()))?;
        let (not_before, not_after, self_signed) = {
            let cert = parse(cert_der)?;
            match cert.basic_constraints() {
                Ok(Some(bc)) if bc.value.ca => {}
                _ => return Err(CaError::NotCa("BasicConstraints CA:TRUE is missing")),
            }
            if let Ok(Some(ku)) = cert.key_usage() {
                if !ku.value.key_cert_sign() {
                    return Err(CaError::NotCa("key usage lacks keyCertSign"));
                }
            }
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(CaError::KeyMismatch);
            }
            let v = cert.validity();
            (
                unix_to_system(v.not_before.timestamp()),
                unix_to_system(v.not_after.timestamp()),
                cert.subject().as_raw() == cert.issuer().as_raw(),
            )
        };
        if now < not_before || now >= not_after {
            return Err(CaError::Expired {
                not_before,
                not_after,
            });
        }
        let (root, intermediates) = if self_signed {
            (cert_der.clone(), Vec::new())
        } else {
            match rest.split_last() {
                Some((root, between)) if is_self_signed(root)? => (root.clone(), between.to_vec()),
                _ => return Err(CaError::NoRoot),
            }
        };
        let bundle = TrustBundle::new(vec![root.clone()]).map_err(|e| match e {
            crate::bundle::BundleError::Cert(c) => CaError::Cert(c),
            _ => CaError::NotCa("the root does not work as a trust anchor"),
        })?;
        let issuer = Issuer::from_ca_cert_der(cert_der, key)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        Ok(Self {
            trust_domain,
            issuer,
            bundle,
            cert: cert_der.clone(),
            intermediates,
            root,
            not_after,
        })
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate (root or intermediate) as PEM, for persistence.
    pub fn cert_pem(&self) -> String {
        let mut pem = cert_to_pem(&self.cert);
        for c in &self.intermediates {
            pem.push_str(&cert_to_pem(c));
        }
        if self.root != self.cert {
            pem.push_str(&cert_to_pem(&self.root));
        }
        pem
    }

    /// The CA private key as PKCS#8 PEM, for persistence. Handle as a secret.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// End of the CA certificate's validity; no leaf outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The bundle holding this CA's root, for workloads to trust.
    pub fn bundle(&self) -> TrustBundle {
        self.bundle.clone()
    }

    /// Signs a workload CSR for `expected` with the default clock.
    /// See [`Ca::sign_csr_at`].
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        expected: &SpiffeId,
        ttl: Duration,
    ) -> Result<Svid, IssueError> {
        self.sign_csr_at(csr_pem, expected, ttl, SystemTime::now())
    }

    /// Signs a workload CSR, issuing an X.509-SVID for `expected`.
    ///
    /// `expected` is the identity the caller proved (join token or current
    /// SVID); the CSR may carry exactly that URI SAN or no SAN at all, and
    /// its subject and other requested extensions are ignored: the CA sets
    /// every field itself. The leaf has one URI SAN, explicit CA:FALSE,
    /// critical digitalSignature key usage, serverAuth+clientAuth EKU, a
    /// random serial, `not_before = now - 60s` and `not_after = now + ttl`
    /// capped at the CA's own expiry.
    pub fn sign_csr_at(
        &self,
        csr_pem: &str,
        expected: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Svid, IssueError> {
        if expected.trust_domain() != &self.trust_domain {
            return Err(IssueError::ForeignTrustDomain {
                id: expected.to_string(),
                ca_trust_domain: self.trust_domain.to_string(),
            });
        }
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| IssueError::MalformedCsr(e.to_string()))?;
        let public_key = check_csr(&der, expected)?;
        self.issue(&public_key, expected, &[], ttl, now)
    }

    /// Issues the control plane's serving certificate: URI SAN
    /// `spiffe://<td>/ns/meshwork-system/sa/control` plus a DNS or IP SAN for
    /// each of `names` (what proxies dial), with a freshly generated P-256 key.
    pub fn issue_server_cert(
        &self,
        names: &[&str],
        ttl: Duration,
    ) -> Result<IssuedKey, IssueError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IssueError::Internal(e.to_string()))?;
        let id = SpiffeId::control_plane(self.trust_domain.clone());
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(name) => SanType::DnsName(
                    (*name)
                        .try_into()
                        .map_err(|_| IssueError::InvalidServerName((*name).to_owned()))?,
                ),
                Err(_) => return Err(IssueError::InvalidServerName((*name).to_owned())),
            };
            sans.push(san);
        }
        let svid = self.issue(&key, &id, &sans, ttl, SystemTime::now())?;
        Ok(IssuedKey {
            svid,
            key_pem: key.serialize_pem(),
        })
    }

    fn issue(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        extra_sans: &[SanType],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Svid, IssueError> {
        if ttl.is_zero() {
            return Err(IssueError::InvalidTtl);
        }
        if now >= self.not_after {
            return Err(IssueError::CaExpired);
        }
        let not_before = now - CLOCK_SKEW_ALLOWANCE;
        let not_after = (now + ttl).min(self.not_after);
        let internal = |e: rcgen::Error| IssueError::Internal(e.to_string());
        let mut params = CertificateParams::default();
        // Empty subject: the identity lives in the SAN only (rcgen then marks
        // the SAN extension critical, as RFC 5280 requires).
        params.distinguished_name = DistinguishedName::new();
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial().map_err(IssueError::Internal)?);
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(internal)?)];
        params.subject_alt_names.extend_from_slice(extra_sans);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(internal)?;
        let mut chain = vec![leaf.pem()];
        if self.cert != self.root {
            chain.push(cert_to_pem(&self.cert));
            chain.extend(self.intermediates.iter().map(|c| cert_to_pem(c)));
        }
        // Read back what was encoded (second precision) so renewal timing
        // matches the certificate exactly.
        let (not_before, not_after) = crate::cert::validity_of(leaf.der())
            .map_err(|e| IssueError::Internal(e.to_string()))?;
        Ok(Svid {
            id: id.clone(),
            chain,
            not_before,
            not_after,
        })
    }
}

impl Svid {
    /// The whole chain as one PEM string, leaf first.
    pub fn chain_pem(&self) -> String {
        self.chain.concat()
    }
}

impl IssueError {
    /// A short stable label for metrics (`reason="identity_mismatch"`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MalformedCsr(_) => "malformed_csr",
            Self::BadSignature => "bad_signature",
            Self::UnsupportedKey(_) => "unsupported_key",
            Self::WeakKey { .. } => "weak_key",
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::TooManySans(_) => "too_many_sans",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Self::InvalidServerName(_) => "invalid_server_name",
            Self::InvalidTtl => "invalid_ttl",
            Self::CaExpired => "ca_expired",
            Self::Internal(_) => "internal",
        }
    }
}

/// The subject public key of an accepted CSR, in the form rcgen signs.
struct CsrKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Parses and checks a CSR: key type, self-signature, requested SANs.
fn check_csr(der: &[u8], expected: &SpiffeId) -> Result<CsrKey, IssueError> {
    let csr = match X509CertificationRequest::from_der(der) {
        Ok(([], csr)) => csr,
        Ok(_) => return Err(IssueError::MalformedCsr("trailing bytes after CSR".into())),
        Err(e) => return Err(IssueError::MalformedCsr(e.to_string())),
    };
    let spki = &csr.certification_request_info.subject_pki;
    let alg_oid = &spki.algorithm.algorithm;
    let alg: &'static SignatureAlgorithm = if *alg_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| IssueError::UnsupportedKey("EC key without a named curve".into()))?;
        if curve == OID_EC_P256 {
            &rcgen::PKCS_ECDSA_P256_SHA256
        } else if curve == OID_NIST_EC_P384 {
            &rcgen::PKCS_ECDSA_P384_SHA384
        } else {
            return Err(IssueError::UnsupportedKey(format!("EC curve {curve}")));
        }
    } else if *alg_oid == OID_SIG_ED25519 {
        &rcgen::PKCS_ED25519
    } else if *alg_oid == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => {
                return Err(IssueError::MalformedCsr(
                    "unparseable RSA public key".into(),
                ))
            }
        };
        if bits < MIN_RSA_BITS {
            return Err(IssueError::WeakKey { bits });
        }
        if bits > MAX_RSA_BITS {
            return Err(IssueError::UnsupportedKey(format!(
                "RSA {bits} bits (max {MAX_RSA_BITS})"
            )));
        }
        &rcgen::PKCS_RSA_SHA256
    } else {
        return Err(IssueError::UnsupportedKey(format!("algorithm {alg_oid}")));
    };
    csr.verify_signature()
        .map_err(|_| IssueError::BadSignature)?;

    let mut names: Vec<String> = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    names.extend(san.general_names.iter().map(describe_name));
                }
                ParsedExtension::ParseError { error } => {
                    return Err(IssueError::MalformedCsr(format!(
                        "requested extension does not parse: {error}"
                    )));
                }
                // Key usage, basic constraints etc. are ignored on purpose:
                // the CA sets every extension of the leaf itself.
                _ => {}
            }
        }
    }
    let expected_uri = format!("URI:{expected}");
    match names.as_slice() {
        [] => {}
        [one] if *one == expected_uri => {}
        [one] => {
            return Err(IssueError::IdentityMismatch {
                expected: expected.to_string(),
                requested: one.clone(),
            })
        }
        many => return Err(IssueError::TooManySans(many.len())),
    }
    Ok(CsrKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg,
    })
}

fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        GeneralName::IPAddress(ip) => format!("IP:{ip:02x?}"),
        other => format!("{other:?}"),
    }
}

/// A DNS host name: dot-separated labels of letters, digits and '-', not
/// starting or ending with '-', at most 63 bytes each and 253 in total.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn is_self_signed(der: &CertificateDer<'_>) -> Result<bool, CertError> {
    let cert = parse(der)?;
    Ok(cert.subject().as_raw() == cert.issuer().as_raw())
}

/// A random positive 128-bit serial (RFC 5280: at most 20 octets, positive).
fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "system random number generator failed".to_string())?;
    // Positive and without a leading zero octet, so DER needs no padding.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests;
