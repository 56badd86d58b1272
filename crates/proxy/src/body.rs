//! Body types shared by the HTTP path.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// Every request and response body the proxy handles, boxed once at the edge.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body error: hyper's, or the proxy's own (a route timeout mid-body).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}
