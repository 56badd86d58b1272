//! Reading certificates: PEM splitting, the SPIFFE id of a leaf, validity.
//!
//! Everything here treats its input as hostile: parse errors become
//! [`CertError`] values, never panics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::id::{IdError, SpiffeId};

/// Why a certificate (or PEM holding certificates) could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The PEM text holds no `CERTIFICATE` block or is not valid PEM.
    #[error(
        "no certificate found in PEM input ({0}); expected -----BEGIN CERTIFICATE----- blocks"
    )]
    Pem(String),
    /// A certificate's DER could not be parsed as X.509.
    #[error("certificate is not valid X.509 DER: {0}")]
    Der(String),
    /// The leaf carries no URI SAN.
    #[error("certificate has no URI SAN; an X.509-SVID needs exactly one spiffe:// URI SAN")]
    NoUriSan,
    /// The leaf carries more than one URI SAN.
    #[error("certificate has {0} URI SANs; an X.509-SVID needs exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN is not a valid mesh SPIFFE id.
    #[error("certificate URI SAN is not a valid SPIFFE id: {0}")]
    InvalidId(#[from] IdError),
}

/// Splits PEM text into DER certificates, in order.
///
/// Other PEM blocks (keys, CSRs) are skipped; no certificate at all is an error.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::Pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Encodes one DER certificate as a PEM block.
pub fn cert_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The SPIFFE id of an X.509-SVID leaf: its exactly-one URI SAN.
///
/// DNS and IP SANs (as on the control plane's serving cert) are ignored;
/// zero or several URI SANs are an error, as the SPIFFE X.509-SVID spec
/// requires.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, CertError> {
    let cert = parse(der)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Der(format!("subject alternative name extension: {e}")))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(CertError::NoUriSan),
        [uri] => Ok(SpiffeId::parse(uri)?),
        many => Err(CertError::MultipleUriSans(many.len())),
    }
}

/// The `(not_before, not_after)` validity window of a certificate.
pub fn validity_of(der: &[u8]) -> Result<(SystemTime, SystemTime), CertError> {
    let cert = parse(der)?;
    let v = cert.validity();
    Ok((
        unix_to_system(v.not_before.timestamp()),
        unix_to_system(v.not_after.timestamp()),
    ))
}

/// The validity window of the first (leaf) certificate in `pem`, for
/// scheduling renewal with [`crate::renew_at`].
pub fn leaf_validity(pem: &str) -> Result<(SystemTime, SystemTime), CertError> {
    let certs = certs_from_pem(pem)?;
    match certs.first() {
        Some(leaf) => validity_of(leaf),
        None => Err(CertError::Pem("no CERTIFICATE block".into())),
    }
}

pub(crate) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CertError::Der("trailing bytes after certificate".into())),
        Err(e) => Err(CertError::Der(e.to_string())),
    }
}

pub(crate) fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn self_signed(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_string().try_into().unwrap())
    }

    #[test]
    fn spiffe_id_needs_exactly_one_uri_san() {
        let one = self_signed(vec![
            uri("spiffe://t/ns/a/sa/b"),
            SanType::DnsName("x.example".try_into().unwrap()),
        ]);
        assert_eq!(
            spiffe_id_of(&one).unwrap().to_string(),
            "spiffe://t/ns/a/sa/b"
        );
        let none = self_signed(vec![SanType::DnsName("x.example".try_into().unwrap())]);
        assert_eq!(spiffe_id_of(&none), Err(CertError::NoUriSan));
        let two = self_signed(vec![
            uri("spiffe://t/ns/a/sa/b"),
            uri("spiffe://t/ns/a/sa/c"),
        ]);
        assert_eq!(spiffe_id_of(&two), Err(CertError::MultipleUriSans(2)));
        let bad = self_signed(vec![uri("https://t/ns/a/sa/b")]);
        assert!(matches!(spiffe_id_of(&bad), Err(CertError::InvalidId(_))));
        assert!(matches!(spiffe_id_of(b"garbage"), Err(CertError::Der(_))));
        for n in 0..one.len() {
            assert!(spiffe_id_of(&one[..n]).is_err());
        }
    }

    #[test]
    fn pem_round_trip_and_validity() {
        let der = self_signed(vec![]);
        let pem = cert_to_pem(&der);
        let parsed = certs_from_pem(&pem).unwrap();
        assert_eq!(parsed[0].as_ref(), &der[..]);
        let (nb, na) = leaf_validity(&pem).unwrap();
        assert!(nb < na);
        assert!(matches!(certs_from_pem(""), Err(CertError::Pem(_))));
        assert!(matches!(
            certs_from_pem("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n"),
            Err(CertError::Pem(_))
        ));
    }
}
