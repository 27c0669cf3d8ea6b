//! `outpost-devsim`: a Modbus TCP device whose registers change over time.
//!
//! `outpost-devsim --config sim.toml` serves the points in the file;
//! `outpost-devsim --listen 127.0.0.1:5020 --counters 10000` serves 10,000
//! holding registers that count up, for benchmarks. The bound address is
//! printed on stdout as `listening <addr>` so scripts can use port 0.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use outpost_devsim::{self as sim, SimConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "outpost-devsim",
    version,
    about = "Modbus TCP device simulator"
)]
struct Cli {
    /// The simulator's TOML file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address (overrides the file).
    #[arg(long)]
    listen: Option<String>,
    /// Holding registers 0..N count up every tick (overrides the file).
    #[arg(long)]
    counters: Option<u16>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg: SimConfig = match &cli.config {
        Some(p) => match sim::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        None => match toml::from_str("") {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if let Some(l) = cli.listen {
        cfg.listen = l;
    }
    if let Some(n) = cli.counters {
        cfg.counters = n;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(async move {
        let (s, listener, addr) = sim::bind(&cfg).await?;
        println!("listening {addr}");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::select! {
            r = sim::serve(cfg, s, listener, shutdown) => r,
            _ = tokio::signal::ctrl_c() => { stop.cancel(); Ok(()) }
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
