//! End-to-end tests of the proxy through real sockets: a standalone proxy
//! (the same code `meshwork proxy --config` runs) in front of real backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

mod authz;
mod basics;
mod capture;
mod dns;
mod edges;
mod envoy_mtls;
mod lb;
mod lifecycle;
mod mtls;
mod parity;
mod protocols;
mod resilience;
mod retries;
mod routing;
