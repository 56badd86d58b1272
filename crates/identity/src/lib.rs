//! Workload identity for meshwork: SPIFFE ids, the mesh CA, join tokens and
//! the rustls configurations that carry identities on the wire.
//!
//! # What it is for
//!
//! The control plane runs a [`Ca`] and a [`TokenIssuer`]: an operator
//! creates a join token for one identity, a proxy presents it with a CSR
//! made by [`generate_key_and_csr`], and the control plane answers with
//! [`Ca::sign_csr`]'s chain and the [`TrustBundle`]. The proxy loads both
//! into a [`WorkloadIdentity`], builds its mTLS configs from it once, and
//! renews at [`renew_at`] by calling [`WorkloadIdentity::update`].
//!
//! # How it is built
//!
//! rustls with the `ring` provider only (TLS 1.3 only), `rcgen` to issue,
//! `x509-parser` to read CSRs and certificates, `rustls-webpki` to build
//! chains against a trust bundle swapped at runtime (see [`tls`]).
//!
//! # What it does not do
//!
//! No network servers, no persistence, no policy: which peer may call which
//! service, where keys are stored, which token ids are spent, and when to
//! rotate a root are the control plane's and proxy's decisions.
//! No revocation: SVIDs are short-lived instead.

pub mod bundle;
pub mod ca;
pub mod cert;
pub mod id;
pub mod renew;
pub mod tls;
pub mod token;
pub mod wire;

pub use bundle::{BundleError, TrustBundle};
pub use ca::{
    Ca, CaError, IssueError, IssuedKey, Svid, CLOCK_SKEW_ALLOWANCE, DEFAULT_CA_VALIDITY,
    DEFAULT_SVID_TTL,
};
pub use cert::{certs_from_pem, leaf_validity, spiffe_id_of, CertError};
pub use id::{IdError, SpiffeId, TrustDomain};
pub use renew::{generate_key_and_csr, renew_at, KeyAndCsr, KeyGenError, DEFAULT_RENEW_JITTER};
pub use tls::{
    peer_identity, peer_identity_of, PeerIdentityError, TlsError, WorkloadIdentity, ALPN_H2,
    ALPN_HTTP1, ALPN_MESH_TCP, DEFAULT_MESH_ALPN,
};
pub use token::{Claims, TokenError, TokenIssuer};
