//! `edgeplane registry get`: the agents registered in etcd, as JSON.

use std::path::PathBuf;

use anyhow::Context as _;
use edgeplane::{
    config::{self, RegistryConfig},
    registry::{client::Etcd, record, tls},
};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Print every agent record under the prefix, one JSON object per line.
    Get(GetArgs),
}

#[derive(clap::Args)]
struct GetArgs {
    /// etcd client URLs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// The registry's key prefix.
    #[arg(long, default_value_t = RegistryConfig::default_prefix())]
    prefix: String,
    /// Only this vehicle's agents.
    #[arg(long)]
    vin: Option<String>,
    /// CA certificate (PEM) that signed etcd's certificate; needed for https:// endpoints.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Command::Get(args) = args.command;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(get(args))
}

async fn get(args: GetArgs) -> anyhow::Result<()> {
    let prefix = match &args.vin {
        Some(vin) => {
            config::check_vin(vin)
                .map_err(anyhow::Error::msg)
                .context("--vin")?;
            format!("{}/vehicles/{vin}/agents/", args.prefix)
        }
        None => format!("{}/vehicles/", args.prefix),
    };
    let tls = tls::cli_config(
        args.ca.as_deref(),
        args.cert.as_deref().zip(args.key.as_deref()),
    )?;
    let etcd = Etcd::connect(&args.endpoints, tls.as_ref()).await?;
    let mut undecodable = 0;
    for kv in etcd.list(&prefix).await? {
        let key = String::from_utf8_lossy(&kv.key);
        // The vehicle's `rules` key lives beside its agents.
        if !key.contains("/agents/") {
            continue;
        }
        match record::decode(&kv.value) {
            Ok(record) => println!("{}", serde_json::to_string(&record)?),
            Err(e) => {
                eprintln!("{key}: not an agent record ({e})");
                undecodable += 1;
            }
        }
    }
    anyhow::ensure!(
        undecodable == 0,
        "{undecodable} record(s) could not be decoded"
    );
    Ok(())
}
