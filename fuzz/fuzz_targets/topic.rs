//! Topic filters and templates come from config files and bridges: parsing and
//! matching any text must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocols::topic::{TopicFilter, TopicTemplate};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (a, b) = s.split_once('\n').unwrap_or((s, s));
    if let Ok(f) = TopicFilter::parse(a) {
        let _ = f.matches(b);
    }
    if let Ok(t) = TopicTemplate::parse(a) {
        let _ = t.render(b);
    }
});
