//! meshwork's data plane: a sidecar proxy configured only through Envoy xDS v3
//! resources.
//!
//! How it is built: [`app`] is the composition root (config source: a mesh
//! file or the [`xds_client`]; shared state, listeners, admin, drain). A
//! connection goes [`listener`] -> [`detect`] (bounded protocol sniffing)
//! -> [`http`] (authorize with [`authz`], rate limit with [`ratelimit`],
//! inject faults with [`fault`], route, balance, forward through
//! [`upstream`] pools with [`retry`] and the [`breaker`] limits) or `tcp`
//! (opaque byte copy). What requests are served from is a
//! [`runtime::Runtime`] derived from a [`config::model::Snapshot`], which
//! [`config::xds`] builds from xDS resources and swaps atomically on every
//! accepted update; what must outlive an update is carried over by cluster
//! name (circuit breaker counts, [`balance`] load statistics, endpoint
//! [`health`] from active checks and outlier detection) or kept by the proxy
//! (upstream pools, rate limit buckets). [`identity`] and `tls` provide the
//! workload certificate and mutual TLS. [`dns`] answers mesh Service names
//! with their VIPs (transparent mode) and forwards other names.
//!
//! Semantics are Envoy's for every xDS field accepted (`docs/xds.md`, with
//! the deliberate differences listed there); anything else is refused.
//!
//! Transparent capture: a `use_original_dst` listener dispatches each
//! redirected connection by its original destination (`listener`), to a
//! Service's VIP listener or to passthrough/blackhole (`tcp`).
//!
//! What it does not do (yet): tracing, delta xDS from the client; those
//! arrive with their issues on the same structure.

pub mod accesslog;
pub mod admin;
pub mod app;
pub mod authz;
pub mod balance;
mod body;
pub mod breaker;
pub mod cert_files;
pub mod config;
pub mod detect;
pub mod dns;
pub mod drain;
pub mod fault;
pub mod filters;
pub mod health;
pub mod http;
pub mod identity;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
pub mod retry;
mod rewind;
pub mod router;
pub mod runtime;
pub mod shared;
mod tcp;
mod tls;
pub mod upstream;
pub mod xds_client;

pub use app::{Options, Proxy};
