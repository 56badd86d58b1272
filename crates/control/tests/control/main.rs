//! Integration tests of the control plane (one test binary, one module per
//! area): the store and resource API, and the xDS server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod store_api;
mod xds;
