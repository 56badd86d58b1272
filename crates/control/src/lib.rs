//! The meshwork control plane, as a library.
//!
//! Purpose: everything `meshwork control` runs, each part behind a small
//! seam so it can be tested alone:
//! - [`store`]: the resources operators declared (embedded redb, or an
//!   in-memory fake), versioned, validated as a whole before every commit;
//! - [`api`]: the HTTP/JSON resource API (`--api-addr`, default
//!   `127.0.0.1:15014`) the CLI talks to;
//! - `registry` and `xds`: live workloads and the xDS server feeding proxies
//!   (TLS, the `ROOTCA` trust bundle, and the CA's `Sign` method);
//! - [`ca`]: the certificate authority, join tokens and root rotation.
//!
//! The composition root (`app`) wires them together. Non-goals: depending
//! on the proxy crate; anything the translator (`api` crate) already does.

pub mod api;
pub mod app;
pub mod ca;
pub mod registry;
pub mod store;
pub mod xds;
