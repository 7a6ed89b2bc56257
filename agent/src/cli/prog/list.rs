use edgeplane::kernel::pinned;

use crate::cli::{status::attached_list, table, target::Target};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.target.dir()?;
    let programs = pinned::inventory(&dir)?
        .map(|i| i.programs)
        .unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&programs)?);
        return Ok(());
    }
    let now = pinned::now_unix();
    let rows: Vec<Vec<String>> = programs
        .iter()
        .map(|p| {
            vec![
                p.id.to_string(),
                p.name.clone(),
                p.kind.to_owned(),
                p.tag.clone(),
                p.loaded_at.map_or("-".into(), |t| {
                    format!("{} ago", table::age(now.saturating_sub(t)))
                }),
                attached_list(p),
            ]
        })
        .collect();
    table::print(
        &["ID", "NAME", "TYPE", "TAG", "LOADED", "ATTACHED TO"],
        &rows,
    );
    Ok(())
}
