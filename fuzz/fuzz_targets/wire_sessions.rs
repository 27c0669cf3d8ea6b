//! Both session state machines take bytes from the other side: any bytes, at
//! any time, must end in frames, events or a named error — never a panic.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use outpost_protocols::wire::{AgentConfig, AgentInfo, AgentSession, HubConfig, HubSession};
use outpost_protocols::{AgentId, Seq};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let Ok(id) = AgentId::parse("fuzz") else { return };
    let mut hub = HubSession::new(now, id, Seq(3), HubConfig::default());
    let mut agent = AgentSession::new(now, AgentInfo { agent_version: "fuzz".into(), labels: Default::default() }, AgentConfig::default());
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(37).enumerate() {
        let t = now + Duration::from_millis(i as u64 * 250);
        let _ = hub.handle_bytes(t, chunk);
        let _ = agent.handle_bytes(t, chunk);
        hub.handle_timeout(t);
        agent.handle_timeout(t);
        while hub.poll_transmit(t, &mut out).is_some() {}
        while agent.poll_transmit(t, &mut out).is_some() {}
        while hub.poll_event().is_some() {}
        while agent.poll_event().is_some() {}
        out.clear();
    }
});
