//! `meshwork control`: run the control plane until SIGTERM / Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of the embedded store (created if missing); everything survives a restart.
    #[arg(long, default_value = "meshwork-data")]
    data_dir: PathBuf,
    /// xDS (ADS over gRPC) for proxies, Envoy and proxyless gRPC clients.
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds_addr: SocketAddr,
    /// HTTP/JSON resource API (what `meshwork apply/get/delete` talk to).
    #[arg(long, default_value = "127.0.0.1:15014")]
    api_addr: SocketAddr,
    /// Seconds a disconnected proxy's workload stays registered.
    #[arg(long, default_value_t = 30)]
    grace_secs: u64,
    #[arg(long, default_value = "info")]
    log_level: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let _log = proxy::logging::init(&args.log_level, false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let control = control::app::Control::start(control::app::Options {
            data_dir: Some(args.data_dir.clone()),
            xds_addr: args.xds_addr,
            api_addr: args.api_addr,
            grace: Duration::from_secs(args.grace_secs),
        })
        .await
        .context("starting the control plane")?;
        eprintln!(
            "meshwork control: xDS on {}, API on http://{}, data in {}",
            control.xds_addr(),
            control.api_addr(),
            args.data_dir.display()
        );
        crate::proxy_cmd::wait_for_signal().await;
        control.shutdown(Duration::from_secs(5)).await;
        Ok(ExitCode::SUCCESS)
    })
}
