//! The proxy's TLS channel to the control plane (xDS and the certificate
//! service share it) and the one unary call it makes there, `Sign`.
//!
//! TLS is done here, not by tonic: a [`ControlConnector`] dials TCP and runs
//! a tokio-rustls handshake with
//! [`WorkloadIdentity::control_client_config`], which verifies the control
//! plane against the trust bundle (and its DNS/IP SAN against the address
//! dialled) and presents this proxy's current SVID, if it has one. tonic
//! only sees an already-encrypted byte stream, so none of its TLS features
//! (and none of their crypto providers) are compiled in.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::identity::wire::{SignRequest, SignResponse, SIGN_PATH};
use ::identity::WorkloadIdentity;
use http::uri::PathAndQuery;
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// ALPN on the control-plane channel: gRPC is HTTP/2.
const ALPN: &[&[u8]] = &[b"h2"];
/// A `Sign` call (handshake included) must finish within this time.
const SIGN_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the connection to the control plane could not be set up. Found in
/// the source chain of tonic's transport errors by [`connect_error_of`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is not `host:port`.
    #[error("control-plane address {0:?} is not host:port")]
    Address(String),
    /// The TCP connection failed (refused, unreachable, timed out).
    #[error("cannot reach the control plane at {addr}: {source}")]
    Tcp {
        /// What was dialled.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// TLS failed: the control plane's certificate did not verify, or the
    /// peer does not speak TLS.
    #[error("TLS with the control plane at {addr} failed: {source}")]
    Tls {
        /// What was dialled.
        addr: String,
        /// rustls's verdict.
        source: rustls::Error,
    },
    /// The connection broke during the handshake.
    #[error("TLS handshake with the control plane at {addr} broke off: {source}")]
    Handshake {
        /// What was dialled.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
}

impl ConnectError {
    /// Whether retrying later can help: TCP and broken handshakes yes, a
    /// certificate that does not verify or a non-TLS peer no.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Tcp { .. } | Self::Handshake { .. })
    }
}

/// A tonic connector: TCP to the URI's authority, then TLS verified against
/// the identity's current trust bundle, presenting its current SVID.
#[derive(Clone)]
pub struct ControlConnector {
    tls: TlsConnector,
}

impl std::fmt::Debug for ControlConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlConnector").finish_non_exhaustive()
    }
}

impl ControlConnector {
    /// A connector for `identity` (its bundle verifies the control plane;
    /// its certificate, once there is one, is presented).
    pub fn new(identity: &Arc<WorkloadIdentity>) -> Result<Self, ::identity::TlsError> {
        let config = identity.control_client_config(ALPN)?;
        Ok(Self {
            tls: TlsConnector::from(config),
        })
    }

    async fn connect(
        tls: TlsConnector,
        uri: Uri,
    ) -> Result<TokioIo<TlsStream<TcpStream>>, ConnectError> {
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or_else(|| ConnectError::Address(uri.to_string()))?;
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(|| ConnectError::Address(uri.to_string()))?;
        let name =
            ServerName::try_from(host).map_err(|_| ConnectError::Address(authority.clone()))?;
        let tcp = TcpStream::connect(&authority)
            .await
            .map_err(|source| ConnectError::Tcp {
                addr: authority.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = tls.connect(name, tcp).await.map_err(|source| {
            // tokio-rustls reports rustls's verdicts as io::Error(InvalidData).
            let rustls_error = source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .cloned();
            match rustls_error {
                Some(source) => ConnectError::Tls {
                    addr: authority.clone(),
                    source,
                },
                None => ConnectError::Handshake {
                    addr: authority.clone(),
                    source,
                },
            }
        })?;
        Ok(TokioIo::new(stream))
    }
}

impl tower::Service<Uri> for ControlConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(Self::connect(self.tls.clone(), uri))
    }
}

/// The [`ConnectError`] somewhere in `e`'s source chain, if any.
pub fn connect_error_of<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ConnectError> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        next = e.source();
    }
    None
}

/// `https://host:port` for a control-plane address given as `host:port`,
/// `http://host:port` or `https://host:port` (the scheme only labels the
/// HTTP/2 requests; [`ControlConnector`] always does TLS).
pub fn tls_uri(server: &str) -> String {
    let bare = server
        .strip_prefix("http://")
        .or_else(|| server.strip_prefix("https://"))
        .unwrap_or(server);
    format!("https://{bare}")
}

/// Why a `Sign` call failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// No connection: see [`ConnectError`] (or tonic's own error).
    #[error("{0}")]
    Connect(String, #[source] Option<ConnectError>),
    /// The control plane answered with a gRPC error.
    #[error("the control plane refused to sign: {}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// No answer in time.
    #[error("the control plane did not answer the Sign call within {}s", SIGN_TIMEOUT.as_secs())]
    Timeout,
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Unauthenticated => "UNAUTHENTICATED",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Unavailable => "UNAVAILABLE",
        C::Internal => "INTERNAL",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        _ => "error",
    }
}

impl SignError {
    /// Whether trying again (later, or at another replica) can help.
    /// Refusals (bad or spent token, wrong identity, bad CSR, plaintext)
    /// and a control plane that is not trusted do not fix themselves.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect(_, Some(c)) => c.is_retryable(),
            Self::Connect(_, None) | Self::Timeout => true,
            Self::Status(s) => {
                // A broken connection surfaces as a Status too: look for
                // the connector's verdict first.
                if let Some(c) = std::error::Error::source(s).and_then(connect_error_of) {
                    return c.is_retryable();
                }
                matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Internal
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::ResourceExhausted
                        | tonic::Code::Aborted
                        | tonic::Code::Cancelled
                )
            }
        }
    }

    /// The gRPC status code, if the control plane answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// The connector's verdict, if the connection failed.
    pub fn connect_error(&self) -> Option<&ConnectError> {
        match self {
            Self::Connect(_, c) => c.as_ref(),
            Self::Status(s) => std::error::Error::source(s).and_then(connect_error_of),
            Self::Timeout => None,
        }
    }
}

/// Calls `Sign` at `server` over a fresh TLS connection (renewals are rare;
/// a fresh handshake also presents the newest certificate). `token`, if
/// given, goes as `authorization: Bearer <token>`.
pub async fn sign(
    connector: ControlConnector,
    server: &str,
    connect_timeout: Duration,
    request: SignRequest,
    token: Option<&str>,
) -> Result<SignResponse, SignError> {
    let call = async {
        let endpoint = tonic::transport::Endpoint::from_shared(tls_uri(server))
            .map_err(|e| {
                SignError::Connect(format!("control-plane address {server:?}: {e}"), None)
            })?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                let cause = connect_error_of(&e).map(|c| c.to_string());
                let owned = take_connect_error(&e);
                SignError::Connect(
                    cause.unwrap_or_else(|| format!("cannot connect to {server}: {e}")),
                    owned,
                )
            })?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| {
            SignError::Connect(
                format!("the connection to {server} is not usable: {e}"),
                None,
            )
        })?;
        let mut req = tonic::Request::new(request);
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| SignError::Status(tonic::Status::invalid_argument(
                    "the join token holds characters not allowed in a header; pass it exactly as `meshwork token create` printed it",
                )))?;
            req.metadata_mut().insert("authorization", value);
        }
        let codec = tonic_prost::ProstCodec::<SignRequest, SignResponse>::default();
        grpc.unary(req, PathAndQuery::from_static(SIGN_PATH), codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(SignError::Status)
    };
    tokio::time::timeout(SIGN_TIMEOUT, call)
        .await
        .map_err(|_| SignError::Timeout)?
}

/// A copy of the [`ConnectError`] in `e`'s chain (rustls errors and the
/// address are cloneable; io errors are re-made from kind and text).
fn take_connect_error(e: &(dyn std::error::Error + 'static)) -> Option<ConnectError> {
    connect_error_of(e).map(|c| match c {
        ConnectError::Address(a) => ConnectError::Address(a.clone()),
        ConnectError::Tls { addr, source } => ConnectError::Tls {
            addr: addr.clone(),
            source: source.clone(),
        },
        ConnectError::Tcp { addr, source } => ConnectError::Tcp {
            addr: addr.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        ConnectError::Handshake { addr, source } => ConnectError::Handshake {
            addr: addr.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
    })
}
