//! `meshwork apply -f FILE|DIR [--dry-run]`: send resources to the control
//! plane, all files in one all-or-nothing request.
//!
//! Contract: every `-f` is a file, a directory (its `.yaml`, `.yml` and
//! `.json` files, sorted, not recursive) or `-` (stdin). They go to
//! `POST /api/v1/apply` as one multi-file body, so the server validates them
//! together with what is stored and names the right file and line in every
//! error. Prints one line per resource: `Kind ns/name created|configured|unchanged`.
//! A `metadata.resourceVersion` in a document (as `get -o yaml` prints it)
//! makes that resource's update conditional.
//!
//! Non-goals: recursion into subdirectories, URLs, pruning what the files
//! no longer mention.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use hyper::Method;

use crate::resources::{block_on, Control, ControlArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// YAML/JSON file, directory of them, or `-` for stdin; repeat for several.
    #[arg(
        long = "filename",
        short = 'f',
        required = true,
        value_name = "FILE|DIR"
    )]
    files: Vec<PathBuf>,
    /// Validate against what is stored and show what would change, without changing it.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    control: ControlArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let files = read_inputs(&args.files)?;
    block_on(async move {
        let control = Control::new(&args.control);
        let body = serde_json::to_vec(&control::api::FilesBody { files })?;
        let path = if args.dry_run {
            "/api/v1/apply?dryRun=true"
        } else {
            "/api/v1/apply"
        };
        let answer = control
            .call(
                Method::POST,
                path,
                Some((control::api::FILES_CONTENT_TYPE, body)),
            )
            .await?;
        if !answer.status.is_success() {
            return Err(answer.error());
        }
        let resp: control::api::WriteResponse = serde_json::from_slice(&answer.body)
            .context("the control plane's answer is not an apply result")?;
        let suffix = if resp.dry_run { " (dry run)" } else { "" };
        for r in &resp.results {
            println!(
                "{} {}/{} {}{suffix}",
                r.kind, r.namespace, r.name, r.outcome
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Reads every input file, expanding directories.
fn read_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<control::api::FileBody>> {
    let mut files = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            files.push(control::api::FileBody {
                name: "stdin".into(),
                text,
            });
        } else if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && is_manifest(f))
                .collect();
            entries.sort();
            if entries.is_empty() {
                return Err(anyhow!("no .yaml, .yml or .json files in {}", p.display()));
            }
            for f in entries {
                files.push(read_file(&f)?);
            }
        } else {
            files.push(read_file(p)?);
        }
    }
    Ok(files)
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn read_file(p: &Path) -> anyhow::Result<control::api::FileBody> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(control::api::FileBody {
        name: p.display().to_string(),
        text,
    })
}
