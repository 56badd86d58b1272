//! meshwork resources: loading, validation and translation to Envoy xDS v3.
//!
//! Purpose: the one place that knows what the mesh's YAML means. The control
//! plane, the standalone proxy and the CLI all go through the same three
//! steps:
//!
//! 1. [`load_str`] / [`load_file`]: YAML text to typed [`Resource`]s, each
//!    [`Sourced`] with its file and line;
//! 2. [`validate`]: every semantic check (Gateway API limits and rules,
//!    references, regexes, conflicts) into a [`Mesh`];
//! 3. [`translate`]: a [`Mesh`] plus a [`ProxyContext`] into the [`Xds`]
//!    resources of one proxy (contract in `docs/xds.md`); [`envoy_bootstrap`]
//!    inlines them into a static Envoy bootstrap.
//!
//! Errors ([`Errors`]) name the file, line, resource and field, and say what
//! was expected; all problems are reported at once.
//!
//! Non-goals: I/O beyond reading one file in [`load_file`], networking, and
//! Kubernetes status or server-side metadata.

mod effective;
mod envoy;
mod error;
mod load;
mod mesh;
pub mod resources;
mod source;
mod translate;
mod validate;
pub mod vip;

pub use effective::{service_port_policy, Candidate, EffectivePolicy, Supplied, Supplier};
pub use envoy::envoy_bootstrap;
pub use error::{Error, Errors, FieldPath, Seg};
pub use load::{load_file, load_str};
pub use mesh::{Key, Mesh, PolicyTarget};
pub use resources::{Kind, Resource};
pub use source::Sourced;
pub use translate::grpc_api_listener;
pub use translate::mtls;
pub use translate::{capture, CAPTURE_METADATA};
pub use translate::{
    locality_load_assignments, names, proxy_locality, translate, ProxyContext, Xds,
};
pub use validate::{validate, with_workloads};
