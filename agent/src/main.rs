//! `outpost-agent`: parse the command line, set up logs, call the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use outpost_agent::config::{self, AgentConfig, ConfigError};
use outpost_agent::outbox::OutboxReader;
use outpost_agent::report;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "outpost-agent",
    version,
    about = "Outpost edge agent: Modbus and MQTT in, a durable outbox, sync to the hub."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    /// The agent's TOML config file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Validate the config and print what would run.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the outbox (works while the agent runs).
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// The fleet policy in force at this agent (works while the agent runs).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Enroll this device: make its key here, and trade a one-time token for
    /// its certificate (written where [uplink] names cert, key and ca).
    Enroll(EnrollArgs),
    /// The agent's certificate.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Ask the running agent to renew its certificate with a new key over its
    /// hub session now (or at its next start), rather than two thirds into
    /// its validity.
    Renew(ConfigArg),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("trust").required(true).args(["ca_fingerprint", "ca_file"])))]
struct EnrollArgs {
    /// The hub's host:port (UDP), as the device reaches it.
    #[arg(long, value_name = "HOST:PORT")]
    hub: String,
    /// The file holding the token from `outpost-hub enroll create`.
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The fleet CA certificate's SHA-256 fingerprint (64 hex digits).
    #[arg(long, value_name = "SHA256HEX")]
    ca_fingerprint: Option<String>,
    /// The fleet CA certificate (PEM).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Replace an existing key (its certificate stops working).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// The version in force, how many of its rules select this agent, and
    /// its text.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Counts, sizes, seq range and evictions.
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// The newest events, oldest first.
    Tail {
        #[command(flatten)]
        config: ConfigArg,
        /// How many events.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
}

fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    config::load_and_validate(path)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config, json } => load(&config.config).map(|c| {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            if json {
                println!("{}", report::check_json(&c));
            } else {
                print!("{}", report::check_text(&c));
            }
        }),
        Command::Run(config) => match load(&config.config) {
            Ok(c) => return run(c),
            Err(e) => Err(e),
        },
        Command::Outbox { command } => return outbox(command),
        Command::Enroll(args) => return enroll(args),
        Command::Policy {
            command: PolicyCommand::Show { config, json },
        } => match load(&config.config) {
            Ok(c) => return policy_show(&c, json),
            Err(e) => Err(e),
        },
        Command::Cert {
            command: CertCommand::Renew(config),
        } => match load(&config.config) {
            Ok(c) => return cert_renew(&c),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn enroll(args: EnrollArgs) -> ExitCode {
    use outpost_agent::enroll::{CaPin, EnrollRequest};
    let path = &args.config.config;
    let raw = match config::load(path, std::env::vars()) {
        Ok(raw) => raw,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let has_id = raw.agent.id.is_some();
    let cfg = match raw.validate(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(uplink) = cfg.uplink.clone().filter(|_| has_id) else {
        eprintln!(
            "error: {}: enrolling needs [agent] id and an [uplink] section (where the certificate, key and CA go)",
            path.display()
        );
        return ExitCode::from(2);
    };
    let ca = match (args.ca_fingerprint, args.ca_file) {
        (Some(fp), _) => CaPin::Fingerprint(fp),
        (None, Some(file)) => CaPin::File(file),
        (None, None) => {
            eprintln!("error: give --ca-fingerprint or --ca-file");
            return ExitCode::from(2);
        }
    };
    let req = EnrollRequest {
        hub: args.hub,
        token_file: args.token_file,
        ca,
        force: args.force,
        agent_id: cfg.agent_id.clone(),
        uplink,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(outpost_agent::enroll::enroll(&req)) {
        Ok(done) => {
            println!(
                "enrolled {} at {}: certificate in {}",
                req.agent_id,
                req.hub,
                done.cert.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn outbox(command: OutboxCommand) -> ExitCode {
    let path = match &command {
        OutboxCommand::Stats { config, .. } | OutboxCommand::Tail { config, .. } => {
            config.config.clone()
        }
    };
    let cfg = match load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match outbox_verb(&cfg, command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn outbox_verb(cfg: &AgentConfig, command: OutboxCommand) -> anyhow::Result<()> {
    let ob = OutboxReader::open(&cfg.outbox.path, cfg.agent_id.clone())?;
    match command {
        OutboxCommand::Stats { json, .. } => {
            let stats = ob.stats()?;
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                print!("{}", report::stats_text(&stats));
            }
        }
        OutboxCommand::Tail { limit, json, .. } => {
            for ev in ob.tail(limit)? {
                if json {
                    println!("{}", ev.json_line());
                } else {
                    println!("{}", report::event_text(&ev));
                }
            }
        }
    }
    Ok(())
}

fn policy_show(cfg: &AgentConfig, json: bool) -> ExitCode {
    let store = match outpost_agent::policy::PolicyStore::open(&cfg.data_dir, &cfg.labels) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let p = store.current();
    let text = if json {
        format!(
            "{}\n",
            serde_json::json!({
                "version": p.version.0,
                "rules": p.compiled.rules(),
                "labels": p.labels,
                "text": p.text,
            })
        )
    } else if p.version.0 == 0 {
        "no policy from the hub yet: every stream is allowed\n".to_owned()
    } else {
        let labels: Vec<String> = p
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.escape_debug()))
            .collect();
        let mut text = format!(
            "# policy version {} in force; {} of its {} rules select this agent (labels {})\n{}",
            p.version.0,
            p.compiled.rules(),
            p.policy.rules.len(),
            if labels.is_empty() {
                "none".to_owned()
            } else {
                labels.join(",")
            },
            p.text
        );
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text
    };
    write_stdout(&text)
}

/// Writes `text` to stdout. A reader that went away (`| head -1`) is not an
/// error; any other failure is one line on stderr and exit 1, never a panic.
fn write_stdout(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

fn cert_renew(cfg: &AgentConfig) -> ExitCode {
    let Some(uplink) = &cfg.uplink else {
        eprintln!(
            "error: {}: uplink: not configured, so there is no hub certificate to renew",
            cfg.source.display()
        );
        return ExitCode::from(2);
    };
    match outpost_agent::cert::request_renewal(&cfg.data_dir) {
        Ok(path) => {
            println!(
                "renewal requested ({}): the running agent asks the hub within 5 s while connected, or at its next connection; {} is replaced when the hub's certificate arrives",
                path.display(),
                uplink.cert.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cfg: AgentConfig) -> ExitCode {
    if let Err(e) =
        outpost_agent::logging::init(&cfg.observability.log, &cfg.observability.log_format)
    {
        eprintln!("error: {}: observability: {e}", cfg.source.display());
        return ExitCode::from(2);
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
        .and_then(|rt| {
            rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let signals = shutdown.clone();
                let agent = outpost_agent::run::run(cfg, shutdown.clone());
                tokio::pin!(agent);
                tokio::select! {
                    r = &mut agent => return r.map_err(anyhow::Error::from),
                    () = wait_for_signal() => {}
                }
                signals.cancel();
                agent.await.map_err(anyhow::Error::from)
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Agent failed.");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received."),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received."),
    }
}
