//! `meshwork demo-app` (hidden): one of the demo's sample apps as a process
//! of its own, what `meshwork demo --transparent` runs in each host under
//! `meshwork run`.
//!
//! Contract: `frontend`, `catalog` and `inventory` serve on `--listen` until
//! SIGTERM or SIGINT, then exit 0. Their calls go to `host:port` targets
//! (`catalog:50051`, `inventory:7000`) resolved by the system resolver for
//! every new connection: they know nothing of the mesh. `traffic` first
//! waits (at most `--ready-within`) until `--target` answers from both
//! catalog versions (pinned with `x-catalog-version`), prints
//! [`READY`]..., then sends `--rps` requests a second and prints a summary
//! line every `--every` seconds; on SIGTERM or SIGINT (or after `--seconds`)
//! it prints the closing line and exits 0, and exits 1 if it never got ready.
//!
//! Non-goals: being useful outside the demo; any flag not needed by it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use super::apps::{self, Target};
use super::traffic;

/// The first words of the line `traffic` prints once both versions answered.
pub(super) const READY: &str = "demo-app traffic: ready";

#[derive(Debug, clap::Args)]
pub struct AppArgs {
    #[command(subcommand)]
    app: App,
}

#[derive(Debug, clap::Subcommand)]
enum App {
    /// HTTP; calls the catalog over gRPC.
    Frontend {
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Where the catalog is, `host:port`.
        #[arg(long, default_value = "catalog:50051")]
        catalog: Target,
    },
    /// gRPC; asks the inventory over TCP.
    Catalog {
        #[arg(long, default_value = "0.0.0.0:50051")]
        listen: SocketAddr,
        /// `v1` or `v2`.
        #[arg(long, value_parser = ["v1", "v2"])]
        version: String,
        /// Its instance name, e.g. `catalog-v1-0`.
        #[arg(long)]
        instance: String,
        /// Where the inventory is, `host:port`.
        #[arg(long, default_value = "inventory:7000")]
        inventory: Target,
    },
    /// TCP line protocol.
    Inventory {
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: SocketAddr,
    },
    /// Steady requests to the frontend, summed up on stdout.
    Traffic {
        /// Where the frontend is, `host:port`.
        #[arg(long, default_value = "frontend:8080")]
        target: Target,
        #[arg(long, default_value_t = 5.0)]
        rps: f64,
        /// Seconds between summary lines.
        #[arg(long, default_value_t = 5)]
        every: u64,
        /// Stop after this many seconds of traffic (0: until SIGTERM).
        #[arg(long, default_value_t = 0)]
        seconds: u64,
        /// Seconds to wait for both catalog versions to answer.
        #[arg(long, default_value_t = 60)]
        ready_within: u64,
    },
}

pub fn run(args: AppArgs) -> anyhow::Result<ExitCode> {
    let _log = proxy::logging::init("warn", false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(app(args.app))
}

async fn app(app: App) -> anyhow::Result<ExitCode> {
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))
    };
    match app {
        App::Frontend { listen, catalog } => apps::frontend(bind(listen).await?, catalog),
        App::Catalog {
            listen,
            version,
            instance,
            inventory,
        } => apps::catalog(
            bind(listen).await?,
            apps::Catalog {
                version: if version == "v2" { "v2" } else { "v1" },
                instance,
                inventory,
            },
        ),
        App::Inventory { listen } => apps::inventory(bind(listen).await?),
        App::Traffic {
            target,
            rps,
            every,
            seconds,
            ready_within,
        } => {
            if !(rps > 0.0 && rps <= 1000.0) {
                bail!("--rps must be between 0 and 1000");
            }
            let stop = async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                    _ = async {
                        if seconds > 0 {
                            tokio::time::sleep(Duration::from_secs(seconds)).await;
                        } else {
                            std::future::pending::<()>().await;
                        }
                    } => {}
                }
            };
            return traffic_app(target, rps, every, ready_within, stop).await;
        }
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn traffic_app(
    target: Target,
    rps: f64,
    every: u64,
    ready_within: u64,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    tokio::pin!(stop);
    // Both versions answer end to end before the traffic starts.
    let deadline = Instant::now() + Duration::from_secs(ready_within);
    let mut client = traffic::Client::new(target.clone());
    for pin in ["v1", "v2"] {
        loop {
            let result = tokio::select! {
                _ = &mut stop => return Ok(ExitCode::SUCCESS),
                r = client.get("/", Some(pin)) => r,
            };
            match result {
                Ok(a) if a.version == pin => break,
                result if Instant::now() > deadline => {
                    eprintln!(
                        "demo-app traffic: {target} did not answer from catalog-{pin} within \
                         {ready_within}s (last: {result:?})"
                    );
                    return Ok(ExitCode::FAILURE);
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    println!("{READY}: {target} answered from catalog-v1 and catalog-v2");

    let tally = traffic::Shared::default();
    let load = tokio::spawn(traffic::run(target, rps, tally.clone()));
    let started = Instant::now();
    let every = Duration::from_secs(every.max(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut before = traffic::Tally::default();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
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
    Ok(ExitCode::SUCCESS)
}
