use anyhow::Context as _;
use aya::maps::MapInfo;
use edgeplane::kernel::pinned::{self, PinnedProgram};
use serde::Serialize;

use crate::cli::{status::attached_list, table, target::Target};

#[derive(clap::Args)]
pub struct Args {
    /// Kernel program id or program name, as `edgeplane prog list` shows them.
    program: String,
    #[command(flatten)]
    target: Target,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    program: &'a PinnedProgram,
    maps: Vec<MapRow>,
}

#[derive(Serialize)]
struct MapRow {
    id: u32,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.target.dir()?;
    let programs = pinned::inventory(&dir)?
        .map(|i| i.programs)
        .unwrap_or_default();
    let p = programs
        .iter()
        .find(|p| p.name == args.program || p.id.to_string() == args.program)
        .with_context(|| {
            format!(
                "no program `{}` is pinned in {} (`edgeplane prog list` shows those that are)",
                args.program,
                dir.display()
            )
        })?;
    let maps: Vec<MapRow> = p
        .map_ids
        .iter()
        .filter_map(|&id| MapInfo::from_id(id).ok())
        .map(|m| MapRow {
            id: m.id(),
            name: m.name_as_str().unwrap_or("?").to_owned(),
            kind: m
                .map_type()
                .map_or_else(|_| "?".into(), |t| format!("{t:?}").to_lowercase()),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: m.max_entries(),
        })
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Shown { program: p, maps })?
        );
        return Ok(());
    }
    let now = pinned::now_unix();
    let opt = |v: Option<u32>| v.map_or("-".into(), |v| v.to_string());
    for (k, v) in [
        ("name", p.name.clone()),
        ("id", p.id.to_string()),
        ("type", p.kind.to_owned()),
        ("tag", p.tag.clone()),
        (
            "loaded",
            p.loaded_at.map_or("-".into(), |t| {
                format!("{} ago", table::age(now.saturating_sub(t)))
            }),
        ),
        ("translated", format!("{} bytes", opt(p.translated_bytes))),
        ("jited", format!("{} bytes", p.jited_bytes)),
        ("verified insns", opt(p.verified_insns)),
        (
            "runs",
            if p.run_count == 0 {
                "- (enable with sysctl kernel.bpf_stats_enabled=1)".into()
            } else {
                format!(
                    "{} in {:.3} s, {} ns each",
                    p.run_count,
                    p.run_time_ns as f64 / 1e9,
                    p.run_time_ns / p.run_count
                )
            },
        ),
        ("attached to", attached_list(p)),
    ] {
        println!("{k:<15} {v}");
    }
    println!();
    let rows: Vec<Vec<String>> = maps
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.name.clone(),
                m.kind.clone(),
                m.key_size.to_string(),
                m.value_size.to_string(),
                m.max_entries.to_string(),
            ]
        })
        .collect();
    table::print(
        &["MAP ID", "NAME", "TYPE", "KEY", "VALUE", "MAX ENTRIES"],
        &rows,
    );
    Ok(())
}
