//! Integration tests of the control plane (one test binary, one module per
//! area): the store and resource API, the xDS server, and the CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ca;
mod store_api;
mod xds;
