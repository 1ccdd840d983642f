//! `blob`: file-transfer throughput through the real server, the way the client moves files:
//! 1 MiB chunks, one call at a time, upload then download of the same blob.

use std::time::{Duration, Instant};

use anyhow::ensure;
use qpq_proto::{method, v1};
use qpq_tests::Client;
use sha2::{Digest, Sha256};

use super::common::{self, Opts, Table};

/// Chunk size, as the client engine uses.
const CHUNK: usize = 1 << 20;

/// Runs the benchmark and prints its table.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let size: usize = if opts.quick { 4 << 20 } else { 32 << 20 };
    let runs = if opts.quick { 1 } else { 5 };
    let dir = tempfile::tempdir()?;
    let server = common::start_server(opts, dir.path(), &[])?;
    let endpoint = Client::endpoint(&server.fingerprint)?;
    let acct = common::account(&endpoint, &server, "blob").await?;
    let c = &acct.client;

    let (mut up, mut down) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let mut blob = vec![0u8; size];
        rand::Rng::fill(&mut rand::thread_rng(), &mut blob[..]);
        let id = Sha256::digest(&blob).to_vec();

        let t = Instant::now();
        for (i, chunk) in blob.chunks(CHUNK).enumerate() {
            let r: v1::UploadBlobResponse = c
                .call(
                    method::UPLOAD_BLOB,
                    &v1::UploadBlobRequest {
                        blob_id: id.clone(),
                        total_size: size as u64,
                        offset: (i * CHUNK) as u64,
                        chunk: chunk.to_vec(),
                        media_type: "application/octet-stream".into(),
                    },
                )
                .await?;
            ensure!(r.complete == ((i + 1) * CHUNK >= size), "upload {run}: chunk {i} complete?");
        }
        up.push(t.elapsed());

        let t = Instant::now();
        let mut got = Vec::with_capacity(size);
        while got.len() < size {
            let r: v1::DownloadBlobResponse = c
                .call(
                    method::DOWNLOAD_BLOB,
                    &v1::DownloadBlobRequest {
                        blob_id: id.clone(),
                        offset: got.len() as u64,
                        max_len: CHUNK as u32,
                    },
                )
                .await?;
            ensure!(!r.chunk.is_empty(), "download {run}: empty chunk at {}", got.len());
            got.extend_from_slice(&r.chunk);
        }
        down.push(t.elapsed());
        ensure!(got == blob, "download {run}: bytes differ from the upload");
    }

    let mib_s = |d: Duration| size as f64 / 1048576.0 / d.as_secs_f64();
    let up_med = common::median(&mut up);
    let down_med = common::median(&mut down);
    let mut t = Table::new("blob: file transfer through the server (1 MiB chunks, one at a time)");
    t.info("upload, median", format!("{:.1} MiB/s ({})", mib_s(up_med), common::dur(up_med)));
    t.info("download, median", format!("{:.1} MiB/s ({})", mib_s(down_med), common::dur(down_med)));
    t.note(format!(
        "{}; {} MiB blob, {runs} runs over loopback, uploads fsynced per chunk by the server",
        opts.server.display(),
        size >> 20
    ));
    t.print();
    c.conn.close(0u32.into(), b"done");
    let mut server = server;
    server.terminate(Duration::from_secs(15))?;
    Ok(())
}
