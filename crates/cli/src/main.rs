//! `meshwork`: the one binary. `main` parses flags, sets up logging and hands
//! over to the subcommand's module; the wiring lives in the libraries.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod apply;
mod ca_cmd;
mod control_cmd;
mod demo;
mod proxy_cmd;
mod resources;
mod run_cmd;
mod status_cmd;
mod validate;
mod why;

#[derive(Debug, Parser)]
#[command(name = "meshwork", version, about = "meshwork service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the mesh on this machine with sample services and print what to try.
    Demo(demo::Args),
    /// The control plane's CA: status, trust bundle, root rotation.
    Ca(ca_cmd::CaArgs),
    /// Join tokens a proxy bootstraps its identity with.
    Token(ca_cmd::TokenArgs),
    /// Run the control plane: store, resource API, registry, xDS server.
    Control(control_cmd::Args),
    /// Run a sidecar proxy, fed by a control plane (--control) or a mesh YAML file (--config).
    Proxy(Box<proxy_cmd::Args>),
    /// Start an application with its sidecar: the app starts once the sidecar is ready, traffic
    /// is captured when root (explicit mode otherwise), and the exit code is the app's.
    Run(Box<run_cmd::Args>),
    /// Create or update resources from YAML/JSON files through the control plane.
    Apply(apply::Args),
    /// List resources (a table, or -o yaml|json), or show one.
    Get(resources::GetArgs),
    /// Delete a resource.
    Delete(resources::DeleteArgs),
    /// Show a service: ports, routes, policy, endpoints and callers.
    Describe(resources::DescribeArgs),
    /// List connected proxies: what each was sent and acknowledged, and NACK reasons.
    ProxyStatus(status_cmd::StatusArgs),
    /// Show the resources one proxy holds.
    ProxyConfig(status_cmd::ConfigArgs),
    /// Check mesh YAML files; print every error and exit non-zero if any.
    Validate(validate::Args),
    /// Print the xDS resources the translator makes from mesh YAML files.
    Translate(validate::TranslateArgs),
    /// One of the demo's sample apps, as `meshwork demo --transparent` runs it.
    #[command(hide = true)]
    DemoApp(demo::AppArgs),
    /// Explain whether a request from a source may reach a service, and which
    /// AuthorizationPolicy decided (exit 0 allowed, 1 denied, 2 error).
    Why(why::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Control(args) => control_cmd::run(args),
        Command::Ca(args) => ca_cmd::ca(args),
        Command::Token(args) => ca_cmd::token(args),
        Command::Demo(args) => demo::run(args),
        Command::Proxy(args) => proxy_cmd::run(*args),
        Command::Run(args) => run_cmd::run(*args),
        Command::Apply(args) => apply::run(args),
        Command::Get(args) => resources::get(args),
        Command::Delete(args) => resources::delete(args),
        Command::Describe(args) => resources::describe(args),
        Command::ProxyStatus(args) => status_cmd::status(args),
        Command::ProxyConfig(args) => status_cmd::config(args),
        Command::Validate(args) => validate::run(args),
        Command::Translate(args) => validate::translate(args),
        Command::Why(args) => why::run(args),
        Command::DemoApp(args) => demo::app(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
