//! An agent and a hub session joined in memory, with a simulated clock, a tiny
//! outbox on the agent's side and a tiny store on the hub's: the drivers of
//! `agent` and `hub`, minus the sockets and the disks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::event::{AgentId, EventBody, Quality, Seq, StreamName, Timestamp, Value};
use crate::wire::command::{Action, CommandId, CommandRequest, Outcome};
use crate::wire::{
    AgentConfig, AgentEvent, AgentInfo, AgentSession, Frame, HubConfig, HubEvent, HubSession,
    ProtocolError, Renewal,
};

/// The one reading of the clock in this crate: an arbitrary origin for the
/// simulated clock. Every later instant is this plus a simulated duration.
#[allow(clippy::disallowed_methods)]
pub(crate) fn origin() -> Instant {
    Instant::now()
}

/// A small event whose value tells it apart.
pub(crate) fn body(n: i64) -> EventBody {
    EventBody {
        stream: StreamName::parse("plc1/temperature").expect("valid"),
        ts: Timestamp(n),
        value: Value::I64(n),
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    }
}

/// The agent's outbox: what it accepted and has not seen acknowledged.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    events: BTreeMap<Seq, EventBody>,
    /// The last seq given out, 0 if none.
    last: u64,
    /// Every event ever appended.
    pub(crate) appended: BTreeMap<Seq, EventBody>,
    /// The seqs the buffer policy dropped before an acknowledgement.
    pub(crate) evicted: BTreeSet<Seq>,
}

impl Outbox {
    /// Appends an event `gap` seqs after the last one (a gap stands for events
    /// evicted before they were ever read).
    pub(crate) fn append(&mut self, gap: u64, body: EventBody) -> Seq {
        let seq = Seq(self.last + 1 + gap);
        self.last = seq.0;
        self.events.insert(seq, body.clone());
        self.appended.insert(seq, body);
        seq
    }

    /// Drops the oldest event, as the `drop-oldest` eviction does.
    pub(crate) fn evict_oldest(&mut self) -> Option<Seq> {
        let (seq, _) = self.events.pop_first()?;
        self.evicted.insert(seq);
        Some(seq)
    }

    /// Up to `max` events after `after`, in seq order.
    pub(crate) fn read_after(&self, after: Seq, max: usize) -> Vec<(Seq, EventBody)> {
        self.events
            .range(after.next()..)
            .take(max)
            .map(|(s, b)| (*s, b.clone()))
            .collect()
    }

    /// Deletes every event up to `upto`; like the real outbox, refuses an
    /// acknowledgement beyond the last seq it ever gave out.
    pub(crate) fn ack(&mut self, upto: Seq) {
        assert!(
            upto.0 <= self.last,
            "ack {upto} beyond the outbox's last seq {}",
            self.last
        );
        self.events.retain(|seq, _| *seq > upto);
    }

    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The last seq given out: the mark the real outbox's commits raise.
    pub(crate) fn last(&self) -> Seq {
        Seq(self.last)
    }

    /// What waits, as the agent's driver reports it: events, their payload
    /// bytes and the oldest seq.
    fn backlog(&self) -> (u64, u64, Option<Seq>) {
        let bytes = self
            .events
            .values()
            .map(|b| b.value.payload_len())
            .sum::<usize>();
        (
            self.events.len() as u64,
            bytes as u64,
            self.events.first_key_value().map(|(s, _)| *s),
        )
    }
}

/// The hub's store for one agent: events keyed by seq, inserted idempotently
/// like `INSERT OR IGNORE` on `(agent_id, seq)`.
#[derive(Debug, Default)]
pub(crate) struct Store {
    pub(crate) events: BTreeMap<Seq, EventBody>,
    /// Every seq actually written, in the order written.
    pub(crate) inserts: Vec<Seq>,
    /// Inserts refused because the seq was already stored.
    pub(crate) ignored_duplicates: usize,
    /// The highest seq the sink accepted: what may be acknowledged.
    pub(crate) acked: Seq,
}

impl Store {
    fn insert(&mut self, seq: Seq, body: EventBody) {
        if let Some(old) = self.events.get(&seq) {
            assert_eq!(old, &body, "seq {seq} stored with two bodies");
            self.ignored_duplicates += 1;
        } else {
            self.events.insert(seq, body);
            self.inserts.push(seq);
        }
    }

    /// The durable watermark: the highest seq stored, 0 if none.
    pub(crate) fn watermark(&self) -> Seq {
        self.events.last_key_value().map_or(Seq(0), |(s, _)| *s)
    }
}

/// Bytes on their way, and when they arrive.
type Link = VecDeque<(Instant, Vec<u8>)>;

/// An agent and a hub on one simulated connection.
pub(crate) struct Pair {
    pub(crate) agent: AgentSession,
    pub(crate) hub: HubSession,
    /// The simulated clock.
    pub(crate) now: Instant,
    /// One-way delay of every chunk.
    pub(crate) latency: Duration,
    /// Probability that a chunk is lost. The stream is reliable, so a lost
    /// chunk means a broken connection: both sessions are dropped and new ones
    /// made, as after a QUIC connection loss.
    pub(crate) loss: f64,
    /// Chunks are at most this many bytes, so frames arrive in pieces.
    pub(crate) mtu: usize,
    /// Whether the store commits as soon as events arrive; otherwise only on
    /// [`Pair::commit`].
    pub(crate) auto_commit: bool,
    /// How many events the agent's driver reads from the outbox at a time.
    pub(crate) read_chunk: usize,
    pub(crate) outbox: Outbox,
    pub(crate) store: Store,
    pub(crate) agent_config: AgentConfig,
    pub(crate) hub_config: HubConfig,
    pub(crate) info: AgentInfo,
    /// Every `Closed` event, from either side.
    pub(crate) closed: Vec<(&'static str, Option<ProtocolError>)>,
    /// Every `Connected` event's watermark.
    pub(crate) connected: Vec<Seq>,
    /// How many connections were made.
    pub(crate) connections: usize,
    /// How many batches of already stored events were sent again.
    pub(crate) replayed: usize,
    /// The policy the hub's operator applied, if any.
    pub(crate) hub_policy: Option<(u64, String)>,
    /// The policy version the agent runs; it survives reconnects (the agent
    /// persists it).
    pub(crate) agent_policy: u64,
    /// The version the hub last heard the agent report, this session.
    pub(crate) reported_policy: Option<u64>,
    /// How many `Policy` frames the hub's session chose to push.
    pub(crate) policies_pushed: usize,
    /// How many `Policy` frames the agent received.
    pub(crate) policies_received: usize,
    /// Whether the one sink every event is routed to is down: commits are
    /// stored but not acknowledged until [`Pair::sink_up`].
    pub(crate) sink_down: bool,
    /// How many `Stored` events the agent saw.
    pub(crate) stored_seen: usize,
    /// How many `NeedEvents` the agent's session asked, and the room of each.
    pub(crate) needs: Vec<usize>,
    /// How many `Backlog` reports reached the hub.
    pub(crate) backlogs_reported: usize,
    /// Whether the hub's driver signs renewal requests (else it refuses).
    pub(crate) hub_signs: bool,
    /// Every `RenewDue` the agent's session asked, by instant.
    pub(crate) renewals_due: Vec<Instant>,
    /// The requests the hub's driver was handed.
    pub(crate) renew_requests: Vec<Vec<u8>>,
    /// The certificates the agent received, and the refusals.
    pub(crate) renewed: Vec<String>,
    pub(crate) renew_refused: Vec<String>,
    /// The hub's durable commands: each id's outcome, `None` while pending.
    pub(crate) commands: BTreeMap<CommandId, Option<Outcome>>,
    /// The agent's durable ledger of commands, with their outcomes.
    pub(crate) ledger: BTreeMap<CommandId, Outcome>,
    /// How many commands the agent executed.
    pub(crate) executions: usize,
    /// Whether the agent reports outcomes (else it records and executes,
    /// then "crashes" before reporting, until the next connection).
    pub(crate) reports_commands: bool,
    to_hub: Link,
    to_agent: Link,
    /// Events handed to the store and not yet committed, with the connection
    /// they came from.
    uncommitted: Vec<(usize, Seq, EventBody)>,
    broken: bool,
    rng: u64,
}

impl Pair {
    /// A connected pair with default settings and an empty outbox and store.
    pub(crate) fn new() -> Pair {
        Pair::with_configs(AgentConfig::default(), HubConfig::default())
    }

    pub(crate) fn with_configs(agent_config: AgentConfig, hub_config: HubConfig) -> Pair {
        let now = origin();
        let info = AgentInfo {
            agent_version: "outpost-agent 0.1.0".into(),
            labels: BTreeMap::from([("site".to_owned(), "depot-17".to_owned())]),
        };
        let mut agent = AgentSession::new(now, info.clone(), agent_config.clone());
        agent.report_policy(0, None);
        let hub = HubSession::new(now, agent_id(), Seq(0), hub_config.clone());
        Pair {
            agent,
            hub,
            now,
            latency: Duration::from_millis(10),
            loss: 0.0,
            mtu: 1200,
            auto_commit: true,
            read_chunk: 100,
            outbox: Outbox::default(),
            store: Store::default(),
            agent_config,
            hub_config,
            info,
            closed: Vec::new(),
            connected: Vec::new(),
            connections: 1,
            replayed: 0,
            hub_policy: None,
            agent_policy: 0,
            reported_policy: None,
            policies_pushed: 0,
            policies_received: 0,
            sink_down: false,
            stored_seen: 0,
            needs: Vec::new(),
            backlogs_reported: 0,
            hub_signs: true,
            renewals_due: Vec::new(),
            renew_requests: Vec::new(),
            renewed: Vec::new(),
            renew_refused: Vec::new(),
            commands: BTreeMap::new(),
            ledger: BTreeMap::new(),
            executions: 0,
            reports_commands: true,
            to_hub: Link::new(),
            to_agent: Link::new(),
            uncommitted: Vec::new(),
            broken: false,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// The sources hand the agent `n` events, without gaps.
    pub(crate) fn fill(&mut self, n: i64) {
        for i in 0..n {
            self.outbox.append(0, body(i));
        }
    }

    /// Seeds the generator behind `loss`.
    pub(crate) fn seed(&mut self, seed: u64) {
        self.rng = seed | 1;
    }

    /// New sessions on a new connection; the hub reads its watermark from the
    /// store as it is now.
    pub(crate) fn connect(&mut self) {
        let (acked, received) = (self.store.acked, self.store.watermark());
        self.connect_with_watermark(acked, received);
    }

    /// New sessions; the hub's says `acked` in `Welcome` and holds what the
    /// store has up to `received`, as the hub's driver does.
    fn connect_with_watermark(&mut self, acked: Seq, received: Seq) {
        self.to_hub.clear();
        self.to_agent.clear();
        self.broken = false;
        self.connections += 1;
        self.agent = AgentSession::new(self.now, self.info.clone(), self.agent_config.clone());
        self.agent.report_policy(self.agent_policy, None);
        self.hub =
            HubSession::new(self.now, agent_id(), acked, self.hub_config.clone()).holding(received);
        if let Some((version, text)) = &self.hub_policy {
            self.hub
                .set_policy(*version, text.as_str())
                .expect("a policy within its limit");
        }
        self.reported_policy = None;
    }

    /// The operator applies a policy: the hub's driver sets it in the
    /// session, which decides whether and when to push it.
    pub(crate) fn apply_policy(&mut self, version: u64, text: &str) {
        self.hub_policy = Some((version, text.to_owned()));
        self.hub
            .set_policy(version, text)
            .expect("a policy within its limit");
    }

    /// The operator sends a read command: stored at the hub, sent if the
    /// agent is connected, else at its next connection.
    pub(crate) fn send_command(&mut self, id: &str) {
        let id = CommandId::parse(id).expect("a valid id");
        self.commands.insert(id.clone(), None);
        if self.hub.is_streaming() {
            self.hub.send_command(read_command(&id)).expect("streaming");
        }
    }

    /// The agent is told to stop: its session drains until `deadline` from
    /// now at the latest, as the agent's driver asks at shutdown.
    pub(crate) fn stop(&mut self, deadline: Duration) {
        self.agent.stop(self.now, self.now + deadline);
    }

    /// The connection breaks. The hub's old connection finishes the commits it
    /// started before the new session reads the watermark, as the hub's driver
    /// must; then both sides reconnect.
    pub(crate) fn reset(&mut self) {
        self.commit();
        self.connect();
    }

    /// The connection breaks and the new hub session reads a stale watermark:
    /// the old connection's commits land only after it (a lagging replica). The
    /// agent then resends events the store already has, and the store's
    /// idempotent insert is what keeps them single.
    pub(crate) fn reset_stale(&mut self) {
        let (acked, received) = (self.store.acked, self.store.watermark());
        self.connect_with_watermark(acked, received);
        self.commit();
    }

    /// The connection breaks, and on the new one the agent sends again, right
    /// after its `Hello`, the events of its outbox the hub already stored (as an
    /// agent that does not trust the watermark would). The hub must drop them
    /// on the wire.
    pub(crate) fn reset_with_replay(&mut self) {
        self.reset();
        // The agent's Hello goes on the link first.
        self.pump();
        let watermark = self.hub.watermark();
        let old: Vec<(Seq, EventBody)> = self
            .outbox
            .events
            .range(..=watermark)
            .map(|(s, b)| (*s, b.clone()))
            .collect();
        if !old.is_empty() {
            let mut bytes = Vec::new();
            Frame::Batch { events: old }
                .encode(&mut bytes)
                .expect("encodes");
            self.replayed += 1;
            self.send(true, bytes);
        }
    }

    /// The hub process dies: what it had not committed is lost; the store stays.
    pub(crate) fn hub_restart(&mut self) {
        self.uncommitted.clear();
        self.connect();
    }

    /// The agent process dies: its outbox stays; the hub, still running, commits
    /// what it received.
    pub(crate) fn agent_restart(&mut self) {
        self.reset();
    }

    /// The store commits everything it was handed; the session that handed it
    /// is told, if it still exists.
    pub(crate) fn commit(&mut self) {
        self.commit_upto(Seq(u64::MAX));
    }

    /// The store commits what it was handed up to `upto`, and the rest
    /// waits; the session that handed it is told, if it still exists.
    pub(crate) fn commit_upto(&mut self, upto: Seq) {
        let mut last = None;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.uncommitted)
            .into_iter()
            .partition(|(_, seq, _)| *seq <= upto);
        self.uncommitted = later;
        for (connection, seq, body) in due {
            self.store.insert(seq, body);
            if connection == self.connections {
                last = Some(seq);
            }
        }
        if !self.sink_down {
            self.store.acked = self.store.watermark();
        }
        if let Some(last) = last {
            self.hub
                .committed(last, self.store.acked)
                .expect("stored only what was handed out");
        }
    }

    /// The sink comes back and accepts everything stored; the hub's session
    /// acknowledges what it handed out of that, as the driver does when a
    /// sink's queue shrinks.
    pub(crate) fn sink_up(&mut self) {
        self.sink_down = false;
        self.store.acked = self.store.watermark();
        self.hub
            .sinks_accepted(self.store.acked)
            .expect("handed out");
    }

    /// Loses one chunk in flight (`index` picks which); the connection breaks.
    pub(crate) fn drop_in_flight(&mut self, index: proptest::sample::Index) {
        let total = self.to_hub.len() + self.to_agent.len();
        if total > 0 {
            let i = index.index(total);
            if i < self.to_hub.len() {
                self.to_hub.remove(i);
            } else {
                self.to_agent.remove(i - self.to_hub.len());
            }
        }
        self.reset();
    }

    /// Lets both drivers act on everything they have at the current instant.
    fn pump(&mut self) {
        loop {
            let mut busy = false;
            self.agent.outbox_committed(self.outbox.last());
            let mut buf = Vec::new();
            while self.agent.poll_transmit(self.now, &mut buf).is_some() {}
            if !buf.is_empty() {
                busy = true;
                self.send(true, buf);
            }
            let mut buf = Vec::new();
            while self.hub.poll_transmit(self.now, &mut buf).is_some() {}
            if !buf.is_empty() {
                busy = true;
                self.send(false, buf);
            }
            while let Some(event) = self.agent.poll_event() {
                busy = true;
                match event {
                    AgentEvent::Connected { watermark, .. } => self.connected.push(watermark),
                    AgentEvent::Acked { upto } => {
                        assert!(
                            upto <= self.store.acked,
                            "ack {upto} beyond what the sink accepted, {}",
                            self.store.acked
                        );
                        self.outbox.ack(upto);
                    }
                    AgentEvent::Stored { upto } => {
                        // The agent will not send these again: the store
                        // must really hold every one it still has.
                        for seq in self.outbox.events.range(..=upto).map(|(s, _)| *s) {
                            assert!(
                                self.store.events.contains_key(&seq),
                                "Stored {upto} but seq {seq} is not in the store"
                            );
                        }
                        self.stored_seen += 1;
                    }
                    AgentEvent::Policy { version, .. } => {
                        self.policies_received += 1;
                        self.agent_policy = version;
                        self.agent.report_policy(version, None);
                    }
                    AgentEvent::NeedEvents { room } => {
                        self.needs.push(room);
                        let events = self
                            .outbox
                            .read_after(self.agent.read_after(), room.min(self.read_chunk));
                        if !events.is_empty() {
                            self.agent
                                .push_events(events)
                                .expect("pushes what it asked for");
                        }
                    }
                    AgentEvent::ReportBacklog => {
                        let (events, bytes, oldest) = self.outbox.backlog();
                        self.agent.report_backlog(events, bytes, oldest);
                    }
                    AgentEvent::Labels { .. } => {}
                    AgentEvent::RenewDue => {
                        self.renewals_due.push(self.now);
                        let csr = format!("csr {}", self.renewals_due.len()).into_bytes();
                        self.agent.renew(csr).expect("due once, in version 4");
                    }
                    AgentEvent::Renewed { cert_pem } => {
                        self.renewed.push(cert_pem);
                        // The new certificate is due far ahead.
                        self.agent
                            .set_renewal(Some(self.now + Duration::from_secs(86_400)));
                    }
                    AgentEvent::RenewRefused { reason } => self.renew_refused.push(reason),
                    AgentEvent::Command { command } => {
                        // Recorded before executing; executed at most once.
                        let outcome = match self.ledger.get(&command.id) {
                            Some(recorded) => recorded.clone(),
                            None => {
                                self.executions += 1;
                                let outcome = Outcome::Applied { value: None };
                                self.ledger.insert(command.id.clone(), outcome.clone());
                                outcome
                            }
                        };
                        if self.reports_commands {
                            self.agent
                                .command_result(&command.id, outcome)
                                .expect("received in this session");
                        }
                    }
                    AgentEvent::Closed { error } => self.closed.push(("agent", error)),
                }
            }
            while let Some(event) = self.hub.poll_event() {
                busy = true;
                match event {
                    HubEvent::Store { events } => {
                        let connection = self.connections;
                        self.uncommitted
                            .extend(events.into_iter().map(|(s, b)| (connection, s, b)));
                        if self.auto_commit {
                            self.commit();
                        }
                    }
                    HubEvent::Closed { error } => self.closed.push(("hub", error)),
                    HubEvent::PolicyStatus { version, .. } => {
                        self.reported_policy = Some(version);
                    }
                    HubEvent::PolicyPushed { .. } => self.policies_pushed += 1,
                    HubEvent::Backlog { .. } => self.backlogs_reported += 1,
                    HubEvent::Hello { .. } => {
                        // Every pending command goes out on the new session.
                        for id in self
                            .commands
                            .iter()
                            .filter(|(_, o)| o.is_none())
                            .map(|(id, _)| id.clone())
                            .collect::<Vec<_>>()
                        {
                            self.hub.send_command(read_command(&id)).expect("streaming");
                        }
                    }
                    HubEvent::CommandResult { id, outcome } => {
                        self.commands.insert(id, Some(outcome));
                    }
                    HubEvent::Renew { csr } => {
                        let result = if self.hub_signs {
                            Renewal::Issued {
                                cert_pem: format!("cert for {}", String::from_utf8_lossy(&csr)),
                            }
                        } else {
                            Renewal::Refused {
                                reason: "renewal is not configured".into(),
                            }
                        };
                        self.renew_requests.push(csr);
                        self.hub.renewed(result).expect("one outstanding");
                    }
                }
            }
            if !busy {
                return;
            }
        }
    }

    /// Puts bytes on a link, in chunks of at most `mtu`, each possibly lost.
    fn send(&mut self, to_hub: bool, bytes: Vec<u8>) {
        let at = self.now + self.latency;
        for chunk in bytes.chunks(self.mtu.max(1)) {
            if self.loss > 0.0 && self.random() < self.loss {
                self.broken = true;
                return;
            }
            let link = if to_hub {
                &mut self.to_hub
            } else {
                &mut self.to_agent
            };
            link.push_back((at, chunk.to_vec()));
        }
    }

    fn random(&mut self) -> f64 {
        // xorshift64: deterministic, and enough for a coin.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One step: both drivers act, timers that are due fire, and the clock
    /// moves to the next arrival, which is delivered. `false` once nothing is in
    /// flight (timers further ahead do not count).
    pub(crate) fn step(&mut self) -> bool {
        self.pump();
        if self.agent.poll_timeout().is_some_and(|t| t <= self.now) {
            self.agent.handle_timeout(self.now);
        }
        if self.hub.poll_timeout().is_some_and(|t| t <= self.now) {
            self.hub.handle_timeout(self.now);
        }
        self.pump();
        if self.broken {
            self.reset();
            return true;
        }
        let next = [self.to_hub.front(), self.to_agent.front()]
            .into_iter()
            .flatten()
            .map(|(at, _)| *at)
            .min();
        let Some(next) = next else {
            return false;
        };
        self.now = self.now.max(next);
        while let Some((_, chunk)) = self.to_hub.pop_front_if_due(self.now) {
            let _ = self.hub.handle_bytes(self.now, &chunk);
        }
        while let Some((_, chunk)) = self.to_agent.pop_front_if_due(self.now) {
            let _ = self.agent.handle_bytes(self.now, &chunk);
        }
        true
    }

    /// Steps until nothing is in flight, at most `max` steps; whether it
    /// settled.
    pub(crate) fn drive_bounded(&mut self, max: usize) -> bool {
        for _ in 0..max {
            if !self.step() {
                return true;
            }
        }
        false
    }

    /// Steps until nothing is in flight.
    pub(crate) fn drive(&mut self) {
        assert!(self.drive_bounded(100_000), "the pair did not settle");
    }

    /// Lets `d` of simulated time pass, firing every timer on the way.
    pub(crate) fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        loop {
            self.drive();
            let next = [self.agent.poll_timeout(), self.hub.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.agent.handle_timeout(self.now);
                    self.hub.handle_timeout(self.now);
                }
                _ => break,
            }
        }
        self.now = self.now.max(target);
    }

    /// Every error a session closed with.
    pub(crate) fn errors(&self) -> Vec<(&'static str, ProtocolError)> {
        self.closed
            .iter()
            .filter_map(|(side, e)| e.clone().map(|e| (*side, e)))
            .collect()
    }
}

trait PopDue {
    fn pop_front_if_due(&mut self, now: Instant) -> Option<(Instant, Vec<u8>)>;
}

impl PopDue for Link {
    fn pop_front_if_due(&mut self, now: Instant) -> Option<(Instant, Vec<u8>)> {
        if self.front().is_some_and(|(at, _)| *at <= now) {
            self.pop_front()
        } else {
            None
        }
    }
}

/// The agent's id, as its certificate would give it.
pub(crate) fn agent_id() -> AgentId {
    AgentId::parse("depot-17.gw-1").expect("valid")
}

/// A read command with this id that never expires.
pub(crate) fn read_command(id: &CommandId) -> CommandRequest {
    CommandRequest {
        id: id.clone(),
        expires_at: Timestamp(i64::MAX),
        role: "operator".into(),
        action: Action::Read {
            stream: StreamName::parse("plc1/setpoint").expect("valid"),
        },
    }
}
