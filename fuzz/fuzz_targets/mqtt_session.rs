//! The broker's bytes drive the agent's MQTT session: any byte stream must end
//! in packets or an error, and the session must never panic on any packet.
#![no_main]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use outpost_agent::sources::mqtt::session::{Session, SessionEvent, SessionOptions};
use rumqttc::mqttbytes::v4::Packet;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let opts = SessionOptions {
        client_id: "fuzz".into(),
        login: None,
        keep_alive: Duration::from_secs(30),
        clean_session: false,
        subscriptions: vec![("#".into(), 2)],
    };
    let mut s = Session::new(opts, BTreeSet::from([1, 2, 3]), now);
    let mut buf = BytesMut::from(data);
    while let Ok(p) = Packet::read(&mut buf, 1 << 20) {
        if s.handle_packet(now, p).is_err() {
            break;
        }
        while let Some(ev) = s.poll_event() {
            match ev {
                SessionEvent::Message { ack, .. } => s.committed(ack),
                SessionEvent::Release { pkid } => s.released(pkid),
                _ => {}
            }
        }
        while s.poll_transmit(now).is_some() {}
    }
    let _ = s.handle_timeout(now + Duration::from_secs(100));
});
