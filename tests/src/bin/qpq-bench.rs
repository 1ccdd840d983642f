//! `qpq-bench`: the server's footprint, fan-out, latency, durability, MLS, OPAQUE, start-up and
//! file-transfer figures against the real release server binary, each beside its goal.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ./target/release/qpq-bench all            # or: footprint fanout latency durable mls opaque start blob
//! ./target/release/qpq-bench --quick all    # a short smoke run
//! ./target/release/qpq-bench --server target/cross/bin/x86_64-unknown-linux-musl/qpq-server-lite footprint
//! ```
//!
//! A missed goal prints MISS and still exits 0; a benchmark that cannot run exits non-zero.

use std::path::PathBuf;

use anyhow::bail;

#[path = "../bench"]
mod bench {
    pub mod blob;
    pub mod common;
    pub mod durable;
    pub mod fanout;
    pub mod footprint;
    pub mod latency;
    pub mod mls;
    pub mod mqtt;
    pub mod opaque;
    pub mod probe;
    pub mod start;
}

use bench::common::Opts;

const COMMANDS: &[&str] =
    &["footprint", "fanout", "latency", "durable", "mls", "opaque", "start", "blob"];

const USAGE: &str = "usage: qpq-bench [--quick] [--server PATH] <all|footprint|fanout|latency|durable|mls|opaque|start|blob>...";

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut server = None;
    let mut commands = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--server" => match args.next() {
                Some(p) => server = Some(PathBuf::from(p)),
                None => bail!("--server needs a path\n{USAGE}"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "all" => commands.extend(COMMANDS.iter().map(|c| c.to_string())),
            c if COMMANDS.contains(&c) => commands.push(c.to_string()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if commands.is_empty() {
        bail!("{USAGE}");
    }
    let server = server.unwrap_or_else(|| qpq_tests::workspace_bin("qpq-server-lite"));
    if !server.exists() {
        bail!("server binary {} not found", server.display());
    }
    let opts = Opts { quick, server };
    println!(
        "qpq-bench: server {}{}; {} CPUs",
        opts.server.display(),
        if quick { " (--quick)" } else { "" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for c in &commands {
        let started = std::time::Instant::now();
        let result = rt.block_on(async {
            match c.as_str() {
                "footprint" => bench::footprint::run(&opts).await,
                "fanout" => bench::fanout::run(&opts).await,
                "latency" => bench::latency::run(&opts).await,
                "durable" => bench::durable::run(&opts).await,
                "mls" => bench::mls::run(&opts),
                "opaque" => bench::opaque::run(&opts).await,
                "start" => bench::start::run(&opts).await,
                "blob" => bench::blob::run(&opts).await,
                _ => unreachable!("checked above"),
            }
        });
        if let Err(e) = result {
            bail!("{c} failed: {e:#}");
        }
        println!("({c} took {:.1} s)", started.elapsed().as_secs_f64());
    }
    Ok(())
}
