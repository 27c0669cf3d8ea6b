//! One task per Modbus device: connect, poll the planned reads, record samples.
//!
//! A Modbus exception is data, not a failure (as in tokio-modbus's
//! `Result<Result<T, ExceptionCode>, Error>`): the tags of that read get a
//! bad-quality sample naming the exception and polling goes on. A timeout or a
//! broken connection marks the remaining tags bad and reconnects with backoff.
//! Bad samples are recorded when the quality changes, not on every poll, so an
//! unplugged device does not fill the outbox with identical errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocols::modbus::{Read, ReadReply, Table, WriteData};
use outpost_protocols::{EventBody, Quality, Reason, Timestamp, Value};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::connect::connect;
use crate::clock;
use crate::config::DeviceSettings;
use crate::metrics::{DeviceErrorLabels, DeviceLabels, Metrics};
use crate::outbox::OutboxHandle;
use crate::sources::{bridge_write_record, DeviceOp, DeviceReply, WriteCommand};

/// Why one request produced no data. The message is the one the log shows;
/// a transport error stays the source.
#[derive(Debug, thiserror::Error)]
enum Fail {
    /// No connection, and the connect attempt (counted where it failed) is
    /// over or backing off.
    #[error("not connected")]
    NotConnected,
    /// The device answered with a Modbus exception: data, not a failure.
    #[error("exception {0}")]
    Exception(u8),
    /// No answer within the device's timeout.
    #[error("timeout")]
    Timeout,
    /// The connection broke, or the reply did not fit the request.
    #[error("{0}")]
    Transport(#[source] tokio_modbus::Error),
    /// A reply of another function than the request's.
    #[error("unexpected response {0:?}")]
    Unexpected(Box<Response>),
}

impl Fail {
    /// Whether the connection must be dropped: a late reply could otherwise
    /// answer the next request.
    fn drops_connection(&self) -> bool {
        matches!(
            self,
            Fail::Timeout | Fail::Transport(_) | Fail::Unexpected(_) | Fail::NotConnected
        )
    }
}

/// The connection to the device, and when the next attempt may be made.
struct Link {
    ctx: Option<Context>,
    /// How long to wait after the next failed connect.
    backoff: Duration,
    next_connect: Instant,
}

impl Link {
    /// Whether there is no connection and the next attempt must still wait.
    fn backing_off(&self) -> bool {
        self.ctx.is_none() && clock::now() < self.next_connect
    }
}

/// A Modbus device being polled.
pub struct ModbusSource {
    device: DeviceSettings,
    outbox: OutboxHandle,
    metrics: Arc<Metrics>,
    writes: mpsc::Receiver<WriteCommand>,
    samples: Option<mpsc::Sender<Vec<EventBody>>>,
}

struct TagState {
    last: Option<(Value, Quality)>,
}

impl ModbusSource {
    /// A source for one device. `samples` receives every recorded batch, for
    /// bridges.
    pub fn new(
        device: DeviceSettings,
        outbox: OutboxHandle,
        metrics: Arc<Metrics>,
        writes: mpsc::Receiver<WriteCommand>,
        samples: Option<mpsc::Sender<Vec<EventBody>>>,
    ) -> ModbusSource {
        ModbusSource {
            device,
            outbox,
            metrics,
            writes,
            samples,
        }
    }

    /// Polls until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = info_span!("modbus", device = %self.device.name);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(mut self, shutdown: CancellationToken) {
        let mut link = Link {
            ctx: None,
            backoff: self.device.backoff,
            next_connect: clock::now(),
        };
        let mut tags: Vec<TagState> = self
            .device
            .tags
            .iter()
            .map(|_| TagState { last: None })
            .collect();
        let mut ticker = tokio::time::interval(self.device.poll);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        info!(transport = %self.device.transport, tags = self.device.tags.len(), reads = self.device.plan.reads.len(), "Polling device.");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
                Some(cmd) = self.writes.recv() => {
                    self.request(&mut link, cmd).await;
                    continue;
                }
            }
            let ts = clock::unix_now().0;
            let samples = self.poll(&mut link).await;
            self.record(ts, samples, &mut tags).await;
        }
        if let Some(mut c) = link.ctx {
            let _ = c.disconnect().await;
        }
        info!("Device stopped.");
    }

    /// Reads every planned range once and returns each tag's value or why
    /// it has none.
    ///
    /// A read that fails drops the connection (a late reply could answer the
    /// next request), and the next read reconnects: a range the device never
    /// answers must not starve the reads after it. Two reads failing in a row
    /// means the device itself is gone; the rest of the poll is then marked
    /// with the same reason.
    async fn poll(&self, link: &mut Link) -> Vec<(usize, Result<Value, Reason>)> {
        let mut samples: Vec<(usize, Result<Value, Reason>)> =
            Vec::with_capacity(self.device.tags.len());
        let mut gone: Option<Reason> = None;
        let mut failed_in_a_row = 0;
        for read in &self.device.plan.reads {
            if let Some(reason) = &gone {
                samples.extend(read.tags.iter().map(|&t| (t, Err(reason.clone()))));
                continue;
            }
            match self.read_with_retries(link, read).await {
                Ok(reply) => {
                    failed_in_a_row = 0;
                    samples.extend(read.decode(&self.device.specs, &reply));
                }
                Err(Fail::Exception(code)) => {
                    failed_in_a_row = 0;
                    self.metrics.modbus_error(&self.device.name, "exception");
                    samples.extend(
                        read.tags
                            .iter()
                            .map(|&t| (t, Err(Reason::ModbusException(code)))),
                    );
                }
                Err(fail) => {
                    let reason = self.count_failure(read, &fail);
                    samples.extend(read.tags.iter().map(|&t| (t, Err(reason.clone()))));
                    failed_in_a_row += 1;
                    if failed_in_a_row >= 2 || link.backing_off() {
                        gone = Some(reason);
                    }
                }
            }
        }
        samples
    }

    /// One planned read, retried on a new connection up to the device's
    /// `retries` when the connection fails; an exception is not retried.
    async fn read_with_retries(&self, link: &mut Link, read: &Read) -> Result<ReadReply, Fail> {
        let mut tries = 0;
        loop {
            let ctx = self.connected(link).await?;
            match self.read_once(ctx, read).await {
                Err(fail) if fail.drops_connection() => {
                    link.ctx = None;
                    if tries >= self.device.retries {
                        return Err(fail);
                    }
                    tries += 1;
                    debug!(
                        start = read.start.0,
                        count = read.count,
                        fail = %fail,
                        "Retrying read on a new connection."
                    );
                }
                other => return other,
            }
        }
    }

    /// The connection, made now if there is none and the backoff allows; a
    /// failed attempt is logged, counted and doubles the backoff.
    async fn connected<'l>(&self, link: &'l mut Link) -> Result<&'l mut Context, Fail> {
        if link.ctx.is_none() {
            if clock::now() < link.next_connect {
                return Err(Fail::NotConnected);
            }
            match connect(&self.device).await {
                Ok(c) => {
                    debug!("Connected to device.");
                    link.ctx = Some(c);
                    link.backoff = self.device.backoff;
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?link.backoff, "Cannot reach device.");
                    self.metrics.modbus_error(&self.device.name, "disconnected");
                    link.next_connect = clock::now() + link.backoff;
                    link.backoff = (link.backoff * 2).min(self.device.backoff_max);
                    return Err(Fail::NotConnected);
                }
            }
        }
        link.ctx.as_mut().ok_or(Fail::NotConnected)
    }

    /// Counts a failed read under its kind and names the reason its tags
    /// get. A failed connect was counted where it failed.
    fn count_failure(&self, read: &Read, fail: &Fail) -> Reason {
        let (kind, reason) = match fail {
            Fail::NotConnected => ("", Reason::Disconnected),
            Fail::Timeout => ("timeout", Reason::Timeout),
            Fail::Transport(_) | Fail::Unexpected(_) => ("disconnected", Reason::Disconnected),
            Fail::Exception(code) => ("exception", Reason::ModbusException(*code)),
        };
        if !kind.is_empty() {
            self.metrics.modbus_error(&self.device.name, kind);
        }
        debug!(start = read.start.0, count = read.count, error = %fail, "Read failed.");
        reason
    }

    /// Records what changed since the last poll: to the bridges, if they
    /// keep up, and to the outbox.
    async fn record(
        &self,
        ts: i64,
        samples: Vec<(usize, Result<Value, Reason>)>,
        tags: &mut [TagState],
    ) {
        let bodies = self.to_bodies(ts, samples, tags);
        if bodies.is_empty() {
            return;
        }
        if let Some(tx) = &self.samples {
            if tx.try_send(bodies.clone()).is_err() {
                self.metrics.bridge_dropped.inc();
                debug!("Bridge queue full; this poll is not bridged.");
            }
        }
        let n = bodies.len();
        match self.outbox.append(bodies, Vec::new()).await {
            Ok(outcome) => {
                self.metrics.accepted("modbus", outcome.accepted as u64);
            }
            Err(e) => {
                // A full or failing disk must not end polling: the samples
                // of this poll are lost (and said so), the next poll tries
                // again, and every tag is recorded afresh once it works.
                self.metrics.outbox_errors.inc();
                warn!(error = %e, samples = n, "Outbox could not store this poll's samples.");
                for t in tags.iter_mut() {
                    t.last = None;
                }
            }
        }
    }

    async fn read_once(&self, ctx: &mut Context, read: &Read) -> Result<ReadReply, Fail> {
        let addr = read.start.0;
        let cnt = read.count;
        let request = match read.table {
            Table::Coil => Request::ReadCoils(addr, cnt),
            Table::Discrete => Request::ReadDiscreteInputs(addr, cnt),
            Table::Holding => Request::ReadHoldingRegisters(addr, cnt),
            Table::Input => Request::ReadInputRegisters(addr, cnt),
        };
        let labels = DeviceLabels {
            device: self.device.name.clone(),
        };
        self.metrics.modbus_requests.get_or_create(&labels).inc();
        let started = clock::now();
        let res = tokio::time::timeout(self.device.timeout, ctx.call(request)).await;
        self.metrics
            .modbus_latency
            .get_or_create(&labels)
            .observe(clock::elapsed(started).as_secs_f64());
        match res {
            Err(_) => Err(Fail::Timeout),
            Ok(Err(e)) => Err(Fail::Transport(e)),
            Ok(Ok(Err(exc))) => Err(Fail::Exception(u8::from(exc))),
            Ok(Ok(Ok(resp))) => match resp {
                Response::ReadCoils(mut bits) | Response::ReadDiscreteInputs(mut bits) => {
                    bits.truncate(usize::from(cnt));
                    Ok(ReadReply::Bits(bits))
                }
                Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => {
                    Ok(ReadReply::Registers(words))
                }
                other => Err(Fail::Unexpected(Box::new(other))),
            },
        }
    }

    fn to_bodies(
        &self,
        ts: i64,
        samples: Vec<(usize, Result<Value, Reason>)>,
        tags: &mut [TagState],
    ) -> Vec<EventBody> {
        let mut out = Vec::with_capacity(samples.len());
        for (i, result) in samples {
            let (Some(tag), Some(state)) = (self.device.tags.get(i), tags.get_mut(i)) else {
                continue;
            };
            let (value, quality) = match result {
                Ok(v) => (v, Quality::Good),
                Err(reason) => {
                    if let Reason::ShortReply { .. } = reason {
                        self.metrics.modbus_error(&self.device.name, "short_reply");
                    }
                    if let Reason::Decode(_) = reason {
                        self.metrics.modbus_error(&self.device.name, "decode");
                    }
                    // Keep the last good value, if any, so bad samples still
                    // say what was last known.
                    let v = match &state.last {
                        Some((v, _)) => v.clone(),
                        None => Value::Bytes(Vec::new()),
                    };
                    (v, Quality::Bad(reason))
                }
            };
            let emit = match &state.last {
                None => true,
                Some((_, last_q)) if *last_q != quality => true,
                Some(_) if quality != Quality::Good => false,
                Some((last_v, _)) => match tag.deadband {
                    None => true,
                    Some(db) => match (last_v.as_f64(), value.as_f64()) {
                        // NaN compares false with everything: a change to or
                        // from NaN is a change.
                        (Some(a), Some(b)) if a.is_nan() || b.is_nan() => a.is_nan() != b.is_nan(),
                        (Some(a), Some(b)) => (a - b).abs() > db,
                        _ => *last_v != value,
                    },
                },
            };
            if !emit {
                continue;
            }
            state.last = Some((value.clone(), quality.clone()));
            out.push(EventBody {
                stream: tag.stream.clone(),
                ts: Timestamp(ts),
                value,
                quality,
                attrs: Default::default(),
            });
        }
        out
    }

    /// Does what a bridge or a command asks of the device, and answers a
    /// command.
    async fn request(&self, link: &mut Link, cmd: WriteCommand) {
        let reply = match &cmd.op {
            DeviceOp::Write(value) => {
                self.write(link, &cmd, value.clone(), cmd.reply.is_some())
                    .await
            }
            DeviceOp::Read => self.read_tag(link, cmd.tag).await,
        };
        match (cmd.reply, &cmd.op) {
            (Some(tx), _) => {
                // A command whose executor went away (the agent stopping)
                // has no one to tell; its ledger says it was interrupted.
                let _ = tx.send(reply);
            }
            (None, DeviceOp::Write(value)) => {
                self.record_bridge_write(&cmd.topic, cmd.tag, value, &reply)
                    .await;
            }
            (None, DeviceOp::Read) => {}
        }
    }

    /// Records what a bridge's write did on the reserved stream, through
    /// the outbox (and its policy) like a sample, so the hub sees it.
    async fn record_bridge_write(
        &self,
        topic: &str,
        tag: usize,
        value: &Value,
        reply: &DeviceReply,
    ) {
        let (outcome, reason) = match reply {
            DeviceReply::Done(_) => ("applied", None),
            DeviceReply::Refused(r) => ("refused", Some(r.as_str())),
            DeviceReply::Failed(r) => ("failed", Some(r.as_str())),
        };
        let tag = self
            .device
            .tags
            .get(tag)
            .map_or_else(|| tag.to_string(), |t| t.name.clone());
        let body = bridge_write_record(
            clock::unix_now(),
            topic,
            &self.device.name,
            &tag,
            &normalise_command(value.clone()),
            outcome,
            reason,
        );
        if let Err(e) = self.outbox.append(vec![body], Vec::new()).await {
            self.metrics.outbox_errors.inc();
            warn!(from = %topic, %tag, outcome, error = %e, "Outbox could not store the record of a bridge write.");
        }
    }

    /// Writes a value, checked against the tag's type and limits first;
    /// with `read_back`, reads the tag afterwards.
    async fn write(
        &self,
        link: &mut Link,
        cmd: &WriteCommand,
        value: Value,
        read_back: bool,
    ) -> DeviceReply {
        let Some(tag) = self.device.tags.get(cmd.tag) else {
            return DeviceReply::Refused(format!(
                "no tag {} on device {}",
                cmd.tag, self.device.name
            ));
        };
        let value = normalise_command(value);
        let labels = |kind: &str| DeviceErrorLabels {
            device: self.device.name.clone(),
            kind: kind.into(),
        };
        if !tag.writable {
            self.metrics
                .modbus_writes
                .get_or_create(&labels("refused"))
                .inc();
            return DeviceReply::Refused(format!("tag {} is not writable", tag.stream));
        }
        let data = match tag
            .limits
            .check(&value)
            .and_then(|()| tag.spec.encode_write(&value).map_err(|e| e.to_string()))
        {
            Ok(d) => d,
            Err(e) => {
                self.metrics
                    .modbus_writes
                    .get_or_create(&labels("refused"))
                    .inc();
                warn!(from = %cmd.topic, tag = %tag.name, ?value, error = %e, "Write refused.");
                return DeviceReply::Refused(format!("{}: {e}", tag.stream));
            }
        };
        let c = match self.connected(link).await {
            Ok(c) => c,
            Err(_) => {
                self.metrics
                    .modbus_writes
                    .get_or_create(&labels("disconnected"))
                    .inc();
                warn!(from = %cmd.topic, tag = %tag.name, "Write dropped: device not connected.");
                return DeviceReply::Failed(format!(
                    "device {} is not connected",
                    self.device.name
                ));
            }
        };
        let addr = tag.spec.address.0;
        let request = match &data {
            WriteData::Coil(b) => Request::WriteSingleCoil(addr, *b),
            WriteData::Registers(words) if words.len() == 1 => {
                Request::WriteSingleRegister(addr, words[0])
            }
            WriteData::Registers(words) => {
                Request::WriteMultipleRegisters(addr, words.clone().into())
            }
            WriteData::MaskRegister { and_mask, or_mask } => {
                Request::MaskWriteRegister(addr, *and_mask, *or_mask)
            }
        };
        let res = tokio::time::timeout(self.device.timeout, c.call(request)).await;
        match res {
            Ok(Ok(Ok(_))) => {
                self.metrics
                    .modbus_writes
                    .get_or_create(&labels("ok"))
                    .inc();
                info!(from = %cmd.topic, tag = %tag.name, ?value, "Wrote tag.");
            }
            Ok(Ok(Err(exc))) => {
                self.metrics
                    .modbus_writes
                    .get_or_create(&labels("exception"))
                    .inc();
                let reason = Reason::ModbusException(u8::from(exc));
                warn!(from = %cmd.topic, tag = %tag.name, ?value, exception = %reason, "Write failed.");
                return DeviceReply::Failed(format!("{}: {reason}", tag.stream));
            }
            Ok(Err(e)) => {
                self.metrics
                    .modbus_writes
                    .get_or_create(&labels("disconnected"))
                    .inc();
                warn!(from = %cmd.topic, tag = %tag.name, error = %e, "Write failed; reconnecting.");
                link.ctx = None;
                return DeviceReply::Failed(format!(
                    "{}: {e}; the device may or may not hold the value",
                    tag.stream
                ));
            }
            Err(_) => {
                self.metrics
                    .modbus_writes
                    .get_or_create(&labels("timeout"))
                    .inc();
                warn!(from = %cmd.topic, tag = %tag.name, "Write timed out; reconnecting.");
                link.ctx = None;
                return DeviceReply::Failed(format!(
                    "{}: no reply within {:?}; the device may or may not hold the value",
                    tag.stream, self.device.timeout
                ));
            }
        }
        if !read_back {
            return DeviceReply::Done(None);
        }
        match self.read_tag(link, cmd.tag).await {
            DeviceReply::Done(v) => DeviceReply::Done(v),
            _ => DeviceReply::Done(None),
        }
    }

    /// Reads one tag now, on its own request.
    async fn read_tag(&self, link: &mut Link, index: usize) -> DeviceReply {
        let Some(spec) = self.device.specs.get(index) else {
            return DeviceReply::Refused(format!("no tag {index} on device {}", self.device.name));
        };
        let read = Read {
            table: spec.table,
            start: spec.address,
            count: spec.width(),
            tags: vec![index],
        };
        match self.read_with_retries(link, &read).await {
            Ok(reply) => match read.decode(&self.device.specs, &reply).pop() {
                Some((_, Ok(v))) => DeviceReply::Done(Some(v)),
                Some((_, Err(reason))) => DeviceReply::Failed(reason.to_string()),
                None => DeviceReply::Failed("nothing decoded".into()),
            },
            Err(fail) => DeviceReply::Failed(fail.to_string()),
        }
    }
}

/// Turns a command payload into the value to write: a JSON number or boolean,
/// `{"value": ...}`, or text holding a number or `true`/`false`.
fn normalise_command(v: Value) -> Value {
    fn from_json(j: &serde_json::Value) -> Option<Value> {
        match j {
            serde_json::Value::Bool(b) => Some(Value::Bool(*b)),
            serde_json::Value::Number(n) => n
                .as_u64()
                .map(Value::U64)
                .or_else(|| n.as_i64().map(Value::I64))
                .or_else(|| n.as_f64().map(Value::F64)),
            serde_json::Value::String(s) => Some(Value::String(s.clone())),
            serde_json::Value::Object(m) => m.get("value").and_then(from_json),
            _ => None,
        }
    }
    match v {
        Value::Json(j) => from_json(&j.to_value()).unwrap_or(Value::Json(j)),
        Value::String(s) => {
            let t = s.trim();
            if let Ok(b) = t.parse::<bool>() {
                Value::Bool(b)
            } else if let Ok(i) = t.parse::<i64>() {
                Value::I64(i)
            } else if let Ok(f) = t.parse::<f64>() {
                Value::F64(f)
            } else {
                Value::String(s)
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocols::JsonText;

    #[test]
    fn command_payloads_become_values() {
        let j = |s: &str| Value::Json(JsonText::parse(s).expect("json"));
        assert_eq!(normalise_command(j("42")), Value::U64(42));
        assert_eq!(normalise_command(j("-3")), Value::I64(-3));
        assert_eq!(normalise_command(j("21.5")), Value::F64(21.5));
        assert_eq!(normalise_command(j("true")), Value::Bool(true));
        assert_eq!(normalise_command(j("{\"value\": 7}")), Value::U64(7));
        assert_eq!(
            normalise_command(Value::String("on".into())),
            Value::String("on".into())
        );
    }
}
