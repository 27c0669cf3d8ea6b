//! The hub reads an enrollment request from any unauthenticated peer, and the
//! device reads the answer: any byte stream, in any chunking, must yield one
//! frame or an error on either side, never a panic, and a request that is
//! accepted must encode again to a request that is accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocols::enroll::{DeviceEnrollment, HubEnrollment};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut hub = HubEnrollment::new();
    for chunk in data.chunks(split) {
        match hub.push(chunk) {
            Ok(Some(request)) => {
                let (_, bytes) =
                    DeviceEnrollment::start(&request.agent_id, &request.token, &request.csr_der)
                        .expect("an accepted request encodes again");
                let again = HubEnrollment::new()
                    .push(&bytes)
                    .expect("and decodes again")
                    .expect("whole");
                assert_eq!(again, request);
                break;
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
    let _ = hub.finish();
    if let Ok((mut device, _)) = DeviceEnrollment::start(
        &outpost_protocols::AgentId::parse("gw-1").expect("id"),
        "token",
        &[1],
    ) {
        for chunk in data.chunks(split) {
            match device.push(chunk) {
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => break,
            }
        }
    }
});
