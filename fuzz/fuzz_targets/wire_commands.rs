//! Commands (frames 14 and 15) arrive only once a session streams, where the
//! raw-bytes target rarely gets: here both sessions are welcomed first, then
//! take any bytes, and the agent answers every command it is handed, as its
//! driver does. Named errors, never a panic.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use outpost_protocols::wire::command::Outcome;
use outpost_protocols::wire::{
    AgentConfig, AgentEvent, AgentInfo, AgentSession, Frame, HubConfig, HubSession,
    PROTOCOL_VERSION,
};
use outpost_protocols::{AgentId, Seq};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let Ok(id) = AgentId::parse("fuzz") else { return };
    let mut hub = HubSession::new(now, id, Seq(0), HubConfig::default());
    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    let mut out = Vec::new();
    // Each side is welcomed by the other's real first frame.
    while agent.poll_transmit(now, &mut out).is_some() {}
    let _ = hub.handle_bytes(now, &out);
    out.clear();
    let mut welcome = Vec::new();
    let _ = Frame::Welcome { version: PROTOCOL_VERSION, watermark: Seq(0), window: 16 }.encode(&mut welcome);
    let _ = agent.handle_bytes(now, &welcome);
    for (i, chunk) in data.chunks(41).enumerate() {
        let t = now + Duration::from_millis(i as u64 * 100);
        let _ = hub.handle_bytes(t, chunk);
        let _ = agent.handle_bytes(t, chunk);
        while let Some(e) = agent.poll_event() {
            if let AgentEvent::Command { command } = e {
                let _ = agent.command_result(&command.id, Outcome::Expired);
            }
        }
        while hub.poll_event().is_some() {}
        while hub.poll_transmit(t, &mut out).is_some() {}
        while agent.poll_transmit(t, &mut out).is_some() {}
        out.clear();
    }
});
