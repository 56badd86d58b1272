//! `meshwork why`: is a request from a given source allowed to reach a
//! service, and which AuthorizationPolicy decided?
//!
//! Contract: the answer comes from the proxy's own engine, not a second
//! implementation: the mesh (files, or the control plane's resources) is
//! translated for a workload of the destination service exactly as its
//! sidecar's inbound listener would be, converted with the proxy's
//! `config::xds` code, and the request is evaluated by `proxy::authz`.
//! Exit status: 0 allowed, 1 denied, 2 the question could not be answered
//! (unknown service or port, invalid mesh, unreachable control plane).
//!
//! Non-goals: routing decisions (which route or backend a request takes).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use api::resources::{Metadata, Workload, WorkloadSpec};
use api::{FieldPath, Mesh, Sourced};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::Value;

use crate::resources::{block_on, Control, ControlArgs};

/// Name of the workload `why` pretends to be the destination's sidecar for.
const PROBE: &str = "meshwork-why-probe";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Destination: SERVICE, SERVICE.NAMESPACE, optionally with :PORT (a
    /// service port; default the service's first port).
    #[arg(long, value_name = "SERVICE[.NS][:PORT]")]
    to: String,
    /// Source SPIFFE id (spiffe://TRUST-DOMAIN/ns/NS/sa/SA). Without it (and
    /// without --from-namespace) the request is plaintext: no identity.
    #[arg(long, value_name = "SPIFFE_ID", conflicts_with = "from_namespace")]
    from: Option<String>,
    /// Source namespace: the identity spiffe://TRUST-DOMAIN/ns/NS/sa/SA (the Mesh trust domain).
    #[arg(long, value_name = "NS")]
    from_namespace: Option<String>,
    /// Service account with --from-namespace.
    #[arg(
        long,
        value_name = "SA",
        default_value = "default",
        requires = "from_namespace"
    )]
    from_service_account: String,
    /// HTTP method.
    #[arg(long, short = 'X', default_value = "GET")]
    method: String,
    /// Request path (a query is allowed; paths match without it).
    #[arg(long, default_value = "/")]
    path: String,
    /// A request header, `name:value`; repeat for several.
    #[arg(short = 'H', long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// A gRPC call `package.Service/Method` (POST to /package.Service/Method
    /// with content-type application/grpc).
    #[arg(long, value_name = "SERVICE/METHOD", conflicts_with = "path")]
    grpc: Option<String>,
    /// Mesh YAML files or directories (default: ask the control plane).
    #[arg(long = "file", short = 'f')]
    files: Vec<PathBuf>,
    #[command(flatten)]
    control: ControlArgs,
}

/// Runs `meshwork why`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match explain(&args) {
        Ok((text, allowed)) => {
            print!("{text}");
            Ok(if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

/// The explanation and whether the request is allowed.
fn explain(args: &Args) -> anyhow::Result<(String, bool)> {
    let (mesh, from_files) = if args.files.is_empty() {
        (from_control(&args.control)?, false)
    } else {
        (from_files(&args.files)?, true)
    };
    let (svc_name, ns, port) = parse_to(&args.to)?;
    let svc = mesh.service(&ns, &svc_name).ok_or_else(|| {
        anyhow!("Service {ns}/{svc_name} not found; check the name and namespace (--to SERVICE.NAMESPACE)")
    })?;
    let ports = &svc.value.spec.ports;
    let sp = match port {
        Some(p) => svc.value.port(p).ok_or_else(|| {
            anyhow!(
                "Service {ns}/{svc_name} has no port {p} (its ports: {})",
                ports
                    .iter()
                    .map(|x| format!("{} ({})", x.port, x.app_protocol.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None => ports
            .first()
            .ok_or_else(|| anyhow!("Service {ns}/{svc_name} has no ports"))?,
    };
    let identity = match (&args.from, &args.from_namespace) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(fns)) => Some(format!(
            "spiffe://{}/ns/{fns}/sa/{}",
            mesh.trust_domain(),
            args.from_service_account
        )),
        (None, None) => None,
    };

    // The destination's inbound listener, as its sidecar gets it.
    let probe = Workload {
        api_version: api::resources::MESHWORK_V1ALPHA1.to_string(),
        kind: "Workload".to_string(),
        metadata: Metadata::new(&ns, PROBE),
        spec: WorkloadSpec {
            service: svc_name.clone(),
            address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            ports: Default::default(),
            weight: 1,
            labels: Default::default(),
            locality: None,
        },
    };
    let with_probe = api::with_workloads(&mesh, vec![Sourced::new("meshwork why", 1, probe)])
        .map_err(|e| anyhow!("{e}"))?;
    let ctx = api::ProxyContext {
        workload: Some((ns.clone(), PROBE.to_string())),
        detect_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let xds = api::translate(&with_probe, &ctx);
    let snapshot = proxy::config::xds::from_resources_with(
        &xds.version,
        xds.listeners,
        xds.routes,
        xds.clusters,
        xds.endpoints,
        &proxy::config::Env::offline(),
    )
    .map_err(|e| anyhow!("the proxy would refuse this config: {e}"))?;
    let inbound = snapshot
        .listeners
        .get(api::names::INBOUND)
        .ok_or_else(|| anyhow!("no inbound listener was translated for {ns}/{svc_name}"))?;

    let mut out = String::new();
    let source = identity
        .as_deref()
        .unwrap_or("plaintext (no peer identity)");
    let http = sp.app_protocol.is_http();
    let (decision, what) = if http {
        // With mTLS a caller with an identity arrives on the TLS chain.
        let tls = inbound.tls.as_ref().filter(|_| identity.is_some());
        let hcm = tls
            .and_then(|t| t.http.as_ref())
            .or(inbound.http.as_ref())
            .ok_or_else(|| anyhow!("the inbound listener has no HTTP chain"))?;
        let (method, path, mut headers) = request_parts(args)?;
        let authority = format!("{svc_name}.{ns}:{}", sp.port);
        if let Ok(v) = HeaderValue::from_str(&authority) {
            headers.insert(http::header::HOST, v);
        }
        let uri_path = path.split('?').next().unwrap_or("/");
        let input = proxy::authz::Input {
            peer_identity: identity.as_deref(),
            http: Some(proxy::authz::HttpInput {
                method: &method,
                path: uri_path,
                path_and_query: &path,
                authority: &authority,
                headers: &headers,
            }),
        };
        let d = hcm
            .authz
            .as_ref()
            .map(|a| a.evaluate(&input))
            .unwrap_or_else(allow_all);
        (
            d,
            format!(
                "{method} {path} to {svc_name}.{ns}:{} ({})",
                sp.port,
                sp.app_protocol.as_str()
            ),
        )
    } else {
        if ports.first().map(|p| p.port) != Some(sp.port) {
            return Err(anyhow!(
                "port {} of {ns}/{svc_name} is not served by the inbound listener's TCP chain (only the service's first port, {}, is); nothing reaches it through the sidecar",
                sp.port,
                ports.first().map_or(0, |p| p.port)
            ));
        }
        let tcp = inbound
            .tls
            .as_ref()
            .filter(|_| identity.is_some())
            .and_then(|t| t.tcp.as_ref())
            .or(inbound.tcp.as_ref())
            .ok_or_else(|| anyhow!("the inbound listener has no TCP chain"))?;
        let input = proxy::authz::Input {
            peer_identity: identity.as_deref(),
            http: None,
        };
        let d = tcp
            .authz
            .as_ref()
            .map(|a| a.evaluate(&input))
            .unwrap_or_else(allow_all);
        (
            d,
            format!("TCP connection to {svc_name}.{ns}:{} (tcp)", sp.port),
        )
    };

    let _ = writeln!(out, "request:  {what}");
    let _ = writeln!(out, "from:     {source}");
    let _ = writeln!(
        out,
        "decision: {}",
        if decision.allowed { "ALLOW" } else { "DENY" }
    );
    let applying: Vec<String> = mesh
        .authorization_policies_for(&ns, &svc_name)
        .map(|p| {
            format!(
                "{}/{} ({})",
                p.value.metadata.namespace,
                p.value.metadata.name,
                p.value.spec.action.as_str()
            )
        })
        .collect();
    match &decision.policy {
        Some(name) => {
            let verb = if decision.allowed {
                "allowed by"
            } else {
                "denied by"
            };
            let _ = writeln!(
                out,
                "policy:   {verb} {}",
                describe(&mesh, name, from_files)
            );
        }
        None if decision.allowed && applying.is_empty() => {
            let _ = writeln!(
                out,
                "policy:   none applies; the mesh default action is {}",
                mesh.default_action().as_str()
            );
        }
        None if decision.allowed => {
            let _ = writeln!(
                out,
                "policy:   no ALLOW policy applies and no DENY policy matches; the mesh default action is {}",
                mesh.default_action().as_str()
            );
        }
        None if decision.default_deny && !applying.iter().any(|p| p.ends_with("(ALLOW)")) => {
            let _ = writeln!(
                out,
                "policy:   none: no ALLOW policy applies and the mesh default action is deny (default deny)"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "policy:   none: ALLOW policies apply to {ns}/{svc_name} and none matches"
            );
        }
    }
    for a in &decision.audit {
        let _ = writeln!(
            out,
            "audit:    would be denied by {}",
            describe(&mesh, a, from_files)
        );
    }
    if applying.is_empty() {
        let _ = writeln!(out, "applying: (no AuthorizationPolicy)");
    } else {
        let _ = writeln!(out, "applying: {}", applying.join(", "));
    }
    Ok((out, decision.allowed))
}

fn allow_all() -> proxy::authz::Decision {
    proxy::authz::Decision {
        allowed: true,
        ..Default::default()
    }
}

/// `ns/name rules[i] (AuthorizationPolicy ns/name, file:line)` for an RBAC
/// policy name `ns/name/rules[i]`.
fn describe(mesh: &Mesh, rbac_name: &str, from_files: bool) -> String {
    let mut parts = rbac_name.splitn(3, '/');
    let (Some(ns), Some(name), Some(rule)) = (parts.next(), parts.next(), parts.next()) else {
        return rbac_name.to_string();
    };
    let index = rule
        .strip_prefix("rules[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|i| i.parse::<usize>().ok());
    let found = mesh
        .authorization_policies()
        .find(|p| p.value.metadata.namespace == ns && p.value.metadata.name == name);
    let mut s = format!("{ns}/{name} {rule}");
    if let Some(p) = found {
        let _ = write!(
            s,
            " (AuthorizationPolicy {ns}/{name}, {}",
            p.value.spec.action.as_str()
        );
        if from_files {
            let path = match index {
                Some(i) => FieldPath::root().key("spec").key("rules").index(i),
                None => FieldPath::root(),
            };
            let (line, _) = p.locate(&path);
            let _ = write!(s, ", {}:{line}", p.file);
        }
        s.push(')');
    }
    s
}

/// `SERVICE[.NS][:PORT]`.
fn parse_to(to: &str) -> anyhow::Result<(String, String, Option<u32>)> {
    let (host, port) = match to.rsplit_once(':') {
        Some((h, p)) => (
            h,
            Some(
                p.parse::<u32>()
                    .map_err(|_| anyhow!("--to {to:?}: {p:?} is not a port number"))?,
            ),
        ),
        None => (to, None),
    };
    let (svc, ns) = match host.split_once('.') {
        Some((s, rest)) => (s, rest.split('.').next().unwrap_or("default")),
        None => (host, api::resources::DEFAULT_NAMESPACE),
    };
    if svc.is_empty() || ns.is_empty() {
        return Err(anyhow!("--to {to:?}: expected SERVICE[.NAMESPACE][:PORT]"));
    }
    Ok((svc.to_string(), ns.to_string(), port))
}

fn request_parts(args: &Args) -> anyhow::Result<(Method, String, HeaderMap)> {
    let mut headers = HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("-H {h:?}: expected NAME:VALUE"))?;
        let name = HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| anyhow!("-H {h:?}: invalid header name"))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| anyhow!("-H {h:?}: invalid header value"))?;
        headers.append(name, value);
    }
    if let Some(g) = &args.grpc {
        let (service, method) = g
            .split_once('/')
            .filter(|(s, m)| !s.is_empty() && !m.is_empty())
            .ok_or_else(|| anyhow!("--grpc {g:?}: expected package.Service/Method"))?;
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        return Ok((Method::POST, format!("/{service}/{method}"), headers));
    }
    let method = Method::from_bytes(args.method.as_bytes())
        .map_err(|_| anyhow!("--method {:?} is not an HTTP method", args.method))?;
    if !args.path.starts_with('/') {
        return Err(anyhow!("--path {:?} must start with '/'", args.path));
    }
    Ok((method, args.path.clone(), headers))
}

/// Loads and validates files, and every YAML/JSON file of directories.
fn from_files(paths: &[PathBuf]) -> anyhow::Result<Mesh> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| is_mesh_file(f))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p.clone());
        }
    }
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    for f in &files {
        match api::load_file(f) {
            Ok(mut r) => resources.append(&mut r),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        return Err(anyhow!("{}", errors.join("\n")));
    }
    api::validate(resources).map_err(|e| anyhow!("{e}"))
}

fn is_mesh_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The control plane's resources, validated here like a file.
fn from_control(args: &ControlArgs) -> anyhow::Result<Mesh> {
    let list = block_on_value(Control::new(args))?;
    let items = list
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut text = String::new();
    for mut item in items {
        if let Some(m) = item.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let _ = writeln!(text, "---\n{item}");
    }
    let resources = api::load_str("control-plane", &text).map_err(|e| anyhow!("{e}"))?;
    api::validate(resources).map_err(|e| anyhow!("{e}"))
}

fn block_on_value(control: Control) -> anyhow::Result<Value> {
    let mut out = None;
    block_on(async {
        out = Some(control.get_json("/api/v1/resources").await?);
        Ok(ExitCode::SUCCESS)
    })?;
    out.ok_or_else(|| anyhow!("the control plane sent no resource list"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn destinations_parse() {
        assert_eq!(
            parse_to("reviews").unwrap(),
            ("reviews".into(), "default".into(), None)
        );
        assert_eq!(
            parse_to("reviews.prod:9080").unwrap(),
            ("reviews".into(), "prod".into(), Some(9080))
        );
        assert_eq!(
            parse_to("reviews.prod.svc.cluster.local").unwrap(),
            ("reviews".into(), "prod".into(), None)
        );
        assert!(parse_to("reviews:http").is_err());
        assert!(parse_to(".x").is_err());
    }
}
