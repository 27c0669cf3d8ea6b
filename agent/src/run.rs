//! Wiring: open the outbox, start every source, stop them in order.
//!
//! Shutdown order matters for the delivery guarantee: sources stop first and
//! commit what they hold (the MQTT source acknowledges what committed), and only
//! then is the outbox writer told to finish, so nothing a source accepted is
//! left uncommitted.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::bridges::Publisher;
use crate::config::AgentConfig;
use crate::metrics::{self, Metrics};
use crate::outbox::{
    spawn_writer_with_policy, Outbox, OutboxConfig, OutboxError, OutboxHandle, PolicyGate,
    WriterOptions,
};
use crate::policy::{PolicyFileError, PolicyStore};
use crate::sources::modbus::ModbusSource;
use crate::sources::mqtt::MqttSource;
use crate::sources::WriteCommand;
use crate::uplink::Uplink;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The data directory could not be created.
    #[error("{path}: cannot create data directory: {message}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// What the OS said.
        message: String,
    },
    /// The outbox could not be opened or failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The persisted fleet policy cannot be read: the agent does not start
    /// rather than run without the rules it was given.
    #[error("{0}; delete the file to take the hub's policy at the next connection")]
    Policy(#[from] PolicyFileError),
    /// The command ledger (`<data_dir>/commands.db`) cannot be opened: the
    /// agent does not start rather than execute commands it cannot record.
    #[error("command ledger: {0}")]
    Ledger(#[from] crate::commands::ledger::LedgerError),
    /// The outbox writer thread died; what it had not committed was never
    /// acknowledged to anyone.
    #[error("outbox writer failed: {0}")]
    Writer(String),
    /// The metrics address could not be bound.
    #[error("observability.metrics: cannot listen on {addr}: {message}")]
    Metrics {
        /// The address.
        addr: String,
        /// What the OS said.
        message: String,
    },
}

/// The outbox settings as the outbox module wants them.
pub fn outbox_config(cfg: &AgentConfig) -> OutboxConfig {
    OutboxConfig {
        path: cfg.outbox.path.clone(),
        synchronous: cfg.outbox.synchronous,
        max_bytes: cfg.outbox.max_bytes,
        max_age: Some(cfg.outbox.max_age),
        eviction: cfg.outbox.eviction,
    }
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(mut cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    for w in &cfg.warnings {
        warn!(agent_id = %cfg.agent_id, warning = %w, "Config allows something risky.");
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| RunError::DataDir {
        path: cfg.data_dir.clone(),
        message: e.to_string(),
    })?;
    let (outbox, recovered) = Outbox::open_recovering(
        &outbox_config(&cfg),
        cfg.agent_id.clone(),
        cfg.outbox.on_corruption,
    )?;
    if let Some(r) = &recovered {
        error!(
            moved_to = %r.moved_to.display(),
            detail = %r.detail,
            salvaged = r.salvaged,
            claimed = ?r.claimed,
            "The outbox was damaged: it was moved aside and the events still readable were kept in a fresh one, with their seqs (outbox.on_corruption = \"move-aside\"). Events that were not readable are lost; the hub resumes after its watermark."
        );
    }
    let policy = PolicyStore::open(&cfg.data_dir, &cfg.labels)?;
    let metrics = Metrics::new();
    metrics
        .kpi
        .start_time
        .set(crate::clock::unix_now().0 / 1_000_000_000);
    let in_force = policy.current();
    metrics
        .policy_version
        .set(i64::try_from(in_force.version.0).unwrap_or(i64::MAX));
    if in_force.version.0 > 0 {
        info!(
            policy_version = in_force.version.0,
            rules = in_force.compiled.rules(),
            "Policy in force from the data directory."
        );
    }
    let writer_stop = CancellationToken::new();
    let (handle, writer) = spawn_writer_with_policy(
        outbox,
        WriterOptions {
            max_batch: cfg.outbox.commit_batch,
            window: cfg.outbox.commit_window,
        },
        Some(PolicyGate::new(policy.subscribe(), metrics.clone())),
        writer_stop.clone(),
    );
    let mut tasks = JoinSet::new();

    if !cfg.observability.metrics.is_empty() {
        let addr = cfg.observability.metrics.clone();
        let listener =
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| RunError::Metrics {
                    addr: addr.clone(),
                    message: e.to_string(),
                })?;
        tasks.spawn(metrics::serve(listener, metrics.clone(), shutdown.clone()));
    }

    let (samples_tx, samples_rx) = if cfg.publish_bridges.is_empty() {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel(1024);
        (Some(tx), Some(rx))
    };
    let mut writers = Vec::new();
    // Moved into the sources, not cloned: with 10,000 tags a second copy of
    // the devices' tags and plans would stay for the agent's whole life.
    let tags = crate::commands::Tags::of(&cfg.devices);
    let devices = std::mem::take(&mut cfg.devices);
    let device_count = devices.len();
    for device in devices {
        let (wtx, wrx) = mpsc::channel::<WriteCommand>(256);
        writers.push(wtx);
        let src = ModbusSource::new(
            device,
            handle.clone(),
            metrics.clone(),
            wrx,
            samples_tx.clone(),
        );
        tasks.spawn(src.run(shutdown.clone()));
    }
    drop(samples_tx);
    let (commands, executor) =
        crate::commands::open(&cfg, tags, writers.clone(), policy.clone(), metrics.clone())?;
    tasks.spawn(executor.run(shutdown.clone()));
    let commands = Arc::new(commands);
    if let Some(mqtt) = &cfg.mqtt {
        let src = MqttSource::new(
            mqtt.clone(),
            cfg.write_bridges.clone(),
            writers,
            handle.clone(),
            metrics.clone(),
        );
        tasks.spawn(src.run(shutdown.clone()));
        if let Some(rx) = samples_rx {
            let p = Publisher::new(
                mqtt.clone(),
                cfg.publish_bridges.clone(),
                rx,
                metrics.clone(),
            );
            tasks.spawn(p.run(shutdown.clone()));
        }
    }
    #[cfg(feature = "opcua")]
    for server in &cfg.opcua_servers {
        let src = crate::sources::opcua::OpcuaSource::new(
            server.clone(),
            cfg.agent_id.clone(),
            &cfg.data_dir,
            handle.clone(),
            metrics.clone(),
        );
        tasks.spawn(src.run(shutdown.clone()));
    }
    // The uplink stops after the sources, so what they commit while stopping
    // is still offered to the hub.
    let uplink_stop = CancellationToken::new();
    let mut uplink_task = JoinSet::new();
    if let Some(uplink) = &cfg.uplink {
        let u = Uplink::new(
            uplink.clone(),
            handle.clone(),
            metrics.clone(),
            policy.clone(),
        )
        .renewing_in(&cfg.data_dir)
        .with_commands(commands);
        uplink_task.spawn(u.run(uplink_stop.clone()));
    }
    tasks.spawn(housekeeping(
        handle.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    // The outbox is open and every source is started: tell systemd.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(agent_id = %cfg.agent_id, devices = device_count, opcua_servers = cfg.opcua_servers.len(), mqtt = cfg.mqtt.is_some(), outbox = %cfg.outbox.path.display(), "Agent running.");

    shutdown.cancelled().await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    info!("Stopping: sources first, then the uplink, then the outbox.");
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            warn!(error = %e, "A task ended abnormally.");
        }
    }
    uplink_stop.cancel();
    while let Some(r) = uplink_task.join_next().await {
        if let Err(e) = r {
            warn!(error = %e, "The uplink ended abnormally.");
        }
    }
    drop(handle);
    writer_stop.cancel();
    let outbox = match writer.await {
        Ok(r) => r?,
        Err(e) => return Err(RunError::Writer(e.to_string())),
    };
    let stats = outbox.stats()?;
    info!(events = stats.events, last_seq = ?stats.last_seq, "Outbox closed.");
    Ok(())
}

/// Refreshes backlog gauges and pings the systemd watchdog.
async fn housekeeping(handle: OutboxHandle, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec);
    let period = if watchdog {
        Duration::from_micros(usec / 2).max(Duration::from_millis(100))
    } else {
        Duration::from_secs(1)
    };
    let mut ticker = tokio::time::interval(period);
    // Evictions happen inside the writer's transactions; the outbox counts
    // them durably by reason, and the metric follows those counters.
    let mut evicted_seen = match handle.stats().await {
        Ok(s) => s.evicted,
        Err(_) => Default::default(),
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // The watchdog is fed only while the outbox answers: a wedged writer
        // should get the agent restarted.
        match handle.stats().await {
            Ok(s) => {
                metrics.outbox_backlog_events.set(s.events as i64);
                let age = s.oldest_accepted_at.map_or(0, |t| {
                    crate::clock::unix_now().0.saturating_sub(t).max(0) / 1_000_000_000
                });
                metrics.kpi.backlog_age.set(age);
                metrics.outbox_backlog_bytes.set(s.bytes as i64);
                for (reason, n) in &s.evicted {
                    let before = evicted_seen.get(reason).copied().unwrap_or(0);
                    metrics.evicted(reason, n.saturating_sub(before));
                }
                evicted_seen = s.evicted;
                if watchdog {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
            Err(e) => warn!(error = %e, "Outbox stats unavailable."),
        }
    }
}
