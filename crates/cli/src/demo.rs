//! `meshwork demo`: the whole mesh on one machine, in one process, so a
//! newcomer sees a control plane steer live traffic in a minute.
//!
//! What runs (all on 127.0.0.1, no root):
//! - a control plane (`control::app::Control`) with an in-memory store (or
//!   `--data-dir`), its resource API and xDS server;
//! - the demo mesh ([`mesh`]), applied through that API
//!   (`POST /api/v1/apply`) like `meshwork apply` does;
//! - a sample application ([`apps`]): `frontend` (HTTP) calls `catalog`
//!   (gRPC), split 90/10 between `catalog-v1` (two instances) and
//!   `catalog-v2`, which call `inventory` (TCP). Every instance has its own
//!   sidecar (`proxy::Proxy` fed by the control plane, registering its
//!   workload with the node `proxy_cmd::node` builds, as `meshwork proxy
//!   --service` does);
//! - steady traffic to `frontend` through a `traffic` sidecar ([`traffic`]),
//!   summed up every few seconds: which catalog version answered, errors.
//!
//! The catalog split is written to a file beside the run; `meshwork apply`
//! of an edited copy changes the live split.
//!
//! Files: in `--dir`, or else in a new directory of the temp dir, made for
//! the run (never reused), with an unguessable name and mode 0700, so no
//! other local user can prepare it or read it ([`dir`]); secrets (the admin
//! token) are new files of mode 0600 that never follow a symlink
//! ([`write_secret`]).
//!
//! Ports: `--control-port P` gives the API P and xDS P+1; `--mesh-port M`
//! gives instance k (in the order printed) M+10k (application), +1
//! (sidecar outbound), +2 (inbound), +3 (admin). 0: the OS picks every port.
//!
//! Identity: the control plane runs its CA with TLS-only xDS; each sidecar
//! gets a single-use join token from the API (`POST /api/v1/tokens`, for
//! its Service's account; the traffic sidecar is `traffic`), the trust
//! bundle from `GET /api/v1/ca/bundle` (written to `root.pem`), and
//! bootstraps its certificate as `meshwork proxy --token --ca-bundle` does.
//!
//! `--transparent` ([`transparent`], root only) runs the same mesh with each
//! instance in a network namespace of its own under `meshwork run`, the apps
//! calling each other by name through the capture, every hop mTLS; `meshwork
//! demo-app` ([`standalone`], hidden) is how it starts each app.
//!
//! Non-goals: capture in the default mode (the apps call their sidecar
//! explicitly), surviving the loss of its own control plane (it is in the
//! same process).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::proxy_cmd::Registration;

mod apps;
mod mesh;
mod netns;
mod standalone;
mod traffic;
mod transparent;

pub use standalone::{run as app, AppArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Control plane ports: the API on this port, xDS on the next (0: any free ports).
    #[arg(long, default_value_t = 16000)]
    control_port: u16,
    /// First port of the services: instance k uses this + 10k (app), +1 (sidecar outbound),
    /// +2 (inbound), +3 (admin). 0: any free ports.
    #[arg(long, default_value_t = 16100, conflicts_with = "transparent")]
    mesh_port: u16,
    /// Directory for the files the demo writes (mesh, split, access logs); default: a new temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the control plane's resources in this directory (default: in memory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Requests per second sent to the frontend.
    #[arg(long, default_value_t = 5.0)]
    rps: f64,
    /// Seconds between summary lines.
    #[arg(long, default_value_t = 5)]
    every: u64,
    /// Stop after this many seconds of traffic (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Log filter for the control plane and sidecars (stderr).
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Each instance in a network namespace of its own under `meshwork run`: unmodified apps
    /// call each other by name, every hop captured and mTLS (needs root).
    #[arg(long)]
    transparent: bool,
    /// With --transparent: the virtual network's IPv4 subnet; this machine gets its first
    /// address (the control plane), the instances the next ones.
    #[arg(long, default_value = "10.77.93.0/24", requires = "transparent")]
    subnet: netns::Subnet,
}

/// One service instance of the sample app (or the traffic's own sidecar).
struct Instance {
    /// Workload name, e.g. `catalog-v1-0`.
    name: &'static str,
    /// Its Service; `None` for the traffic sidecar, which registers nothing.
    service: Option<&'static str>,
    version: Option<&'static str>,
    /// What its sidecar calls (the control plane sends only those).
    upstreams: &'static [&'static str],
    /// What the app speaks, for the table.
    protocol: &'static str,
}

const INSTANCES: [Instance; 6] = [
    Instance {
        name: "traffic",
        service: None,
        version: None,
        upstreams: &["frontend"],
        protocol: "-",
    },
    Instance {
        name: "frontend-0",
        service: Some("frontend"),
        version: None,
        upstreams: &["catalog"],
        protocol: "HTTP",
    },
    Instance {
        name: "catalog-v1-0",
        service: Some("catalog-v1"),
        version: Some("v1"),
        upstreams: &["inventory"],
        protocol: "gRPC",
    },
    Instance {
        name: "catalog-v1-1",
        service: Some("catalog-v1"),
        version: Some("v1"),
        upstreams: &["inventory"],
        protocol: "gRPC",
    },
    Instance {
        name: "catalog-v2-0",
        service: Some("catalog-v2"),
        version: Some("v2"),
        upstreams: &["inventory"],
        protocol: "gRPC",
    },
    Instance {
        name: "inventory-0",
        service: Some("inventory"),
        version: None,
        upstreams: &[],
        protocol: "TCP",
    },
];

/// A started instance: its app's address and its sidecar.
struct Running {
    spec: &'static Instance,
    app: Option<SocketAddr>,
    sidecar: proxy::Proxy,
    /// The SPIFFE id of its sidecar's certificate.
    spiffe_id: String,
}

/// How long the sidecars get to receive their config and the app to answer.
const READY_WITHIN: Duration = Duration::from_secs(30);

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !(args.rps > 0.0 && args.rps <= 1000.0) {
        bail!("--rps must be between 0 and 1000");
    }
    if args.transparent {
        transparent::check_root()?;
    }
    let log = proxy::logging::init(&args.log_level, false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if args.transparent {
        return rt.block_on(async {
            let dir = dir(&args)?;
            transparent::run(&args, &dir).await
        });
    }
    rt.block_on(demo(args, log))
}

async fn demo(args: Args, log: proxy::logging::LogHandle) -> anyhow::Result<ExitCode> {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let at = |base: u16, offset: u16| -> anyhow::Result<SocketAddr> {
        if base == 0 {
            return Ok(SocketAddr::new(lo, 0));
        }
        base.checked_add(offset)
            .map(|p| SocketAddr::new(lo, p))
            .ok_or_else(|| anyhow!("port {base} + {offset} is past 65535; pick a lower base port"))
    };

    // Files beside the run.
    let dir = dir(&args)?;

    // 1. The control plane: CA on, xDS over TLS only; every sidecar joins
    //    with a join token, as `meshwork proxy --token` does.
    let control = control::app::Control::start(control::app::Options {
        grace: Duration::from_secs(10),
        ..control::app::Options::new(
            args.data_dir.clone(),
            at(args.control_port, 1)?,
            at(args.control_port, 0)?,
        )
    })
    .await
    .map_err(|e| match e {
        // The library's hint names `meshwork control`'s flags; say ours.
        control::app::Error::Bind { what, addr, source } => anyhow!(
            "the demo's control plane cannot bind its {what} port {addr}: {source}; \
             is another demo or `meshwork control` running? Pick other ports with \
             --control-port P (0: any free ports)"
        ),
        e => anyhow::Error::new(e).context("starting the demo's control plane"),
    })?;
    let (api, xds) = (control.api_addr(), control.xds_addr());
    // The admin token `meshwork apply` needs: in the data directory, or
    // written beside the run when the store is in memory.
    let token_file = match control.admin_token_path() {
        Some(p) => p.to_path_buf(),
        None => {
            let p = dir.join("admin.token");
            write_secret(&p, control.admin_token())?;
            p
        }
    };

    // The trust bundle every sidecar verifies the control plane with, as
    // `meshwork ca bundle > root.pem` would print it.
    let bundle_pem = String::from_utf8(
        api_call(api, control.admin_token(), "GET", "/api/v1/ca/bundle", None)
            .await
            .context("fetching the trust bundle")?
            .to_vec(),
    )
    .context("the trust bundle is not text")?;
    let bundle_file = dir.join("root.pem");
    std::fs::write(&bundle_file, &bundle_pem)
        .with_context(|| format!("writing {}", bundle_file.display()))?;

    // 2. The mesh, through the API.
    let mesh_file = dir.join("mesh.yaml");
    let split_file = dir.join("catalog-split.yaml");
    let split = mesh::split(90, 10).replace(
        "THIS_FILE --control API_ADDR",
        &format!(
            "{} --control {api} --admin-token-file {}",
            split_file.display(),
            token_file.display()
        ),
    );
    for (file, text) in [(&mesh_file, mesh::MESH), (&split_file, split.as_str())] {
        std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))?;
    }
    apply(
        api,
        control.admin_token(),
        &[("mesh.yaml", mesh::MESH), ("catalog-split.yaml", &split)],
    )
    .await
    .context("applying the demo mesh")?;

    // 3. The instances: app socket first (its port is registered), then the
    //    sidecar, then the app once the sidecar has its listeners.
    let mut running = Vec::new();
    let mut app_listeners = Vec::new();
    for (k, spec) in INSTANCES.iter().enumerate() {
        let base = k as u16 * 10;
        let app = match spec.service {
            Some(_) => {
                let l = TcpListener::bind(at(args.mesh_port, base)?)
                    .await
                    .with_context(|| {
                        format!("binding {}'s port (busy? pick others with --mesh-port M; 0: any free ports)", spec.name)
                    })?;
                let addr = l.local_addr()?;
                app_listeners.push(Some(l));
                Some(addr)
            }
            None => {
                app_listeners.push(None);
                None
            }
        };
        let outbound = at(args.mesh_port, base + 1)?;
        let inbound = at(args.mesh_port, base + 2)?;
        let registration = spec.service.map(|service| Registration {
            service: service.to_owned(),
            namespace: "default".to_owned(),
            name: Some(spec.name.to_owned()),
            app_port: app.map(|a| a.port()),
            address: Some(lo),
            labels: spec
                .version
                .map(|v| vec![format!("version={v}")])
                .unwrap_or_default(),
            locality: None,
        });
        let mut node = crate::proxy_cmd::node(
            inbound,
            outbound,
            registration.as_ref(),
            Some(spec.upstreams),
        )?;
        if spec.service.is_none() {
            node.id = spec.name.to_owned();
        }
        // Its identity: a single-use token from the API for the service's
        // account (the traffic sidecar: `traffic`), then Sign over TLS.
        let account = spec.service.unwrap_or(spec.name);
        let token = create_token(api, control.admin_token(), account)
            .await
            .with_context(|| format!("creating {}'s join token", spec.name))?;
        let manager = tokio::time::timeout(
            READY_WITHIN,
            proxy::identity::Manager::bootstrap(proxy::identity::Options {
                servers: vec![xds.to_string()],
                token: Some(proxy::identity::Token::new(&token)),
                bundle_pem: bundle_pem.clone(),
                bundle_source: bundle_file.display().to_string(),
                trust_domain: None,
                identity_dir: None,
                ttl: None,
                connect_timeout: Duration::from_secs(2),
                max_backoff: Duration::from_secs(2),
            }),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "{}'s sidecar got no certificate within {}s",
                spec.name,
                READY_WITHIN.as_secs()
            )
        })?
        .with_context(|| format!("getting {}'s workload certificate", spec.name))?;
        let spiffe_id = manager.spiffe_id().to_string();
        let opts = proxy::Options {
            identity: Some(manager.identity()),
            source: proxy::app::Source::Control {
                client: Box::new(proxy::xds_client::ClientOptions {
                    servers: crate::proxy_cmd::servers(&[xds.to_string()]),
                    node,
                    connect_timeout: Duration::from_secs(2),
                    max_backoff: Duration::from_secs(2),
                    identity: Some(manager),
                }),
                service: spec.service.map(|s| format!("{s}.default")),
            },
            outbound_addr: outbound,
            inbound_addr: inbound,
            admin_addr: at(args.mesh_port, base + 3)?,
            workload: None,
            access_log: proxy::accesslog::Target::File(
                dir.join(format!("access-{}.log", spec.name)),
            ),
            detect_timeout: Duration::from_secs(1),
            capture: false,
            dns: None,
        };
        let sidecar = proxy::Proxy::start(opts, log.clone())
            .await
            .with_context(|| {
                format!(
                    "starting {}'s sidecar (ports busy? pick others with --mesh-port M; 0: any free ports)",
                    spec.name
                )
            })?;
        running.push(Running {
            spec,
            app,
            sidecar,
            spiffe_id,
        });
    }

    // Each app needs its sidecar's listener before it can call anything.
    let deadline = Instant::now() + READY_WITHIN;
    for (r, listener) in running.iter().zip(app_listeners) {
        let Some(listener) = listener else { continue };
        match r.spec.service {
            Some("frontend") => {
                let out = wait_listener(&r.sidecar, r.spec.name, "outbound_http", deadline).await?;
                apps::frontend(listener, apps::Target::Sidecar(out));
            }
            Some("inventory") => apps::inventory(listener),
            _ => {
                let inventory =
                    wait_listener(&r.sidecar, r.spec.name, mesh::INVENTORY_LISTENER, deadline)
                        .await?;
                apps::catalog(
                    listener,
                    apps::Catalog {
                        version: r.spec.version.unwrap_or("v1"),
                        instance: r.spec.name.to_owned(),
                        inventory: apps::Target::Sidecar(inventory),
                    },
                );
            }
        }
    }
    let traffic = running
        .iter()
        .find(|r| r.spec.service.is_none())
        .ok_or_else(|| anyhow!("the traffic sidecar is missing from the instance list"))?;
    let traffic_out = wait_listener(&traffic.sidecar, "traffic", "outbound_http", deadline).await?;

    // 4. Wait until a request reaches each version end to end.
    let mut client = traffic::Client::new(apps::Target::Sidecar(traffic_out));
    for pin in ["v1", "v2"] {
        loop {
            match client.get("/", Some(pin)).await {
                Ok(a) if a.version == pin => break,
                result if Instant::now() > deadline => bail!(
                    "the demo app did not answer through the mesh within {}s (last: {result:?}); \
                     run with --log-level info to see why",
                    READY_WITHIN.as_secs()
                ),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    print_banner(
        &args,
        &dir,
        api,
        xds,
        &running,
        traffic_out,
        &mesh_file,
        &split_file,
        &token_file,
    );

    // 5. Traffic and the summary.
    let tally = traffic::Shared::default();
    let load = tokio::spawn(traffic::run(
        apps::Target::Sidecar(traffic_out),
        args.rps,
        tally.clone(),
    ));
    let started = Instant::now();
    let stop = async {
        if args.seconds > 0 {
            tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        } else {
            crate::proxy_cmd::wait_for_signal().await;
        }
    };
    tokio::pin!(stop);
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(args.every.max(1)),
        Duration::from_secs(args.every.max(1)),
    );
    let mut before = traffic::Tally::default();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = every.tick() => {
                let now = traffic::snapshot(&tally);
                println!("{}", traffic::line(started.elapsed(), &before, &now));
                before = now;
            }
        }
    }
    load.abort();
    let _ = load.await;
    println!(
        "{}",
        traffic::total(started.elapsed(), &traffic::snapshot(&tally))
    );

    // 6. Stop: sidecars drain, then the control plane.
    let mut stopping = tokio::task::JoinSet::new();
    for r in running {
        stopping.spawn(r.sidecar.shutdown(Duration::from_secs(2)));
    }
    while stopping.join_next().await.is_some() {}
    control.shutdown(Duration::from_secs(2)).await;
    if args.dir.is_none() {
        println!("files kept in {}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The address of `sidecar`'s listener `name`, once its config has it.
async fn wait_listener(
    sidecar: &proxy::Proxy,
    who: &str,
    name: &str,
    deadline: Instant,
) -> anyhow::Result<SocketAddr> {
    loop {
        if let Some(a) = sidecar.listener(name) {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!(
                "{who}'s sidecar has no listener {name:?} after {}s: it got no config from the \
                 control plane (run with --log-level info to see why)",
                READY_WITHIN.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /api/v1/apply` of `files` (name, YAML) in one request, as
/// `meshwork apply -f` sends them.
async fn apply(api: SocketAddr, admin_token: &str, files: &[(&str, &str)]) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&control::api::FilesBody {
        files: files
            .iter()
            .map(|(name, text)| control::api::FileBody {
                name: (*name).to_owned(),
                text: (*text).to_owned(),
            })
            .collect(),
    })?;
    let stream = tokio::net::TcpStream::connect(api)
        .await
        .with_context(|| format!("connecting to the API at {api}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::post("/api/v1/apply")
        .header(hyper::header::HOST, api.to_string())
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {admin_token}"),
        )
        .header(
            hyper::header::CONTENT_TYPE,
            control::api::FILES_CONTENT_TYPE,
        )
        .body(Full::new(Bytes::from(body)))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| anyhow!("the API did not answer within 30s"))??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "the control plane refused it ({status}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// A single-use join token for `default/<account>` (`POST /api/v1/tokens`,
/// what `meshwork token create` calls).
async fn create_token(api: SocketAddr, admin_token: &str, account: &str) -> anyhow::Result<String> {
    let body = serde_json::to_vec(&control::api::TokenRequest {
        namespace: "default".to_owned(),
        service_account: account.to_owned(),
        ttl_seconds: 600,
        reusable: false,
    })?;
    let answer = api_call(
        api,
        admin_token,
        "POST",
        "/api/v1/tokens",
        Some(("application/json", body)),
    )
    .await?;
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    v["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the control plane answered without a token: {v}"))
}

/// One request to the control plane's API with the admin token; the body
/// of a 2xx answer.
async fn api_call(
    api: SocketAddr,
    admin_token: &str,
    method: &str,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
) -> anyhow::Result<Bytes> {
    let stream = tokio::net::TcpStream::connect(api)
        .await
        .with_context(|| format!("connecting to the API at {api}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, api.to_string())
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {admin_token}"),
        );
    let body = match body {
        Some((content_type, bytes)) => {
            req = req.header(hyper::header::CONTENT_TYPE, content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        sender.send_request(req.body(Full::new(body))?),
    )
    .await
    .map_err(|_| anyhow!("the API did not answer {method} {path} within 30s"))??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{method} {path}: the control plane refused it ({status}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(body)
}

/// The directory the demo writes its files into: `--dir` (created if
/// missing), or else a new one under the temp dir that did not exist before,
/// with an unpredictable name and mode 0700, so no other local user can
/// have prepared it (symlinks, files of theirs) nor read what is in it.
fn dir(args: &Args) -> anyhow::Result<PathBuf> {
    match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            check_own_dir(d)?;
            Ok(d.clone())
        }
        None => {
            let prefix = format!("meshwork-demo-{}-", std::process::id());
            fresh_dir(&std::env::temp_dir(), || {
                format!("{prefix}{}", random_hex())
            })
        }
    }
}

/// `--dir` must be this user's and not writable by others: the demo (as
/// root, with `--transparent`) writes files there, and another user able to
/// plant symlinks in it could redirect those writes.
fn check_own_dir(d: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(d).with_context(|| format!("reading {}", d.display()))?;
    let me = crate::run_cmd::effective_uid();
    if me.is_some_and(|uid| uid != meta.uid()) {
        bail!(
            "--dir {}: owned by uid {}, not by this user: another user's directory could hold symlinks the demo would write through; use a directory of your own (or leave --dir out)",
            d.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "--dir {}: writable by group or others (mode {:o}): they could plant symlinks the demo would write through; `chmod go-w` it, or use another directory",
            d.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// How many names [`fresh_dir`] tries before it gives up.
const FRESH_DIR_TRIES: usize = 16;

/// Creates `parent/<name()>`, a directory that did not exist, mode 0700
/// (not `create_dir_all`: an existing one, maybe someone else's, is never
/// reused); another name on `AlreadyExists`.
fn fresh_dir(parent: &Path, mut name: impl FnMut() -> String) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let mut last = None;
    for _ in 0..FRESH_DIR_TRIES {
        let dir = parent.join(name());
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(dir),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "creating the demo's directory {} (pick one with --dir DIR)",
                        dir.display()
                    )
                })
            }
        }
    }
    bail!(
        "could not create a new directory for the demo in {}: {FRESH_DIR_TRIES} names were \
         taken (last {}); pick one with --dir DIR",
        parent.display(),
        last.map(|d| d.display().to_string()).unwrap_or_default()
    )
}

/// 64 random bits in hex, for a name no other user can guess: std's
/// `RandomState` keys come from the OS's random source (this crate does not
/// depend on a random number crate).
fn random_hex() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(now);
    format!("{:016x}", h.finish())
}

/// This process's effective user id (`/proc/self/status`).
fn euid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// Writes `text` to a new file only its owner can read (mode 0600).
///
/// The file is created with `O_EXCL` (`create_new`), so an existing file or
/// symlink is never opened nor followed. In a `--dir` of the user's, an
/// existing file of ours at `path` (an earlier run's) is replaced; a symlink
/// or a file owned by another user is refused: someone else could read, or
/// redirect, the secret.
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            if m.file_type().is_symlink() {
                bail!(
                    "refusing to write a secret to {}: it is a symbolic link (someone could \
                     redirect the secret through it); remove it, or pick another --dir",
                    path.display()
                );
            }
            let me = euid();
            if me != Some(m.uid()) {
                bail!(
                    "refusing to write a secret to {}: it already exists and belongs to user \
                     {}{}, who could read it; remove it, or pick another --dir",
                    path.display(),
                    m.uid(),
                    me.map(|u| format!(", not to this process's user {u}"))
                        .unwrap_or_default()
                );
            }
            if !m.is_file() {
                bail!(
                    "refusing to write a secret to {}: it exists and is not a regular file; \
                     remove it, or pick another --dir",
                    path.display()
                );
            }
            // Ours, from an earlier run: made anew below (mode 0600, even
            // if it had another).
            std::fs::remove_file(path)
                .with_context(|| format!("removing the old {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (it must not exist: is another run using this --dir?)",
                path.display()
            )
        })?;
    writeln!(f, "{text}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn print_banner(
    args: &Args,
    dir: &std::path::Path,
    api: SocketAddr,
    xds: SocketAddr,
    running: &[Running],
    traffic_out: SocketAddr,
    mesh_file: &std::path::Path,
    split_file: &std::path::Path,
    token_file: &std::path::Path,
) {
    let store = match &args.data_dir {
        Some(d) => format!("stored in {}", d.display()),
        None => "stored in memory (gone when the demo stops; --data-dir keeps it)".to_owned(),
    };
    let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    let mut table = String::new();
    table.push_str(&format!(
        "  {:<13} {:<11} {:<22} {:<17} {:<17} {}\n",
        "instance", "service", "app", "sidecar outbound", "sidecar inbound", "sidecar admin"
    ));
    let mut admin_of = std::collections::BTreeMap::new();
    for r in running {
        let app = r
            .app
            .map(|a| format!("{a} {}", r.spec.protocol))
            .unwrap_or_else(|| "(traffic generator)".into());
        admin_of.insert(r.spec.name, r.sidecar.admin_addr());
        table.push_str(&format!(
            "  {:<13} {:<11} {:<22} {:<17} {:<17} http://{}\n",
            r.spec.name,
            r.spec.service.unwrap_or("-"),
            app,
            show(r.sidecar.listener("outbound_http")),
            show(r.sidecar.listener("inbound")),
            r.sidecar.admin_addr(),
        ));
    }
    let mut identities = String::new();
    for r in running {
        identities.push_str(&format!("  {:<13} {}\n", r.spec.name, r.spiffe_id));
    }
    let admin = |name: &str| {
        admin_of
            .get(name)
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    println!(
        r#"
meshwork demo: a control plane, a sample app of {n} instances each with its own sidecar,
and steady traffic ({rps}/s), all in this process on 127.0.0.1.

control plane
  API (HTTP)   http://{api}   resources {store}
  xDS (gRPC)   {xds} (TLS; also the CA's Sign service)

{table}
identities: each sidecar joined with a single-use token and holds a 24h X.509-SVID,
renewed at half-life; the key never left it
{identities}
request path (every arrow goes through the caller's own sidecar):
  traffic --HTTP--> frontend --gRPC--> catalog-v1 (90%) | catalog-v2 (10%) --TCP--> inventory
  the GRPCRoute `catalog` makes the split; catalog-v1's two instances take turns, with
  retries under a budget and outlier detection (TrafficPolicy catalog-v1)

files ({dir})
  applied at start:     {mesh}
  the split, to edit:   {split}
  access logs:          {dir}/access-<instance>.log
  trust bundle:         {dir}/root.pem (what `meshwork proxy --ca-bundle` takes)

look
  curl -s http://{api}/api/v1/resources
  meshwork get services --control {api}
  meshwork get grpcroute catalog -o yaml --control {api}
  meshwork describe service catalog --control {api}
  meshwork describe service catalog-v1 --control {api}
  meshwork proxy-status --control {api}
  curl -s http://{fe_admin}/metrics | grep meshwork_requests_total
  curl -s http://{fe_admin}/config_dump
  curl -s http://{fe_admin}/clusters
  curl -s http://{fe_admin}/metrics | grep -E 'meshwork_(retries|outlier|upstream_overflow)'
  curl -s http://{fe_admin}/certs
  meshwork ca status --control {api}
  curl -s -H 'Host: frontend' http://{traffic_out}/product/3
  curl -s -H 'Host: frontend' -H 'x-catalog-version: v2' http://{traffic_out}/

try: change the split (e.g. weights 50 and 50), apply it, and watch the lines below follow
  $EDITOR {split}
  meshwork apply -f {split} --control {api} --admin-token-file {token}

{stop}
"#,
        n = running.iter().filter(|r| r.spec.service.is_some()).count(),
        rps = args.rps,
        dir = dir.display(),
        mesh = mesh_file.display(),
        split = split_file.display(),
        token = token_file.display(),
        fe_admin = admin("frontend-0"),
        stop = if args.seconds > 0 {
            format!("running {}s of traffic", args.seconds)
        } else {
            "Ctrl-C stops it.".to_owned()
        },
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use clap::FromArgMatches as _;

    use super::*;

    /// A directory of its own for one test, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(what: &str) -> Scratch {
            let d = std::env::temp_dir().join(format!(
                "meshwork-demo-test-{what}-{}-{}",
                std::process::id(),
                random_hex()
            ));
            std::fs::create_dir(&d).unwrap();
            Scratch(d)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn args(argv: &[&str]) -> Args {
        let cmd = <Args as clap::Args>::augment_args(clap::Command::new("demo"));
        let m = cmd
            .try_get_matches_from(std::iter::once("demo").chain(argv.iter().copied()))
            .unwrap();
        Args::from_arg_matches(&m).unwrap()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_default_dir_is_new_private_and_unguessable() {
        let a = dir(&args(&[])).unwrap();
        let b = dir(&args(&[])).unwrap();
        let _cleanup = (Scratch(a.clone()), Scratch(b.clone()));
        assert_ne!(a, b);
        for d in [&a, &b] {
            let name = d.file_name().unwrap().to_string_lossy().into_owned();
            let random = name
                .strip_prefix(&format!("meshwork-demo-{}-", std::process::id()))
                .unwrap_or_else(|| panic!("{name}"));
            assert_eq!(random.len(), 16, "{name}");
            assert_eq!(d.parent(), Some(std::env::temp_dir().as_path()));
            assert_eq!(mode(d), 0o700, "{}", d.display());
            assert_eq!(std::fs::read_dir(d).unwrap().count(), 0);
        }
    }

    #[test]
    fn a_dir_others_can_write_into_is_refused() {
        let base = std::env::temp_dir().join(format!("meshwork-demo-own-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
        super::check_own_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = super::check_own_dir(&base).unwrap_err().to_string();
        assert!(
            e.contains("writable by group or others") && e.contains("chmod go-w"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_fresh_dir_never_reuses_an_existing_one() {
        let base = Scratch::new("fresh");
        // Someone prepared the first name, with a symlink in it.
        let taken = base.0.join("taken");
        std::fs::create_dir(&taken).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", taken.join("admin.token")).unwrap();
        let mut names = ["taken", "new"].into_iter();
        let d = fresh_dir(&base.0, || names.next().unwrap().to_owned()).unwrap();
        assert_eq!(d, base.0.join("new"));
        assert_eq!(mode(&d), 0o700);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);

        // Every name taken: an error naming --dir, not a reused directory.
        let e = fresh_dir(&base.0, || "taken".to_owned()).unwrap_err();
        assert!(format!("{e:#}").contains("--dir DIR"), "{e:#}");
    }

    #[test]
    fn a_secret_is_a_new_file_only_its_owner_reads() {
        let d = Scratch::new("secret");
        let p = d.0.join("admin.token");
        write_secret(&p, "s3cret").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "s3cret\n");
        assert_eq!(mode(&p), 0o600);
        // An earlier run's file of ours, even world-readable, is made anew.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&p, "again").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "again\n");
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn a_secret_is_never_written_through_a_symlink() {
        let d = Scratch::new("symlink");
        let victim = d.0.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let p = d.0.join("admin.token");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let e = format!("{:#}", write_secret(&p, "s3cret").unwrap_err());
        assert!(
            e.contains(&p.display().to_string()) && e.contains("symbolic link"),
            "{e}"
        );
        assert!(e.contains("remove it, or pick another --dir"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A dangling one too (it would create the file where it points).
        let dangling = d.0.join("dangling.token");
        std::os::unix::fs::symlink(d.0.join("elsewhere"), &dangling).unwrap();
        assert!(write_secret(&dangling, "s3cret").is_err());
        assert!(!d.0.join("elsewhere").exists());
    }

    #[test]
    fn a_secret_is_never_written_into_another_users_file() {
        if euid() != Some(0) {
            eprintln!("skipped: needs root to make a file of another user");
            return;
        }
        let d = Scratch::new("owner");
        let p = d.0.join("admin.token");
        std::fs::write(&p, "theirs").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        let e = format!("{:#}", write_secret(&p, "s3cret").unwrap_err());
        assert!(
            e.contains(&p.display().to_string()) && e.contains("belongs to user 65534"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "theirs");
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), 65534);
    }
}
