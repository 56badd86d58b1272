//! mTLS on the data path: terminating it inbound, originating it outbound,
//! and naming why a handshake failed.
//!
//! Configs come ready-made from `config` (built once per config update from
//! the proxy's `identity::WorkloadIdentity`, which they read at handshake
//! time, so certificate rotation needs no rebuild). This module adds the
//! bounded handshakes and the failure reasons that label
//! `meshwork_tls_handshake_failures_total` (see `docs/mtls.md`).
//!
//! Non-goals: certificate management (the identity manager), TLS other than
//! mesh mTLS (no SNI routing, no TLS origination to non-mesh services).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::{AlertDescription, CertificateError};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// How long a peer gets to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed handshake: the reason label and the detail for the debug log.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed ({reason}): {detail}")]
pub struct HandshakeError {
    /// A `reason` label value (stable, documented in `docs/mtls.md`).
    pub reason: &'static str,
    /// What happened, in words.
    pub detail: String,
}

/// Terminates mTLS on `io` (whose first bytes may have been replayed).
pub async fn accept<IO>(
    config: Arc<rustls::ServerConfig>,
    io: IO,
) -> Result<server::TlsStream<IO>, HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(io)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(classify(&e)),
        Err(_) => Err(timeout()),
    }
}

/// Originates mTLS over `stream` to `addr` (the name is for logs only:
/// mesh mTLS checks the SPIFFE id, not the host name).
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    stream: TcpStream,
    limit: Duration,
) -> Result<client::TlsStream<TcpStream>, HandshakeError> {
    let name = ServerName::IpAddress(addr.ip().into());
    match tokio::time::timeout(limit, TlsConnector::from(config).connect(name, stream)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(classify(&e)),
        Err(_) => Err(timeout()),
    }
}

fn timeout() -> HandshakeError {
    HandshakeError {
        reason: "timeout",
        detail: "the peer did not complete the handshake in time".into(),
    }
}

/// Maps a handshake error onto a stable reason label.
pub fn classify(e: &io::Error) -> HandshakeError {
    let detail = e.to_string();
    let reason = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(err) => rustls_reason(err),
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof => "truncated",
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => "connection_reset",
            io::ErrorKind::InvalidData => "malformed_handshake",
            _ => "io_error",
        },
    };
    HandshakeError { reason, detail }
}

#[allow(deprecated)]
fn rustls_reason(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match e {
        E::NoCertificatesPresented => "no_client_certificate",
        E::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate_expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate_not_yet_valid"
            }
            // An issuer with the right name but another key: a certificate
            // from another CA that uses the same trust domain (two meshes
            // both on `cluster.local`) fails the chain's signature check.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_issuer",
            CertificateError::Other(other)
                if other
                    .0
                    .downcast_ref::<identity::PeerIdentityError>()
                    .is_some() =>
            {
                "identity_mismatch"
            }
            _ => "bad_certificate",
        },
        E::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => "peer_requires_certificate",
            AlertDescription::UnknownCA => "peer_rejected_certificate",
            AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate => "peer_rejected_certificate",
            AlertDescription::NoApplicationProtocol => "no_application_protocol",
            AlertDescription::ProtocolVersion => "protocol_version",
            _ => "peer_alert",
        },
        E::NoApplicationProtocol => "no_application_protocol",
        E::PeerIncompatible(_) => "protocol_version",
        E::InvalidMessage(_) | E::PeerMisbehaved(_) | E::InappropriateHandshakeMessage { .. } => {
            "malformed_handshake"
        }
        E::InappropriateMessage { .. } => "malformed_handshake",
        E::General(_) => "no_local_certificate",
        _ => "handshake_error",
    }
}

/// A stream that splits into independently owned read and write halves
/// (the TCP proxy copies both ways at once). Plain TCP splits without a
/// lock; TLS streams go through `tokio::io::split`.
pub trait IntoHalves: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    type Read: AsyncRead + Send + Unpin + 'static;
    type Write: AsyncWrite + Send + Unpin + 'static;
    fn into_halves(self) -> (Self::Read, Self::Write);
    /// Sets TCP_NODELAY on the socket underneath.
    fn nodelay(&self);
}

impl IntoHalves for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;
    fn into_halves(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }
    fn nodelay(&self) {
        let _ = self.set_nodelay(true);
    }
}

impl IntoHalves for client::TlsStream<TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
    fn nodelay(&self) {
        let _ = self.get_ref().0.set_nodelay(true);
    }
}

impl IntoHalves for server::TlsStream<crate::rewind::Rewind<TcpStream>> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
    fn nodelay(&self) {
        let _ = self.get_ref().0.get_ref().set_nodelay(true);
    }
}
