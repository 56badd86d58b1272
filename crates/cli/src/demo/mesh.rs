//! The demo's resources: what `meshwork demo` applies to its control plane.
//!
//! Contract: two files. [`MESH`] (or [`mesh_strict`] for the transparent
//! demo, where every hop, the traffic generator's included, is in the mesh)
//! holds the Mesh settings (mTLS), the
//! Services, the frontend's HTTPRoute and a TrafficPolicy; [`split`] the GRPCRoute that splits
//! `catalog` between `catalog-v1` and `catalog-v2`, which the demo writes
//! next to its run for the user to edit and `meshwork apply` again. Both are
//! applied together at start (one all-or-nothing request).
//!
//! Non-goals: Workloads. Every instance's sidecar registers its own.

/// Port of the `frontend` Service (HTTP).
pub(super) const FRONTEND_PORT: u16 = 8080;
/// Port of the `catalog` Services (gRPC).
pub(super) const CATALOG_PORT: u16 = 50051;
/// Port of the `inventory` Service (TCP).
pub(super) const INVENTORY_PORT: u16 = 7000;
/// Name of a catalog sidecar's TCP listener for `inventory`.
pub(super) const INVENTORY_LISTENER: &str = "outbound_tcp|7000|inventory.default";

/// Services, the frontend's HTTPRoute and a TrafficPolicy.
pub(super) const MESH: &str = r#"# meshwork demo: the mesh applied at start (the catalog split is in its own file).
# Mutual TLS between sidecars: each joined with a token and holds a
# certificate for its service account. Permissive: the demo's traffic
# generator, outside the mesh, still reaches the frontend in plaintext.
apiVersion: meshwork.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  mtls: {mode: permissive}
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: frontend}
spec:
  ports: [{name: http, port: 8080, appProtocol: http}]
---
# What clients call; the GRPCRoute `catalog` sends it to the versions.
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  ports: [{name: grpc, port: 50051, appProtocol: grpc}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: catalog-v1}
spec:
  ports: [{name: grpc, port: 50051, appProtocol: grpc}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2}
spec:
  ports: [{name: grpc, port: 50051, appProtocol: grpc}]
---
# Opaque TCP. Every catalog instance has a sidecar on this one machine, so
# each sidecar's local listener for it takes a free port (localPort: 0).
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: inventory}
spec:
  ports: [{name: stock, port: 7000, appProtocol: tcp, localPort: 0}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: frontend}
spec:
  parentRefs: [{kind: Service, name: frontend, port: 8080}]
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-meshwork-route, value: frontend}]}
    backendRefs: [{name: frontend, port: 8080}]
    timeouts: {request: 5s}
---
# Two catalog-v1 instances: take turns; retry a call that fails with
# UNAVAILABLE on the other instance; take an instance that keeps failing out
# of rotation for a while (see docs/resilience.md).
apiVersion: meshwork.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: catalog-v1}
spec:
  targetRef: {kind: Service, name: catalog-v1}
  loadBalancer: {algorithm: roundRobin}
  connectionPool: {connectTimeout: 1s, idleTimeout: 30s, maxRequests: 256}
  retries:
    attempts: 2
    on: [connect-failure, reset]
    grpcStatuses: [unavailable]
    backoff: {baseInterval: 25ms, maxInterval: 250ms}
    budget: {percent: 20, minConcurrency: 3}
  outlierDetection: {consecutive5xx: 5, interval: 5s, baseEjectionTime: 15s}
"#;

/// [`MESH`] with `mtls: strict`: a sidecar refuses plaintext, so every hop
/// is mutual TLS (the transparent demo: the traffic generator has a sidecar
/// too).
pub(super) fn mesh_strict() -> String {
    MESH.replace(
        "# certificate for its service account. Permissive: the demo's traffic\n\
         # generator, outside the mesh, still reaches the frontend in plaintext.\n",
        "# certificate for its service account. Strict: every hop is mutual TLS;\n\
         # a sidecar refuses plaintext (the traffic generator has a sidecar too).\n",
    )
    .replace("mtls: {mode: permissive}", "mtls: {mode: strict}")
}

/// The GRPCRoute splitting `catalog` `v1`/`v2` percent.
pub(super) fn split(v1: u32, v2: u32) -> String {
    format!(
        r#"# The catalog split. Edit the weights (they are relative: 50/50, 0/100, ...),
# then apply it to the demo's control plane:
#   meshwork apply -f THIS_FILE --control API_ADDR
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: catalog}}
spec:
  parentRefs: [{{kind: Service, name: catalog, port: 50051}}]
  rules:
  # A request with header x-catalog-version: v1 or v2 gets that version.
  - matches: [{{headers: [{{name: x-catalog-version, value: v1}}]}}]
    backendRefs: [{{name: catalog-v1, port: 50051}}]
  - matches: [{{headers: [{{name: x-catalog-version, value: v2}}]}}]
    backendRefs: [{{name: catalog-v2, port: 50051}}]
  # Everything else is split.
  - backendRefs:
    - {{name: catalog-v1, port: 50051, weight: {v1}}}
    - {{name: catalog-v2, port: 50051, weight: {v2}}}
"#
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The demo applies these at start: they must stay valid as the
    /// resource schemas move.
    #[test]
    fn the_demo_mesh_validates() {
        let mut all = api::load_str("mesh.yaml", MESH).unwrap();
        all.extend(api::load_str("catalog-split.yaml", &split(90, 10)).unwrap());
        let mesh = api::validate(all).unwrap();
        assert!(mesh.service("default", "inventory").is_some());

        let strict = mesh_strict();
        assert!(strict.contains("mtls: {mode: strict}") && strict.contains("Strict: every hop"));
        let mut all = api::load_str("mesh.yaml", &strict).unwrap();
        all.extend(api::load_str("catalog-split.yaml", &split(90, 10)).unwrap());
        api::validate(all).unwrap();
    }
}
