//! The trust bundle: the root certificates a workload trusts.

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::cert::{cert_to_pem, certs_from_pem, parse, CertError};

/// Why a trust bundle could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The PEM text or a certificate in it could not be parsed.
    #[error("trust bundle: {0}")]
    Cert(#[from] CertError),
    /// A bundle needs at least one root.
    #[error("trust bundle is empty; it needs at least one CA root certificate")]
    Empty,
    /// A certificate in the bundle is not a CA (BasicConstraints CA:TRUE).
    #[error("trust bundle entry #{0} is not a CA certificate (BasicConstraints CA:TRUE missing); put only roots in a bundle")]
    NotCa(usize),
    /// webpki refused a certificate as a trust anchor.
    #[error("trust bundle entry #{index} cannot be a trust anchor: {reason}")]
    Anchor {
        /// Position of the certificate in the bundle (0-based).
        index: usize,
        /// webpki's reason.
        reason: String,
    },
}

/// One or more CA root certificates that a workload trusts.
///
/// Root rotation publishes a bundle holding the old and the new root
/// together, so that certificates from either verify while leaves are
/// reissued (see [`crate::Ca`] for the whole procedure). The bundle is
/// exchanged as a plain concatenation of PEM `CERTIFICATE` blocks
/// ([`TrustBundle::from_pem`] / [`TrustBundle::to_pem`]).
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER roots; duplicates are dropped, order kept.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        let mut unique: Vec<CertificateDer<'static>> = Vec::with_capacity(roots.len());
        for root in roots {
            if !unique.contains(&root) {
                unique.push(root);
            }
        }
        if unique.is_empty() {
            return Err(BundleError::Empty);
        }
        let mut anchors = Vec::with_capacity(unique.len());
        for (index, root) in unique.iter().enumerate() {
            if !parse(root)?.is_ca() {
                return Err(BundleError::NotCa(index));
            }
            let anchor =
                webpki::anchor_from_trusted_cert(root).map_err(|e| BundleError::Anchor {
                    index,
                    reason: e.to_string(),
                })?;
            anchors.push(anchor.to_owned());
        }
        Ok(Self {
            roots: unique,
            anchors,
        })
    }

    /// Parses a concatenation of PEM `CERTIFICATE` blocks.
    pub fn from_pem(pem: &str) -> Result<Self, BundleError> {
        Self::new(certs_from_pem(pem)?)
    }

    /// The bundle as a concatenation of PEM blocks, in order.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|c| cert_to_pem(c)).collect()
    }

    /// The roots, in order.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// A new bundle with `other`'s roots appended (rotation: old + new).
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut roots = self.roots.clone();
        let mut anchors = self.anchors.clone();
        for (root, anchor) in other.roots.iter().zip(&other.anchors) {
            if !roots.contains(root) {
                roots.push(root.clone());
                anchors.push(anchor.clone());
            }
        }
        TrustBundle { roots, anchors }
    }

    /// A new bundle without the roots of `retired` (rotation: drop the old
    /// root after the grace period). Removing every root is an error.
    pub fn without(&self, retired: &TrustBundle) -> Result<TrustBundle, BundleError> {
        let roots: Vec<_> = self
            .roots
            .iter()
            .filter(|r| !retired.roots.contains(r))
            .cloned()
            .collect();
        Self::new(roots)
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.roots == other.roots
    }
}

impl Eq for TrustBundle {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::{Ca, TrustDomain, DEFAULT_SVID_TTL};

    fn ca() -> Ca {
        Ca::generate(TrustDomain::new("t").unwrap()).unwrap()
    }

    #[test]
    fn pem_round_trip_merge_and_retire() {
        let (a, b) = (ca(), ca());
        let both = a.bundle().merged(&b.bundle());
        assert_eq!(both.roots().len(), 2);
        assert_eq!(both.merged(&a.bundle()), both, "merge dedupes");
        let parsed = TrustBundle::from_pem(&both.to_pem()).unwrap();
        assert_eq!(parsed, both);
        assert_eq!(parsed.anchors().len(), 2);
        let doubled = format!("{}{}", both.to_pem(), a.bundle().to_pem());
        assert_eq!(TrustBundle::from_pem(&doubled).unwrap(), both);
        assert_eq!(both.without(&a.bundle()).unwrap(), b.bundle());
        assert_eq!(
            a.bundle().without(&a.bundle()).unwrap_err(),
            BundleError::Empty
        );
    }

    #[test]
    fn refuses_garbage_and_leaves() {
        assert!(matches!(
            TrustBundle::from_pem("nope"),
            Err(BundleError::Cert(_))
        ));
        assert_eq!(TrustBundle::new(vec![]).unwrap_err(), BundleError::Empty);
        let ca = ca();
        let leaf = ca.issue_server_cert(&["x"], DEFAULT_SVID_TTL).unwrap();
        let pem = format!("{}{}", ca.bundle().to_pem(), leaf.svid.chain_pem());
        assert_eq!(
            TrustBundle::from_pem(&pem).unwrap_err(),
            BundleError::NotCa(1)
        );
    }
}
