//! Feeds arbitrary bytes, as a stream, to the local socket's frame reader
//! (`qpq_tui::ipc::read_frame`) with the socket's real message types: as a
//! `qpq_tui::protocol::Request`, the way `qpq daemon` reads what an attached `qpq` sends, and
//! as a `Reply`, the way an attached `qpq` reads the daemon's answers. Nothing may panic; a
//! clean end (`Ok(None)`) only for empty input; a frame (`Ok(Some)`) only when the input holds
//! its whole header and payload, and nothing is read past it. A message read is written again
//! and reads back, and from then on is written the same way.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use qpq_tui::ipc::{self, HEADER_LEN, IpcError};
use qpq_tui::protocol::{Reply, Request};
use tokio::runtime::{Builder, Runtime};

static RT: LazyLock<Runtime> =
    LazyLock::new(|| Builder::new_current_thread().build().expect("tokio runtime"));

/// Reads `$data` as one frame of a `$t` and checks what came out. (A macro, not a generic
/// function: this crate does not depend on serde to name its traits.)
macro_rules! check {
    ($t:ty, $data:expr) => {{
        let data: &[u8] = $data;
        let mut r = data;
        match RT.block_on(ipc::read_frame::<$t, _>(&mut r)) {
            Ok(None) => assert!(data.is_empty(), "Ok(None) for {} bytes", data.len()),
            Ok(Some(v)) => {
                assert!(data.len() >= HEADER_LEN, "a frame from {} bytes", data.len());
                let header: &[u8; HEADER_LEN] = data[..HEADER_LEN].try_into().expect("header");
                let len = ipc::decode_header(header).expect("a frame was read");
                assert!(data.len() >= HEADER_LEN + len, "payload past the input");
                assert_eq!(r.len(), data.len() - HEADER_LEN - len, "read past its frame");
                // Written again, a message may be longer than it came (an optional field left
                // out is written as `null`), so one near the limit may be too large.
                match ipc::encode(&v) {
                    Ok(again) => {
                        let mut a = &again[..];
                        match RT.block_on(ipc::read_frame::<$t, _>(&mut a)) {
                            Ok(Some(back)) => {
                                assert!(a.is_empty(), "a re-encoded frame read in part");
                                let third = ipc::encode(&back).expect("encodes as before");
                                assert!(third == again, "{v:?} changed when read back: {back:?}");
                            }
                            other => panic!("re-encoded {v:?} reads as {other:?}"),
                        }
                    }
                    Err(IpcError::TooLarge(_)) => {}
                    Err(e) => panic!("a message read does not encode: {e}"),
                }
            }
            Err(_) => {}
        }
    }};
}

fuzz_target!(|data: &[u8]| {
    check!(Request, data);
    check!(Reply, data);
});
