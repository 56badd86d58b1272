//! `meshwork proxy`: build the data-plane runtime with the requested number
//! of workers, start the proxy, and drain on SIGTERM / Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use proxy::accesslog::Target;
use proxy::xds_client::WorkloadState;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "control"])))]
pub struct Args {
    /// Where the config comes from and who this proxy is (shared with `meshwork run`).
    #[command(flatten)]
    pub(crate) sidecar: SidecarArgs,
    /// With --service: the port the local application listens on.
    #[arg(long, requires = "service")]
    app_port: Option<u16>,
    /// Where applications send outbound requests (explicit mode).
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_addr: SocketAddr,
    /// Where other proxies and clients reach the local application.
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_addr: SocketAddr,
    /// Admin server: /ready, /live, /metrics, /config_dump, /listeners, /logging.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// The Workload (`namespace/name` or `name`) this proxy fronts; enables the inbound listener.
    #[arg(long)]
    workload: Option<String>,
    /// Worker threads for the data path.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Access log: `-` (stdout), a file path, or `off`.
    #[arg(long, default_value = "-")]
    access_log: String,
    /// Log filter (tracing directives), changeable later through the admin /logging endpoint.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Protocol detection bound in milliseconds; after it, a silent connection is treated as TCP.
    #[arg(long, default_value_t = 1000)]
    detect_timeout_ms: u64,
    /// On SIGTERM, how long in-flight requests get to finish, in seconds.
    #[arg(long, default_value_t = 20)]
    drain_timeout_secs: u64,
    /// How often the config file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Transparent capture: the outbound listener also takes connections
    /// redirected to it (iptables REDIRECT) and routes them by their original
    /// destination (mesh Service VIPs; anything else passes through, or is
    /// refused under `outboundTrafficPolicy: REGISTRY_ONLY`). Needs a fixed
    /// --outbound-addr port. `meshwork run` sets it.
    #[arg(long)]
    capture: bool,
    /// With --service and a control plane: the state the workload starts in. `starting` keeps it
    /// out of its Service's endpoints until the admin `POST /healthcheck/ok` (`meshwork run` does
    /// that once the application accepts); `POST /healthcheck/fail` announces `draining`.
    #[arg(long, default_value = "serving", value_parser = parse_workload_state)]
    workload_state: WorkloadState,
    /// Managed by the parent process (`meshwork run` passes it): stop on SIGINT or when the
    /// parent goes away (a `meshwork run` killed with SIGKILL does not leave its sidecar
    /// running); SIGTERM from others is ignored, the parent orders the stop.
    #[arg(long)]
    exit_with_parent: bool,
    /// Mesh DNS (UDP and TCP): answers mesh Service names with their VIPs and forwards the rest.
    /// `off` disables it. Default: 127.0.0.1:15053 with --capture, off otherwise. 127.0.0.1
    /// (0.0.0.0) also serves on `[::1]` (`[::]`) at the same port, where the host has IPv6.
    #[arg(long, value_parser = parse_dns_addr)]
    dns_addr: Option<DnsAddr>,
    /// Mesh DNS: the cluster domain of `name.namespace.svc.<domain>`.
    #[arg(long, default_value = proxy::dns::DEFAULT_DOMAIN)]
    dns_domain: String,
    /// Mesh DNS: the resolver for other names, `ip` or `ip:port` (default: the first nameserver
    /// of /etc/resolv.conf).
    #[arg(long, value_parser = parse_upstream)]
    dns_upstream: Option<SocketAddr>,
    /// Mesh DNS: how long a forwarded query may take before SERVFAIL, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    dns_timeout_ms: u64,
}

/// Where a sidecar's config comes from and who it is: the flags `meshwork
/// proxy` and `meshwork run` share (`run` hands them to its sidecar with
/// [`SidecarArgs::to_proxy_flags`]), defined once so that both commands
/// take and document them alike.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SidecarArgs {
    /// Standalone: mesh YAML file to run from; watched, changes apply without dropping connections.
    #[arg(long, short = 'c')]
    pub(crate) config: Option<PathBuf>,
    /// Control-plane xDS address(es), `host:port[,host:port...]`; tried in turn.
    #[arg(long, value_delimiter = ',')]
    pub(crate) control: Vec<String>,
    /// With --control: the Service this proxy's workload belongs to (registers it).
    #[arg(long, requires = "control")]
    pub(crate) service: Option<String>,
    /// With --service: its namespace.
    #[arg(long, default_value = "default")]
    pub(crate) namespace: String,
    /// With --service: the address the application is reached at (default: the inbound address's IP,
    /// or 127.0.0.1 when that is unspecified).
    #[arg(long)]
    pub(crate) address: Option<std::net::IpAddr>,
    /// With --service: the workload name (default: `<service>-<pid>`).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// With --service: labels, `key=value[,key=value...]`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) labels: Vec<String>,
    /// With --service: locality, `region/zone`.
    #[arg(long)]
    pub(crate) locality: Option<String>,
    /// With --control: the services this workload calls (`svc[.ns][,...]`); its config is then
    /// scoped to them (and what their routes reach) instead of the whole mesh.
    #[arg(long, value_delimiter = ',')]
    pub(crate) upstreams: Vec<String>,
    /// With --control: a join token (`meshwork token create`): the proxy gets its workload
    /// certificate with it and talks to the control plane over TLS. Also read from
    /// $MESHWORK_TOKEN. Without one, the proxy has no identity and xDS is plaintext.
    #[arg(long, requires = "control", conflicts_with = "token_file")]
    pub(crate) token: Option<String>,
    /// Like --token, read from this file (keeps the token out of `ps`).
    #[arg(long, requires = "control")]
    pub(crate) token_file: Option<PathBuf>,
    /// With a token: the control plane's root certificates (PEM), to verify it
    /// (`meshwork ca bundle > root.pem`).
    #[arg(long)]
    pub(crate) ca_bundle: Option<PathBuf>,
    /// With a token: refuse a token (or saved certificate) of another trust domain.
    #[arg(long)]
    pub(crate) trust_domain: Option<String>,
    /// With a token: keep the key and certificate here (mode 0600) so a restarted proxy resumes
    /// with its still-valid certificate instead of needing a new token.
    #[arg(long)]
    pub(crate) identity_dir: Option<PathBuf>,
    /// With a token: the certificate lifetime to ask for (`90s`, `30m`, `24h`); the control plane
    /// caps it. Default: the control plane's (24h).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) cert_ttl: Option<Duration>,
    /// Without a control plane: this proxy's certificate chain (PEM, leaf first), for mTLS.
    /// Needs --key and --ca-bundle (the roots); the files are reloaded when they change.
    #[arg(long, requires_all = ["key", "ca_bundle"], conflicts_with_all = ["token", "token_file", "identity_dir"])]
    pub(crate) cert: Option<PathBuf>,
    /// With --cert: its private key (PEM).
    #[arg(long, requires = "cert")]
    pub(crate) key: Option<PathBuf>,
}

impl SidecarArgs {
    /// These flags as `meshwork proxy` takes them, the token excepted: it
    /// travels in the sidecar's environment, not on a command line.
    pub(crate) fn to_proxy_flags(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let mut flag = |name: &str, value: std::ffi::OsString| {
            a.push(format!("--{name}").into());
            a.push(value);
        };
        if let Some(c) = &self.config {
            flag("config", c.into());
        }
        if !self.control.is_empty() {
            flag("control", self.control.join(",").into());
            if let Some(s) = &self.service {
                flag("service", s.into());
                flag("namespace", (&self.namespace).into());
                if let Some(n) = &self.name {
                    flag("name", n.into());
                }
                if !self.labels.is_empty() {
                    flag("labels", self.labels.join(",").into());
                }
                if let Some(l) = &self.locality {
                    flag("locality", l.into());
                }
                if let Some(ip) = &self.address {
                    flag("address", ip.to_string().into());
                }
            }
            if !self.upstreams.is_empty() {
                flag("upstreams", self.upstreams.join(",").into());
            }
            if let Some(f) = &self.token_file {
                flag("token-file", f.into());
            }
        }
        for (name, value) in [
            ("ca-bundle", &self.ca_bundle),
            ("identity-dir", &self.identity_dir),
            ("cert", &self.cert),
            ("key", &self.key),
        ] {
            if let Some(v) = value {
                flag(name, v.into());
            }
        }
        if let Some(t) = &self.trust_domain {
            flag("trust-domain", t.into());
        }
        if let Some(t) = &self.cert_ttl {
            flag("cert-ttl", format!("{}s", t.as_secs()).into());
        }
        a
    }
}

/// Time for a `draining` announcement to leave before the xDS stream stops.
const ANNOUNCE_PAUSE: Duration = Duration::from_millis(100);

/// `--workload-state`.
fn parse_workload_state(s: &str) -> Result<WorkloadState, String> {
    WorkloadState::parse(s).ok_or_else(|| format!("{s:?}: expected starting, serving or draining"))
}

/// `--dns-addr`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
enum DnsAddr {
    Off,
    At(SocketAddr),
}

fn parse_dns_addr(s: &str) -> Result<DnsAddr, String> {
    if s == "off" {
        return Ok(DnsAddr::Off);
    }
    s.parse()
        .map(DnsAddr::At)
        .map_err(|_| format!("{s:?} is not `ip:port` or `off`"))
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{s:?} is not `ip` or `ip:port`"))
}

/// The DNS server's options: on with --dns-addr, or with --capture at the
/// default address; the upstream and search domains from resolv.conf
/// unless given.
fn dns_options(args: &Args) -> anyhow::Result<Option<proxy::dns::DnsOptions>> {
    let addr = match args.dns_addr {
        Some(DnsAddr::Off) => return Ok(None),
        Some(DnsAddr::At(a)) => a,
        None if args.capture => proxy::dns::DEFAULT_ADDR
            .parse()
            .context("the default DNS address")?,
        None => return Ok(None),
    };
    let path = std::path::Path::new("/etc/resolv.conf");
    let conf = match proxy::dns::ResolvConf::read(path) {
        Ok(c) => c,
        Err(e) if args.dns_upstream.is_some() => {
            tracing::debug!(error = %e, "no {}; no search domains", path.display());
            proxy::dns::ResolvConf::default()
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "mesh DNS: cannot read {}: {e}; give the resolver for non-mesh names with --dns-upstream",
                path.display()
            ))
        }
    };
    let upstream = args.dns_upstream.or(conf.nameserver).with_context(|| {
        format!(
            "mesh DNS: {} names no usable nameserver; give one with --dns-upstream",
            path.display()
        )
    })?;
    // The proxy's own namespace: bare Service names resolve in it.
    let namespace = match args.workload.as_deref().and_then(|w| w.split_once('/')) {
        Some((ns, _)) => ns.to_string(),
        None => args.sidecar.namespace.clone(),
    };
    Ok(Some(proxy::dns::DnsOptions {
        addr,
        domain: args.dns_domain.clone(),
        namespace,
        upstream,
        search: conf.search,
        timeout: Duration::from_millis(args.dns_timeout_ms.max(1)),
    }))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Before anything that takes time: the parent this sidecar must follow.
    let parent = std::os::unix::process::parent_id();
    let log = proxy::logging::init(&args.log_level, false);
    let access_log = match args.access_log.as_str() {
        "-" => Target::Stdout,
        "off" | "" => Target::Off,
        path => Target::File(PathBuf::from(path)),
    };
    if args.capture && args.outbound_addr.port() == 0 {
        anyhow::bail!(
            "--capture needs a fixed --outbound-addr port (the redirect rules point at it), not port 0"
        );
    }
    let source = match &args.sidecar.config {
        Some(path) => proxy::app::Source::File {
            path: path.clone(),
            poll_interval: Duration::from_millis(args.poll_ms.max(50)),
        },
        None => control_source(&args)?,
    };
    let what = match &args.sidecar.config {
        Some(p) => p.display().to_string(),
        None => format!("control plane {}", args.sidecar.control.join(",")),
    };
    let identity = identity_options(&args)?;
    let cert_files = cert_files(&args)?;
    let mut opts = proxy::Options {
        source,
        outbound_addr: args.outbound_addr,
        inbound_addr: args.inbound_addr,
        admin_addr: args.admin_addr,
        workload: args.workload.clone(),
        access_log,
        detect_timeout: Duration::from_millis(args.detect_timeout_ms),
        identity: None,
        capture: args.capture,
        dns: dns_options(&args)?,
    };
    let workers = args.workers.max(1);
    // One worker: a current-thread runtime, no cross-thread wakeups.
    let rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .context("starting the async runtime")?;
    let drain = Duration::from_secs(args.drain_timeout_secs);
    rt.block_on(async move {
        // Installed first, so no stop request is lost; one future for the
        // bootstrap, the start and the main wait.
        let stop = stop_requested(args.exit_with_parent.then_some(parent))?;
        tokio::pin!(stop);
        if let Some((identity, files)) = cert_files {
            tracing::info!(spiffe_id = ?identity.id().map(|i| i.to_string()), "workload certificate loaded from files");
            opts.identity = Some(identity.clone());
            tokio::spawn(proxy::cert_files::watch(
                identity,
                files,
                Duration::from_secs(2),
            ));
        }
        if let Some(identity) = identity {
            // The first certificate before anything else: xDS runs over TLS
            // presenting it. A refusal ends the process with the fix.
            let manager = tokio::select! {
                r = proxy::identity::Manager::bootstrap(identity) => r.context("getting this proxy's workload certificate")?,
                () = &mut stop => return Ok(ExitCode::SUCCESS),
            };
            tracing::info!(spiffe_id = %manager.spiffe_id(), "workload certificate installed");
            opts.identity = Some(manager.identity());
            if let proxy::app::Source::Control { client, .. } = &mut opts.source {
                client.identity = Some(manager);
            }
        }
        let mut proxy = proxy::Proxy::start(opts, log)
            .await
            .with_context(|| format!("starting the proxy from {what}"))?;
        if proxy.workload_state() == WorkloadState::Starting {
            match (args.sidecar.service.is_some(), args.app_port) {
                (true, Some(port)) => {
                    let ip = args.sidecar.address.unwrap_or(match args.inbound_addr.ip() {
                        ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
                        ip => ip,
                    });
                    proxy.serve_once_accepting(SocketAddr::new(ip, port));
                }
                _ => tracing::warn!("--workload-state starting without --service and --app-port: the workload stays starting until POST /healthcheck/ok"),
            }
        }
        for (name, addr) in proxy.listeners() {
            tracing::info!(listener = %name, %addr, "ready");
        }
        if let Some(dns) = proxy.dns_addr() {
            tracing::info!(%dns, "mesh DNS ready");
        }
        tracing::info!(admin = %proxy.admin_addr(), "proxy ready");
        stop.await;
        // Callers stop picking this workload before its listeners go (a
        // control plane sends it as DRAINING at once, and forgets it when
        // the stream ends instead of after a grace period).
        if proxy.set_workload_state(None, WorkloadState::Draining) {
            tokio::time::sleep(ANNOUNCE_PAUSE).await;
        }
        tracing::info!(deadline = ?drain, "draining");
        let clean = proxy.shutdown(drain).await;
        if clean {
            tracing::info!("drained; exiting");
        } else {
            tracing::warn!("drain deadline passed with requests still in flight; exiting");
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The xDS client's options: servers and the node that registers this
/// proxy's workload (metadata the control plane's registry reads).
fn control_source(args: &Args) -> anyhow::Result<proxy::app::Source> {
    let workload = args.sidecar.service.as_ref().map(|service| Registration {
        service: service.clone(),
        namespace: args.sidecar.namespace.clone(),
        name: args.sidecar.name.clone(),
        app_port: args.app_port,
        address: args.sidecar.address,
        labels: args.sidecar.labels.clone(),
        locality: args.sidecar.locality.clone(),
    });
    let upstreams: Vec<&str> = args
        .sidecar
        .upstreams
        .iter()
        .map(String::as_str)
        .filter(|u| !u.is_empty())
        .collect();
    let mut node = node(
        args.inbound_addr,
        args.outbound_addr,
        workload.as_ref(),
        (!upstreams.is_empty()).then_some(upstreams.as_slice()),
    )?;
    if args.capture {
        use envoy_types::pb::google::protobuf::{value::Kind, Value};
        node.metadata
            .get_or_insert_with(Default::default)
            .fields
            .insert(
                api::CAPTURE_METADATA.to_owned(),
                Value {
                    kind: Some(Kind::BoolValue(true)),
                },
            );
    }
    let node = args.workload_state.on_node(&node);
    Ok(proxy::app::Source::Control {
        client: Box::new(proxy::xds_client::ClientOptions {
            servers: servers(&args.sidecar.control),
            node,
            connect_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_secs(10),
            identity: None,
        }),
        service: workload.map(|w| format!("{}.{}", w.service, w.namespace)),
    })
}

/// `--cert/--key/--ca-bundle`: an identity from files (no control plane
/// needed), checked before anything starts.
fn cert_files(
    args: &Args,
) -> anyhow::Result<
    Option<(
        std::sync::Arc<identity::WorkloadIdentity>,
        proxy::cert_files::CertFiles,
    )>,
> {
    let (Some(cert), Some(key), Some(ca_bundle)) = (
        &args.sidecar.cert,
        &args.sidecar.key,
        &args.sidecar.ca_bundle,
    ) else {
        return Ok(None);
    };
    let files = proxy::cert_files::CertFiles {
        cert: cert.clone(),
        key: key.clone(),
        ca_bundle: ca_bundle.clone(),
    };
    let identity = proxy::cert_files::load(&files)?;
    Ok(Some((identity, files)))
}

/// The identity manager's options, if the proxy is to have an identity
/// (a token, or an identity dir to resume from); checked here so that a
/// missing or unreadable file is reported before anything starts.
fn identity_options(args: &Args) -> anyhow::Result<Option<proxy::identity::Options>> {
    use anyhow::bail;
    let token = match (&args.sidecar.token, &args.sidecar.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("reading --token-file {}", file.display()))?,
        ),
        (None, None) => std::env::var("MESHWORK_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty()),
    };
    let token = token.map(|t| proxy::identity::Token::new(&t));
    if let Some(t) = &token {
        if t.as_str().is_empty() {
            bail!("the join token is empty; {}", proxy::identity::TOKEN_HINT);
        }
    }
    if token.is_none() && args.sidecar.identity_dir.is_none() {
        if (args.sidecar.ca_bundle.is_some() && args.sidecar.cert.is_none())
            || args.sidecar.trust_domain.is_some()
            || args.sidecar.cert_ttl.is_some()
        {
            bail!(
                "--ca-bundle, --trust-domain and --cert-ttl go with a join token: pass --token, \
                 --token-file or $MESHWORK_TOKEN ({})",
                proxy::identity::TOKEN_HINT
            );
        }
        return Ok(None);
    }
    if args.sidecar.control.is_empty() {
        bail!("a join token (or --identity-dir) needs --control: certificates come from the control plane");
    }
    let Some(bundle_file) = &args.sidecar.ca_bundle else {
        bail!(
            "a join token needs --ca-bundle FILE, the control plane's root certificates, so the \
             proxy can verify it; {}",
            proxy::identity::BUNDLE_HINT
        );
    };
    let bundle_pem = std::fs::read_to_string(bundle_file).with_context(|| {
        format!(
            "reading --ca-bundle {} ({})",
            bundle_file.display(),
            proxy::identity::BUNDLE_HINT
        )
    })?;
    let trust_domain = match &args.sidecar.trust_domain {
        Some(td) => Some(
            proxy::identity::TrustDomain::new(td)
                .with_context(|| format!("--trust-domain {td:?}"))?,
        ),
        None => None,
    };
    if let Some(dir) = &args.sidecar.identity_dir {
        proxy::identity::check_identity_dir(dir)?;
    }
    Ok(Some(proxy::identity::Options {
        servers: args
            .sidecar
            .control
            .iter()
            .filter(|a| !a.is_empty())
            .cloned()
            .collect(),
        token,
        bundle_pem,
        bundle_source: bundle_file.display().to_string(),
        trust_domain,
        identity_dir: args.sidecar.identity_dir.clone(),
        ttl: args.sidecar.cert_ttl,
        connect_timeout: Duration::from_secs(2),
        max_backoff: Duration::from_secs(10),
    }))
}

/// `90s`, `30m`, `24h`, `2d` or plain seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        return Err(format!("{:?}: must be positive", s.trim()));
    }
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "{:?}: whole seconds only here, like 90s, 30m or 24h",
            s.trim()
        ));
    }
    Ok(d)
}

/// Like [`parse_duration`], zero included (`0s`: none).
pub(crate) fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| {
        format!("{s:?}: expected a number with a unit, like 500ms, 90s, 30m or 24h")
    })?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

/// The workload a sidecar registers with the control plane (`--service`
/// and the flags that go with it).
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) service: String,
    pub(crate) namespace: String,
    /// Default: `<service>-<pid>`.
    pub(crate) name: Option<String>,
    pub(crate) app_port: Option<u16>,
    /// Default: the inbound address's IP, or 127.0.0.1 when unspecified.
    pub(crate) address: Option<std::net::IpAddr>,
    /// `key=value` each.
    pub(crate) labels: Vec<String>,
    /// `region/zone`.
    pub(crate) locality: Option<String>,
}

/// The xDS `Node` a sidecar announces: where it listens, the workload it
/// registers (if any) and, when given, the services it calls (`upstreams`:
/// the control plane then sends only those). `meshwork proxy` and
/// `meshwork demo` both build their nodes here, so the registry sees one shape.
pub(crate) fn node(
    inbound_addr: SocketAddr,
    outbound_addr: SocketAddr,
    workload: Option<&Registration>,
    upstreams: Option<&[&str]>,
) -> anyhow::Result<envoy_types::pb::envoy::config::core::v3::Node> {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
    let s = |v: String| Value {
        kind: Some(Kind::StringValue(v)),
    };
    let mut fields = std::collections::HashMap::new();
    fields.insert("inbound_addr".to_owned(), s(inbound_addr.to_string()));
    fields.insert("outbound_addr".to_owned(), s(outbound_addr.to_string()));
    if let Some(up) = upstreams {
        fields.insert(
            "upstreams".to_owned(),
            Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: up.iter().map(|u| s((*u).to_owned())).collect(),
                })),
            },
        );
    }
    let mut id = format!("proxy-{}", std::process::id());
    let mut cluster = String::new();
    if let Some(w) = workload {
        let name = w
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", w.service, std::process::id()));
        id = format!("{name}.{}", w.namespace);
        cluster = w.service.clone();
        let address = w.address.unwrap_or(match inbound_addr.ip() {
            ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
            ip => ip,
        });
        fields.insert("service".to_owned(), s(w.service.clone()));
        fields.insert("namespace".to_owned(), s(w.namespace.clone()));
        fields.insert("address".to_owned(), s(address.to_string()));
        if let Some(port) = w.app_port {
            fields.insert(
                "app_port".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(f64::from(port))),
                },
            );
        }
        let mut labels = std::collections::HashMap::new();
        for l in &w.labels {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("label {l:?}: expected key=value"))?;
            labels.insert(k.to_owned(), s(v.to_owned()));
        }
        if !labels.is_empty() {
            fields.insert(
                "labels".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(Struct { fields: labels })),
                },
            );
        }
        if let Some(l) = &w.locality {
            fields.insert("locality".to_owned(), s(l.clone()));
        }
    }
    Ok(Node {
        id,
        cluster,
        user_agent_name: "meshwork".to_owned(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    })
}

/// Control-plane addresses as the xDS client wants them (`http://host:port`).
pub(crate) fn servers(addrs: &[String]) -> Vec<String> {
    addrs
        .iter()
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a.starts_with("http://") || a.starts_with("https://") {
                a.clone()
            } else {
                format!("http://{a}")
            }
        })
        .collect()
}

/// Resolves when the proxy should drain and exit. On its own: SIGTERM or
/// SIGINT. Managed by its parent (`--exit-with-parent`, `meshwork run`;
/// `parent` is the pid it started under): SIGINT (what the parent sends once
/// the application is done) or the parent going away; a SIGTERM from anyone
/// else (a service manager signalling the whole control group) is logged and
/// ignored, so outbound keeps working while the application drains. The
/// signal handlers are installed before this returns, so nothing sent from
/// then on is lost.
fn stop_requested(parent: Option<u32>) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    Ok(async move {
        let gone = async {
            match parent {
                Some(p) => parent_gone(p).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(gone);
        loop {
            tokio::select! {
                _ = int.recv() => return,
                () = &mut gone => return,
                _ = term.recv() => match parent {
                    None => return,
                    Some(parent) => tracing::warn!(
                        parent,
                        "SIGTERM ignored: this sidecar stops when its parent (meshwork run) says so, after the application; signal the parent (or send SIGINT here)"
                    ),
                },
            }
        }
    })
}

/// Resolves once this process's parent is no longer `parent` (it died and
/// this process was reparented), checked now and every second.
async fn parent_gone(parent: u32) {
    loop {
        if std::os::unix::process::parent_id() != parent {
            tracing::warn!(
                parent,
                "the parent process is gone (--exit-with-parent): draining and exiting"
            );
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the proxy");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_only_some_flags_take_zero_or_milliseconds() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2000ms"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("0s").unwrap_err().contains("positive"));
        assert!(parse_duration("500ms")
            .unwrap_err()
            .contains("whole seconds"));
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s")
            .unwrap_err()
            .contains("expected a number"));
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration_or_zero("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(
            parse_workload_state("draining"),
            Ok(WorkloadState::Draining)
        );
        assert!(parse_workload_state("up")
            .unwrap_err()
            .contains("starting, serving or draining"));
    }
}
