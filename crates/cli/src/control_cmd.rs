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
    /// SPIFFE trust domain of every identity the CA issues.
    #[arg(long, default_value = control::app::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of workload certificates (SVIDs) when the proxy asks for none: 90s, 30m, 24h.
    #[arg(long, default_value = "24h", value_parser = crate::proxy_cmd::parse_duration)]
    svid_ttl: Duration,
    /// Longest SVID lifetime the CA grants, whatever is asked.
    #[arg(long, default_value = "24h", value_parser = crate::proxy_cmd::parse_duration)]
    max_svid_ttl: Duration,
    /// Use this CA certificate (PEM; an intermediate followed by its chain up to the root)
    /// instead of the root generated in --data-dir. Needs --ca-key.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The PKCS#8 PEM private key of --ca-cert.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Extra DNS name or IP address proxies dial the xDS port by (repeatable);
    /// the listen IP and `localhost` are always in the serving certificate.
    #[arg(long = "tls-san", value_name = "NAME")]
    tls_sans: Vec<String>,
    /// Also accept plaintext xDS on the xDS port (proxyless gRPC, proxies without
    /// --token). The CA's Sign method stays TLS-only.
    #[arg(long)]
    plaintext_xds: bool,
    /// Read the admin token from this file instead of creating `<data-dir>/admin.token`.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
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
            grace: Duration::from_secs(args.grace_secs),
            trust_domain: args.trust_domain.clone(),
            svid_ttl: args.svid_ttl,
            max_svid_ttl: args.max_svid_ttl,
            ca_files: args.ca_cert.clone().zip(args.ca_key.clone()),
            tls_sans: args.tls_sans.clone(),
            plaintext_xds: args.plaintext_xds,
            admin_token_file: args.admin_token_file.clone(),
            ..control::app::Options::new(Some(args.data_dir.clone()), args.xds_addr, args.api_addr)
        })
        .await
        .context("starting the control plane")?;
        eprintln!(
            "meshwork control: xDS on {} ({}), API on http://{}, data in {}\n  trust bundle: {} (or `meshwork ca bundle`)\n  admin token:  {}",
            control.xds_addr(),
            if args.plaintext_xds { "TLS and plaintext" } else { "TLS" },
            control.api_addr(),
            args.data_dir.display(),
            args.data_dir.join("ca").join("bundle.pem").display(),
            control
                .admin_token_path()
                .map_or_else(|| "(in memory)".to_string(), |p| p.display().to_string()),
        );
        crate::proxy_cmd::wait_for_signal().await;
        control.shutdown(Duration::from_secs(5)).await;
        Ok(ExitCode::SUCCESS)
    })
}
