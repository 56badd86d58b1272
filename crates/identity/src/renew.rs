//! When to renew an SVID, and the workload side of issuance (key + CSR).

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use crate::id::SpiffeId;

/// Default jitter: renewal happens up to 10% of the lifetime before half-life.
pub const DEFAULT_RENEW_JITTER: f64 = 0.1;

/// A freshly generated workload key and the CSR to send to the CA.
///
/// The key never leaves the proxy process: only `csr_pem` goes on the wire.
#[derive(Clone)]
pub struct KeyAndCsr {
    /// PKCS#8 PEM private key (ECDSA P-256). Keep it in memory only.
    pub key_pem: String,
    /// PEM `CERTIFICATE REQUEST` carrying the id as its single URI SAN.
    pub csr_pem: String,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key_pem", &"[secret]")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// Why key or CSR generation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("generating workload key/CSR failed: {0}")]
pub struct KeyGenError(String);

/// When to renew a certificate valid from `not_before` to `not_after`: at
/// half-life minus a random jitter of up to `jitter_fraction` of the
/// lifetime (clamped to 0..=0.5), so that a fleet issued at once does not
/// renew at once. A zero or negative lifetime yields `not_before`.
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    jitter_fraction: f64,
    rng: &mut fastrand::Rng,
) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let fraction = if jitter_fraction.is_finite() {
        jitter_fraction.clamp(0.0, 0.5)
    } else {
        0.0
    };
    let jitter = lifetime.mul_f64(fraction * rng.f64());
    not_before + (lifetime / 2).saturating_sub(jitter)
}

/// Generates an ECDSA P-256 key and a CSR for `id` (URI SAN = the id,
/// empty subject).
pub fn generate_key_and_csr(id: &SpiffeId) -> Result<KeyAndCsr, KeyGenError> {
    let err = |e: rcgen::Error| KeyGenError(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(err)?)];
    let csr = params.serialize_request(&key).map_err(err)?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem().map_err(err)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn renews_between_forty_and_fifty_percent() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(24 * 3600);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut earliest = end;
        for _ in 0..1000 {
            let at = renew_at(start, end, DEFAULT_RENEW_JITTER, &mut rng);
            assert!(at <= start + Duration::from_secs(12 * 3600));
            assert!(at >= start + Duration::from_secs(12 * 3600) - Duration::from_secs(8640));
            earliest = earliest.min(at);
        }
        // Jitter actually spreads renewals (not all at half-life).
        assert!(earliest < start + Duration::from_secs(12 * 3600 - 3600));
        assert_eq!(
            renew_at(start, end, 0.0, &mut rng),
            start + Duration::from_secs(12 * 3600)
        );
        // Garbage inputs do not panic.
        assert_eq!(renew_at(end, start, 0.1, &mut rng), end);
        let _ = renew_at(start, end, f64::NAN, &mut rng);
        let at = renew_at(start, end, 5.0, &mut rng);
        assert!(at >= start);
    }
}
