//! The certificate service's messages (protocol: docs/identity.md): what a proxy sends to get its SVID
//! and what the control plane answers.
//!
//! gRPC service `meshwork.ca.v1.CertificateService`, unary method `Sign`
//! ([`SIGN_PATH`]), served on the control plane's xDS port. Hand-written
//! prost messages (no `.proto` compilation step); field numbers are the
//! wire contract and never change meaning.
//!
//! Authentication, per request: the metadata `authorization: Bearer
//! <join token>` for a first certificate, or (renewal) the TLS client
//! certificate of a valid SVID from this CA with a CSR for the same id.

/// The gRPC path of `Sign`.
pub const SIGN_PATH: &str = "/meshwork.ca.v1.CertificateService/Sign";

/// The gRPC service name.
pub const SERVICE: &str = "meshwork.ca.v1.CertificateService";

/// A certificate signing request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignRequest {
    /// PKCS#10 CSR, PEM. Its key is the workload's; the key never travels.
    #[prost(string, tag = "1")]
    pub csr_pem: String,
    /// Requested lifetime; 0 means the CA's default. The CA caps it.
    #[prost(int64, tag = "2")]
    pub ttl_seconds: i64,
}

/// The issued certificate and the roots to trust.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignResponse {
    /// The chain, leaf first (PEM each); the root is not included.
    #[prost(string, repeated, tag = "1")]
    pub chain_pem: Vec<String>,
    /// Every trusted root, PEM, the one currently signing first.
    #[prost(string, tag = "2")]
    pub bundle_pem: String,
    /// The SPIFFE id the leaf carries.
    #[prost(string, tag = "3")]
    pub spiffe_id: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prost::Message;

    #[test]
    fn messages_round_trip() {
        let r = SignResponse {
            chain_pem: vec!["a".into(), "b".into()],
            bundle_pem: "roots".into(),
            spiffe_id: "spiffe://td/ns/a/sa/b".into(),
        };
        assert_eq!(
            SignResponse::decode(r.encode_to_vec().as_slice()).unwrap(),
            r
        );
        let q = SignRequest {
            csr_pem: "csr".into(),
            ttl_seconds: 60,
        };
        assert_eq!(
            SignRequest::decode(q.encode_to_vec().as_slice()).unwrap(),
            q
        );
    }
}
