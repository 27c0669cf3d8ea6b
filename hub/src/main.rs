//! `outpost-hub`: parse the command line and call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "outpost-hub", version, about = "Outpost fleet hub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print what would run.
    Check {
        /// The hub's TOML config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match outpost_hub::config::load(&config, std::env::vars()) {
            Ok(c) => {
                println!("config {}: ok", config.display());
                println!(
                    "hub listen {} (QUIC) data_dir {}",
                    c.hub.listen,
                    c.hub.data_dir.display()
                );
                println!("store {} synchronous={}", c.store.kind, c.store.synchronous);
                println!("api {}", c.api.listen);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
    }
}
