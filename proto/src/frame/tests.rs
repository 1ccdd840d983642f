use proptest::prelude::*;

use super::*;
use crate::{Message, method, v1};

fn any_status() -> impl Strategy<Value = Status> {
    (0u8..=11).prop_map(|b| Status::from_u8(b).expect("0..=11 are assigned"))
}

proptest! {
    #[test]
    fn request_round_trips(method in any::<u16>(), id in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let bytes = encode_request(method, id, &payload).unwrap();
        prop_assert_eq!(bytes.len(), REQUEST_HEADER_LEN + payload.len());
        let (h, p) = decode_request(&bytes).unwrap();
        prop_assert_eq!((h.method, h.request_id, h.len as usize), (method, id, payload.len()));
        prop_assert_eq!(p, payload.as_slice());
    }

    #[test]
    fn response_round_trips(status in any_status(), id in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let bytes = encode_response(status, id, &payload).unwrap();
        let (h, p) = decode_response(&bytes).unwrap();
        prop_assert_eq!((h.status, h.request_id), (status, id));
        prop_assert_eq!(p, payload.as_slice());
    }

    #[test]
    fn push_round_trips(event in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let bytes = encode_push(event, &payload).unwrap();
        let (h, p) = decode_push(&bytes).unwrap();
        prop_assert_eq!(h.event, event);
        prop_assert_eq!(p, payload.as_slice());
    }

    #[test]
    fn every_strict_prefix_is_truncated(payload in proptest::collection::vec(any::<u8>(), 0..64), cut in any::<prop::sample::Index>()) {
        let bytes = encode_request(method::ENQUEUE, 1, &payload).unwrap();
        let cut = cut.index(bytes.len());
        let is_truncated = matches!(decode_request(&bytes[..cut]), Err(FrameError::Truncated { .. }));
        prop_assert!(is_truncated);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode_request(&bytes);
        let _ = decode_response(&bytes);
        let _ = decode_push(&bytes);
    }

    #[test]
    fn protobuf_messages_survive_framing(data in proptest::collection::vec(any::<u8>(), 0..512), seq in any::<u64>(), ttl in any::<u32>()) {
        let msg = v1::EnqueueRequest { recipient_key: vec![7; 32], payload: data, channel_id: vec![], ttl_secs: ttl, message_id: vec![1; 16] };
        let body = msg.encode_to_vec();
        prop_assert_eq!(msg.encoded_len(), body.len());
        let bytes = encode_request(method::ENQUEUE, 9, &body).unwrap();
        let (_, p) = decode_request(&bytes).unwrap();
        prop_assert_eq!(v1::EnqueueRequest::decode(p).unwrap(), msg);
        let env = v1::Envelope { seq, data: vec![1, 2, 3], message_id: vec![], enqueued_at_ms: 0 };
        prop_assert_eq!(v1::Envelope::decode(env.encode_to_vec().as_slice()).unwrap(), env);
    }
}

#[test]
fn oversized_header_is_refused_before_payload() {
    let header = RequestHeader { method: method::ENQUEUE, request_id: 1, len: MAX_PAYLOAD + 1 };
    // Only the 10 header bytes exist: the length check fires without the payload.
    assert_eq!(
        RequestHeader::decode(&header.encode()),
        Err(FrameError::TooLarge { len: u64::from(MAX_PAYLOAD) + 1, max: MAX_PAYLOAD })
    );
    let push = PushHeader { event: 1000, len: u32::MAX };
    assert!(matches!(PushHeader::decode(&push.encode()), Err(FrameError::TooLarge { .. })));
    let resp = ResponseHeader { status: Status::Ok, request_id: 1, len: u32::MAX };
    assert!(matches!(ResponseHeader::decode(&resp.encode()), Err(FrameError::TooLarge { .. })));
}

#[test]
fn max_payload_is_accepted_and_one_more_is_not() {
    let max = vec![0u8; MAX_PAYLOAD as usize];
    let bytes = encode_request(1, 1, &max).unwrap();
    assert_eq!(decode_request(&bytes).unwrap().0.len, MAX_PAYLOAD);
    let over = vec![0u8; MAX_PAYLOAD as usize + 1];
    assert!(matches!(encode_request(1, 1, &over), Err(FrameError::TooLarge { .. })));
    assert!(matches!(encode_push(1, &over), Err(FrameError::TooLarge { .. })));
}

#[test]
fn trailing_bytes_and_unknown_status_are_refused() {
    let mut bytes = encode_request(1, 1, b"abc").unwrap();
    bytes.push(0);
    assert_eq!(decode_request(&bytes), Err(FrameError::TrailingBytes(1)));
    let mut resp = encode_response(Status::Ok, 1, b"").unwrap();
    resp[0] = 12;
    assert_eq!(decode_response(&resp), Err(FrameError::UnknownStatus(12)));
}

#[test]
fn header_layout_is_big_endian() {
    let h = RequestHeader { method: 0x0102, request_id: 0x0304_0506, len: 0x0708_090a };
    assert_eq!(h.encode(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    let r = ResponseHeader { status: Status::UnknownMethod, request_id: 0x0102_0304, len: 5 };
    assert_eq!(r.encode(), [11, 1, 2, 3, 4, 0, 0, 0, 5]);
    let p = PushHeader { event: 1000, len: 2 };
    assert_eq!(p.encode(), [0x03, 0xe8, 0, 0, 0, 2]);
}
