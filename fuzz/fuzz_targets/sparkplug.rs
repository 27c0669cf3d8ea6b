//! Sparkplug B payloads come from any edge node on the site broker: a host
//! fed any sequence of messages on any message type must never panic, and
//! every event it makes must have a valid stream.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use outpost_protocols::sparkplug::{Host, HostOptions, Output};

const TOPICS: [&str; 8] = [
    "spBv1.0/g/NBIRTH/n",
    "spBv1.0/g/NDATA/n",
    "spBv1.0/g/NDEATH/n",
    "spBv1.0/g/DBIRTH/n/d",
    "spBv1.0/g/DDATA/n/d",
    "spBv1.0/g/DDEATH/n/d",
    "spBv1.0/g/NCMD/n",
    "spBv1.0/STATE/h",
];

fuzz_target!(|data: &[u8]| {
    let mut host = Host::new(HostOptions {
        rebirth: true,
        rebirth_interval: Duration::from_millis(1),
    });
    // Messages are separated by the byte sequence 0xfe 0xfe; each message's
    // first byte picks its topic.
    let start = Instant::now();
    for (i, msg) in data.split(|b| *b == 0xfe).enumerate() {
        let Some((&which, payload)) = msg.split_first() else {
            continue;
        };
        let topic = TOPICS[usize::from(which) % TOPICS.len()];
        let now = start + Duration::from_millis(i as u64);
        let _ = host.handle_message(now, i as i64 * 1_000_000, topic, payload);
        while let Some(out) = host.poll_output() {
            if let Output::Sample(body) = out {
                assert!(!body.stream.as_str().is_empty());
            }
        }
    }
});
