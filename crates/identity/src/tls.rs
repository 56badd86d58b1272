//! rustls configurations for mesh mTLS and the control-plane channel, built
//! on one hot-swappable [`WorkloadIdentity`].
//!
//! # Design
//!
//! Every config holds an `Arc<WorkloadIdentity>`; the certificate resolvers
//! and verifiers read the identity's current certificate and trust bundle
//! *at handshake time*. So [`WorkloadIdentity::update`] (renewal) and
//! [`WorkloadIdentity::set_bundle`] (root rotation) take effect for the next
//! handshake without rebuilding any config; established connections keep
//! the keys they negotiated.
//!
//! Chains are verified with `rustls-webpki` against the bundle's roots, with
//! the clientAuth or serverAuth EKU as appropriate. Hostnames play no part
//! in mesh mTLS: the client checks that the server's SPIFFE id (its single
//! URI SAN) is one of the ids expected for the destination. Those are fixed
//! per [`ClientConfig`]: [`WorkloadIdentity::mesh_client_config`] is cheap
//! (a few `Arc` clones), so build one per destination (or per distinct set
//! of expected ids) and cache it next to the connection pool. The
//! `ServerName` passed to the connector is not checked; use the
//! destination's host name so logs read well.
//!
//! TLS 1.3 only. Session resumption is disabled on both sides: resumed
//! sessions skip certificate verification, which would let a connection
//! outlive the removal of a root from the bundle; mesh connections are
//! long-lived and pooled, so full handshakes cost little.
//!
//! # ALPN
//!
//! ALPN names the application protocol inside the tunnel:
//! [`ALPN_H2`], [`ALPN_HTTP1`], and [`ALPN_MESH_TCP`] (`meshwork-tcp/1`)
//! for opaque TCP, which tells the receiving proxy to forward bytes without
//! protocol sniffing. A client that offers ALPN values the server does not
//! list fails the handshake (`no_application_protocol`).

use std::fmt;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::bundle::TrustBundle;
use crate::cert::{certs_from_pem, spiffe_id_of, CertError};
use crate::id::{SpiffeId, CONTROL_NAMESPACE, CONTROL_SERVICE_ACCOUNT};

/// ALPN for HTTP/2 inside the mesh tunnel.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1 inside the mesh tunnel.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN for opaque TCP inside the mesh tunnel: forward bytes, do not sniff.
pub const ALPN_MESH_TCP: &[u8] = b"meshwork-tcp/1";
/// What a mesh server accepts by default: h2, http/1.1, meshwork-tcp/1.
pub const DEFAULT_MESH_ALPN: &[&[u8]] = &[ALPN_H2, ALPN_HTTP1, ALPN_MESH_TCP];

/// Why a TLS identity or config could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate chain PEM is unusable.
    #[error("workload certificate: {0}")]
    Cert(#[from] CertError),
    /// The private key PEM is unusable.
    #[error("workload private key: {0}; supply a PKCS#8, SEC1 or PKCS#1 PEM key")]
    Key(String),
    /// The key does not match the leaf certificate, or rustls refused it.
    #[error("workload certificate and key cannot be used together: {0}")]
    Rustls(#[from] rustls::Error),
    /// A mesh client config needs at least one expected peer identity.
    #[error(
        "no expected server identity given; pass the SPIFFE ids allowed to serve this destination"
    )]
    NoExpectedIdentity,
}

/// Why a peer's certificate was refused for identity reasons (wrapped in
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerIdentityError {
    /// The server presented a valid certificate for the wrong identity.
    #[error("server presented identity {presented}, expected one of [{}]", .expected.join(", "))]
    Mismatch {
        /// The ids allowed for this destination.
        expected: Vec<String>,
        /// The id in the server's certificate.
        presented: String,
    },
    /// The peer's certificate carries no usable SPIFFE id.
    #[error("peer certificate has no valid SPIFFE id: {0}")]
    NoSpiffeId(CertError),
    /// The control plane's certificate carries a non-control-plane identity.
    #[error("control plane presented identity {0}, expected spiffe://<td>/ns/meshwork-system/sa/control")]
    NotControlPlane(String),
}

/// The current certificate (with its key) and trust bundle of one
/// workload, swappable at runtime. Share it as `Arc<WorkloadIdentity>`
/// among all configs built from it.
pub struct WorkloadIdentity {
    current: ArcSwapOption<Current>,
    bundle: ArcSwap<TrustBundle>,
    provider: Arc<CryptoProvider>,
}

struct Current {
    key: Arc<CertifiedKey>,
    id: SpiffeId,
}

impl fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("id", &self.id().map(|id| id.to_string()))
            .field("roots", &self.bundle.load().roots().len())
            .finish()
    }
}

impl WorkloadIdentity {
    /// An identity with a trust bundle but no certificate yet (a proxy
    /// bootstrapping with a join token). Servers built from it fail
    /// handshakes and clients present no certificate until [`update`].
    ///
    /// [`update`]: WorkloadIdentity::update
    pub fn new(bundle: TrustBundle) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::empty(),
            bundle: ArcSwap::from_pointee(bundle),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// An identity with a certificate chain (PEM, leaf first) and its key.
    pub fn with_cert(
        chain_pem: &str,
        key_pem: &str,
        bundle: TrustBundle,
    ) -> Result<Arc<Self>, TlsError> {
        let identity = Self::new(bundle);
        identity.update(chain_pem, key_pem)?;
        Ok(identity)
    }

    /// Installs a new certificate chain (PEM, leaf first) and private key,
    /// atomically. Checked first: the key matches the leaf and the leaf has
    /// exactly one valid SPIFFE id. On error the old certificate stays.
    pub fn update(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let chain = certs_from_pem(chain_pem)?;
        let id = match chain.first() {
            Some(leaf) => spiffe_id_of(leaf)?,
            None => return Err(CertError::Pem("empty chain".into()).into()),
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let certified = CertifiedKey::from_der(chain, key, &self.provider)?;
        self.current.store(Some(Arc::new(Current {
            key: Arc::new(certified),
            id,
        })));
        Ok(())
    }

    /// Replaces the trust bundle atomically (root rotation: install old+new,
    /// later new only).
    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Arc::new(bundle));
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// The SPIFFE id of the current certificate, if there is one.
    pub fn id(&self) -> Option<SpiffeId> {
        self.current.load().as_ref().map(|c| c.id.clone())
    }

    /// The current certificate and key in rustls form.
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|c| c.key.clone())
    }

    /// Server side of proxy-to-proxy mTLS: TLS 1.3, client certificate
    /// required and verified (clientAuth) against the current bundle, the
    /// current certificate presented, `alpn` offered in preference order.
    /// Authorization by peer id is the caller's job ([`peer_identity`]).
    pub fn mesh_server_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config(true, alpn)
    }

    /// Client side of proxy-to-proxy mTLS: TLS 1.3, presents the current
    /// certificate, verifies the server chain (serverAuth) against the
    /// current bundle and requires the server's SPIFFE id to be in
    /// `expected`. See the module docs for why this is per destination.
    pub fn mesh_client_config(
        self: &Arc<Self>,
        expected: Vec<SpiffeId>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        if expected.is_empty() {
            return Err(TlsError::NoExpectedIdentity);
        }
        let verifier = Arc::new(ServerVerifier {
            identity: self.clone(),
            check: ServerCheck::Expected(expected),
        });
        self.client_config(verifier, alpn)
    }

    /// Server side of the control-plane channel: like
    /// [`mesh_server_config`](Self::mesh_server_config) but a client
    /// certificate is optional. Proxies bootstrap with a join token before
    /// they have one; renewals present their current SVID, which is then
    /// verified and readable with [`peer_identity`]. An invalid certificate
    /// still fails the handshake.
    pub fn control_server_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config(false, alpn)
    }

    /// Client side of the control-plane channel (proxy → control plane):
    /// verifies the control plane's chain against the bundle, its DNS/IP SAN
    /// against the `ServerName` dialled, and that its SPIFFE id is the
    /// control plane's (`/ns/meshwork-system/sa/control`). Presents the
    /// current SVID if the identity has one.
    pub fn control_client_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(ServerVerifier {
            identity: self.clone(),
            check: ServerCheck::ControlPlane,
        });
        self.client_config(verifier, alpn)
    }

    fn server_config(
        self: &Arc<Self>,
        mandatory: bool,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = Arc::new(ClientVerifier {
            identity: self.clone(),
            mandatory,
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    fn client_config(
        self: &Arc<Self>,
        verifier: Arc<ServerVerifier>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// The SPIFFE id of the peer of an established TLS connection: the single
/// URI SAN of its leaf certificate. `None` if the peer presented no
/// certificate (control-plane bootstrap) or the handshake is not done.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    peer_identity_of(conn.peer_certificates()?)
}

/// [`peer_identity`] from a peer certificate chain (leaf first).
pub fn peer_identity_of(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    spiffe_id_of(chain.first()?).ok()
}

/// Serves and presents the identity's current certificate.
#[derive(Debug)]
struct Resolver(Arc<WorkloadIdentity>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified_key()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.certified_key()
    }

    fn has_certs(&self) -> bool {
        self.0.current.load().is_some()
    }
}

/// Verifies client certificates against the identity's current bundle.
#[derive(Debug)]
struct ClientVerifier {
    identity: Arc<WorkloadIdentity>,
    mandatory: bool,
}

/// The handshake-signature methods both verifiers share: checked with the
/// identity's crypto provider, as rustls's own verifiers do.
macro_rules! handshake_signatures_by_provider {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.identity.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.identity.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.identity
                .provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle changes at runtime and cannot be borrowed from here;
        // an empty hint list means "any CA", and workloads have one cert.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.identity.bundle.load();
        let ee = parse_end_entity(end_entity)?;
        verify_chain(
            &self.identity.provider,
            &bundle,
            &ee,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        spiffe_id_of(end_entity).map_err(|e| identity_error(PeerIdentityError::NoSpiffeId(e)))?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_by_provider!();
}

/// What a client checks beyond the chain.
#[derive(Debug)]
enum ServerCheck {
    /// Mesh: the server's SPIFFE id is one of these.
    Expected(Vec<SpiffeId>),
    /// Control plane: the dialled name matches a DNS/IP SAN and the SPIFFE
    /// id is the control plane's.
    ControlPlane,
}

/// Verifies server certificates against the identity's current bundle.
#[derive(Debug)]
struct ServerVerifier {
    identity: Arc<WorkloadIdentity>,
    check: ServerCheck,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.identity.bundle.load();
        let ee = parse_end_entity(end_entity)?;
        verify_chain(
            &self.identity.provider,
            &bundle,
            &ee,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let presented = spiffe_id_of(end_entity)
            .map_err(|e| identity_error(PeerIdentityError::NoSpiffeId(e)))?;
        match &self.check {
            ServerCheck::Expected(expected) => {
                if !expected.contains(&presented) {
                    return Err(identity_error(PeerIdentityError::Mismatch {
                        expected: expected.iter().map(|id| id.to_string()).collect(),
                        presented: presented.to_string(),
                    }));
                }
            }
            ServerCheck::ControlPlane => {
                ee.verify_is_valid_for_subject_name(server_name)
                    .map_err(pki_error)?;
                if presented.namespace() != CONTROL_NAMESPACE
                    || presented.service_account() != CONTROL_SERVICE_ACCOUNT
                {
                    return Err(identity_error(PeerIdentityError::NotControlPlane(
                        presented.to_string(),
                    )));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_by_provider!();
}

fn parse_end_entity<'a>(
    der: &'a CertificateDer<'a>,
) -> Result<webpki::EndEntityCert<'a>, rustls::Error> {
    webpki::EndEntityCert::try_from(der).map_err(pki_error)
}

/// Builds a path from `ee` through `intermediates` to a root of `bundle`.
fn verify_chain(
    provider: &CryptoProvider,
    bundle: &TrustBundle,
    ee: &webpki::EndEntityCert<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(pki_error)
}

fn identity_error(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Maps webpki's verdicts onto rustls's certificate errors (which become
/// the right TLS alerts).
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    #[allow(deprecated)]
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertNotValidForName(_) => CertificateError::NotValidForName,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) => {
            CertificateError::InvalidPurpose
        }
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}
