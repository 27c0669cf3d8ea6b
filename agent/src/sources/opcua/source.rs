//! One task per OPC UA server: a session, its subscriptions, and the
//! notifications they bring, recorded through the same outbox as Modbus.
//!
//! The library's session event loop is polled inside this task (never
//! spawned), next to the loop that records what it delivers, so a shutdown
//! ends both. The library reconnects by itself: it reactivates the old
//! session if the server still has it, else makes a new one and transfers
//! the old subscriptions to it (or, where the server lost them, creates them
//! again, which sends every node's current value). What the server kept
//! while the agent was away is then published again; a notification whose
//! publish response was lost on the way shows up as a gap in the
//! subscription's sequence numbers (OPC UA Part 4, 5.13.1.1), which is
//! filled with Republish from the server's retransmission queue before the
//! later notifications are recorded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{Fuse, FusedFuture};
use futures::{FutureExt, Stream, StreamExt};
use opcua::client::{
    ClientBuilder, IdentityToken, MonitoredItemMap, OnSubscriptionNotificationCore, Password,
    Session, SessionConnectMode, SessionPollResult,
};
use opcua::crypto::SecurityPolicy as UaPolicy;
use opcua::types::{
    AttributeId, DataChangeFilter, DataChangeNotification, DataChangeTrigger, DeadbandType,
    EndpointDescription, ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest,
    MonitoringMode, MonitoringParameters, NodeId, NotificationMessage, ReadValueId, StatusCode,
    TimestampsToReturn,
};
use outpost_protocols::{AgentId, EventBody, Quality, Reason, Timestamp, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::trust;
use super::values::{self, Sample};
use crate::clock;
use crate::config::opcua::{Identity, SecurityMode, SecurityPolicy, ServerSettings};
use crate::metrics::Metrics;
use crate::outbox::OutboxHandle;

/// The most missing notifications one gap may ask the server for; a longer
/// gap means the server's retransmission queue is gone anyway.
const MAX_REPUBLISH: u32 = 1000;
/// Monitored items per CreateMonitoredItems request.
const CREATE_CHUNK: usize = 1000;
/// The keep-alive count of each subscription (publishing intervals without
/// data before the server sends an empty message).
const KEEP_ALIVE_COUNT: u32 = 10;

/// What reaches the recording loop, in the order it happened.
enum Msg {
    /// A notification message (data or keep-alive) of the agent's
    /// subscription number `sub`.
    Notification {
        sub: usize,
        message: NotificationMessage,
    },
    /// The connection is gone; the library is reconnecting.
    Lost(StatusCode),
    /// Connected (again).
    Connected(SessionConnectMode),
}

/// Hands a subscription's notifications to the recording loop. The library
/// calls it while it holds its subscription lock, so it only queues.
struct Tap {
    sub: usize,
    tx: mpsc::UnboundedSender<Msg>,
}

impl OnSubscriptionNotificationCore for Tap {
    fn on_subscription_notification(
        &mut self,
        message: NotificationMessage,
        _items: MonitoredItemMap<'_>,
    ) {
        let _ = self.tx.send(Msg::Notification {
            sub: self.sub,
            message,
        });
    }
}

/// What the agent last recorded for one node.
struct NodeState {
    last: Option<(Value, Quality, Timestamp)>,
}

/// An OPC UA server being subscribed to.
pub struct OpcuaSource {
    server: ServerSettings,
    agent_id: AgentId,
    pki: PathBuf,
    outbox: OutboxHandle,
    metrics: Arc<Metrics>,
}

impl OpcuaSource {
    /// A source for one server; its trust store lives in
    /// `data_dir/opcua/<server name>/pki`.
    pub fn new(
        server: ServerSettings,
        agent_id: AgentId,
        data_dir: &std::path::Path,
        outbox: OutboxHandle,
        metrics: Arc<Metrics>,
    ) -> OpcuaSource {
        let pki = data_dir.join("opcua").join(&server.name).join("pki");
        OpcuaSource {
            server,
            agent_id,
            pki,
            outbox,
            metrics,
        }
    }

    /// Subscribes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = info_span!("opcua", agent_id = %self.agent_id, server = %self.server.name);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(self, shutdown: CancellationToken) {
        let s = &self.server;
        if let Err(e) = trust::prepare(&self.pki, &s.trusted_server_certificates) {
            error!(error = %e, "Cannot set up the trusted server certificates; this server is not subscribed to.");
            return;
        }
        let identity = match identity(&s.identity) {
            Ok(i) => i,
            Err(e) => {
                error!(error = %e, "Cannot read the user identity; this server is not subscribed to.");
                return;
            }
        };
        let mut builder = ClientBuilder::new()
            .application_name("outpost-agent")
            .application_uri(s.application_uri.clone())
            .product_uri("urn:outpost:agent")
            .pki_dir(self.pki.clone())
            .create_sample_keypair(false)
            .trust_server_certs(false)
            .verify_server_certs(true)
            .session_retry_limit(-1)
            .session_retry_initial(s.reconnect_min)
            .session_retry_max(s.reconnect_max)
            .request_timeout(s.request_timeout)
            .session_timeout(u32::try_from(s.session_timeout.as_millis()).unwrap_or(u32::MAX))
            .session_name(format!("outpost-agent {}", self.agent_id))
            .recreate_monitored_items_chunk(CREATE_CHUNK)
            .recreate_subscriptions(true);
        if let Some((cert, key)) = &s.certificate {
            builder = builder
                .certificate_path(cert.clone())
                .private_key_path(key.clone());
        }
        let mut client = match builder.client() {
            Ok(c) => c,
            Err(errors) => {
                error!(errors = ?errors, "The OPC UA client cannot be set up; this server is not subscribed to.");
                return;
            }
        };
        info!(endpoint = %s.endpoint, policy = s.security_policy.name(), mode = s.security_mode.name(), nodes = s.nodes.len(), "Connecting to OPC UA server.");

        // The first connection finds the server's endpoint (and with it the
        // server certificate the secure channel is opened against); after
        // that the library's event loop reconnects by itself.
        let mut backoff = s.reconnect_min;
        let (session, event_loop) = loop {
            let attempt = self.find_endpoint(&client);
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = attempt => match r {
                    Ok(endpoint) => match client.connect_to_endpoint_directly(endpoint, identity.clone()) {
                        Ok(pair) => break pair,
                        Err(e) => {
                            self.metrics.opcua_error(&s.name, "connect");
                            warn!(error = %e, retry_in = ?backoff, "Cannot use the OPC UA server's endpoint.");
                        }
                    },
                    Err(e) => {
                        self.metrics.opcua_error(&s.name, "connect");
                        warn!(error = %e, retry_in = ?backoff, "Cannot reach the OPC UA server's endpoint.");
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(clock::jitter(backoff)) => {}
            }
            backoff = (backoff * 2).min(s.reconnect_max);
        };

        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = drive(
            event_loop.enter(),
            tx.clone(),
            self.metrics.clone(),
            s.name.clone(),
        )
        .fuse();
        tokio::pin!(driver);
        let mut rec = Recorder {
            source: &self,
            session: session.clone(),
            tx,
            nodes: s.nodes.iter().map(|_| NodeState { last: None }).collect(),
            last_seq: vec![None; s.subscriptions()],
            subscribed: false,
            connected: false,
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = &mut driver, if !driver.is_terminated() => {
                    error!("The OPC UA session ended; this server is no longer subscribed to.");
                    break;
                }
                Some(msg) = rx.recv() => rec.handle(msg, driver.as_mut()).await,
            }
        }
        // Close the session (deleting its subscriptions) while the event
        // loop still runs, then record what was already delivered: the
        // server counts it as received.
        if !driver.is_terminated() {
            let close = session.disconnect();
            tokio::pin!(close);
            let deadline = tokio::time::sleep(Duration::from_secs(2));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut close => break,
                    () = &mut driver, if !driver.is_terminated() => {}
                    () = &mut deadline => break,
                }
            }
        }
        rx.close();
        let mut rest = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Notification { message, .. } = msg {
                rest.extend(rec.bodies(&message));
            }
        }
        rec.record(rest).await;
        info!("OPC UA server stopped.");
    }
}

impl OpcuaSource {
    /// Asks the server for its endpoints (GetEndpoints, on an unsecured
    /// channel as OPC UA Part 4, 5.4.4 allows) and picks the one with the
    /// configured policy and mode, to be reached at the configured URL: a
    /// server behind a port forward or a proxy advertises an address the
    /// agent cannot use.
    async fn find_endpoint(
        &self,
        client: &opcua::client::Client,
    ) -> Result<EndpointDescription, opcua::types::Error> {
        let s = &self.server;
        let endpoints = client
            .get_server_endpoints_from_url(s.endpoint.as_str())
            .await?;
        let policy = UaPolicy::from_uri(policy_uri(s.security_policy));
        let mut found = endpoints
            .into_iter()
            .find(|e| {
                e.security_mode == mode(s.security_mode)
                    && UaPolicy::from_uri(e.security_policy_uri.as_ref()) == policy
            })
            .ok_or_else(|| {
                opcua::types::Error::new(
                    StatusCode::BadSecurityPolicyRejected,
                    format!(
                        "the server offers no endpoint with security policy {} and mode {}",
                        s.security_policy.name(),
                        s.security_mode.name()
                    ),
                )
            })?;
        found.endpoint_url = s.endpoint.as_str().into();
        Ok(found)
    }
}

/// Polls the library's session event loop and reports connection changes
/// into the recording loop's queue; ends when the event loop does.
async fn drive(
    stream: impl Stream<Item = Result<SessionPollResult, StatusCode>>,
    tx: mpsc::UnboundedSender<Msg>,
    metrics: Arc<Metrics>,
    server: String,
) {
    tokio::pin!(stream);
    while let Some(r) = stream.next().await {
        match r {
            Ok(SessionPollResult::Reconnected(mode)) => {
                let _ = tx.send(Msg::Connected(mode));
            }
            Ok(SessionPollResult::ConnectionLost(code)) => {
                metrics.opcua_error(&server, "disconnected");
                let _ = tx.send(Msg::Lost(code));
            }
            Ok(SessionPollResult::ReconnectFailed(code)) => {
                metrics.opcua_error(&server, "connect");
                warn!(status = %code, "Cannot reconnect to the OPC UA server.");
            }
            Ok(_) => {}
            Err(code) => {
                error!(status = %code, "The OPC UA session failed.");
                return;
            }
        }
    }
}

/// Runs `fut` (a request on the session) while the event loop that carries
/// it keeps being polled; `None` if the event loop has ended.
async fn call<T>(
    mut driver: std::pin::Pin<&mut Fuse<impl std::future::Future<Output = ()>>>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(fut);
    loop {
        if driver.is_terminated() {
            return None;
        }
        tokio::select! {
            r = &mut fut => return Some(r),
            () = driver.as_mut() => {}
        }
    }
}

/// The recording loop's state.
struct Recorder<'a> {
    source: &'a OpcuaSource,
    session: Arc<Session>,
    tx: mpsc::UnboundedSender<Msg>,
    nodes: Vec<NodeState>,
    /// The last sequence number seen on each of the agent's subscriptions.
    last_seq: Vec<Option<u32>>,
    subscribed: bool,
    connected: bool,
}

impl Recorder<'_> {
    async fn handle(
        &mut self,
        msg: Msg,
        mut driver: std::pin::Pin<&mut Fuse<impl std::future::Future<Output = ()>>>,
    ) {
        let name = &self.source.server.name;
        match msg {
            Msg::Connected(mode) => {
                let fresh = matches!(mode, SessionConnectMode::NewSession(_));
                info!(new_session = fresh, "Connected to OPC UA server.");
                self.connected = true;
                // async-opcua 0.19 makes a new publishing loop at each
                // reconnect that sends nothing until it is triggered, and
                // the subscriptions it reactivated, transferred or made
                // again were all there before it: without this nudge no
                // Publish request is ever sent after a reconnect.
                self.session.trigger_publish_now();
                if !self.subscribed {
                    self.subscribed = true;
                    // `None`: the event loop ended, which the main loop
                    // reports next.
                    let _ = call(driver.as_mut(), self.subscribe()).await;
                } else if !fresh {
                    // The session (and its subscriptions) lived on at the
                    // server: only changes come, so the nodes marked
                    // disconnected are read once to be good again.
                    call(driver.as_mut(), self.refresh()).await;
                }
            }
            Msg::Lost(code) => {
                warn!(status = %code, "Lost the OPC UA server; its nodes are bad until it is back.");
                self.connected = false;
                let ts = clock::unix_now();
                let bodies = (0..self.nodes.len())
                    .filter_map(|i| self.body(i, ts, None, Quality::Bad(Reason::Disconnected)))
                    .collect();
                self.record(bodies).await;
            }
            Msg::Notification { sub, message } => {
                let mut bodies = Vec::new();
                let seq = message.sequence_number;
                let has_data = message
                    .notification_data
                    .as_ref()
                    .is_some_and(|d| !d.is_empty());
                // A data message has the next number; a keep-alive carries
                // the number the next data message will have (Part 4,
                // 7.21). Either way, numbers between the last one seen and
                // this one were sent and not received.
                if let Some(Some(last)) = self.last_seq.get(sub).copied() {
                    if seq > last.wrapping_add(1) && seq - last - 1 <= MAX_REPUBLISH {
                        for missing in last + 1..seq {
                            match call(driver.as_mut(), self.republish(sub, missing)).await {
                                Some(Some(m)) => bodies.extend(self.bodies(&m)),
                                _ => {
                                    self.source.metrics.opcua_error(name, "lost");
                                    warn!(seq = missing, "A notification the server sent is lost: it no longer has it.");
                                }
                            }
                        }
                    }
                }
                if let Some(slot) = self.last_seq.get_mut(sub) {
                    if has_data {
                        *slot = Some(seq);
                    } else if seq > 0 {
                        *slot = Some(seq - 1);
                    }
                }
                bodies.extend(self.bodies(&message));
                self.record(bodies).await;
            }
        }
    }

    /// Creates the subscriptions and their monitored items; a node the
    /// server refuses gets a bad sample naming why.
    async fn subscribe(&mut self) {
        let s = &self.source.server;
        let per = s.items_per_subscription.max(1);
        let publishing = s.publishing_interval;
        // The server keeps a subscription this many publishing intervals
        // without a publish request: at least the session timeout, so a
        // reconnect within it finds the notifications kept.
        let lifetime = u32::try_from(s.session_timeout.as_millis() / publishing.as_millis().max(1))
            .unwrap_or(u32::MAX)
            .max(KEEP_ALIVE_COUNT * 3);
        let mut refused = Vec::new();
        for (k, chunk) in s.nodes.chunks(per).enumerate() {
            let tap = Tap {
                sub: k,
                tx: self.tx.clone(),
            };
            let id = match self
                .session
                .create_subscription(publishing, lifetime, KEEP_ALIVE_COUNT, 0, 0, true, tap)
                .await
            {
                Ok(id) => id,
                Err(e) => {
                    self.source.metrics.opcua_error(&s.name, "subscribe");
                    error!(error = %e, subscription = k, "The server refused a subscription; its nodes are not recorded.");
                    continue;
                }
            };
            let first = k * per;
            let requests: Vec<MonitoredItemCreateRequest> = chunk
                .iter()
                .enumerate()
                .map(|(j, n)| item_request(first + j, n))
                .collect();
            for (c, part) in requests.chunks(CREATE_CHUNK).enumerate() {
                match self
                    .session
                    .create_monitored_items(id, TimestampsToReturn::Both, part.to_vec())
                    .await
                {
                    Ok(results) => {
                        for (j, r) in results.iter().enumerate() {
                            let status = r.result.status_code;
                            if !status.is_good() {
                                let i = first + c * CREATE_CHUNK + j;
                                refused.push((i, status));
                            }
                        }
                    }
                    Err(e) => {
                        self.source.metrics.opcua_error(&s.name, "subscribe");
                        error!(error = %e, subscription = k, "The server refused monitored items; they are not recorded.");
                        for j in 0..part.len() {
                            refused.push((first + c * CREATE_CHUNK + j, e.status()));
                        }
                    }
                }
            }
            debug!(
                subscription = k,
                server_id = id,
                items = chunk.len(),
                "Subscribed."
            );
        }
        if !refused.is_empty() {
            warn!(nodes = refused.len(), first = %s.nodes[refused[0].0].node_id, status = %refused[0].1, "The server refused some nodes.");
            self.source
                .metrics
                .opcua_errors
                .get_or_create(&crate::metrics::DeviceErrorLabels {
                    device: s.name.clone(),
                    kind: "bad_node".into(),
                })
                .inc_by(refused.len() as u64);
        }
        let ts = clock::unix_now();
        let bodies = refused
            .into_iter()
            .filter_map(|(i, status)| self.body(i, ts, None, values::quality(status)))
            .collect();
        self.record(bodies).await;
        info!(
            nodes = s.nodes.len(),
            subscriptions = s.subscriptions(),
            "Subscribed to OPC UA server."
        );
    }

    /// Reads the nodes still marked disconnected and records their values.
    async fn refresh(&mut self) {
        let stale: Vec<usize> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| matches!(&n.last, Some((_, Quality::Bad(Reason::Disconnected), _))))
            .map(|(i, _)| i)
            .collect();
        let received = clock::unix_now();
        let mut bodies = Vec::new();
        for part in stale.chunks(CREATE_CHUNK) {
            let ids: Vec<ReadValueId> = part
                .iter()
                .map(|&i| read_value_id(&self.source.server.nodes[i].node_id))
                .collect();
            match self.session.read(&ids, TimestampsToReturn::Both, 0.0).await {
                Ok(values) => {
                    for (&i, dv) in part.iter().zip(values.iter()) {
                        let Sample { ts, value, quality } = values::sample(dv, received);
                        bodies.extend(self.body(i, ts, value, quality));
                    }
                }
                Err(e) => {
                    debug!(error = %e, "Reading the nodes after a reconnect failed; their next change will tell.")
                }
            }
        }
        self.record(bodies).await;
    }

    /// Asks the server for notification `seq` of the agent's subscription
    /// `sub` again; `None` if it no longer has it.
    async fn republish(&self, sub: usize, seq: u32) -> Option<NotificationMessage> {
        let per = self.source.server.items_per_subscription.max(1);
        let handle = u32::try_from(sub * per + 1).ok()?;
        // The server's id of this subscription changes when the library
        // creates it again; find it by a client handle it holds.
        let id = {
            let state = self.session.subscription_state().lock();
            let ids = state.subscription_ids().unwrap_or_default();
            ids.into_iter().find(|id| {
                state
                    .get(*id)
                    .is_some_and(|s| s.monitored_items().any(|m| m.client_handle() == handle))
            })
        }?;
        match self.session.republish(id, seq).await {
            Ok(m) => {
                self.source
                    .metrics
                    .opcua_error(&self.source.server.name, "republished");
                debug!(seq, "Republished a notification that was lost on the way.");
                Some(m)
            }
            Err(e) => {
                debug!(seq, error = %e, "Republish failed.");
                None
            }
        }
    }

    /// The event bodies of a notification message's data changes.
    fn bodies(&mut self, message: &NotificationMessage) -> Vec<EventBody> {
        let received = clock::unix_now();
        let mut out = Vec::new();
        for obj in message.notification_data.iter().flatten() {
            let Some(dc) = obj.inner_as::<DataChangeNotification>() else {
                continue;
            };
            for item in dc.monitored_items.iter().flatten() {
                let Some(i) = (item.client_handle as usize).checked_sub(1) else {
                    continue;
                };
                let Sample { ts, value, quality } = values::sample(&item.value, received);
                out.extend(self.body(i, ts, value, quality));
            }
        }
        out
    }

    /// Node `i`'s event body, remembering it as the node's last; `None`
    /// for an unknown node, a bad quality repeated (so an absent server
    /// does not fill the outbox with the same error), or the very sample
    /// recorded last (same value, quality and time: the read after a
    /// reconnect and the change the server had queued can be one sample).
    fn body(
        &mut self,
        i: usize,
        ts: Timestamp,
        value: Option<Value>,
        quality: Quality,
    ) -> Option<EventBody> {
        let node = self.source.server.nodes.get(i)?;
        let state = self.nodes.get_mut(i)?;
        if let Some((last_v, last_q, last_ts)) = &state.last {
            if *last_q == quality
                && (value.is_none() && quality != Quality::Good
                    || (value.as_ref() == Some(last_v) && *last_ts == ts))
            {
                return None;
            }
        }
        // A sample without a value keeps the last one, so a bad sample
        // still says what was last known.
        let value = match value {
            Some(v) => v,
            None => match &state.last {
                Some((v, _, _)) => v.clone(),
                None => Value::Bytes(Vec::new()),
            },
        };
        state.last = Some((value.clone(), quality.clone(), ts));
        Some(EventBody {
            stream: node.stream.clone(),
            ts,
            value,
            quality,
            attrs: Default::default(),
        })
    }

    /// Appends to the outbox, as the Modbus source does.
    async fn record(&mut self, bodies: Vec<EventBody>) {
        if bodies.is_empty() {
            return;
        }
        let n = bodies.len();
        match self.source.outbox.append(bodies, Vec::new()).await {
            Ok(outcome) => self
                .source
                .metrics
                .accepted("opcua", outcome.accepted as u64),
            Err(e) => {
                self.source.metrics.outbox_errors.inc();
                warn!(error = %e, samples = n, "Outbox could not store these OPC UA samples.");
                for node in &mut self.nodes {
                    node.last = None;
                }
            }
        }
    }
}

fn read_value_id(node_id: &str) -> ReadValueId {
    ReadValueId {
        node_id: node_id.parse().unwrap_or_else(|_| NodeId::null()),
        attribute_id: AttributeId::Value as u32,
        ..Default::default()
    }
}

/// The monitored item for node `i` (client handle `i + 1`).
fn item_request(i: usize, n: &crate::config::opcua::NodeSettings) -> MonitoredItemCreateRequest {
    let filter = match n.deadband {
        Some(db) => ExtensionObject::from_message(DataChangeFilter {
            trigger: DataChangeTrigger::StatusValue,
            deadband_type: DeadbandType::Absolute as u32,
            deadband_value: db,
        }),
        None => ExtensionObject::null(),
    };
    MonitoredItemCreateRequest {
        item_to_monitor: read_value_id(&n.node_id),
        monitoring_mode: MonitoringMode::Reporting,
        requested_parameters: MonitoringParameters {
            client_handle: u32::try_from(i + 1).unwrap_or(u32::MAX),
            // -1: the subscription's publishing interval (Part 4, 7.21).
            sampling_interval: n
                .sampling_interval
                .map_or(-1.0, |d| d.as_secs_f64() * 1000.0),
            filter,
            queue_size: n.queue_size,
            discard_oldest: true,
        },
    }
}

fn policy_uri(p: SecurityPolicy) -> &'static str {
    match p {
        SecurityPolicy::None => UaPolicy::None.to_uri(),
        SecurityPolicy::Basic256Sha256 => UaPolicy::Basic256Sha256.to_uri(),
        SecurityPolicy::Aes128Sha256RsaOaep => UaPolicy::Aes128Sha256RsaOaep.to_uri(),
        SecurityPolicy::Aes256Sha256RsaPss => UaPolicy::Aes256Sha256RsaPss.to_uri(),
    }
}

fn mode(m: SecurityMode) -> MessageSecurityMode {
    match m {
        SecurityMode::None => MessageSecurityMode::None,
        SecurityMode::Sign => MessageSecurityMode::Sign,
        SecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
    }
}

/// Why the user identity cannot be used.
#[derive(Debug, thiserror::Error)]
enum IdentityError {
    /// The password file cannot be read.
    #[error("{path}: {source}")]
    Password {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The user certificate or key cannot be read.
    #[error("user certificate: {0}")]
    Certificate(String),
}

fn identity(i: &Identity) -> Result<IdentityToken, IdentityError> {
    Ok(match i {
        Identity::Anonymous => IdentityToken::Anonymous,
        Identity::UserPassword {
            username,
            password_file,
        } => {
            let text = std::fs::read_to_string(password_file).map_err(|source| {
                IdentityError::Password {
                    path: password_file.clone(),
                    source,
                }
            })?;
            let password = text.trim_end_matches(['\n', '\r']).to_owned();
            IdentityToken::new_user_name(username.clone(), Password::new(password))
        }
        Identity::Certificate {
            certificate,
            private_key,
        } => IdentityToken::new_x509_path(certificate, private_key)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_asks_for_its_deadband_and_queue() {
        let n = crate::config::opcua::NodeSettings {
            node_id: "ns=2;s=T".into(),
            stream: outpost_protocols::StreamName::parse("s/T").expect("stream"),
            sampling_interval: Some(Duration::from_millis(250)),
            deadband: Some(0.5),
            queue_size: 7,
        };
        let r = item_request(4, &n);
        assert_eq!(r.requested_parameters.client_handle, 5);
        assert_eq!(r.requested_parameters.sampling_interval, 250.0);
        assert_eq!(r.requested_parameters.queue_size, 7);
        let f = r
            .requested_parameters
            .filter
            .inner_as::<DataChangeFilter>()
            .expect("a data change filter");
        assert_eq!(f.deadband_value, 0.5);
        assert_eq!(r.item_to_monitor.node_id, NodeId::new(2, "T"));
    }
}
