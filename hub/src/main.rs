//! `outpost-hub`: parse the command line and call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::NonEmptyStringValueParser;
use clap::error::ErrorKind;
use clap::{ArgGroup, Parser, Subcommand};
use outpost_hub::ca::{self, Validity};
use outpost_hub::config::StoreKind;
use outpost_hub::store::Synchronous;
use outpost_protocols::AgentId;

#[derive(Parser)]
#[command(name = "outpost-hub", version, about = "Outpost fleet hub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve agents until SIGTERM or SIGINT.
    Run {
        /// The hub's TOML config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate the config and print what would run.
    Check {
        /// The hub's TOML config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// The fleet CA: create it, issue the hub's and the agents' certificates.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The fleet registry (works while the hub runs).
    Fleet {
        #[command(subcommand)]
        command: outpost_hub::verbs::FleetCommand,
    },
    /// Stored events (works while the hub runs).
    Events {
        #[command(subcommand)]
        command: outpost_hub::verbs::EventsCommand,
    },
    /// The sinks: queues, deliveries, errors (works while the hub runs).
    Sinks {
        #[command(subcommand)]
        command: outpost_hub::verbs::SinksCommand,
    },
    /// The fleet's policy: apply, show, history, diff (works while the hub runs).
    Policy {
        #[command(subcommand)]
        command: outpost_hub::admin::PolicyCommand,
    },
    /// An agent's standing: its labels, revocation (works while the hub runs).
    Agent {
        #[command(subcommand)]
        command: outpost_hub::agents::AgentCommand,
    },
    /// The tamper-evident audit log: list, verify.
    Audit {
        #[command(subcommand)]
        command: outpost_hub::admin::AuditCommand,
    },
    /// One-time enrollment tokens: create, list, revoke (works while the hub runs).
    Enroll {
        #[command(subcommand)]
        command: outpost_hub::enroll::verbs::EnrollCommand,
    },
    /// Static API tokens: create (printed once), list, revoke.
    Token {
        #[command(subcommand)]
        command: outpost_hub::api::auth::verbs::TokenCommand,
    },
    /// Commands to agents: send, status, list (the break-glass path, as
    /// local:<login> in the admin role; works while the hub runs).
    #[command(name = "command")]
    Cmd {
        #[command(subcommand)]
        command: outpost_hub::commands::verbs::CommandVerb,
    },
    /// The operator HTTP API's contract.
    Api {
        #[command(subcommand)]
        command: ApiCommand,
    },
}

#[derive(Subcommand)]
enum ApiCommand {
    /// Print the OpenAPI 3.1 document (docs/api/openapi.json).
    Openapi,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the fleet CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        /// The CA's folder, created if missing.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The CA certificate's common name.
        #[arg(long, default_value = ca::DEFAULT_CA_NAME, value_parser = NonEmptyStringValueParser::new())]
        name: String,
        /// Days the CA certificate is valid.
        #[arg(long, value_name = "N", default_value = "3650")]
        days: Validity,
        /// Replace an existing CA; every certificate it issued stops being trusted.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent's certificate (--agent) or the hub's (--hub) into OUT.
    #[command(group(ArgGroup::new("subject").required(true).args(["agent", "hub"])))]
    Issue {
        /// The CA's folder, as made by `ca init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The agent's id: writes OUT/ca.pem, OUT/agent.pem, OUT/agent.key.
        #[arg(long, value_name = "ID", value_parser = AgentId::parse)]
        agent: Option<AgentId>,
        /// A DNS name or IP address of the hub (repeatable): writes OUT/ca.pem,
        /// OUT/hub.pem, OUT/hub.key.
        #[arg(long, value_name = "NAME")]
        hub: Vec<String>,
        /// Where to write the files, created if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Days the certificate is valid (never beyond the CA's own expiry).
        #[arg(long, value_name = "N", default_value = "825")]
        days: Validity,
        /// Seconds the certificate is valid instead of --days (1 to 86400),
        /// for tests of renewal and expiry; hidden from --help.
        #[arg(long, value_name = "SECONDS", hide = true, conflicts_with = "days", value_parser = validity_secs)]
        validity_secs: Option<Validity>,
        /// The hub's config file: record the issue in that hub's audit log
        /// and, for an agent, bind the new certificate to it in the registry.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Who issues it, for the audit log, as `local:NAME` (default: the
        /// login name).
        #[arg(long, value_name = "NAME")]
        actor: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match cli.command {
        Command::Run { config } => match outpost_hub::config::load(&config, std::env::vars()) {
            Ok(c) => run(c, config),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Check { config } => match outpost_hub::config::load(&config, std::env::vars()) {
            Ok(c) => {
                println!("config {}: ok", config.display());
                println!(
                    "hub listen {} (QUIC) data_dir {}",
                    c.hub.listen,
                    c.hub.data_dir.display()
                );
                match &c.store {
                    StoreKind::Sqlite { synchronous } => println!(
                        "store sqlite synchronous={}",
                        match synchronous {
                            Synchronous::Full => "full",
                            Synchronous::Normal => "normal",
                        }
                    ),
                    StoreKind::JetStream(js) => println!("store jetstream url {}", js.url()),
                }
                println!(
                    "region {} (policy residency: the store is in this region)",
                    c.hub.region.as_deref().unwrap_or("not set")
                );
                println!("api {}", c.api.listen);
                for s in &c.sinks {
                    println!(
                        "sink {} {} region {} batch_max {}",
                        s.id,
                        s.kind.name(),
                        s.region.as_deref().unwrap_or("not set"),
                        s.batch_max
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Ca { command } => match run_ca(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Policy { command } => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            verb_exit(outpost_hub::admin::policy(
                &command,
                &env,
                &mut std::io::stdout().lock(),
            ))
        }
        Command::Agent { command } => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            verb_exit(outpost_hub::agents::agent(
                &command,
                &env,
                &mut std::io::stdout().lock(),
            ))
        }
        Command::Audit { command } => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            verb_exit(outpost_hub::admin::audit(
                &command,
                &env,
                &mut std::io::stdout().lock(),
            ))
        }
        Command::Token { command } => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            match outpost_hub::api::auth::verbs::token(
                &command,
                &env,
                &mut std::io::stdout().lock(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Api {
            command: ApiCommand::Openapi,
        } => {
            print!("{}", outpost_hub::api::openapi::document());
            ExitCode::SUCCESS
        }
        Command::Fleet { command } => verb_exit(outpost_hub::verbs::fleet(
            &command,
            std::env::vars(),
            &mut std::io::stdout().lock(),
        )),
        Command::Sinks { command } => verb_exit(outpost_hub::verbs::sinks(
            &command,
            std::env::vars(),
            &mut std::io::stdout().lock(),
        )),
        Command::Events { command } => verb_exit(outpost_hub::verbs::events(
            &command,
            std::env::vars(),
            &mut std::io::stdout().lock(),
        )),
        Command::Cmd { command } => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            match outpost_hub::commands::verbs::command(
                &command,
                &env,
                &mut std::io::stdout().lock(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Enroll { command } => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            match outpost_hub::enroll::verbs::enroll(&command, &env, &mut std::io::stdout().lock())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}

/// `--validity-secs`: a validity in seconds.
fn validity_secs(s: &str) -> Result<Validity, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of seconds"))?;
    Validity::seconds(n).map_err(|e| e.to_string())
}

fn run_ca(command: CaCommand) -> Result<(), anyhow::Error> {
    match command {
        CaCommand::Init {
            dir,
            name,
            days,
            force,
        } => {
            ca::init(&dir, &name, days, force)?;
            println!(
                "wrote {} and {} (mode 0600), valid {} days",
                dir.join(ca::CA_CERT).display(),
                dir.join(ca::CA_KEY).display(),
                days.get()
            );
        }
        CaCommand::Issue {
            dir,
            agent,
            hub,
            out,
            days,
            validity_secs,
            config,
            actor,
        } => {
            let days = validity_secs.unwrap_or(days);
            // The hub's config is read first, so a bad one refuses the issue.
            let audit = match &config {
                Some(c) => Some(outpost_hub::admin::AuditTarget::open(c, std::env::vars())?),
                None => None,
            };
            let (cert, key, subject) = match &agent {
                Some(id) => {
                    ca::issue_agent(&dir, id, &out, days)?;
                    if let Some(a) = &audit {
                        let env: Vec<(String, String)> = std::env::vars().collect();
                        let actor = outpost_hub::admin::local_actor(actor.as_deref(), &env);
                        let detail = format!(
                            "{} valid {days}, from CA {}",
                            out.join(ca::AGENT_CERT).display(),
                            dir.display()
                        );
                        let (serial, fingerprint) = a.record_agent_certificate(
                            &actor,
                            id,
                            &out.join(ca::AGENT_CERT),
                            &detail,
                        )?;
                        println!(
                            "bound agent {id} to serial {serial}, fingerprint sha256:{fingerprint}"
                        );
                    }
                    (ca::AGENT_CERT, ca::AGENT_KEY, format!("agent {id}"))
                }
                None => {
                    ca::issue_hub(&dir, &hub, &out, days)?;
                    (ca::HUB_CERT, ca::HUB_KEY, format!("hub {}", hub.join(",")))
                }
            };
            if let (Some(a), None) = (audit, &agent) {
                let env: Vec<(String, String)> = std::env::vars().collect();
                let actor = outpost_hub::admin::local_actor(actor.as_deref(), &env);
                a.record(
                    &actor,
                    "ca.issued",
                    &subject,
                    &format!(
                        "{} valid {days}, from CA {}",
                        out.join(cert).display(),
                        dir.display()
                    ),
                )?;
            }
            println!(
                "wrote {}, {} and {} (mode 0600)",
                out.join(ca::CA_CERT).display(),
                out.join(cert).display(),
                out.join(key).display()
            );
        }
    }
    Ok(())
}

/// The exit status of an operator verb: its error as one line on stderr, and
/// silence when the reader of the output went away (`| head`).
fn verb_exit(result: Result<(), outpost_hub::verbs::VerbError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Help and version go to stdout as clap renders them; any other command-line
/// error is one line on stderr and exit status 2, as for every other bad input.
fn usage_error(e: &clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let line = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("{line}");
    ExitCode::from(2)
}

fn run(cfg: outpost_hub::config::HubConfig, path: PathBuf) -> ExitCode {
    if let Err(e) = outpost_hub::logging::init(&cfg.observability.log) {
        eprintln!("error: {}: observability.log: {e}", path.display());
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let hub = outpost_hub::run::run(cfg, &path, shutdown.clone(), None);
        tokio::pin!(hub);
        tokio::select! {
            r = &mut hub => return r,
            () = wait_for_signal() => {}
        }
        shutdown.cancel();
        hub.await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "Hub failed.");
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
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
