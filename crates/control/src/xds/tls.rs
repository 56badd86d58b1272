//! TLS on the xDS port: the incoming connection stream tonic serves.
//!
//! Contract:
//! - Every accepted TCP connection is handshaken in a task of its own (so a
//!   slow or broken client never holds up the others), bounded by
//!   [`HANDSHAKE_TIMEOUT`]. A failed handshake (garbage, truncation,
//!   an untrusted client certificate, a plaintext client on a TLS-only
//!   port) is counted on the CA, logged at debug, and the connection is
//!   dropped.
//! - The server presents a certificate issued by the CA for
//!   `spiffe://<td>/ns/meshwork-system/sa/control` with the configured DNS/IP
//!   SANs, re-issued at half-life and whenever the published bundle changes
//!   (root rotation), and verifies client certificates (optional) against
//!   the current bundle.
//! - With plaintext allowed, the first byte decides: `0x16` (a TLS
//!   handshake record) is TLS, anything else plaintext HTTP/2.
//! - Each connection carries a [`PeerInfo`] (tonic's `Connected`), which
//!   tonic puts in every request's extensions: the Sign handler reads the
//!   transport and the client certificate from it.
//!
//! Non-goals: TLS 1.2, session resumption (disabled: renewals must present
//! a certificate that is verified again).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use identity::{TlsError, WorkloadIdentity};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use crate::ca::Authority;

/// Longest a client may take to send its first byte and finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (out of file descriptors, ...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections handshaken but not yet taken by the server.
const QUEUE: usize = 64;

/// How the xDS port is secured.
#[derive(Debug, Clone)]
pub struct XdsTls {
    /// The CA that issues the serving certificate and answers Sign.
    pub authority: Arc<Authority>,
    /// DNS names and IP addresses for the serving certificate's SANs.
    pub names: Vec<String>,
    /// Also accept plaintext HTTP/2 (`--plaintext-xds`).
    pub plaintext: bool,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("issuing the control plane's serving certificate: {0}; check the --tls-san values")]
    Issue(#[from] identity::IssueError),
    #[error("loading the serving certificate: {0}")]
    Tls(#[from] TlsError),
}

/// What the server knows about the peer of one connection (in every
/// request's extensions).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The connection is TLS.
    pub tls: bool,
    /// The client certificate chain, leaf first, if one was presented (the
    /// handshake verified it against the bundle).
    pub chain: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// One accepted connection, TLS or plaintext.
pub(crate) enum Conn {
    Plain(TcpStream, Option<SocketAddr>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(_, remote) => PeerInfo {
                remote: *remote,
                tls: false,
                chain: None,
            },
            Conn::Tls(_, info) => info.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// The server side of TLS: the serving identity and its acceptor.
pub(crate) struct ServerTls {
    identity: Arc<WorkloadIdentity>,
    acceptor: TlsAcceptor,
    authority: Arc<Authority>,
    names: Vec<String>,
    plaintext: bool,
}

impl ServerTls {
    /// Issues the first serving certificate and builds the acceptor.
    pub(crate) fn new(tls: &XdsTls) -> Result<ServerTls, TlsSetupError> {
        let names: Vec<&str> = tls.names.iter().map(String::as_str).collect();
        let (issued, bundle) = tls.authority.server_cert(&names)?;
        let identity =
            WorkloadIdentity::with_cert(&issued.svid.chain_pem(), &issued.key_pem, bundle)?;
        let config = identity.control_server_config(&[identity::ALPN_H2])?;
        Ok(ServerTls {
            identity,
            acceptor: TlsAcceptor::from(config),
            authority: tls.authority.clone(),
            names: tls.names.clone(),
            plaintext: tls.plaintext,
        })
    }

    /// Re-issues the serving certificate at half-life and on every bundle
    /// change, until `stop`.
    pub(crate) async fn keep_fresh(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut published = self.authority.published();
        published.borrow_and_update();
        loop {
            let renew_in = self
                .identity
                .certified_key()
                .and_then(|k| k.cert.first().cloned())
                .and_then(|leaf| identity::cert::validity_of(&leaf).ok())
                .map(|(nb, na)| {
                    let half = nb + na.duration_since(nb).unwrap_or_default() / 2;
                    half.duration_since(SystemTime::now()).unwrap_or_default()
                })
                .unwrap_or(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(renew_in) => {}
                r = published.changed() => if r.is_err() { return },
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
            published.borrow_and_update();
            self.reissue();
        }
    }

    fn reissue(&self) {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        match self.authority.server_cert(&names) {
            Ok((issued, bundle)) => {
                // Bundle first: clients with leaves of a new root must verify.
                self.identity.set_bundle(bundle);
                match self
                    .identity
                    .update(&issued.svid.chain_pem(), &issued.key_pem)
                {
                    Ok(()) => tracing::info!("xDS serving certificate re-issued"),
                    Err(e) => {
                        tracing::error!(error = %e, "installing the new xDS serving certificate failed; keeping the old one")
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "re-issuing the xDS serving certificate failed; retrying at the next change")
            }
        }
    }
}

/// Accepts connections on `listener` and hands them, handshaken, to the
/// returned channel; `tls: None` is plaintext only. Ends when the receiver
/// is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
) -> mpsc::Receiver<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "xDS: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Some(tls) = tls.clone() else {
                if tx
                    .send(Ok(Conn::Plain(stream, Some(remote))))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&tls, stream, remote)).await
                {
                    Ok(Ok(Some(conn))) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tls.authority.count_handshake_failure();
                        tracing::debug!(%remote, error = %e, "xDS: TLS handshake failed");
                    }
                    Err(_) => {
                        tls.authority.count_handshake_failure();
                        tracing::debug!(%remote, "xDS: TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

/// TLS record type of a handshake message: the first byte of a ClientHello.
const TLS_HANDSHAKE: u8 = 0x16;

async fn handshake(
    tls: &ServerTls,
    stream: TcpStream,
    remote: SocketAddr,
) -> io::Result<Option<Conn>> {
    if tls.plaintext {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 0 {
            // Closed before sending anything.
            return Ok(None);
        }
        if first[0] != TLS_HANDSHAKE {
            return Ok(Some(Conn::Plain(stream, Some(remote))));
        }
    }
    let s = tls.acceptor.accept(stream).await?;
    let chain = s
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
    let info = PeerInfo {
        remote: Some(remote),
        tls: true,
        chain,
    };
    Ok(Some(Conn::Tls(Box::new(s), info)))
}
