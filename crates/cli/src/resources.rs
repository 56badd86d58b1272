//! `meshwork get`, `delete` and `describe`: resources through the control
//! plane's HTTP API, plus the small HTTP client `apply` shares.
//!
//! Contract: every command talks to `--control ADDR` (else
//! `$MESHWORK_CONTROL`, else `127.0.0.1:15014`) over plain HTTP/1.1, prints
//! what it got for people (a table, or `-o yaml|json` for programs) and
//! exits non-zero with the server's error and every detail line when the
//! request was refused. An unreachable control plane is reported with what
//! to do next.
//!
//! Non-goals: watching (`-w`), label selectors, TLS to the API (it listens
//! on localhost).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Default address of the control plane's HTTP API.
const DEFAULT_CONTROL: &str = "127.0.0.1:15014";
/// Environment variable naming the control plane.
const CONTROL_ENV: &str = "MESHWORK_CONTROL";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the control plane is.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Control plane HTTP API address (host:port); default $MESHWORK_CONTROL, else 127.0.0.1:15014.
    #[arg(long, value_name = "ADDR")]
    control: Option<String>,
    /// File holding the admin token that changes need; default $MESHWORK_ADMIN_TOKEN,
    /// else ./meshwork-data/admin.token when it exists.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Kind: mesh, service, workload, httproute, grpcroute, tcproute, trafficpolicy, authorizationpolicy (plural and short names work), or `all`.
    kind: String,
    /// One resource by name (default: list them).
    name: Option<String>,
    /// Namespace (a list shows every namespace unless given; one resource defaults to `default`).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Output: a table (default), `yaml` or `json`.
    #[arg(long, short = 'o', value_parser = ["yaml", "json", "table"])]
    output: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Kind of the resource (as for `get`).
    kind: String,
    /// Its name.
    name: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Only delete if the resource is still at this version (from `get -o yaml`).
    #[arg(long, value_name = "N")]
    resource_version: Option<u64>,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// What to describe: `service`.
    kind: String,
    /// Its name.
    name: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    #[command(flatten)]
    control: ControlArgs,
}

/// The control plane's HTTP API.
pub(crate) struct Control {
    addr: String,
    /// The admin token, or why the one asked for could not be read.
    admin: Result<Option<String>, String>,
}

/// A response, read to the end.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

impl Control {
    pub(crate) fn new(args: &ControlArgs) -> Control {
        let addr = args
            .control
            .clone()
            .or_else(|| std::env::var(CONTROL_ENV).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_CONTROL.to_string());
        // Accept a URL too, as people paste them.
        let addr = addr
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let admin = crate::ca_cmd::admin_token(args.admin_token_file.as_deref());
        Control { addr, admin }
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "cannot reach the control plane at {}: {e}\n  start it with `meshwork control`, or point at it with --control ADDR or {CONTROL_ENV}=ADDR",
            self.addr
        )
    }

    /// Sends one request; `body` is (content type, bytes).
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<Answer> {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(self.addr.as_str()),
        )
        .await
        .map_err(|_| self.unreachable("connect timed out"))?
        .map_err(|e| self.unreachable(e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(conn);
        let admin = self.admin.clone().map_err(|e| anyhow!(e))?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.as_str());
        if let Some(token) = admin {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = match body {
            Some((ct, b)) => {
                req = req.header(hyper::header::CONTENT_TYPE, ct);
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(bytes)).context("building the request")?;
        let exchange = async {
            let resp = sender.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Answer {
                status: parts.status,
                body,
            })
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(anyhow!(
                "the control plane at {} broke off the request: {e}",
                self.addr
            )),
            Err(_) => Err(anyhow!(
                "the control plane at {} did not answer within {}s",
                self.addr,
                REQUEST_TIMEOUT.as_secs()
            )),
        }
    }

    /// GET `path`, expecting JSON.
    pub(crate) async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None).await?.json()
    }
}

impl Answer {
    /// The JSON body of a successful answer, or the server's error.
    pub(crate) fn json(self) -> anyhow::Result<Value> {
        if !self.status.is_success() {
            return Err(self.error());
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| anyhow!("the control plane sent something that is not JSON: {e}"))
    }

    /// The server's error, with each detail on its own line.
    pub(crate) fn error(&self) -> anyhow::Error {
        match serde_json::from_slice::<control::api::ErrorBody>(&self.body) {
            Ok(e) => {
                let mut s = e.error;
                for d in e.details {
                    s.push_str("\n  ");
                    s.push_str(&d);
                }
                anyhow!(s)
            }
            Err(_) => anyhow!(
                "the control plane answered {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body).trim()
            ),
        }
    }
}

/// Runs `f` on a small runtime: these commands make a few requests.
pub(crate) fn block_on<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    f: F,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(f)
}

fn kind_arg(s: &str) -> anyhow::Result<api::Kind> {
    control::api::kind_from_arg(s).ok_or_else(|| {
        anyhow!(
            "unknown kind {s:?}; use one of: {}",
            api::Kind::ALL
                .map(|k| k.as_str().to_ascii_lowercase())
                .join(", ")
        )
    })
}

/// Names and namespaces are DNS labels; anything else would not be found
/// and could garble the request path.
fn check_name(what: &str, s: &str) -> anyhow::Result<()> {
    if !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Ok(())
    } else {
        Err(anyhow!(
            "{s:?} is not a valid {what}: use lower-case letters, digits, '-' and '.'"
        ))
    }
}

pub fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    for (what, v) in [("name", &args.name), ("namespace", &args.namespace)] {
        if let Some(v) = v {
            check_name(what, v)?;
        }
    }
    block_on(async move {
        let control = Control::new(&args.control);
        let all = args.kind.eq_ignore_ascii_case("all");
        let kind = if all {
            None
        } else {
            Some(kind_arg(&args.kind)?)
        };
        let output = args.output.as_deref().unwrap_or("table");
        if let Some(name) = &args.name {
            let Some(kind) = kind else {
                return Err(anyhow!(
                    "`get all` lists everything; name a kind to get one resource"
                ));
            };
            let ns = args
                .namespace
                .as_deref()
                .unwrap_or(api::resources::DEFAULT_NAMESPACE);
            let v = control
                .get_json(&format!("/api/v1/resources/{}/{ns}/{name}", kind.as_str()))
                .await?;
            match output {
                "yaml" => print!("{}", to_yaml(&v)?),
                "json" => println!("{}", serde_json::to_string_pretty(&v)?),
                _ => print!("{}", table(std::slice::from_ref(&v), Some(kind))),
            }
            return Ok(ExitCode::SUCCESS);
        }
        let mut path = String::from("/api/v1/resources");
        let mut sep = '?';
        if let Some(k) = kind {
            let _ = write!(path, "{sep}kind={}", k.as_str());
            sep = '&';
        }
        if let Some(ns) = &args.namespace {
            let _ = write!(path, "{sep}namespace={ns}");
        }
        let list = control.get_json(&path).await?;
        let items = list
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        match output {
            "yaml" => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        println!("---");
                    }
                    print!("{}", to_yaml(item)?);
                }
            }
            "json" => println!("{}", serde_json::to_string_pretty(&list)?),
            _ if items.is_empty() => {
                let what = kind.map_or("resources".to_string(), |k| format!("{k} resources"));
                match &args.namespace {
                    Some(ns) => eprintln!("no {what} in namespace {ns}"),
                    None => eprintln!("no {what}"),
                }
            }
            _ => print!("{}", table(&items, kind)),
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn to_yaml(v: &Value) -> anyhow::Result<String> {
    serde_yaml::to_string(v).context("formatting YAML")
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    check_name("name", &args.name)?;
    check_name("namespace", &args.namespace)?;
    block_on(async move {
        let control = Control::new(&args.control);
        let kind = kind_arg(&args.kind)?;
        let mut path = format!(
            "/api/v1/resources/{}/{}/{}",
            kind.as_str(),
            args.namespace,
            args.name
        );
        if let Some(v) = args.resource_version {
            let _ = write!(path, "?resourceVersion={v}");
        }
        control.call(Method::DELETE, &path, None).await?.json()?;
        println!("{kind} {}/{} deleted", args.namespace, args.name);
        Ok(ExitCode::SUCCESS)
    })
}

/// A text table: columns padded to their widest cell.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}   ");
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return "",
        }
    }
    cur.as_str().unwrap_or("")
}

fn num(v: &Value, key: &str) -> String {
    v.get(key).map(|x| x.to_string()).unwrap_or_default()
}

/// `name:port` of each entry of a reference list (parentRefs, backendRefs).
fn refs(list: Option<&Value>, with_weight: bool) -> Vec<String> {
    list.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|r| {
                    let mut t = s(r, &["name"]).to_string();
                    if let Some(ns) = r.get("namespace").and_then(Value::as_str) {
                        t = format!("{ns}/{t}");
                    }
                    if let Some(p) = r.get("port") {
                        let _ = write!(t, ":{p}");
                    } else if let Some(sn) = r.get("sectionName").and_then(Value::as_str) {
                        let _ = write!(t, ":{sn}");
                    }
                    if with_weight {
                        if let Some(w) = r.get("weight") {
                            let _ = write!(t, " ({w})");
                        }
                    }
                    t
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every backend of every rule of a route.
fn route_backends(r: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(rules) = r.pointer("/spec/rules").and_then(Value::as_array) {
        for rule in rules {
            for b in refs(rule.get("backendRefs"), true) {
                if !out.contains(&b) {
                    out.push(b);
                }
            }
        }
    }
    out
}

/// The kind-specific columns of a table.
fn columns(kind: Option<api::Kind>) -> &'static [&'static str] {
    use api::Kind::*;
    match kind {
        None => &[],
        Some(Service) => &["PORTS"],
        Some(Workload) => &["SERVICE", "ADDRESS"],
        Some(HttpRoute | GrpcRoute | TcpRoute) => &["PARENTS", "BACKENDS"],
        Some(TrafficPolicy) => &["TARGET"],
        Some(Mesh) => &["TRUST-DOMAIN", "MTLS", "DEFAULT-ACTION"],
        Some(AuthorizationPolicy) => &["TARGET", "ACTION", "RULES"],
    }
}

fn cells(item: &Value, kind: Option<api::Kind>) -> Vec<String> {
    use api::Kind::*;
    let spec = item.get("spec").cloned().unwrap_or(Value::Null);
    match kind {
        None => Vec::new(),
        Some(Service) => {
            let ports = spec
                .get("ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            let proto = p
                                .get("appProtocol")
                                .and_then(Value::as_str)
                                .unwrap_or("http");
                            format!("{}:{}/{proto}", s(p, &["name"]), num(p, "port"))
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![ports]
        }
        Some(Workload) => vec![
            s(&spec, &["service"]).to_string(),
            s(&spec, &["address"]).to_string(),
        ],
        Some(HttpRoute | GrpcRoute | TcpRoute) => vec![
            refs(spec.get("parentRefs"), false).join(","),
            route_backends(item).join(","),
        ],
        Some(TrafficPolicy) => {
            let mut t = format!(
                "{}/{}",
                s(&spec, &["targetRef", "kind"]),
                s(&spec, &["targetRef", "name"])
            );
            let section = s(&spec, &["targetRef", "sectionName"]);
            if !section.is_empty() {
                let _ = write!(t, "#{section}");
            }
            vec![t]
        }
        Some(Mesh) => {
            let or = |v: &str, d: &str| {
                if v.is_empty() {
                    d.to_string()
                } else {
                    v.to_string()
                }
            };
            vec![
                or(
                    s(&spec, &["trustDomain"]),
                    api::resources::DEFAULT_TRUST_DOMAIN,
                ),
                or(s(&spec, &["mtls", "mode"]), "permissive"),
                or(s(&spec, &["authorization", "defaultAction"]), "allow"),
            ]
        }
        Some(AuthorizationPolicy) => vec![
            if spec.get("targetRef").is_some() {
                format!(
                    "{}/{}",
                    s(&spec, &["targetRef", "kind"]),
                    s(&spec, &["targetRef", "name"])
                )
            } else {
                "(namespace)".to_string()
            },
            s(&spec, &["action"]).to_string(),
            spec.get("rules")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
                .to_string(),
        ],
    }
}

/// NAMESPACE NAME VERSION plus the kind's own columns; with no kind (`get
/// all`) a KIND column first.
fn table(items: &[Value], kind: Option<api::Kind>) -> String {
    let mut header = Vec::new();
    if kind.is_none() {
        header.push("KIND");
    }
    header.extend(["NAMESPACE", "NAME", "VERSION"]);
    header.extend(columns(kind));
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| {
            let mut row = Vec::new();
            if kind.is_none() {
                row.push(s(item, &["kind"]).to_string());
            }
            row.push(s(item, &["metadata", "namespace"]).to_string());
            row.push(s(item, &["metadata", "name"]).to_string());
            row.push(s(item, &["metadata", "resourceVersion"]).to_string());
            row.extend(cells(item, kind));
            row
        })
        .collect();
    render(&header, &rows)
}

pub fn describe(args: DescribeArgs) -> anyhow::Result<ExitCode> {
    check_name("name", &args.name)?;
    check_name("namespace", &args.namespace)?;
    block_on(async move {
        if kind_arg(&args.kind)? != api::Kind::Service {
            return Err(anyhow!(
                "describe knows services only; use `meshwork get {} NAME -o yaml` for the rest",
                args.kind
            ));
        }
        let control = Control::new(&args.control);
        let list = control.get_json("/api/v1/resources").await?;
        let items = list
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        // Proxies are optional: an older or store-only control plane has none.
        let proxies = match control.call(Method::GET, "/api/v1/proxies", None).await {
            Ok(a) if a.status.is_success() => serde_json::from_slice::<Value>(&a.body)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let mut details = Vec::new();
        for p in &proxies {
            if let Some(id) = p.get("id").and_then(Value::as_str) {
                if let Ok(d) = control.get_json(&format!("/api/v1/proxies/{id}")).await {
                    details.push(d);
                }
            }
        }
        match describe_service(&items, &proxies, &details, &args.namespace, &args.name) {
            Some(text) => {
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            None => Err(anyhow!(
                "Service {}/{} not found; list services with `meshwork get services`",
                args.namespace,
                args.name
            )),
        }
    })
}

/// Does reference `r` (parentRef / backendRef / targetRef) of a resource in
/// namespace `from` point at Service `ns/name`?
fn points_at(r: &Value, from: &str, ns: &str, name: &str) -> bool {
    let kind = r.get("kind").and_then(Value::as_str).unwrap_or("Service");
    let rns = r.get("namespace").and_then(Value::as_str).unwrap_or(from);
    kind == "Service" && rns == ns && s(r, &["name"]) == name
}

/// The text of `describe service`, or `None` when there is no such service.
fn describe_service(
    items: &[Value],
    proxies: &[Value],
    proxy_details: &[Value],
    ns: &str,
    name: &str,
) -> Option<String> {
    let is = |v: &Value, kind: &str| s(v, &["kind"]) == kind;
    let in_ns = |v: &Value| s(v, &["metadata", "namespace"]).to_string();
    let svc = items
        .iter()
        .find(|v| is(v, "Service") && in_ns(v) == ns && s(v, &["metadata", "name"]) == name)?;
    let mut out = String::new();
    let _ = writeln!(out, "Service:          {ns}/{name}");
    let _ = writeln!(
        out,
        "Version:          {}",
        s(svc, &["metadata", "resourceVersion"])
    );
    let sa = svc
        .pointer("/spec/serviceAccount")
        .and_then(Value::as_str)
        .unwrap_or(name);
    let _ = writeln!(out, "Service account:  {sa}");
    let _ = writeln!(out, "VIP:              {}", vip_text(items, ns, name));
    let _ = writeln!(out, "Ports:");
    let ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for p in &ports {
        let proto = p
            .get("appProtocol")
            .and_then(Value::as_str)
            .unwrap_or("http");
        let target = p.get("targetPort").unwrap_or(&p["port"]);
        let _ = writeln!(
            out,
            "  {:<12} {}/{proto} -> workload port {target}",
            s(p, &["name"]),
            num(p, "port")
        );
    }

    let label = |v: &Value| {
        format!(
            "{} {}/{}",
            s(v, &["kind"]),
            in_ns(v),
            s(v, &["metadata", "name"])
        )
    };
    let routes: Vec<&Value> = items
        .iter()
        .filter(|v| matches!(s(v, &["kind"]), "HTTPRoute" | "GRPCRoute" | "TCPRoute"))
        .collect();
    let _ = writeln!(out, "Routes attached:");
    let mut any = false;
    for r in &routes {
        let from = in_ns(r);
        let parents = r
            .pointer("/spec/parentRefs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let on: Vec<String> = parents
            .iter()
            .filter(|p| points_at(p, &from, ns, name))
            .map(|p| {
                p.get("port")
                    .map(|x| format!("port {x}"))
                    .or_else(|| {
                        p.get("sectionName")
                            .and_then(Value::as_str)
                            .map(|x| format!("port {x}"))
                    })
                    .unwrap_or_else(|| "all ports".into())
            })
            .collect();
        if on.is_empty() {
            continue;
        }
        any = true;
        let rules = r
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let _ = writeln!(
            out,
            "  {} ({}): {rules} rule{}, backends {}",
            label(r),
            on.join(", "),
            if rules == 1 { "" } else { "s" },
            route_backends(r).join(", ")
        );
    }
    if !any {
        let _ = writeln!(out, "  (none: requests go to the service's own endpoints)");
    }
    let _ = writeln!(out, "Routed to by:");
    let mut any = false;
    for r in &routes {
        let from = in_ns(r);
        let sends = r
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .is_some_and(|rules| {
                rules.iter().any(|rule| {
                    rule.get("backendRefs")
                        .and_then(Value::as_array)
                        .is_some_and(|bs| bs.iter().any(|b| points_at(b, &from, ns, name)))
                })
            });
        if sends {
            any = true;
            let _ = writeln!(out, "  {}", label(r));
        }
    }
    if !any {
        let _ = writeln!(out, "  (no route)");
    }

    let _ = writeln!(out, "Policy:");
    let policies: Vec<api::resources::TrafficPolicy> = items
        .iter()
        .filter(|v| is(v, "TrafficPolicy"))
        .filter_map(traffic_policy)
        .collect();
    // Policies on the Service or its ports, then on the HTTPRoutes attached
    // to it (which apply to those routes' requests only).
    let mut any = false;
    for p in &policies {
        let t = &p.spec.target_ref;
        if p.metadata.namespace != ns {
            continue;
        }
        let on = match (t.kind.as_str(), &t.section_name) {
            ("Service", None) if t.name == name => "the service".to_string(),
            ("Service", Some(port)) if t.name == name => format!("port {port}"),
            ("HTTPRoute", section) if attached_route(&routes, ns, &t.name, ns, name) => {
                match section {
                    Some(rule) => format!("HTTPRoute {ns}/{} rule {rule}", t.name),
                    None => format!("HTTPRoute {ns}/{}", t.name),
                }
            }
            _ => continue,
        };
        any = true;
        let _ = writeln!(out, "  TrafficPolicy {ns}/{} (on {on})", p.metadata.name);
    }
    if !any {
        let _ = writeln!(out, "  (none: mesh defaults)");
    }
    let _ = writeln!(
        out,
        "Effective policy by port (most specific policy per section):"
    );
    for p in &ports {
        let port_name = s(p, &["name"]);
        let eff = api::service_port_policy(&policies, ns, name, port_name);
        let _ = writeln!(out, "  {port_name} ({}):", num(p, "port"));
        let sections = eff.sections();
        if sections.is_empty() {
            let _ = writeln!(out, "    (mesh defaults)");
        }
        for (section, value, by) in sections {
            let _ = writeln!(out, "    {section:<17} {value}");
            let _ = writeln!(out, "    {:<17} from {by}", "");
        }
    }

    let _ = writeln!(out, "Authorization:");
    let default_action = items
        .iter()
        .find(|v| is(v, "Mesh"))
        .map(|m| s(m, &["spec", "authorization", "defaultAction"]))
        .filter(|a| !a.is_empty())
        .unwrap_or("allow");
    let _ = writeln!(out, "  mesh default action: {default_action}");
    let mut any = false;
    for p in items.iter().filter(|v| {
        is(v, "AuthorizationPolicy")
            && in_ns(v) == ns
            && v.pointer("/spec/targetRef")
                .is_none_or(|t| points_at(t, ns, ns, name))
    }) {
        any = true;
        let rules = p
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let scope = if p.pointer("/spec/targetRef").is_some() {
            "this service"
        } else {
            "every service of the namespace"
        };
        let _ = writeln!(
            out,
            "  {} ({}, {rules} rule{}, targets {scope})",
            label(p),
            s(p, &["spec", "action"]),
            if rules == 1 { "" } else { "s" },
        );
    }
    if !any {
        let _ = writeln!(out, "  (no AuthorizationPolicy applies)");
    }

    let _ = writeln!(out, "Endpoints:");
    let mut any = false;
    for w in items
        .iter()
        .filter(|v| is(v, "Workload") && in_ns(v) == ns && s(v, &["spec", "service"]) == name)
    {
        any = true;
        let spec = &w["spec"];
        let mut line = format!(
            "  static      {:<24} {}",
            s(w, &["metadata", "name"]),
            s(spec, &["address"])
        );
        if let Some(ps) = spec.get("ports").and_then(Value::as_object) {
            let ps: Vec<String> = ps.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            let _ = write!(line, "  ports {}", ps.join(","));
        }
        let zone = s(spec, &["locality", "zone"]);
        if !zone.is_empty() {
            let _ = write!(line, "  zone {zone}");
        }
        let _ = writeln!(out, "{line}");
    }
    let fq = format!("{name}.{ns}");
    for p in proxies {
        let service = s(p, &["service"]);
        let same_ns = p
            .get("namespace")
            .and_then(Value::as_str)
            .is_none_or(|x| x == ns);
        if (service == name && same_ns) || service == fq {
            any = true;
            let _ = writeln!(
                out,
                "  registered  {:<24} {}",
                s(p, &["id"]),
                p.get("address")
                    .map(|a| a.as_str().map_or(a.to_string(), str::to_string))
                    .unwrap_or_default()
            );
        }
    }
    if !any {
        let _ = writeln!(
            out,
            "  (none: no static Workload and no connected proxy of this service)"
        );
    }

    // Callers: proxies holding one of this service's outbound clusters.
    let clusters: Vec<String> = ports
        .iter()
        .map(|p| format!("outbound|{}||{fq}", num(p, "port")))
        .collect();
    let callers: Vec<&str> = proxy_details
        .iter()
        .filter(|d| holds_any(d, &clusters))
        .map(|d| s(d, &["id"]))
        .collect();
    let _ = writeln!(out, "Called by (proxies holding its clusters):");
    if callers.is_empty() {
        let _ = writeln!(out, "  (none connected)");
    }
    for c in callers {
        let _ = writeln!(out, "  {c}");
    }
    Some(out)
}

/// A TrafficPolicy as the control plane lists it (`None` when its spec does
/// not read as one, e.g. from a newer control plane).
fn traffic_policy(v: &Value) -> Option<api::resources::TrafficPolicy> {
    let spec = serde_json::from_value(v.get("spec")?.clone()).ok()?;
    Some(api::resources::TrafficPolicy {
        api_version: s(v, &["apiVersion"]).to_string(),
        kind: "TrafficPolicy".to_string(),
        metadata: api::resources::Metadata::new(
            s(v, &["metadata", "namespace"]),
            s(v, &["metadata", "name"]),
        ),
        spec,
    })
}

/// The Service's VIP as every proxy and the translator compute it
/// (`api::vip`: from all the Services of the mesh), and where it comes from.
fn vip_text(items: &[Value], ns: &str, name: &str) -> String {
    let services: Vec<(api::Key, Option<std::net::Ipv4Addr>)> = items
        .iter()
        .filter(|v| s(v, &["kind"]) == "Service")
        .map(|v| {
            let key = (
                s(v, &["metadata", "namespace"]).to_string(),
                s(v, &["metadata", "name"]).to_string(),
            );
            let vip = v
                .pointer("/spec/vip")
                .and_then(Value::as_str)
                .and_then(|a| a.parse().ok());
            (key, vip)
        })
        .collect();
    let key = (ns.to_string(), name.to_string());
    let pinned = services
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| *v);
    let table = api::vip::allocate(services.iter().map(|(k, v)| (k, *v)));
    match table.get(&key) {
        Some(ip) if pinned == Some(*ip) => format!("{ip} (spec.vip)"),
        Some(ip) => format!("{ip} (allocated; pin it with spec.vip)"),
        None => "none (all 65534 VIPs of 240.240.0.0/16 are taken)".to_string(),
    }
}

/// Whether HTTPRoute `rns/route` is among `routes` and attaches to Service
/// `ns/name`.
fn attached_route(routes: &[&Value], rns: &str, route: &str, ns: &str, name: &str) -> bool {
    routes.iter().any(|r| {
        s(r, &["kind"]) == "HTTPRoute"
            && s(r, &["metadata", "namespace"]) == rns
            && s(r, &["metadata", "name"]) == route
            && r.pointer("/spec/parentRefs")
                .and_then(Value::as_array)
                .is_some_and(|ps| ps.iter().any(|p| points_at(p, rns, ns, name)))
    })
}

/// Whether a proxy's config (as `GET /api/v1/proxies/{id}` shows it) names
/// any of `names` among its resources.
fn holds_any(detail: &Value, names: &[String]) -> bool {
    match detail {
        Value::String(x) => names.iter().any(|n| n == x),
        Value::Array(a) => a.iter().any(|v| holds_any(v, names)),
        // The proxy's own id could look like anything: skip it.
        Value::Object(o) => o.iter().any(|(k, v)| k != "id" && holds_any(v, names)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn items() -> Vec<Value> {
        vec![
            json!({"kind": "Service", "metadata": {"name": "reviews", "namespace": "default", "resourceVersion": "3"},
                   "spec": {"ports": [{"name": "http", "port": 80}, {"name": "grpc", "port": 9090, "appProtocol": "grpc"}]}}),
            json!({"kind": "HTTPRoute", "metadata": {"name": "split", "namespace": "default", "resourceVersion": "4"},
                   "spec": {"parentRefs": [{"kind": "Service", "name": "reviews", "port": 80}],
                            "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 80, "weight": 90}]}]}}),
            json!({"kind": "HTTPRoute", "metadata": {"name": "front", "namespace": "web", "resourceVersion": "5"},
                   "spec": {"parentRefs": [{"kind": "Service", "name": "frontend", "port": 80}],
                            "rules": [{"backendRefs": [{"name": "reviews", "namespace": "default", "port": 80}]}]}}),
            json!({"kind": "Workload", "metadata": {"name": "reviews-0", "namespace": "default", "resourceVersion": "3"},
                   "spec": {"service": "reviews", "address": "10.0.0.7", "locality": {"zone": "z1"}}}),
            json!({"kind": "TrafficPolicy", "metadata": {"name": "p", "namespace": "default", "resourceVersion": "6"},
                   "spec": {"targetRef": {"kind": "Service", "name": "reviews"}, "loadBalancer": {"algorithm": "roundRobin"},
                            "retries": {"attempts": 2}, "rateLimit": {"requests": 100}}}),
            json!({"kind": "TrafficPolicy", "metadata": {"name": "grpc-only", "namespace": "default", "resourceVersion": "10"},
                   "spec": {"targetRef": {"kind": "Service", "name": "reviews", "sectionName": "grpc"},
                            "retries": {"attempts": 4, "grpcStatuses": ["unavailable"]}}}),
            json!({"kind": "TrafficPolicy", "metadata": {"name": "split-limits", "namespace": "default", "resourceVersion": "11"},
                   "spec": {"targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "split"},
                            "fault": {"abort": {"httpStatus": 503, "percent": 1}}}}),
            json!({"kind": "TrafficPolicy", "metadata": {"name": "elsewhere", "namespace": "default", "resourceVersion": "12"},
                   "spec": {"targetRef": {"kind": "Service", "name": "ratings"}, "retries": {"attempts": 9}}}),
            json!({"kind": "AuthorizationPolicy", "metadata": {"name": "readers", "namespace": "default", "resourceVersion": "7"},
                   "spec": {"targetRef": {"kind": "Service", "name": "reviews"}, "action": "ALLOW", "rules": [{"to": [{"methods": ["GET"]}]}]}}),
            json!({"kind": "AuthorizationPolicy", "metadata": {"name": "ns-wide", "namespace": "default", "resourceVersion": "8"},
                   "spec": {"action": "DENY", "rules": [{"to": [{"paths": ["/admin*"]}]}]}}),
            json!({"kind": "AuthorizationPolicy", "metadata": {"name": "other", "namespace": "default", "resourceVersion": "9"},
                   "spec": {"targetRef": {"kind": "Service", "name": "ratings"}, "action": "DENY"}}),
        ]
    }

    #[test]
    fn tables_have_the_kind_columns() {
        let t = table(&items()[..1], Some(api::Kind::Service));
        assert_eq!(
            t,
            "NAMESPACE   NAME      VERSION   PORTS\ndefault     reviews   3         http:80/http,grpc:9090/grpc\n"
        );
        let t = table(&items()[1..2], Some(api::Kind::HttpRoute));
        assert!(
            t.contains("reviews:80") && t.contains("reviews-v1:80 (90)"),
            "{t}"
        );
        let t = table(&items(), None);
        assert!(t.starts_with("KIND "), "{t}");
    }

    #[test]
    fn describe_gathers_routes_policy_endpoints_and_callers() {
        let proxies =
            vec![json!({"id": "reviews-1.default", "service": "reviews", "address": "10.0.0.8"})];
        let details = vec![
            json!({"id": "frontend-0.web", "types": {"clusters": {"resources": [{"name": "outbound|80||reviews.default", "version": "1"}]}}}),
        ];
        let text = describe_service(&items(), &proxies, &details, "default", "reviews").unwrap();
        for want in [
            "Service:          default/reviews",
            "HTTPRoute default/split (port 80): 1 rule, backends reviews-v1:80 (90)",
            "Routed to by:\n  HTTPRoute web/front",
            "TrafficPolicy default/p",
            "static      reviews-0",
            "zone z1",
            "registered  reviews-1.default",
            "Called by (proxies holding its clusters):\n  frontend-0.web",
            "AuthorizationPolicy default/readers (ALLOW, 1 rule, targets this service)",
            "AuthorizationPolicy default/ns-wide (DENY, 1 rule, targets every service of the namespace)",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("default/other"), "{text}");
        // Policies and the effective sections per port, with their source.
        for want in [
            "Policy:\n  TrafficPolicy default/p (on the service)\n  TrafficPolicy default/grpc-only (on port grpc)\n  TrafficPolicy default/split-limits (on HTTPRoute default/split)\n",
            "  http (80):\n    loadBalancer      {\"algorithm\":\"roundRobin\"}\n                      from TrafficPolicy default/p (on Service default/reviews)\n    retries           {\"attempts\":2}\n",
            "  grpc (9090):\n    loadBalancer      {\"algorithm\":\"roundRobin\"}\n                      from TrafficPolicy default/p (on Service default/reviews)\n    retries           {\"attempts\":4,\"grpcStatuses\":[\"unavailable\"]}\n                      from TrafficPolicy default/grpc-only (on Service default/reviews port grpc)\n",
            "    rateLimit         {\"requests\":100}\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("elsewhere"), "{text}");
        assert!(describe_service(&items(), &[], &[], "default", "nope").is_none());
    }

    #[test]
    fn describe_shows_the_vip_the_proxies_use() {
        let text = describe_service(&items(), &[], &[], "default", "reviews").unwrap();
        let want = api::vip::home_vip("default", "reviews");
        assert!(
            text.contains(&format!(
                "VIP:              {want} (allocated; pin it with spec.vip)"
            )),
            "{text}"
        );
        let mut pinned = items();
        pinned[0]["spec"]["vip"] = json!("240.240.9.9");
        let text = describe_service(&pinned, &[], &[], "default", "reviews").unwrap();
        assert!(
            text.contains("VIP:              240.240.9.9 (spec.vip)"),
            "{text}"
        );
    }
}
