//! `meshwork`: the one binary. `main` parses flags, sets up logging and hands
//! over to the subcommand's module; the wiring lives in the libraries.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;
mod proxy_cmd;
mod validate;

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
    /// Run a sidecar proxy (standalone: configured from a mesh YAML file).
    Proxy(proxy_cmd::Args),
    /// Check mesh YAML files; print every error and exit non-zero if any.
    Validate(validate::Args),
    /// Print the xDS resources the translator makes from mesh YAML files.
    Translate(validate::TranslateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Proxy(args) => proxy_cmd::run(args),
        Command::Validate(args) => validate::run(args),
        Command::Translate(args) => validate::translate(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
