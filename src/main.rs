//! The `walhoard` command line.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use walhoard_protocol::{ConnectParams, ReplicationClient};

#[derive(Parser)]
#[command(
    name = "walhoard",
    version,
    about = "PostgreSQL backup daemon and restore tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect over the replication protocol and print what the server reports about itself.
    Identify {
        /// libpq connection string or postgres:// URI (PG* variables and ~/.pgpass apply).
        #[arg(long, default_value = "")]
        conninfo: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

async fn identify(conninfo: &str, json: bool) -> Result<()> {
    let params = ConnectParams::parse(conninfo).context("parse --conninfo")?;
    let mut client = ReplicationClient::connect(&params)
        .await
        .with_context(|| format!("connect to {params}"))?;
    let id = client.identify_system().await.context("IDENTIFY_SYSTEM")?;
    let seg = client
        .wal_segment_size()
        .await
        .context("SHOW wal_segment_size")?;
    let version = client
        .connection()
        .server_param("server_version")
        .unwrap_or("unknown")
        .to_string();
    if json {
        let v = serde_json::json!({
            "system_id": id.system_id.to_string(),
            "timeline": id.timeline.get(),
            "xlogpos": id.xlogpos.to_string(),
            "wal_segment_size": seg.bytes(),
            "server_version": version,
        });
        println!("{v}");
    } else {
        println!("system_id:        {}", id.system_id);
        println!("timeline:         {}", id.timeline);
        println!("xlogpos:          {}", id.xlogpos);
        println!("wal_segment_size: {}", seg.bytes());
        println!("server_version:   {version}");
    }
    client.close().await.ok();
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WALHOARD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walhoard: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Identify { conninfo, json } => identify(&conninfo, json).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walhoard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
