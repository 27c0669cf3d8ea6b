//! Commands from the hub, executed at most once.
//!
//! The uplink's driver hands each `Command` to the [`Executor`] through
//! [`Commands`] and sends back what comes out. The executor works through
//! commands one at a time, in its own task, so that a slow device never
//! holds up the uplink:
//!
//! ```text
//! Command{id}
//!   ledger has id with outcome ──▶ that outcome again (counted as replayed)
//!   ledger has id, no outcome  ──▶ failed: stopped while executing, not retried
//!   past expires_at            ──▶ expired (recorded)
//!   own policy says no         ──▶ refused (recorded)
//!   no such tag / no broker    ──▶ refused / unsupported (recorded)
//!   else: record id (committed) ─▶ execute ─▶ record outcome ─▶ report
//! ```
//!
//! Why authorise again at the agent: the hub authorised the operator, but
//! the agent is the last place that can say no before a device moves, and
//! its copy of the policy is the one its site was given.

pub mod ledger;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocols::policy::Command as Grant;
use outpost_protocols::wire::command::{Action, CommandId, CommandRequest, Outcome};
use outpost_protocols::StreamName;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use self::ledger::{Entry, Ledger, LedgerError};
use crate::clock;
use crate::config::{AgentConfig, MqttSettings};
use crate::metrics::Metrics;
use crate::policy::PolicyStore;
use crate::sources::{DeviceOp, DeviceReply, WriteCommand};

/// Commands waiting for the executor, at most.
const QUEUE: usize = 256;

/// How long a publish may take to be acknowledged by the site broker.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a device may take to answer a command (its queue, the write,
/// the read-back).
const DEVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long recorded outcomes are kept: longer than any command's expiry,
/// so a command the hub could still send again is answered from the record.
const KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// The end-to-end tests' fault: set to `1`, the agent aborts (as a kill -9
/// would stop it) right after it recorded the outcome of a command it
/// executed, and before it reports it, so that the window the ledger exists
/// for can be hit exactly. Read once at start, and only by debug builds,
/// the ones the tests run: a release build ignores it
/// ([commands.md](../../../docs/commands.md#testing-at-most-once)).
pub const ABORT_AFTER_RECORD: &str = "OUTPOST_TEST_ABORT_AFTER_COMMAND";

/// Whether the test-only fault [`ABORT_AFTER_RECORD`] is armed; always
/// `false` in a release build, where the read is compiled out.
fn abort_after_record_armed() -> bool {
    cfg!(debug_assertions) && std::env::var_os(ABORT_AFTER_RECORD).is_some_and(|v| v == "1")
}

/// The uplink's side: where commands go and their results come from.
#[derive(Debug)]
pub struct Commands {
    requests: mpsc::Sender<CommandRequest>,
    results: tokio::sync::Mutex<mpsc::Receiver<(CommandId, Outcome)>>,
}

impl Commands {
    /// Hands a command to the executor; `false` if its queue is full (the
    /// command stays unanswered, and the hub sends it again on the next
    /// connection).
    pub fn submit(&self, command: CommandRequest) -> bool {
        self.requests.try_send(command).is_ok()
    }

    /// The next result; `None` once the executor stopped.
    pub async fn next_result(&self) -> Option<(CommandId, Outcome)> {
        self.results.lock().await.recv().await
    }
}

/// Where a tag is: its device's queue and its index there.
#[derive(Debug, Clone)]
struct TagRef {
    device: usize,
    tag: usize,
}

/// Every configured tag by its stream, with where it is. Made before the
/// devices' settings move into their sources (the agent keeps no second
/// copy of 10,000 tags), so that commands still find them.
#[derive(Debug, Clone, Default)]
pub struct Tags(HashMap<StreamName, TagRef>);

impl Tags {
    /// The tags of `devices`, in config order (the order of their queues).
    pub fn of(devices: &[crate::config::DeviceSettings]) -> Tags {
        let mut tags = HashMap::new();
        for (d, device) in devices.iter().enumerate() {
            for (t, tag) in device.tags.iter().enumerate() {
                tags.insert(tag.stream.clone(), TagRef { device: d, tag: t });
            }
        }
        Tags(tags)
    }
}

/// Executes commands, one at a time.
pub struct Executor {
    ledger: Arc<Mutex<Ledger>>,
    tags: HashMap<StreamName, TagRef>,
    devices: Vec<mpsc::Sender<WriteCommand>>,
    mqtt: Option<MqttSettings>,
    policy: PolicyStore,
    metrics: Arc<Metrics>,
    requests: mpsc::Receiver<CommandRequest>,
    results: mpsc::Sender<(CommandId, Outcome)>,
    /// The test-only fault [`ABORT_AFTER_RECORD`].
    abort_after_record: bool,
}

/// Opens the ledger in the data directory and makes the executor and the
/// uplink's handle. `devices` are the device tasks' queues, in config order.
pub fn open(
    cfg: &AgentConfig,
    tags: Tags,
    devices: Vec<mpsc::Sender<WriteCommand>>,
    policy: PolicyStore,
    metrics: Arc<Metrics>,
) -> Result<(Commands, Executor), LedgerError> {
    let ledger = Ledger::open(&cfg.data_dir.join("commands.db"))?;
    let before = clock::unix_now().0 - i64::try_from(KEEP.as_nanos()).unwrap_or(i64::MAX);
    let pruned = ledger.prune(before)?;
    if pruned > 0 {
        debug!(pruned, "Old command records pruned.");
    }
    let (rtx, rrx) = mpsc::channel(QUEUE);
    let (otx, orx) = mpsc::channel(QUEUE);
    Ok((
        Commands {
            requests: rtx,
            results: tokio::sync::Mutex::new(orx),
        },
        Executor {
            ledger: Arc::new(Mutex::new(ledger)),
            tags: tags.0,
            devices,
            mqtt: cfg.mqtt.clone(),
            policy,
            metrics,
            requests: rrx,
            results: otx,
            abort_after_record: abort_after_record_armed(),
        },
    ))
}

impl Executor {
    /// Executes commands until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let command = tokio::select! {
                () = shutdown.cancelled() => break,
                c = self.requests.recv() => match c {
                    Some(c) => c,
                    None => break,
                },
            };
            let span = info_span!("command", id = %command.id, kind = command.action.kind(), target = %command.action.target());
            let outcome = self.handle(&command).instrument(span).await;
            let Some(outcome) = outcome else { continue };
            if self.results.send((command.id, outcome)).await.is_err() {
                break;
            }
        }
    }

    /// The outcome to report, or `None` when the ledger failed (nothing was
    /// executed; the hub sends the command again on the next connection).
    async fn handle(&self, command: &CommandRequest) -> Option<Outcome> {
        let kind = command.action.kind();
        let recorded = match self.with_ledger(command, |l, c| l.get(&c.id)).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "Cannot read the command ledger; the command is not executed.");
                return None;
            }
        };
        match recorded {
            Some(Entry::Done(outcome)) => {
                self.metrics.commands_replayed.inc();
                info!(
                    outcome = outcome.name(),
                    "Command sent again; answered from the ledger, not executed again."
                );
                return Some(outcome);
            }
            Some(Entry::Started) => {
                let outcome = Outcome::Failed {
                    reason: "the agent stopped while executing it; not executed again (at most once), the target may or may not have changed".into(),
                };
                warn!("Command was interrupted by a stop of the agent; reported failed, not executed again.");
                return self.finish(command, outcome).await;
            }
            None => {}
        }
        let now = clock::unix_now();
        let decided = if now > command.expires_at {
            Some(Outcome::Expired)
        } else {
            self.precheck(command)
        };
        if let Some(outcome) = decided {
            info!(
                outcome = outcome.name(),
                reason = outcome.reason().unwrap_or(""),
                "Command not executed."
            );
            return self.finish(command, outcome).await;
        }
        // Recorded, committed, before anything is done.
        if let Err(e) = self
            .with_ledger(command, move |l, c| l.start(&c.id, &c.action, now.0))
            .await
        {
            warn!(error = %e, "Cannot record the command; it is not executed.");
            return None;
        }
        let outcome = self.execute(&command.action, &command.id).await;
        info!(kind, outcome = outcome.name(), reason = outcome.reason().unwrap_or(""), value = ?outcome.value(), "Command executed.");
        let recorded = self.finish(command, outcome).await;
        if recorded.is_some() && self.abort_after_record {
            warn!(
                fault = ABORT_AFTER_RECORD,
                "Test fault: aborting after recording the command's outcome, before reporting it."
            );
            std::process::abort();
        }
        recorded
    }

    /// Records the outcome and counts it; `None` if it cannot be recorded
    /// (then it is not reported: reported but not recorded, a resend would
    /// execute the command a second time if it had not started yet).
    async fn finish(&self, command: &CommandRequest, outcome: Outcome) -> Option<Outcome> {
        let now = clock::unix_now().0;
        let o = outcome.clone();
        match self
            .with_ledger(command, move |l, c| l.finish(&c.id, &c.action, &o, now))
            .await
        {
            Ok(()) => {
                self.metrics.command(command.action.kind(), outcome.name());
                Some(outcome)
            }
            Err(e) => {
                warn!(error = %e, "Cannot record the command's outcome; not reported.");
                None
            }
        }
    }

    /// Runs `f` on the ledger on a blocking thread (its commits fsync).
    async fn with_ledger<T: Send + 'static>(
        &self,
        command: &CommandRequest,
        f: impl FnOnce(&Ledger, &CommandRequest) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let ledger = Arc::clone(&self.ledger);
        let command = command.clone();
        match tokio::task::spawn_blocking(move || {
            let l = ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&l, &command)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => Err(LedgerError::Corrupt {
                path: "commands.db".into(),
                id: String::new(),
                reason: format!("ledger task failed: {e}"),
            }),
        }
    }

    /// What says no before anything is recorded as started: the agent's own
    /// policy, a target it does not have.
    fn precheck(&self, command: &CommandRequest) -> Option<Outcome> {
        let current = self.policy.current();
        let target = command.action.target();
        let grant = match &command.action {
            Action::Write { .. } => Grant::Write(target),
            Action::Publish { .. } => Grant::Publish(target),
            Action::Read { .. } => Grant::Read(target),
            _ => {
                return Some(Outcome::Unsupported {
                    reason: "this agent does not know the command's kind".into(),
                })
            }
        };
        if !current
            .policy
            .authorize(&command.role, &current.labels, grant)
        {
            return Some(Outcome::Refused {
                reason: format!(
                    "the agent's policy (version {}) grants role {:?} no {} of {target}",
                    current.version.0,
                    command.role,
                    command.action.kind()
                ),
            });
        }
        match &command.action {
            Action::Write { stream, .. } | Action::Read { stream }
                if !self.tags.contains_key(stream) =>
            {
                return Some(Outcome::Refused {
                    reason: format!("no tag {stream} in this agent's config"),
                });
            }
            Action::Publish { .. } if self.mqtt.is_none() => {
                return Some(Outcome::Unsupported {
                    reason: "no site broker configured ([mqtt])".into(),
                })
            }
            _ => {}
        }
        None
    }

    async fn execute(&self, action: &Action, id: &CommandId) -> Outcome {
        match action {
            Action::Write { stream, value } => {
                self.device(stream, DeviceOp::Write(value.clone()), id)
                    .await
            }
            Action::Read { stream } => self.device(stream, DeviceOp::Read, id).await,
            Action::Publish {
                topic,
                payload,
                qos,
                retain,
            } => match &self.mqtt {
                Some(m) => publish(m, id, topic, payload, *qos, *retain).await,
                None => Outcome::Unsupported {
                    reason: "no site broker configured ([mqtt])".into(),
                },
            },
            _ => Outcome::Unsupported {
                reason: "this agent does not know the command's kind".into(),
            },
        }
    }

    /// Asks the tag's device task, which alone talks to the device.
    async fn device(&self, stream: &StreamName, op: DeviceOp, id: &CommandId) -> Outcome {
        let Some(t) = self.tags.get(stream) else {
            return Outcome::Refused {
                reason: format!("no tag {stream} in this agent's config"),
            };
        };
        let Some(queue) = self.devices.get(t.device) else {
            return Outcome::Failed {
                reason: format!("the device of {stream} is not running"),
            };
        };
        let (tx, rx) = oneshot::channel();
        let request = WriteCommand {
            tag: t.tag,
            op,
            topic: format!("command {id}"),
            reply: Some(tx),
        };
        if queue.send(request).await.is_err() {
            return Outcome::Failed {
                reason: format!("the device of {stream} is not running"),
            };
        }
        match tokio::time::timeout(DEVICE_TIMEOUT, rx).await {
            Ok(Ok(DeviceReply::Done(value))) => Outcome::Applied { value },
            Ok(Ok(DeviceReply::Refused(reason))) => Outcome::Refused { reason },
            Ok(Ok(DeviceReply::Failed(reason))) => Outcome::Failed { reason },
            Ok(Err(_)) => Outcome::Failed {
                reason: format!("the device of {stream} stopped before answering"),
            },
            Err(_) => Outcome::Failed {
                reason: format!(
                    "the device of {stream} did not answer within {DEVICE_TIMEOUT:?}; the target may or may not have changed"
                ),
            },
        }
    }
}

/// Publishes on the site broker on a connection of its own
/// (`<client_id>-cmd`), and waits for the acknowledgement its QoS asks for
/// (MQTT 3.1.1 sections 4.3.1 to 4.3.3: none for 0, PUBACK for 1, PUBCOMP
/// for 2).
async fn publish(
    settings: &MqttSettings,
    id: &CommandId,
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
) -> Outcome {
    let opts = match crate::bridges::client_options(settings, format!("{}-cmd", settings.client_id))
    {
        Ok(o) => o,
        Err(e) => {
            return Outcome::Failed {
                reason: format!("site broker TLS: {e}"),
            }
        }
    };
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    let level = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    if let Err(e) = client.publish(topic, level, retain, payload.to_vec()).await {
        return Outcome::Failed {
            reason: format!("publish not queued: {e}"),
        };
    }
    let done = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == 0 => return Ok(()),
                Ok(Event::Incoming(Packet::PubAck(_))) if qos == 1 => return Ok(()),
                Ok(Event::Incoming(Packet::PubComp(_))) if qos == 2 => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let outcome = match tokio::time::timeout(PUBLISH_TIMEOUT, done).await {
        Ok(Ok(())) => Outcome::Applied { value: None },
        Ok(Err(e)) => Outcome::Failed {
            reason: format!("site broker: {e}"),
        },
        Err(_) => Outcome::Failed {
            reason: format!(
                "site broker did not acknowledge within {PUBLISH_TIMEOUT:?}; it may or may not have the message"
            ),
        },
    };
    debug!(command = %id, topic, "Publish command done.");
    let _ = client.try_disconnect();
    // Let the DISCONNECT leave, briefly.
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    outcome
}
