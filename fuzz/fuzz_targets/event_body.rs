//! Stored and received event bodies are postcard bytes from disk or the wire:
//! decoding any bytes must return an error, never panic, and whatever decodes
//! must encode back to bytes that decode to the same body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocols::EventBody;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = EventBody::decode(data) {
        let again = EventBody::decode(&body.encode()).expect("re-encoded body decodes");
        assert_eq!(format!("{body:?}"), format!("{again:?}"));
        let _ = body.value.to_json();
        let _ = body.quality.to_json();
    }
});
