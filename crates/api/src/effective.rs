//! The effective TrafficPolicy of a Service port or of an HTTPRoute rule.
//!
//! Contract: policies merge section by section (`loadBalancer`, `timeouts`,
//! `retries`...), never field by field: the most specific policy that sets a
//! section supplies all of it. Most specific first: an HTTPRoute rule's own
//! Gateway API `timeouts` (these do merge field by field: `request` and
//! `backendRequest`, the latter as `perTry`, over the policy's `timeouts`),
//! a policy on the rule, on the route, on the parent Service's port, on the
//! Service. Every section says which policy supplied it ([`Supplier`]), which
//! is what `meshwork describe` shows.
//!
//! The merge is plain data in, plain data out: [`crate::Mesh`] finds the
//! candidates through its index ([`crate::Mesh::port_policy`],
//! [`crate::Mesh::route_policy`]); the CLI finds them in the resources the
//! control plane lists ([`service_port_policy`]).
//!
//! Non-goals: validation (see [`crate::validate`]; a merge of valid policies
//! is valid, except that `timeouts.perTry` may end up longer than a
//! `timeouts.request` from another level, which Envoy allows: the request
//! timeout wins).

use std::fmt;

use crate::mesh::{is_service_group, Key, PolicyTarget};
use crate::resources::{
    ConnectionPool, Fault, HealthCheck, HttpRouteTimeouts, LoadBalancer, LocalityLb,
    OutlierDetection, RateLimit, Retries, Timeouts, TrafficPolicy, TrafficPolicySpec,
};

/// Who supplied a section of an [`EffectivePolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Supplier {
    /// A TrafficPolicy `(namespace, name)`, with what it targets.
    Policy { policy: Key, target: PolicyTarget },
    /// The Gateway API `timeouts` of rule `rule` (index) of HTTPRoute
    /// `route`; the fields it does not set come from the policies.
    RouteRule { route: Key, rule: usize },
}

impl fmt::Display for Supplier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Supplier::Policy { policy, target } => {
                write!(f, "TrafficPolicy {}/{} (on {target})", policy.0, policy.1)
            }
            Supplier::RouteRule { route, rule } => {
                write!(f, "HTTPRoute {}/{} rule {rule} timeouts", route.0, route.1)
            }
        }
    }
}

/// A section and who supplied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supplied<T> {
    pub value: T,
    pub by: Supplier,
}

/// One policy that applies, in the merge order.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub spec: &'a TrafficPolicySpec,
    pub by: Supplier,
    /// Only the sections that callers enforce for this destination: a
    /// Service's `rateLimit` is enforced by the Service's own sidecars, so
    /// it does not apply to the callers' routes.
    pub callers_only: bool,
}

impl<'a> Candidate<'a> {
    /// `p`, which targets `target`.
    pub fn policy(p: &'a TrafficPolicy, target: PolicyTarget) -> Self {
        Candidate {
            spec: &p.spec,
            by: Supplier::Policy {
                policy: (p.metadata.namespace.clone(), p.metadata.name.clone()),
                target,
            },
            callers_only: false,
        }
    }
}

/// The sections that apply, each from the most specific policy setting it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub load_balancer: Option<Supplied<LoadBalancer>>,
    pub connection_pool: Option<Supplied<ConnectionPool>>,
    pub timeouts: Option<Supplied<Timeouts>>,
    pub retries: Option<Supplied<Retries>>,
    pub outlier_detection: Option<Supplied<OutlierDetection>>,
    pub health_check: Option<Supplied<HealthCheck>>,
    pub rate_limit: Option<Supplied<RateLimit>>,
    pub fault: Option<Supplied<Fault>>,
    pub locality: Option<Supplied<LocalityLb>>,
}

impl EffectivePolicy {
    /// Merges `candidates` (most specific first), section by section.
    pub fn merge<'a>(candidates: impl IntoIterator<Item = Candidate<'a>>) -> Self {
        let mut e = EffectivePolicy::default();
        fn take<T: Clone>(slot: &mut Option<Supplied<T>>, v: &Option<T>, by: &Supplier) {
            if slot.is_none() {
                if let Some(v) = v {
                    *slot = Some(Supplied {
                        value: v.clone(),
                        by: by.clone(),
                    });
                }
            }
        }
        for c in candidates {
            let s = c.spec;
            take(&mut e.load_balancer, &s.load_balancer, &c.by);
            take(&mut e.connection_pool, &s.connection_pool, &c.by);
            take(&mut e.timeouts, &s.timeouts, &c.by);
            take(&mut e.retries, &s.retries, &c.by);
            take(&mut e.outlier_detection, &s.outlier_detection, &c.by);
            take(&mut e.health_check, &s.health_check, &c.by);
            if !c.callers_only {
                take(&mut e.rate_limit, &s.rate_limit, &c.by);
            }
            take(&mut e.fault, &s.fault, &c.by);
            take(&mut e.locality, &s.locality, &c.by);
        }
        e
    }

    /// Puts an HTTPRoute rule's own `timeouts` over the merged ones:
    /// `request` as `request`, `backendRequest` as `perTry`.
    pub(crate) fn overlay_route_timeouts(
        &mut self,
        t: &HttpRouteTimeouts,
        route: Key,
        rule: usize,
    ) {
        if t.request.is_none() && t.backend_request.is_none() {
            return;
        }
        let mut v = self.timeouts.take().map(|s| s.value).unwrap_or_default();
        if let Some(r) = t.request {
            v.request = Some(r);
        }
        if let Some(b) = t.backend_request {
            v.per_try = Some(b);
        }
        self.timeouts = Some(Supplied {
            value: v,
            by: Supplier::RouteRule { route, rule },
        });
    }

    /// The sections that apply, in the order of the TrafficPolicy spec:
    /// (YAML name, value as JSON, who supplied it). What `meshwork describe`
    /// prints.
    pub fn sections(&self) -> Vec<(&'static str, serde_json::Value, &Supplier)> {
        fn one<'a, T: serde::Serialize>(
            out: &mut Vec<(&'static str, serde_json::Value, &'a Supplier)>,
            name: &'static str,
            s: &'a Option<Supplied<T>>,
        ) {
            if let Some(s) = s {
                let v = serde_json::to_value(&s.value).unwrap_or(serde_json::Value::Null);
                out.push((name, v, &s.by));
            }
        }
        let mut out = Vec::new();
        one(&mut out, "loadBalancer", &self.load_balancer);
        one(&mut out, "connectionPool", &self.connection_pool);
        one(&mut out, "timeouts", &self.timeouts);
        one(&mut out, "retries", &self.retries);
        one(&mut out, "outlierDetection", &self.outlier_detection);
        one(&mut out, "healthCheck", &self.health_check);
        one(&mut out, "rateLimit", &self.rate_limit);
        one(&mut out, "fault", &self.fault);
        one(&mut out, "locality", &self.locality);
        out
    }

    /// True when no section applies.
    pub fn is_empty(&self) -> bool {
        *self == EffectivePolicy::default()
    }

    /// Whether `locality` applies and is enabled.
    pub fn locality_enabled(&self) -> bool {
        self.locality
            .as_ref()
            .is_some_and(|l| l.value.enabled.unwrap_or(true))
    }
}

/// The effective policy of port `port` (by name) of Service
/// `namespace/service`, from a list of TrafficPolicies that need not be
/// validated or indexed (those that do not target the service are skipped;
/// of two for one target the first wins, as validation allows one).
pub fn service_port_policy<'a>(
    policies: impl IntoIterator<Item = &'a TrafficPolicy>,
    namespace: &str,
    service: &str,
    port: &str,
) -> EffectivePolicy {
    let mut on_port = None;
    let mut on_service = None;
    for p in policies {
        let t = &p.spec.target_ref;
        if p.metadata.namespace != namespace
            || t.kind != "Service"
            || t.name != service
            || !t.group.as_deref().is_none_or(is_service_group)
        {
            continue;
        }
        let svc: Key = (namespace.to_string(), service.to_string());
        match t.section_name.as_deref() {
            Some(s) if s == port => {
                on_port.get_or_insert_with(|| {
                    Candidate::policy(
                        p,
                        PolicyTarget::Service {
                            service: svc,
                            port: Some(s.to_string()),
                        },
                    )
                });
            }
            Some(_) => {}
            None => {
                on_service.get_or_insert_with(|| {
                    Candidate::policy(
                        p,
                        PolicyTarget::Service {
                            service: svc,
                            port: None,
                        },
                    )
                });
            }
        }
    }
    EffectivePolicy::merge(on_port.into_iter().chain(on_service))
}
