//! meshwork's data plane: a sidecar proxy configured only through Envoy xDS v3
//! resources.
//!
//! How it is built: [`app`] is the composition root (config source, shared
//! state, listeners, admin, drain). A connection goes [`listener`] ->
//! [`detect`] (bounded protocol sniffing) -> [`http`] (route, balance,
//! forward through [`upstream`] pools) or [`tcp`] (opaque byte copy). What
//! requests are served from is a [`runtime::Runtime`] derived from a
//! [`config::model::Snapshot`], which [`config::xds`] builds from xDS
//! resources and swaps atomically on every accepted update.
//!
//! What it deliberately does not do (yet): TLS and identities, retries,
//! circuit breaking, rate limits, an xDS client (standalone file mode only);
//! those arrive with their issues on the same structure.

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
