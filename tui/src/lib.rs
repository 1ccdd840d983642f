//! qpq-tui: the `qpq` terminal client (scriptable subcommands and the terminal UI). The binary
//! is `src/main.rs`; the library exists so benchmarks and tests can drive the same code.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod app;
pub mod attach;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod downloads;
pub mod ipc;
pub mod login;
pub mod protocol;
pub mod signals;
pub mod tui_main;
pub mod ui;
pub mod worker;
