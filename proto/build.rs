//! Compiles `proto/qpq/v1/*.proto` with protox (pure Rust, no system `protoc`) and prost.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "qpq/v1/common.proto",
    "qpq/v1/auth.proto",
    "qpq/v1/delivery.proto",
    "qpq/v1/keys.proto",
    "qpq/v1/user.proto",
    "qpq/v1/blob.proto",
    "qpq/v1/device.proto",
    "qpq/v1/health.proto",
    "qpq/v1/account.proto",
    "qpq/v1/push.proto",
    "qpq/v1/content.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    for file in FILES {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let fds = protox::compile(FILES, [&root])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
