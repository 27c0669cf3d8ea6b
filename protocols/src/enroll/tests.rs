//! The enrollment frames round-trip in any chunking, and every limit and
//! misuse is refused with a named error, never a panic.

use proptest::prelude::*;

use super::*;

fn id(s: &str) -> AgentId {
    AgentId::parse(s).expect("id")
}

/// Feeds `bytes` in chunks of `split`, returning the first item or error.
fn feed<T>(
    bytes: &[u8],
    split: usize,
    mut push: impl FnMut(&[u8]) -> Result<Option<T>, EnrollError>,
) -> Result<Option<T>, EnrollError> {
    for chunk in bytes.chunks(split.max(1)) {
        if let Some(t) = push(chunk)? {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

fn code() -> impl Strategy<Value = RefusalCode> {
    any::<u16>().prop_map(RefusalCode::from_u16)
}

fn frame() -> impl Strategy<Value = EnrollFrame> {
    prop_oneof![
        (
            "[a-z0-9-]{1,20}",
            "[!-~]{0,60}",
            proptest::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(|(agent_id, token, csr_der)| EnrollFrame::Request {
                agent_id,
                token,
                csr_der
            }),
        (".{0,200}", ".{0,200}")
            .prop_map(|(cert_pem, ca_pem)| EnrollFrame::Issued { cert_pem, ca_pem }),
        (code(), ".{0,100}").prop_map(|(code, reason)| EnrollFrame::Refused { code, reason }),
    ]
}

proptest! {
    #[test]
    fn every_frame_round_trips(f in frame()) {
        let bytes = f.encode().expect("encode");
        prop_assert_eq!(EnrollFrame::decode(&bytes[4..]).expect("decode"), f);
    }

    #[test]
    fn a_request_and_its_answer_cross_in_any_chunking(
        token in "[!-~]{1,128}",
        csr in proptest::collection::vec(any::<u8>(), 1..MAX_CSR_LEN),
        refuse in any::<bool>(),
        reason in ".{0,300}",
        split in 1usize..64,
    ) {
        let (mut device, request) =
            DeviceEnrollment::start(&id("gw-1"), &token, &csr).expect("start");
        let mut hub = HubEnrollment::new();
        let got = feed(&request, split, |c| hub.push(c)).expect("request").expect("complete");
        prop_assert_eq!(got.agent_id.as_str(), "gw-1");
        prop_assert_eq!(&got.token, &token);
        prop_assert_eq!(&got.csr_der, &csr);
        prop_assert!(hub.finish().is_ok());
        let answer = if refuse {
            Answer::Refused { code: RefusalCode::TokenUsed, reason: reason.clone() }
        } else {
            Answer::Issued { cert_pem: reason.clone(), ca_pem: "ca".into() }
        };
        let bytes = hub.answer(answer.clone());
        let heard = feed(&bytes, split, |c| device.push(c)).expect("answer").expect("complete");
        prop_assert_eq!(heard, answer);
        prop_assert!(device.finish().is_ok());
    }

    #[test]
    fn any_bytes_yield_a_request_or_an_error_never_a_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        split in 1usize..64,
    ) {
        let mut hub = HubEnrollment::new();
        let _ = feed(&bytes, split, |c| hub.push(c));
        let mut device = DeviceEnrollment { reader: OneFrame::default() };
        let _ = feed(&bytes, split, |c| device.push(c));
    }
}

#[test]
fn variant_indices_and_codes_are_fixed() {
    let request = EnrollFrame::Request {
        agent_id: "a".into(),
        token: "t".into(),
        csr_der: vec![9],
    }
    .encode()
    .expect("request");
    assert_eq!(request, [0, 0, 0, 7, 0, 1, b'a', 1, b't', 1, 9]);
    let issued = EnrollFrame::Issued {
        cert_pem: String::new(),
        ca_pem: String::new(),
    }
    .encode()
    .expect("issued");
    assert_eq!(issued, [0, 0, 0, 3, 1, 0, 0]);
    let refused = EnrollFrame::Refused {
        code: RefusalCode::Disabled,
        reason: String::new(),
    }
    .encode()
    .expect("refused");
    assert_eq!(refused, [0, 0, 0, 3, 2, 10, 0]);
    for n in 0..=20u16 {
        let code = RefusalCode::from_u16(n);
        assert_eq!(code.to_u16(), n);
        assert_eq!(
            matches!(code, RefusalCode::Unknown(_)),
            !(1..=11).contains(&n),
            "{n}"
        );
    }
    assert_eq!(
        RefusalCode::TokenForAnotherAgent.name(),
        "token_for_another_agent"
    );
}

#[test]
fn a_length_over_the_limit_is_refused_before_the_body_arrives() {
    let mut hub = HubEnrollment::new();
    let len = u32::try_from(MAX_FRAME_LEN + 1).expect("fits");
    let err = hub.push(&len.to_be_bytes()).expect_err("too large");
    assert_eq!(
        err,
        EnrollError::TooLarge {
            len: MAX_FRAME_LEN + 1
        }
    );
    assert_eq!(err.code(), RefusalCode::Malformed);
    // And stays refused.
    assert!(hub.push(&[0; 16]).is_err());
}

#[test]
fn a_request_breaking_a_limit_is_malformed() {
    let ok_csr = [1u8; 10];
    let long_token = "t".repeat(MAX_TOKEN_LEN + 1);
    let big_csr = vec![1u8; MAX_CSR_LEN + 1];
    for (what, agent_id, token, csr) in [
        ("bad id", "a b", "tok", &ok_csr[..]),
        ("empty id", "", "tok", &ok_csr[..]),
        ("empty token", "gw-1", "", &ok_csr[..]),
        ("long token", "gw-1", long_token.as_str(), &ok_csr[..]),
        ("space in token", "gw-1", "to k", &ok_csr[..]),
        ("non-ascii token", "gw-1", "tøk", &ok_csr[..]),
        ("empty csr", "gw-1", "tok", &[][..]),
        ("big csr", "gw-1", "tok", &big_csr[..]),
    ] {
        let bytes = EnrollFrame::Request {
            agent_id: agent_id.into(),
            token: token.into(),
            csr_der: csr.to_vec(),
        }
        .encode()
        .expect("encode");
        let err = HubEnrollment::new().push(&bytes).expect_err(what);
        assert!(matches!(err, EnrollError::Malformed(_)), "{what}: {err}");
        assert!(
            !err.to_string().contains(token) || token.len() < 4,
            "{what}: {err}"
        );
    }
}

#[test]
fn each_side_refuses_the_frames_it_never_receives() {
    let answer = EnrollFrame::Refused {
        code: RefusalCode::Internal,
        reason: "x".into(),
    }
    .encode()
    .expect("encode");
    assert_eq!(
        HubEnrollment::new().push(&answer),
        Err(EnrollError::Unexpected("Refused"))
    );
    let (_, request) = DeviceEnrollment::start(&id("gw-1"), "tok", &[1]).expect("start");
    let (mut device, _) = DeviceEnrollment::start(&id("gw-1"), "tok", &[1]).expect("start");
    assert_eq!(
        device.push(&request),
        Err(EnrollError::Unexpected("Request"))
    );
}

#[test]
fn bytes_after_the_frame_or_a_truncated_frame_are_errors() {
    let (_, mut request) = DeviceEnrollment::start(&id("gw-1"), "tok", &[1]).expect("start");
    let mut hub = HubEnrollment::new();
    assert_eq!(
        hub.push(&request[..request.len() - 1]),
        Ok(None),
        "incomplete"
    );
    assert!(hub.finish().is_err());
    request.push(0);
    assert!(HubEnrollment::new().push(&request).is_err());
    let empty_body = [0, 0, 0, 0];
    assert!(matches!(
        HubEnrollment::new().push(&empty_body),
        Err(EnrollError::Malformed(_))
    ));
}

#[test]
fn a_long_reason_is_cut_at_a_character_boundary() {
    let mut hub = HubEnrollment::new();
    let bytes = hub.answer(Answer::Refused {
        code: RefusalCode::Internal,
        reason: "é".repeat(MAX_REASON_LEN),
    });
    let (mut device, _) = DeviceEnrollment::start(&id("gw-1"), "tok", &[1]).expect("start");
    let Some(Answer::Refused { reason, .. }) = device.push(&bytes).expect("answer") else {
        panic!("not a refusal");
    };
    assert_eq!(reason.len(), MAX_REASON_LEN);
    assert!(hub.answered());
}

#[test]
fn debug_output_never_shows_the_token() {
    let secret = "s3cr3t-t0ken-value";
    let frame = EnrollFrame::Request {
        agent_id: "gw-1".into(),
        token: secret.into(),
        csr_der: vec![1, 2],
    };
    assert!(!format!("{frame:?}").contains(secret));
    let (_, bytes) = DeviceEnrollment::start(&id("gw-1"), secret, &[1]).expect("start");
    let request = HubEnrollment::new()
        .push(&bytes)
        .expect("push")
        .expect("request");
    assert!(!format!("{request:?}").contains(secret));
}
