//! The frame decoder reads bytes from any peer on the network: any byte stream,
//! in any chunking, must yield frames or an error, never a panic, and never
//! buffer past the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocols::wire::{Frame, FrameDecoder, MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut d = FrameDecoder::new();
    for chunk in data.chunks(split) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(frame)) => {
                    let mut out = Vec::new();
                    if frame.encode(&mut out).is_ok() {
                        assert!(Frame::decode(&out[4..]).is_ok());
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= MAX_FRAME_LEN + 4 + chunk.len());
    }
});
