//! Feeds arbitrary bytes, as a stream, to the local socket's frame reader
//! (`qpq_tui::ipc::read_frame`) with `serde_json::Value` as the message type. Nothing may
//! panic; a clean end (`Ok(None)`) only for empty input; a frame (`Ok(Some)`) only when the
//! input holds its whole header and payload.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use qpq_tui::ipc::{self, HEADER_LEN, IpcError};
use tokio::runtime::{Builder, Runtime};

static RT: LazyLock<Runtime> =
    LazyLock::new(|| Builder::new_current_thread().build().expect("tokio runtime"));

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let res = RT.block_on(ipc::read_frame::<serde_json::Value, _>(&mut r));
    match res {
        Ok(None) => assert!(data.is_empty(), "Ok(None) for {} bytes", data.len()),
        Ok(Some(v)) => {
            assert!(data.len() >= HEADER_LEN, "a frame from {} bytes", data.len());
            let header: &[u8; HEADER_LEN] = data[..HEADER_LEN].try_into().expect("header");
            let len = ipc::decode_header(header).expect("a frame was read");
            assert!(data.len() >= HEADER_LEN + len, "payload past the input");
            assert_eq!(r.len(), data.len() - HEADER_LEN - len, "read past its frame");
            // What was read can be written again and reads back as a frame (JSON may grow
            // when written again, e.g. `1e15`, so past a few MiB it may be too large).
            match ipc::encode(&v) {
                Ok(again) => {
                    let mut a = &again[..];
                    let back = RT.block_on(ipc::read_frame::<serde_json::Value, _>(&mut a));
                    assert!(matches!(back, Ok(Some(_))), "re-encoded frame: {back:?}");
                }
                Err(IpcError::TooLarge(_)) => {}
                Err(e) => panic!("a frame read does not encode: {e}"),
            }
        }
        Err(_) => {}
    }
});
