//! The benchmark's mesh as API documents: Services, static Workloads,
//! HTTPRoutes, and the one-resource changes whose propagation is timed.
//!
//! Contract: names and addresses are deterministic functions of indices, so
//! the driver and the simulated proxies (another process) agree on them
//! without talking. Service `i` is `svc-NNNN` with one HTTP port 8080; its
//! Workloads are `svc-NNNN-J` on `10.<1+i/250>.<i%250>.<1+J>`; simulated
//! proxies register on `10.200.<k/256>.<k%256>`; changed endpoints move to
//! `10.250.<n>.77`, an address nothing else uses. Non-goals: realistic
//! traffic policies (the mesh exercises translation size, not features).

use serde_json::{json, Value};

/// The service port every Service declares.
pub const PORT: u16 = 8080;

/// Name of service `i`.
pub fn service(i: usize) -> String {
    format!("svc-{i:04}")
}

/// Name of the HTTPRoute attached to service `i`.
pub fn route_name(i: usize) -> String {
    format!("route-{i:04}")
}

fn service_doc(i: usize) -> Value {
    json!({
        "apiVersion": "meshwork.dev/v1alpha1",
        "kind": "Service",
        "metadata": {"name": service(i)},
        "spec": {"ports": [{"name": "http", "port": PORT, "appProtocol": "http"}]},
    })
}

/// Static Workload `j` of service `i`, at `address` (or its usual one).
pub fn workload_doc(i: usize, j: usize, address: Option<&str>) -> Value {
    let usual = format!("10.{}.{}.{}", 1 + i / 250, i % 250, 1 + j);
    json!({
        "apiVersion": "meshwork.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": format!("{}-{j}", service(i))},
        "spec": {
            "service": service(i),
            "address": address.unwrap_or(&usual),
            "ports": {"http": PORT},
        },
    })
}

/// The HTTPRoute of service `i`: `/v2` gets a request header `x-bench:
/// <value>`, everything else goes straight to the service.
pub fn route_doc(i: usize, value: &str) -> Value {
    let backend = json!([{"name": service(i), "port": PORT}]);
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": route_name(i)},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": service(i), "port": PORT}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                    "filters": [{
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {"set": [{"name": "x-bench", "value": value}]},
                    }],
                    "backendRefs": backend,
                },
                {"backendRefs": backend},
            ],
        },
    })
}

/// The whole mesh as one JSON array (one apply, one transaction).
pub fn mesh_body(services: usize, per_service: usize, routes: usize) -> String {
    let mut docs = Vec::with_capacity(services * (per_service + 1) + routes);
    for i in 0..services {
        docs.push(service_doc(i));
    }
    for i in 0..services {
        for j in 0..per_service {
            docs.push(workload_doc(i, j, None));
        }
    }
    for i in 0..routes.min(services) {
        docs.push(route_doc(i, "initial"));
    }
    Value::Array(docs).to_string()
}

/// Address simulated proxy `k` registers its workload on.
pub fn sim_address(k: usize) -> String {
    format!("10.200.{}.{}", (k / 256) % 256, k % 256)
}

/// The services simulated proxy `k` calls: service 0 (a dependency every
/// proxy shares, the one the benchmark changes) and the `n - 1` services
/// after its own.
pub fn upstreams(k: usize, services: usize, n: usize) -> Vec<String> {
    let own = k % services;
    let mut out = vec![service(0)];
    for d in 1..n {
        let s = service((own + d) % services);
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}
