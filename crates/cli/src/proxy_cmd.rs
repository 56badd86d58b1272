//! `meshwork proxy`: build the data-plane runtime with the requested number
//! of workers, start the proxy, and drain on SIGTERM / Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use proxy::accesslog::Target;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Mesh YAML file to run from; watched, changes apply without dropping connections.
    #[arg(long, short = 'c')]
    config: PathBuf,
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
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let log = proxy::logging::init(&args.log_level, false);
    let access_log = match args.access_log.as_str() {
        "-" => Target::Stdout,
        "off" | "" => Target::Off,
        path => Target::File(PathBuf::from(path)),
    };
    let opts = proxy::Options {
        config: args.config.clone(),
        outbound_addr: args.outbound_addr,
        inbound_addr: args.inbound_addr,
        admin_addr: args.admin_addr,
        workload: args.workload.clone(),
        access_log,
        detect_timeout: Duration::from_millis(args.detect_timeout_ms),
        poll_interval: Duration::from_millis(args.poll_ms.max(50)),
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
        let proxy = proxy::Proxy::start(opts, log)
            .await
            .with_context(|| format!("starting the proxy from {}", args.config.display()))?;
        for (name, addr) in proxy.listeners() {
            tracing::info!(listener = %name, %addr, "ready");
        }
        tracing::info!(admin = %proxy.admin_addr(), "proxy ready");
        wait_for_signal().await;
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

async fn wait_for_signal() {
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
