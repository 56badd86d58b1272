//! Protocol detection: is this connection HTTP/1.1, HTTP/2 prior knowledge
//! (h2c), or something else?
//!
//! Also recognises a TLS ClientHello's record header (`0x16 0x03`), as
//! Envoy's `tls_inspector` does, so a permissive mTLS listener can take the
//! TLS or the plaintext path.
//!
//! Mirrors Envoy's `http_inspector` listener filter: it reads at most the
//! request line, and gives up after a bound so that server-first protocols
//! (where the client waits for the server to speak) are not stalled: on
//! timeout the connection is treated as opaque TCP.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What the first bytes of a connection look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS handshake record (`0x16 0x03`): a ClientHello, as Envoy's
    /// `tls_inspector` sees it. Only listeners with TLS chains act on it;
    /// for the others it is opaque bytes.
    Tls,
    /// Bytes arrived that are not HTTP.
    Opaque,
    /// Nothing conclusive arrived before the deadline.
    Timeout,
    /// The peer closed (or failed) before sending anything.
    Closed,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not worth sniffing further; hyper will
/// answer it (431/400) if it is HTTP at all.
const MAX_SNIFF: usize = 8 * 1024;

/// Reads from `io` until the protocol is known or `timeout` passes. Returns
/// the bytes read, which the caller must replay (see `crate::rewind`).
pub async fn detect<T: AsyncRead + Unpin>(io: &mut T, timeout: Duration) -> (Protocol, Bytes) {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match classify(&buf) {
            Some(p) => return (p, buf.freeze()),
            None if buf.len() >= MAX_SNIFF => return (Protocol::Http1, buf.freeze()),
            None => {}
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => return (Protocol::Timeout, buf.freeze()),
            // A client that sends a few bytes and half-closes (`nc -N`)
            // is opaque TCP: its bytes must still be delivered.
            Ok(Ok(0)) if !buf.is_empty() => return (Protocol::Opaque, buf.freeze()),
            Ok(Ok(0)) | Ok(Err(_)) => return (Protocol::Closed, buf.freeze()),
            Ok(Ok(_)) => {}
        }
    }
}

/// `None` while the bytes so far could still be either.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    match buf {
        [] => return None,
        [0x16] => return None,
        [0x16, 0x03, ..] => return Some(Protocol::Tls),
        _ => {}
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    // HTTP/1.x request line: token SP request-target SP "HTTP/1." digit CRLF
    let method_end = match buf.iter().position(|&b| b == b' ') {
        Some(i) => i,
        None => {
            return if buf.iter().all(|&b| is_tchar(b)) && buf.len() < 32 {
                None
            } else {
                Some(Protocol::Opaque)
            }
        }
    };
    if method_end == 0 || !buf[..method_end].iter().all(|&b| is_tchar(b)) {
        return Some(Protocol::Opaque);
    }
    let rest = &buf[method_end + 1..];
    let line_end = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => i,
        None => {
            return if rest.iter().any(|&b| b < 0x20 && b != b'\t' && b != b'\r') {
                Some(Protocol::Opaque)
            } else {
                None
            }
        }
    };
    let line = rest[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&rest[..line_end]);
    match line.iter().rposition(|&b| b == b' ') {
        Some(i) if line[i + 1..].starts_with(b"HTTP/1.") && line.len() == i + 9 => {
            Some(Protocol::Http1)
        }
        _ => Some(Protocol::Opaque),
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET /x HTTP/1.0\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /very/long"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Protocol::Tls));
        assert_eq!(classify(b"\x16"), None);
        assert_eq!(classify(b"\x16\x00"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET / SMTP/1.0\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\0\0\0"), Some(Protocol::Opaque));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out() {
        let (mut a, _b) = tokio::io::duplex(64);
        let (p, bytes) = detect(&mut a, Duration::from_secs(1)).await;
        assert_eq!(p, Protocol::Timeout);
        assert!(bytes.is_empty());
    }
}
