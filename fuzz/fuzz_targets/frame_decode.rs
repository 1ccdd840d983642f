//! Feeds arbitrary bytes to every frame decoder and, where a request frame decodes, to the
//! protobuf decoders of the request messages the server accepts. Nothing may panic, and every
//! accepted frame must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qpq_proto::{Message, frame, v1};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, payload)) = frame::decode_request(data) {
        let again =
            frame::encode_request(h.method, h.request_id, payload).expect("decoded frames fit");
        assert_eq!(again, data);
        let _ = v1::EnqueueRequest::decode(payload);
        let _ = v1::BatchEnqueueRequest::decode(payload);
        let _ = v1::FetchWaitRequest::decode(payload);
        let _ = v1::OpaqueLoginFinishRequest::decode(payload);
        let _ = v1::UploadBlobRequest::decode(payload);
    }
    if let Ok((h, payload)) = frame::decode_response(data) {
        assert_eq!(frame::encode_response(h.status, h.request_id, payload).expect("fits"), data);
        let _ = v1::Error::decode(payload);
    }
    if let Ok((h, payload)) = frame::decode_push(data) {
        assert_eq!(frame::encode_push(h.event, payload).expect("fits"), data);
        let _ = v1::NewMessage::decode(payload);
    }
});
