//! `meshwork proxy-status` and `meshwork proxy-config`: what each connected
//! proxy (ours, Envoy, proxyless gRPC) has been sent, what it acknowledged,
//! and why it refused what it refused.

use std::process::ExitCode;

use serde_json::Value;

use crate::resources::{block_on, Control, ControlArgs};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Output: a table (default) or `json`.
    #[arg(long, short = 'o', value_parser = ["json", "table"])]
    output: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The proxy's id (`<workload>.<namespace>`, as `proxy-status` lists it).
    id: String,
    /// Output: a table of resources (default) or `json`.
    #[arg(long, short = 'o', value_parser = ["json", "table"])]
    output: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
}

/// xDS types (as the status JSON names them) in the order a proxy receives them.
const TYPES: [(&str, &str); 4] = [
    ("clusters", "CDS"),
    ("endpoints", "EDS"),
    ("listeners", "LDS"),
    ("routes", "RDS"),
];

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let list = Control::new(&args.control)
            .get_json("/api/v1/proxies")
            .await?;
        if args.output.as_deref() == Some("json") {
            println!("{}", serde_json::to_string_pretty(&list)?);
            return Ok(ExitCode::SUCCESS);
        }
        let proxies = list.as_array().cloned().unwrap_or_default();
        if proxies.is_empty() {
            println!("no proxies connected");
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{:<32} {:<20} {:<16} {:<7} {:<7} {:<7} {:<7}",
            "ID", "SERVICE", "ADDRESS", "CDS", "EDS", "LDS", "RDS"
        );
        let mut nacks = Vec::new();
        for p in &proxies {
            let cells: Vec<String> = TYPES
                .iter()
                .map(|(t, short)| {
                    let ty = find_type(p, t);
                    match ty {
                        None => "-".to_owned(),
                        Some(ty) => {
                            if let Some(n) = ty.get("last_nack").filter(|n| !n.is_null()) {
                                nacks.push(format!(
                                    "{} {short} NACK of version {}: {}",
                                    str_of(p, "id"),
                                    str_of(n, "version"),
                                    str_of(n, "reason")
                                ));
                            }
                            if ty["in_sync"].as_bool() == Some(true) {
                                "SYNCED".to_owned()
                            } else if ty.get("last_nack").is_some_and(|n| !n.is_null()) {
                                "NACKED".to_owned()
                            } else {
                                "STALE".to_owned()
                            }
                        }
                    }
                })
                .collect();
            println!(
                "{:<32} {:<20} {:<16} {:<7} {:<7} {:<7} {:<7}",
                str_of(p, "id"),
                str_of(p, "service"),
                str_of(p, "address"),
                cells[0],
                cells[1],
                cells[2],
                cells[3]
            );
        }
        for n in nacks {
            println!("{n}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn config(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let path = format!("/api/v1/proxies/{}", args.id);
        let p = Control::new(&args.control).get_json(&path).await?;
        if args.output.as_deref() == Some("json") {
            println!("{}", serde_json::to_string_pretty(&p)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!("{:<6} {:<56} VERSION", "TYPE", "NAME");
        for (t, short) in TYPES {
            let Some(ty) = find_type(&p, t) else { continue };
            for r in ty["resources"].as_array().into_iter().flatten() {
                println!(
                    "{short:<6} {:<56} {}",
                    str_of(r, "name"),
                    str_of(r, "version")
                );
            }
            if let Some(n) = ty.get("last_nack").filter(|n| !n.is_null()) {
                println!("{short:<6} last NACK: {}", str_of(n, "reason"));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The entry of a type in a proxy's `types`.
fn find_type<'a>(p: &'a Value, t: &str) -> Option<&'a Value> {
    p["types"].get(t)
}

fn str_of(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}
