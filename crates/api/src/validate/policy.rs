//! TrafficPolicy checks: the target (a Service or one of its ports, an
//! HTTPRoute or one of its rules; one policy per exact target), then every
//! section, refusing out-of-range and contradictory settings with the
//! field path. The policy index of the [`Mesh`] is built here.

use std::collections::BTreeMap;

use super::{checks, label_of, Ck};
use crate::error::{Errors, FieldPath};
use crate::mesh::{is_service_group, list_ports, Key, Mesh, PolicyTarget};
use crate::resources::{
    ConnectionPool, Fault, HashConfig, HealthCheck, Kind, LbAlgorithm, LoadBalancer, LocalityLb,
    OutlierDetection, Percent, RateLimit, Retries, Timeouts, TrafficPolicy, TrafficPolicySpec,
    DEFAULT_BACKOFF_BASE, DEFAULT_BASE_EJECTION_TIME, DEFAULT_BUDGET_PERCENT, DEFAULT_HC_INTERVAL,
    DEFAULT_HC_TIMEOUT, DEFAULT_MAX_RING, MIN_RATE_INTERVAL,
};

/// `retries.on` conditions meshwork implements (Envoy's `retry_on` names).
pub(crate) const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
];
/// `retries.grpcStatuses` names (Envoy's `retry_on` names for gRPC).
pub(crate) const RETRY_GRPC: &[&str] = &[
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];
/// Group of Gateway API kinds.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

pub(super) fn check_policies(mesh: &mut Mesh, errors: &mut Errors) {
    let mut index: BTreeMap<PolicyTarget, Key> = BTreeMap::new();
    for (pk, p) in &mesh.traffic_policies {
        let tp: &TrafficPolicy = &p.value;
        let mut ck = Ck::new(p, label_of(Kind::TrafficPolicy, &tp.metadata), errors);
        let base = FieldPath::root().key("spec");
        let tpath = base.key("targetRef");
        if let Some(target) = resolve_target(mesh, &mut ck, tp, &tpath) {
            if let Some(other) = index.get(&target) {
                let place = mesh
                    .traffic_policies
                    .get(other)
                    .map(|o| o.place())
                    .unwrap_or_default();
                let (what, field) = match &target {
                    PolicyTarget::Service { port: None, .. } => ("Service", "name"),
                    PolicyTarget::Service { .. } => ("Service port", "sectionName"),
                    PolicyTarget::HttpRoute { rule: None, .. } => ("HTTPRoute", "name"),
                    PolicyTarget::HttpRoute { .. } => ("HTTPRoute rule", "sectionName"),
                };
                ck.err(
                    &tpath.key(field),
                    format!(
                        "{target} already has TrafficPolicy {}/{} ({place}); one TrafficPolicy per {what}: merge them",
                        other.0, other.1
                    ),
                );
            } else {
                index.insert(target, pk.clone());
            }
        }
        let on_route = tp.spec.target_ref.kind == "HTTPRoute";
        check_spec(&mut ck, &tp.spec, &base, on_route);
    }
    mesh.policy_index = index;
}

/// Resolves `targetRef`, reporting what does not resolve.
fn resolve_target<T>(
    mesh: &Mesh,
    ck: &mut Ck<'_, T>,
    tp: &TrafficPolicy,
    path: &FieldPath,
) -> Option<PolicyTarget> {
    let tr = &tp.spec.target_ref;
    let ns = &tp.metadata.namespace;
    let group = tr.group.as_deref();
    match tr.kind.as_str() {
        "Service" => {
            if group.is_some_and(|g| !is_service_group(g)) {
                ck.err(
                    &path.key("group"),
                    "must be \"\", \"core\" or \"meshwork.dev\" for a Service",
                );
                return None;
            }
            let Some(svc) = mesh.service(ns, &tr.name) else {
                ck.err(
                    &path.key("name"),
                    format!(
                        "Service {ns}/{} not found (a TrafficPolicy targets a Service of its own namespace)",
                        tr.name
                    ),
                );
                return None;
            };
            if let Some(section) = &tr.section_name {
                if svc.value.port_named(section).is_none() {
                    ck.err(
                        &path.key("sectionName"),
                        format!(
                            "Service {ns}/{} has no port named {section:?} (its ports: {})",
                            tr.name,
                            list_ports(&svc.value)
                        ),
                    );
                    return None;
                }
            }
            Some(PolicyTarget::Service {
                service: (ns.clone(), tr.name.clone()),
                port: tr.section_name.clone(),
            })
        }
        "HTTPRoute" => {
            if group.is_some_and(|g| g != GATEWAY_GROUP) {
                ck.err(
                    &path.key("group"),
                    format!("must be {GATEWAY_GROUP:?} for an HTTPRoute"),
                );
                return None;
            }
            let Some(route) = mesh.http_routes.get(&(ns.clone(), tr.name.clone())) else {
                ck.err(
                    &path.key("name"),
                    format!(
                        "HTTPRoute {ns}/{} not found (a TrafficPolicy targets an HTTPRoute of its own namespace)",
                        tr.name
                    ),
                );
                return None;
            };
            if let Some(section) = &tr.section_name {
                let rules = &route.value.spec.rules;
                if !rules.iter().any(|r| r.name.as_ref() == Some(section)) {
                    let names: Vec<&str> = rules.iter().filter_map(|r| r.name.as_deref()).collect();
                    ck.err(
                        &path.key("sectionName"),
                        format!(
                            "HTTPRoute {ns}/{} has no rule named {section:?} (its named rules: {})",
                            tr.name,
                            if names.is_empty() {
                                "none; give the rule a `name`".to_string()
                            } else {
                                names.join(", ")
                            }
                        ),
                    );
                    return None;
                }
            }
            Some(PolicyTarget::HttpRoute {
                route: (ns.clone(), tr.name.clone()),
                rule: tr.section_name.clone(),
            })
        }
        other => {
            ck.err(
                &path.key("kind"),
                format!(
                    "{other:?} is not supported: a TrafficPolicy targets a Service (optionally one port by sectionName) or an HTTPRoute (optionally one rule by sectionName)"
                ),
            );
            None
        }
    }
}

/// Refuses a section that only a Service target may set.
fn service_only<T>(ck: &mut Ck<'_, T>, path: &FieldPath, on_route: bool) -> bool {
    if on_route {
        ck.err(
            path,
            "not allowed on an HTTPRoute target: it applies to the destination Service as a whole; put it on a TrafficPolicy for the Service (targetRef kind Service)",
        );
        false
    } else {
        true
    }
}

fn check_spec<T>(ck: &mut Ck<'_, T>, s: &TrafficPolicySpec, base: &FieldPath, on_route: bool) {
    if let Some(lb) = &s.load_balancer {
        let p = base.key("loadBalancer");
        if service_only(ck, &p, on_route) {
            check_lb(ck, lb, &p);
        }
    }
    if let Some(cp) = &s.connection_pool {
        let p = base.key("connectionPool");
        if service_only(ck, &p, on_route) {
            check_pool(ck, cp, s.retries.as_ref(), &p);
        }
    }
    if let Some(t) = &s.timeouts {
        check_timeouts(ck, t, &base.key("timeouts"));
    }
    if let Some(r) = &s.retries {
        check_retries(ck, r, &base.key("retries"), on_route);
    }
    if let Some(o) = &s.outlier_detection {
        let p = base.key("outlierDetection");
        if service_only(ck, &p, on_route) {
            check_outlier(ck, o, &p);
        }
    }
    if let Some(h) = &s.health_check {
        let p = base.key("healthCheck");
        if service_only(ck, &p, on_route) {
            check_health(ck, h, &p);
        }
    }
    if let Some(r) = &s.rate_limit {
        check_rate_limit(ck, r, &base.key("rateLimit"), on_route);
    }
    if let Some(f) = &s.fault {
        check_fault(ck, f, &base.key("fault"));
    }
    if let Some(l) = &s.locality {
        let p = base.key("locality");
        if service_only(ck, &p, on_route) {
            check_locality(ck, l, &p);
        }
    }
}

fn nonzero<T>(ck: &mut Ck<'_, T>, path: &FieldPath, d: Option<crate::resources::GwDuration>) {
    if d.is_some_and(|d| d.get().is_zero()) {
        ck.err(path, "must be more than 0s");
    }
}

fn at_least_one<T>(ck: &mut Ck<'_, T>, path: &FieldPath, v: Option<u32>) {
    if v == Some(0) {
        ck.err(path, "must be at least 1");
    }
}

/// A percentage from 0 to 100 (`positive`: more than 0).
fn percent<T>(ck: &mut Ck<'_, T>, path: &FieldPath, p: Percent, positive: bool) -> bool {
    let v = p.as_f64();
    if p.0 < 0 || p.0 > 1_000_000 {
        ck.err(
            path,
            format!("{v} is out of range: expected a percentage from 0 to 100"),
        );
        false
    } else if positive && p.0 == 0 {
        ck.err(path, "must be more than 0");
        false
    } else {
        true
    }
}

/// A percentage Envoy takes as a whole number (0 to 100).
fn whole_percent<T>(ck: &mut Ck<'_, T>, path: &FieldPath, p: Percent) {
    if percent(ck, path, p, false) && p.0 % 10_000 != 0 {
        ck.err(
            path,
            format!("{} must be a whole number of percent", p.as_f64()),
        );
    }
}

fn check_pool<T>(
    ck: &mut Ck<'_, T>,
    cp: &ConnectionPool,
    retries: Option<&Retries>,
    p: &FieldPath,
) {
    nonzero(ck, &p.key("connectTimeout"), cp.connect_timeout);
    at_least_one(ck, &p.key("maxConnections"), cp.max_connections);
    at_least_one(ck, &p.key("maxRequests"), cp.max_requests);
    if cp.max_retries.is_some() && retries.is_some_and(|r| r.budget.is_some()) {
        ck.err(
            &p.key("maxRetries"),
            "is ignored when retries.budget is set (the budget caps retries in flight); remove one of them",
        );
    }
}

fn check_timeouts<T>(ck: &mut Ck<'_, T>, t: &Timeouts, p: &FieldPath) {
    if let (Some(req), Some(per)) = (t.request, t.per_try) {
        if !req.get().is_zero() && per.get() > req.get() {
            ck.err(
                &p.key("perTry"),
                format!(
                    "perTry {per} is longer than request {req}: the request timeout covers every try; make perTry shorter"
                ),
            );
        }
    }
}

fn check_retries<T>(ck: &mut Ck<'_, T>, r: &Retries, p: &FieldPath, on_route: bool) {
    ck.range(&p.key("attempts"), r.attempts.into(), 1, 10);
    for (i, c) in r.on.iter().enumerate() {
        if !RETRY_ON.contains(&c.as_str()) {
            let hint = if RETRY_GRPC.contains(&c.as_str()) {
                " (a gRPC status: put it in grpcStatuses)"
            } else if c == "retriable-status-codes" {
                " (list the codes in statusCodes instead)"
            } else {
                ""
            };
            ck.err(
                &p.key("on").index(i),
                format!(
                    "unknown retry condition {c:?}{hint}; valid: {}",
                    RETRY_ON.join(", ")
                ),
            );
        }
    }
    for (i, c) in r.status_codes.iter().enumerate() {
        ck.range(&p.key("statusCodes").index(i), (*c).into(), 100, 599);
    }
    for (i, c) in r.grpc_statuses.iter().enumerate() {
        if !RETRY_GRPC.contains(&c.as_str()) {
            ck.err(
                &p.key("grpcStatuses").index(i),
                format!(
                    "unknown gRPC status {c:?}; valid: {}",
                    RETRY_GRPC.join(", ")
                ),
            );
        }
    }
    if let Some(b) = &r.backoff {
        let bp = p.key("backoff");
        nonzero(ck, &bp.key("baseInterval"), b.base_interval);
        nonzero(ck, &bp.key("maxInterval"), b.max_interval);
        if let Some(max) = b.max_interval.filter(|m| !m.get().is_zero()) {
            let base = b
                .base_interval
                .map(|d| d.get())
                .unwrap_or(DEFAULT_BACKOFF_BASE);
            if max.get() < base {
                ck.err(
                    &bp.key("maxInterval"),
                    format!(
                        "maxInterval {max} is shorter than baseInterval {}{}",
                        crate::resources::GwDuration(base),
                        if b.base_interval.is_none() {
                            " (the default)"
                        } else {
                            ""
                        }
                    ),
                );
            }
        }
    }
    if let Some(b) = &r.budget {
        let bp = p.key("budget");
        if service_only(ck, &bp, on_route) {
            if let Some(pc) = b.percent {
                if pc.0 == 0 {
                    ck.err(
                        &bp.key("percent"),
                        format!(
                            "0 allows no retry while retries are on; use more than 0 (default {})",
                            DEFAULT_BUDGET_PERCENT
                        ),
                    );
                } else {
                    percent(ck, &bp.key("percent"), pc, true);
                }
            }
        }
    }
}

fn check_outlier<T>(ck: &mut Ck<'_, T>, o: &OutlierDetection, p: &FieldPath) {
    nonzero(ck, &p.key("interval"), o.interval);
    nonzero(ck, &p.key("baseEjectionTime"), o.base_ejection_time);
    nonzero(ck, &p.key("maxEjectionTime"), o.max_ejection_time);
    if let Some(max) = o.max_ejection_time.filter(|m| !m.get().is_zero()) {
        let base = o
            .base_ejection_time
            .map(|d| d.get())
            .unwrap_or(DEFAULT_BASE_EJECTION_TIME);
        if max.get() < base {
            ck.err(
                &p.key("maxEjectionTime"),
                format!(
                    "maxEjectionTime {max} is shorter than baseEjectionTime {}",
                    crate::resources::GwDuration(base)
                ),
            );
        }
    }
    if let Some(m) = o.max_ejection_percent {
        whole_percent(ck, &p.key("maxEjectionPercent"), m);
    }
    if let Some(sr) = &o.success_rate {
        if let Some(f) = sr.stdev_factor {
            let fp = p.key("successRate").key("stdevFactor");
            if f.0 <= 0 {
                ck.err(&fp, format!("{} must be more than 0", f.as_f64()));
            } else if f.0 > 1_000_000_000 {
                ck.err(&fp, format!("{} is too large (at most 100000)", f.as_f64()));
            }
        }
    }
    if let Some(fp) = &o.failure_percentage {
        if let Some(t) = fp.threshold {
            whole_percent(ck, &p.key("failurePercentage").key("threshold"), t);
        }
    }
    let off = o.consecutive5xx == Some(0)
        && o.consecutive_gateway_errors.unwrap_or(0) == 0
        && o.success_rate.is_none()
        && o.failure_percentage.is_none();
    if off {
        ck.err(
            p,
            "every detector is off (consecutive5xx is 0 and no other is set); remove outlierDetection to disable it",
        );
    }
}

fn check_health<T>(ck: &mut Ck<'_, T>, h: &HealthCheck, p: &FieldPath) {
    let kinds = usize::from(h.http.is_some())
        + usize::from(h.tcp.is_some())
        + usize::from(h.grpc.is_some());
    if kinds != 1 {
        ck.err(
            p,
            format!("set exactly one of http, tcp and grpc (found {kinds})"),
        );
    }
    nonzero(ck, &p.key("interval"), h.interval);
    nonzero(ck, &p.key("timeout"), h.timeout);
    let interval = h.interval.map(|d| d.get()).unwrap_or(DEFAULT_HC_INTERVAL);
    let timeout = h.timeout.map(|d| d.get()).unwrap_or(DEFAULT_HC_TIMEOUT);
    if !interval.is_zero() && !timeout.is_zero() && timeout >= interval {
        ck.err(
            &p.key("timeout"),
            format!(
                "timeout {} must be shorter than interval {}{}",
                crate::resources::GwDuration(timeout),
                crate::resources::GwDuration(interval),
                if h.interval.is_none() {
                    " (the default)"
                } else {
                    ""
                }
            ),
        );
    }
    at_least_one(ck, &p.key("healthyThreshold"), h.healthy_threshold);
    at_least_one(ck, &p.key("unhealthyThreshold"), h.unhealthy_threshold);
    if let Some(http) = &h.http {
        let hp = p.key("http");
        if !http.path.starts_with('/') {
            ck.err(
                &hp.key("path"),
                format!("path {:?} must start with '/'", http.path),
            );
        } else if http
            .path
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            ck.err(
                &hp.key("path"),
                format!(
                    "path {:?} must not contain spaces or control characters",
                    http.path
                ),
            );
        }
        if let Some(host) = &http.host {
            if host.is_empty() {
                ck.err(
                    &hp.key("host"),
                    "must not be empty (remove it for the default)",
                );
            }
            ck.check(&hp.key("host"), checks::header_value(host));
        }
        for (i, c) in http.expected_statuses.iter().enumerate() {
            ck.range(&hp.key("expectedStatuses").index(i), (*c).into(), 100, 599);
        }
    }
}

fn check_rate_limit<T>(ck: &mut Ck<'_, T>, r: &RateLimit, p: &FieldPath, on_route: bool) {
    at_least_one(ck, &p.key("requests"), Some(r.requests));
    if let Some(i) = r.interval {
        if i.get() < MIN_RATE_INTERVAL {
            ck.err(
                &p.key("interval"),
                format!("{i} is shorter than the smallest interval, 50ms"),
            );
        }
    }
    if let Some(b) = r.burst {
        if b < r.requests {
            ck.err(
                &p.key("burst"),
                format!(
                    "burst {b} is less than requests {}: the bucket must hold at least one refill",
                    r.requests
                ),
            );
        }
    }
    if on_route && r.per_source {
        ck.err(
            &p.key("perSource"),
            "not allowed on an HTTPRoute target: each caller's sidecar already keeps its own bucket; put perSource on a TrafficPolicy for the Service",
        );
    }
}

fn check_fault<T>(ck: &mut Ck<'_, T>, f: &Fault, p: &FieldPath) {
    if f.delay.is_none() && f.abort.is_none() {
        ck.err(p, "set delay, abort or both");
    }
    if let Some(d) = &f.delay {
        let dp = p.key("delay");
        if d.fixed_delay.get().is_zero() {
            ck.err(&dp.key("fixedDelay"), "must be more than 0s");
        }
        if let Some(pc) = d.percent {
            percent(ck, &dp.key("percent"), pc, false);
        }
    }
    if let Some(a) = &f.abort {
        let ap = p.key("abort");
        match (a.http_status, a.grpc_status) {
            (Some(_), Some(_)) | (None, None) => {
                ck.err(&ap, "set exactly one of httpStatus and grpcStatus");
            }
            _ => {}
        }
        if let Some(s) = a.http_status {
            ck.range(&ap.key("httpStatus"), s.into(), 200, 599);
        }
        if let Some(s) = a.grpc_status {
            ck.range(&ap.key("grpcStatus"), s.into(), 1, 16);
        }
        if let Some(pc) = a.percent {
            percent(ck, &ap.key("percent"), pc, false);
        }
    }
    for (i, h) in f.headers.iter().enumerate() {
        let hp = p.key("headers").index(i);
        ck.check(&hp.key("name"), checks::header_name(&h.name));
        ck.check(&hp.key("value"), checks::header_value(&h.value));
    }
}

fn check_locality<T>(ck: &mut Ck<'_, T>, l: &LocalityLb, p: &FieldPath) {
    for (i, f) in l.failover.iter().enumerate() {
        let fp = p.key("failover").index(i);
        if f.from.is_empty() {
            ck.err(&fp.key("from"), "must not be empty (a region)");
        }
        if f.to.is_empty() {
            ck.err(&fp.key("to"), "must not be empty (a region)");
        }
        if !f.from.is_empty() && f.from == f.to {
            ck.err(
                &fp.key("to"),
                format!("fails over from region {:?} to itself", f.from),
            );
        }
    }
}

fn check_lb<T>(ck: &mut Ck<'_, T>, lb: &LoadBalancer, p: &FieldPath) {
    let alg = lb.algorithm;
    if let Some(c) = lb.choice_count {
        if alg != LbAlgorithm::LeastRequest {
            ck.err(
                &p.key("choiceCount"),
                format!("only used by algorithm leastRequest, not {}", alg.as_str()),
            );
        }
        ck.range(&p.key("choiceCount"), c.into(), 2, 100);
    }
    if let Some(h) = &lb.hash {
        if !alg.is_hash() {
            ck.err(
                &p.key("hash"),
                format!(
                    "only used by algorithms ringHash and maglev, not {}",
                    alg.as_str()
                ),
            );
        }
        check_hash(ck, h, &p.key("hash"));
    }
    if let Some(r) = &lb.ring_hash {
        let rp = p.key("ringHash");
        if alg != LbAlgorithm::RingHash {
            ck.err(
                &rp,
                format!("only used by algorithm ringHash, not {}", alg.as_str()),
            );
        }
        let min = r
            .minimum_ring_size
            .unwrap_or(crate::resources::DEFAULT_MIN_RING);
        let max = r.maximum_ring_size.unwrap_or(DEFAULT_MAX_RING);
        if let Some(v) = r.minimum_ring_size {
            ck.range(&rp.key("minimumRingSize"), v, 1, DEFAULT_MAX_RING);
        }
        if let Some(v) = r.maximum_ring_size {
            ck.range(&rp.key("maximumRingSize"), v, 1, DEFAULT_MAX_RING);
        }
        if min > max {
            ck.err(
                &rp,
                format!("minimumRingSize {min} is larger than maximumRingSize {max}"),
            );
        }
    }
    if let Some(m) = &lb.maglev {
        let mp = p.key("maglev");
        if alg != LbAlgorithm::Maglev {
            ck.err(
                &mp,
                format!("only used by algorithm maglev, not {}", alg.as_str()),
            );
        }
        if let Some(t) = m.table_size {
            if t > 5_000_011 || !checks::is_prime(t) {
                ck.err(
                    &mp.key("tableSize"),
                    format!("{t} is not a prime number up to 5000011 (e.g. 65537)"),
                );
            }
        }
    }
}

fn check_hash<T>(ck: &mut Ck<'_, T>, h: &HashConfig, p: &FieldPath) {
    let set = usize::from(h.header.is_some())
        + usize::from(h.cookie.is_some())
        + usize::from(h.source_ip.is_some());
    if set != 1 {
        ck.err(p, "set exactly one of header, cookie and sourceIP");
    }
    if let Some(name) = &h.header {
        ck.check(&p.key("header"), checks::header_name(name));
    }
    if let Some(c) = &h.cookie {
        let cp = p.key("cookie");
        ck.check(&cp.key("name"), checks::header_name(&c.name).map_err(|_| {
            format!("cookie name {:?} must be a non-empty token (letters, digits, and !#$%&'*+-.^_`|~)", c.name)
        }));
        if let Some(path) = &c.path {
            ck.check(&cp.key("path"), checks::replacement_path(path, false));
        }
    }
    if h.source_ip == Some(false) {
        ck.err(
            &p.key("sourceIP"),
            "must be true when set (remove it to hash something else)",
        );
    }
}
