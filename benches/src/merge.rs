//! `edgeplane-bench report`: merges the suites' JSON rows and criterion's estimates into
//! latest.json and latest.md, and prints the Markdown.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::report::{Report, Row};

#[derive(clap::Args)]
pub struct Options {
    /// Directory for latest.json and latest.md.
    #[arg(long)]
    out: PathBuf,
    /// criterion's output directory (target/criterion), whose estimates become micro rows.
    #[arg(long)]
    criterion: Option<PathBuf>,
    /// Rows written by the suites (--json), in report order.
    parts: Vec<PathBuf>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for p in &opts.parts {
        rows.extend(Report::load(p)?.rows);
    }
    if let Some(dir) = &opts.criterion {
        rows.extend(criterion_rows(dir)?);
    }
    let report = Report { rows };
    report.save(&opts.out.join("latest.json"))?;
    let md = report.markdown();
    std::fs::write(opts.out.join("latest.md"), &md)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    println!("{md}");
    Ok(())
}

/// One row per criterion benchmark: the mean of its latest run (`new/estimates.json`).
fn criterion_rows(dir: &Path) -> anyhow::Result<Vec<Row>> {
    let mut found = Vec::new();
    walk(dir, &mut found)?;
    found.sort();
    let mut rows = Vec::new();
    for new in found {
        let read = |f: &str| -> anyhow::Result<serde_json::Value> {
            let p = new.join(f);
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            Ok(serde_json::from_str(&text)?)
        };
        let (bench, est) = (read("benchmark.json")?, read("estimates.json")?);
        let name = bench["full_id"]
            .as_str()
            .context("benchmark.json without full_id")?;
        let mean = est["mean"]["point_estimate"]
            .as_f64()
            .context("estimates.json without mean")?;
        rows.push(Row::micro(name, mean, "criterion, mean"));
    }
    Ok(rows)
}

/// Every `new` directory holding criterion's estimates below `dir`.
fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") && path.join("estimates.json").is_file() {
            found.push(path);
        } else {
            walk(&path, found)?;
        }
    }
    Ok(())
}
