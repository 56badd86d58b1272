//! `meshwork validate` and `meshwork translate`: the translator, offline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Mesh YAML files (multi-document); repeat for several.
    #[arg(long = "file", short = 'f', required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct TranslateArgs {
    #[command(flatten)]
    input: Args,
    /// Translate for the proxy of this Workload (`namespace/name` or `name`).
    #[arg(long)]
    workload: Option<String>,
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_addr: SocketAddr,
    /// Also write an Envoy bootstrap (binary protobuf, `.pb`) holding the
    /// translated resources statically, for `envoy -c FILE`.
    #[arg(long)]
    envoy_bootstrap: Option<PathBuf>,
    /// Admin port of that Envoy bootstrap.
    #[arg(long, default_value_t = 9901)]
    envoy_admin_port: u16,
}

/// Loads and validates every file, reporting all errors of all files.
fn load(files: &[PathBuf]) -> Result<api::Mesh, String> {
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match api::load_file(f) {
            Ok(mut r) => resources.append(&mut r),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    api::validate(resources).map_err(|e| e.to_string())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match load(&args.files) {
        Ok(mesh) => {
            println!("ok: {} resources valid", mesh.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn translate(args: TranslateArgs) -> anyhow::Result<ExitCode> {
    let mesh = match load(&args.input.files) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let ctx = api::ProxyContext {
        outbound_addr: args.outbound_addr,
        inbound_addr: args.inbound_addr,
        workload: args.workload.as_deref().map(|w| match w.split_once('/') {
            Some((ns, n)) => (ns.to_owned(), n.to_owned()),
            None => ("default".to_owned(), w.to_owned()),
        }),
        detect_timeout: Duration::from_secs(1),
        certs_dir: None,
        capture: false,
    };
    let xds = api::translate(&mesh, &ctx);
    if let Some(path) = &args.envoy_bootstrap {
        let bootstrap = api::envoy_bootstrap(&xds, args.envoy_admin_port);
        std::fs::write(path, prost::Message::encode_to_vec(&bootstrap))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote Envoy bootstrap {}", path.display());
    }
    // What our proxy makes of it: the same view as its /config_dump.
    let snapshot = proxy::config::xds::from_resources_with(
        &xds.version,
        xds.listeners,
        xds.routes,
        xds.clusters,
        xds.endpoints,
        &proxy::config::Env::offline(),
    )
    .map_err(|e| anyhow::anyhow!("the proxy would refuse this config: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&snapshot)?);
    Ok(ExitCode::SUCCESS)
}
