//! The proxy's configuration: runtime types and their construction from xDS.
//!
//! Purpose: `model` is the plain data the data path reads; `xds` turns Envoy
//! xDS v3 resources into a validated [`model::Snapshot`] or a NACK naming the
//! offending field. Contract: a `Snapshot` that left `xds` is consistent and is
//! trusted without further checks. Non-goals: no I/O here (fetching resources
//! is the xDS client's job, swapping snapshots the runtime's).

pub mod model;
pub mod xds;

pub use model::Snapshot;
pub use xds::{
    apply, apply_with, from_resources, from_resources_with, Env, NackError, NackReason,
    ResourceKind, Update,
};
