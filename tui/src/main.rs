//! `qpq`, the terminal client. The client engine and the terminal UI are not built yet; this
//! binary only says so, so that nobody mistakes it for a working client.

fn main() {
    eprintln!(
        "qpq {}: the terminal client is not built yet. \
         Run `./target/debug/qpq-demo` for a server walk-through.",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
