use std::time::Duration;

use edgeplane::kernel::pinned::{self, Inventory};
use serde::Serialize;

use super::{client, table, target::Target};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Status {
    #[serde(flatten)]
    inventory: Inventory,
    /// The running agent's /readyz, when it answers.
    readiness: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    readiness_error: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.target.dir()?;
    let Some(inventory) = pinned::inventory(&dir)? else {
        if args.json {
            println!("null");
        } else {
            println!(
                "nothing is pinned in {}: no data plane, no agent",
                dir.display()
            );
        }
        return Ok(());
    };
    let (readiness, readiness_error) = match (&inventory.agent, inventory.agent_running) {
        (Some(a), true) => match client::get(a.http, "/readyz", Duration::from_secs(2)) {
            Ok((_, body)) => match serde_json::from_str(&body) {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(format!("bad /readyz JSON: {e}"))),
            },
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        _ => (None, None),
    };
    let status = Status {
        inventory,
        readiness,
        readiness_error,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print(&status);
    }
    Ok(())
}

fn print(s: &Status) {
    let inv = &s.inventory;
    let now = pinned::now_unix();
    match (&inv.agent, inv.agent_running) {
        (Some(a), true) => println!(
            "agent:      running, pid {}, version {}, up {}, config {}",
            a.pid,
            a.version,
            table::age(now.saturating_sub(a.started_at)),
            a.config.display()
        ),
        (Some(a), false) => println!(
            "agent:      not running (last: pid {}, version {}); the data plane it left keeps running",
            a.pid, a.version
        ),
        (None, running) => println!(
            "agent:      {}",
            if running {
                "running (no record yet)"
            } else {
                "not running"
            }
        ),
    }
    println!("data plane: pinned in {}", inv.dir.display());
    if let Some(e) = &inv.state_error {
        println!("warning:    {e}");
    }
    if let Some(a) = inv.agent.as_ref().filter(|_| inv.agent_running) {
        match (&s.readiness, &s.readiness_error) {
            (Some(r), _) => println!(
                "http:       {} ({})",
                a.http,
                if r["ready"] == true {
                    "ready"
                } else {
                    "not ready"
                }
            ),
            (None, Some(e)) => println!("http:       {} (unreachable: {e})", a.http),
            (None, None) => {}
        }
    }
    println!();
    let rows: Vec<Vec<String>> = inv
        .programs
        .iter()
        .map(|p| {
            vec![
                p.id.to_string(),
                p.name.clone(),
                p.kind.to_owned(),
                attached_list(p),
            ]
        })
        .collect();
    table::print(&["ID", "PROGRAM", "TYPE", "ATTACHED TO"], &rows);
    if let Some(components) = s
        .readiness
        .as_ref()
        .and_then(|r| r["components"].as_array())
    {
        println!();
        let rows: Vec<Vec<String>> = components
            .iter()
            .map(|c| {
                let text = |k: &str| c[k].as_str().unwrap_or("").to_owned();
                let mut state = text("state");
                if let Some(h) = c["hook"].as_str() {
                    state = format!("{state} ({h})");
                }
                if let Some(d) = c["detail"].as_str() {
                    state = format!("{state}: {d}");
                }
                vec![text("name"), state]
            })
            .collect();
        table::print(&["COMPONENT", "STATE"], &rows);
    }
}

pub fn attached_list(p: &pinned::PinnedProgram) -> String {
    if p.attached.is_empty() {
        return "-".into();
    }
    p.attached
        .iter()
        .map(|a| {
            format!(
                "{} ({}){}",
                a.iface,
                a.hook,
                if a.present { "" } else { " [interface gone]" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
