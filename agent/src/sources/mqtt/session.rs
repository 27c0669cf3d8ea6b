//! The subscriber side of an MQTT 3.1.1 session, sans-IO.
//!
//! Why not rumqttc's event loop: rumqttc 0.25 drops the connection when the
//! broker resends a PUBREL for a packet id it does not know (rumqttc issue #664),
//! which is exactly what a persistent session produces after the agent was
//! killed between PUBREC and PUBCOMP. And rumqttc acknowledges QoS 2 on its own
//! schedule, while we must acknowledge only after the outbox has committed. So
//! this module drives the session itself on rumqttc's public `mqttbytes` codec.
//!
//! QoS 2 uses "Method B" of MQTT 3.1.1 section 4.3.3: the packet id of a stored
//! PUBLISH is remembered — in the same outbox transaction as the event — until
//! the broker's PUBREL. A PUBLISH whose packet id is remembered is a redelivery
//! and is acknowledged with PUBREC without storing it again. The release is
//! committed before PUBCOMP is sent, so a packet id the broker reuses for a new
//! message is never mistaken for a redelivery.
//!
//! The session never reads the clock and performs no I/O: the driver in
//! `source.rs` feeds it packets and the time, and drains its outputs in this
//! order after every input: `poll_transmit` until `None`, then `poll_event`
//! until `None`, then sleeps until `poll_timeout`.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, PubComp, PubRec, Publish,
    Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;

/// Errors that end a session; the driver reconnects after them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The broker refused the connection (MQTT 3.1.1 section 3.2.2.3).
    #[error("broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    /// The first packet from the broker was not CONNACK (section 3.2).
    #[error("expected CONNACK, got {0}")]
    ExpectedConnAck(&'static str),
    /// The broker sent a packet a server never sends to a client.
    #[error("unexpected {0} from the broker")]
    Unexpected(&'static str),
    /// No PINGRESP or other packet within 1.5 keep-alive intervals (section 3.1.2.10).
    #[error("broker silent for {0:?}; keep-alive expired")]
    KeepAliveTimeout(Duration),
}

/// What the driver must do with a message before it may be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// QoS 0: nothing to acknowledge.
    None,
    /// QoS 1: PUBACK after commit.
    PubAck(u16),
    /// QoS 2: commit the event together with the packet id, then PUBREC.
    PubRec(u16),
}

/// Outputs for the driver.
#[derive(Debug)]
pub enum SessionEvent {
    /// CONNACK accepted; `session_present` says whether the broker kept state.
    Connected {
        /// Whether the broker resumed a stored session.
        session_present: bool,
    },
    /// A new message: store it (with the packet id for QoS 2), then call
    /// [`Session::committed`] with `ack`.
    Message {
        /// The PUBLISH as received.
        publish: Publish,
        /// What to acknowledge after the commit.
        ack: Ack,
    },
    /// A QoS 2 redelivery of a message already stored; PUBREC was queued.
    Duplicate {
        /// The packet id.
        pkid: u16,
    },
    /// The broker released a QoS 2 packet id: commit its removal, then call
    /// [`Session::released`].
    Release {
        /// The packet id.
        pkid: u16,
    },
    /// The broker refused one of the subscriptions.
    SubscribeFailed {
        /// The refused filter.
        filter: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitConnAck,
    Connected,
}

/// Everything the session needs to connect.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Client id.
    pub client_id: String,
    /// Credentials.
    pub login: Option<(String, String)>,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// Clean or persistent session.
    pub clean_session: bool,
    /// Filters and their QoS.
    pub subscriptions: Vec<(String, u8)>,
}

/// One connection's worth of MQTT subscriber state.
///
/// Poll order after each input: [`Session::poll_transmit`] until `None`, then
/// [`Session::poll_event`] until `None`, then wait until
/// [`Session::poll_timeout`] or the next packet.
#[derive(Debug)]
pub struct Session {
    opts: SessionOptions,
    state: State,
    /// QoS 2 packet ids stored and not yet released; loaded from the outbox.
    pending_qos2: BTreeSet<u16>,
    /// QoS 2 packet ids handed to the driver whose commit has not finished.
    storing_qos2: BTreeSet<u16>,
    transmit: VecDeque<Packet>,
    events: VecDeque<SessionEvent>,
    last_received: Instant,
    last_sent: Instant,
    ping_outstanding: bool,
    subscribe_pkid: u16,
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

impl Session {
    /// Starts a session: queues CONNECT. `pending_qos2` are the packet ids the
    /// outbox holds as stored but not released.
    pub fn new(opts: SessionOptions, pending_qos2: BTreeSet<u16>, now: Instant) -> Session {
        let mut connect = Connect::new(opts.client_id.clone());
        connect.keep_alive = opts.keep_alive.as_secs().min(u16::MAX as u64) as u16;
        connect.clean_session = opts.clean_session;
        if let Some((u, p)) = &opts.login {
            connect.login = Some(Login::new(u.clone(), p.clone()));
        }
        let mut transmit = VecDeque::new();
        transmit.push_back(Packet::Connect(connect));
        // With a clean session the broker forgets every packet id, so ours must
        // go too (MQTT 3.1.1 section 3.1.2.4).
        let pending_qos2 = if opts.clean_session {
            BTreeSet::new()
        } else {
            pending_qos2
        };
        Session {
            opts,
            state: State::AwaitConnAck,
            pending_qos2,
            storing_qos2: BTreeSet::new(),
            transmit,
            events: VecDeque::new(),
            last_received: now,
            last_sent: now,
            ping_outstanding: false,
            subscribe_pkid: 1,
        }
    }

    /// Whether CONNACK has been accepted.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Packet ids stored and awaiting PUBREL.
    pub fn pending_qos2(&self) -> &BTreeSet<u16> {
        &self.pending_qos2
    }

    /// Feeds one packet from the broker.
    pub fn handle_packet(&mut self, now: Instant, packet: Packet) -> Result<(), SessionError> {
        self.last_received = now;
        if self.state == State::AwaitConnAck {
            return match packet {
                Packet::ConnAck(ack) => self.on_connack(ack),
                other => Err(SessionError::ExpectedConnAck(packet_name(&other))),
            };
        }
        match packet {
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PubRel(rel) => {
                self.events
                    .push_back(SessionEvent::Release { pkid: rel.pkid });
            }
            Packet::SubAck(ack) => {
                for (code, (filter, _)) in ack.return_codes.iter().zip(&self.opts.subscriptions) {
                    if *code == SubscribeReasonCode::Failure {
                        self.events.push_back(SessionEvent::SubscribeFailed {
                            filter: filter.clone(),
                        });
                    }
                }
            }
            Packet::PingResp => self.ping_outstanding = false,
            // This session publishes at QoS 0 only, so acknowledgements of
            // publishes cannot refer to anything of ours; a broker sending
            // them is broken.
            other @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::UnsubAck(_)
            | Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq
            | Packet::Disconnect) => return Err(SessionError::Unexpected(packet_name(&other))),
        }
        Ok(())
    }

    fn on_connack(&mut self, ack: ConnAck) -> Result<(), SessionError> {
        if ack.code != ConnectReturnCode::Success {
            return Err(SessionError::Refused(ack.code));
        }
        self.state = State::Connected;
        // A broker without our session (it was restarted without persistence, or
        // expired us) will never send PUBREL for the ids we remember, and may
        // reuse them for new messages: forget them.
        if !ack.session_present {
            self.pending_qos2.clear();
        }
        if !self.opts.subscriptions.is_empty() {
            // Subscribing again on a resumed session is harmless (section
            // 3.8.4: an identical filter replaces the existing subscription) and
            // covers a config whose filters changed since the last run.
            let filters = self
                .opts
                .subscriptions
                .iter()
                .map(|(f, q)| SubscribeFilter::new(f.clone(), qos_of(*q)))
                .collect::<Vec<_>>();
            let mut sub = Subscribe::new_many(filters);
            sub.pkid = self.subscribe_pkid;
            self.subscribe_pkid = self.subscribe_pkid.wrapping_add(1).max(1);
            self.transmit.push_back(Packet::Subscribe(sub));
        }
        self.events.push_back(SessionEvent::Connected {
            session_present: ack.session_present,
        });
        Ok(())
    }

    fn on_publish(&mut self, publish: Publish) {
        match publish.qos {
            QoS::AtMostOnce => self.events.push_back(SessionEvent::Message {
                publish,
                ack: Ack::None,
            }),
            QoS::AtLeastOnce => {
                let pkid = publish.pkid;
                self.events.push_back(SessionEvent::Message {
                    publish,
                    ack: Ack::PubAck(pkid),
                })
            }
            QoS::ExactlyOnce => {
                let pkid = publish.pkid;
                if self.pending_qos2.contains(&pkid) {
                    self.transmit.push_back(Packet::PubRec(PubRec::new(pkid)));
                    self.events.push_back(SessionEvent::Duplicate { pkid });
                } else if !self.storing_qos2.insert(pkid) {
                    // Redelivered before our first copy finished committing: the
                    // PUBREC that follows that commit answers both.
                    self.events.push_back(SessionEvent::Duplicate { pkid });
                } else {
                    self.events.push_back(SessionEvent::Message {
                        publish,
                        ack: Ack::PubRec(pkid),
                    })
                }
            }
        }
    }

    /// Queues a QoS 0 PUBLISH (not retained), if connected: a Sparkplug
    /// host's NCMD. QoS 0 needs no packet id and no acknowledgement, so the
    /// subscriber's state does not change; a request lost with the
    /// connection is asked again after the next gap.
    pub fn publish(&mut self, topic: String, payload: Vec<u8>) {
        if self.state == State::Connected {
            self.transmit.push_back(Packet::Publish(Publish::new(
                topic,
                QoS::AtMostOnce,
                payload,
            )));
        }
    }

    /// The outbox committed the message; queue its acknowledgement.
    ///
    /// Calls must come in the order the messages were received: MQTT 3.1.1
    /// section 4.6 requires acknowledgements in that order.
    pub fn committed(&mut self, ack: Ack) {
        match ack {
            Ack::None => {}
            Ack::PubAck(pkid) => self.transmit.push_back(Packet::PubAck(PubAck::new(pkid))),
            Ack::PubRec(pkid) => {
                self.storing_qos2.remove(&pkid);
                self.pending_qos2.insert(pkid);
                self.transmit.push_back(Packet::PubRec(PubRec::new(pkid)));
            }
        }
    }

    /// The outbox committed the release of a QoS 2 packet id; queue PUBCOMP.
    ///
    /// A PUBREL for an id we do not know is answered too (section 4.3.3: the
    /// receiver must respond to a PUBREL with PUBCOMP), which is exactly what
    /// rumqttc gets wrong.
    pub fn released(&mut self, pkid: u16) {
        self.pending_qos2.remove(&pkid);
        self.transmit.push_back(Packet::PubComp(PubComp::new(pkid)));
    }

    /// Keep-alive: sends PINGREQ when idle, fails when the broker is silent.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        let ka = self.opts.keep_alive;
        let silent = now.saturating_duration_since(self.last_received);
        if silent >= ka + ka / 2 {
            return Err(SessionError::KeepAliveTimeout(silent));
        }
        if self.state == State::Connected
            && !self.ping_outstanding
            && now.saturating_duration_since(self.last_sent) >= ka
        {
            self.transmit.push_back(Packet::PingReq);
            self.ping_outstanding = true;
        }
        Ok(())
    }

    /// When [`Session::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        let ka = self.opts.keep_alive;
        let ping_at = self.last_sent + ka;
        let dead_at = self.last_received + ka + ka / 2;
        if self.ping_outstanding {
            dead_at
        } else {
            ping_at.min(dead_at)
        }
    }

    /// The next packet to send.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Packet> {
        let p = self.transmit.pop_front()?;
        self.last_sent = now;
        Some(p)
    }

    /// The next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::PubRel;

    fn opts(clean: bool) -> SessionOptions {
        SessionOptions {
            client_id: "agent".into(),
            login: None,
            keep_alive: Duration::from_secs(10),
            clean_session: clean,
            subscriptions: vec![("plant/#".into(), 2)],
        }
    }

    fn connected(pending: &[u16]) -> (Session, Instant) {
        let now = crate::clock::now();
        let mut s = Session::new(opts(false), pending.iter().copied().collect(), now);
        assert!(matches!(s.poll_transmit(now), Some(Packet::Connect(_))));
        s.handle_packet(
            now,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true)),
        )
        .expect("connack");
        assert!(matches!(s.poll_transmit(now), Some(Packet::Subscribe(_))));
        assert!(matches!(
            s.poll_event(),
            Some(SessionEvent::Connected {
                session_present: true
            })
        ));
        (s, now)
    }

    fn publish(qos: QoS, pkid: u16) -> Packet {
        let mut p = Publish::new("plant/a", qos, b"1".to_vec());
        p.pkid = pkid;
        Packet::Publish(p)
    }

    #[test]
    fn qos2_is_acknowledged_only_after_commit() {
        let (mut s, now) = connected(&[]);
        s.handle_packet(now, publish(QoS::ExactlyOnce, 7))
            .expect("publish");
        assert!(s.poll_transmit(now).is_none(), "no PUBREC before commit");
        let ack = match s.poll_event() {
            Some(SessionEvent::Message { ack, .. }) => ack,
            other => panic!("{other:?}"),
        };
        assert_eq!(ack, Ack::PubRec(7));
        s.committed(ack);
        assert!(matches!(s.poll_transmit(now), Some(Packet::PubRec(r)) if r.pkid == 7));
        assert!(s.pending_qos2().contains(&7));
    }

    #[test]
    fn a_redelivered_qos2_message_is_not_stored_twice() {
        let (mut s, now) = connected(&[7]);
        s.handle_packet(now, publish(QoS::ExactlyOnce, 7))
            .expect("publish");
        assert!(matches!(
            s.poll_event(),
            Some(SessionEvent::Duplicate { pkid: 7 })
        ));
        assert!(matches!(s.poll_transmit(now), Some(Packet::PubRec(r)) if r.pkid == 7));
    }

    #[test]
    fn an_unknown_pubrel_is_completed_not_fatal() {
        let (mut s, now) = connected(&[]);
        s.handle_packet(now, Packet::PubRel(PubRel::new(99)))
            .expect("pubrel");
        assert!(matches!(
            s.poll_event(),
            Some(SessionEvent::Release { pkid: 99 })
        ));
        s.released(99);
        assert!(matches!(s.poll_transmit(now), Some(Packet::PubComp(c)) if c.pkid == 99));
    }

    #[test]
    fn a_release_frees_the_packet_id_for_a_new_message() {
        let (mut s, now) = connected(&[7]);
        s.handle_packet(now, Packet::PubRel(PubRel::new(7)))
            .expect("pubrel");
        let _ = s.poll_event();
        s.released(7);
        let _ = s.poll_transmit(now);
        s.handle_packet(now, publish(QoS::ExactlyOnce, 7))
            .expect("publish");
        assert!(matches!(
            s.poll_event(),
            Some(SessionEvent::Message {
                ack: Ack::PubRec(7),
                ..
            })
        ));
    }

    #[test]
    fn a_lost_session_forgets_remembered_packet_ids() {
        let now = crate::clock::now();
        let mut s = Session::new(opts(false), [3u16].into_iter().collect(), now);
        let _ = s.poll_transmit(now);
        s.handle_packet(
            now,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
        )
        .expect("connack");
        assert!(s.pending_qos2().is_empty());
    }

    #[test]
    fn a_refused_connection_is_an_error() {
        let now = crate::clock::now();
        let mut s = Session::new(opts(false), BTreeSet::new(), now);
        let r = s.handle_packet(
            now,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false)),
        );
        assert!(matches!(r, Err(SessionError::Refused(_))));
    }

    #[test]
    fn keep_alive_pings_when_idle_and_fails_when_silent() {
        let (mut s, now) = connected(&[]);
        let t = s.poll_timeout();
        assert_eq!(t, now + Duration::from_secs(10));
        s.handle_timeout(t).expect("ping");
        assert!(matches!(s.poll_transmit(t), Some(Packet::PingReq)));
        let dead = s.poll_timeout();
        assert!(matches!(
            s.handle_timeout(dead),
            Err(SessionError::KeepAliveTimeout(_))
        ));
    }

    #[test]
    fn qos1_acks_keep_receive_order() {
        let (mut s, now) = connected(&[]);
        for id in [5, 3, 9] {
            s.handle_packet(now, publish(QoS::AtLeastOnce, id))
                .expect("publish");
        }
        let mut acks = Vec::new();
        while let Some(SessionEvent::Message { ack, .. }) = s.poll_event() {
            acks.push(ack);
        }
        for a in acks {
            s.committed(a);
        }
        let ids: Vec<u16> = std::iter::from_fn(|| s.poll_transmit(now))
            .filter_map(|p| match p {
                Packet::PubAck(a) => Some(a.pkid),
                _ => None,
            })
            .collect();
        assert_eq!(ids, vec![5, 3, 9]);
    }
}
