//! `qpq`: the terminal client. With a subcommand it runs one scriptable action; without one
//! it opens the terminal UI.

mod app;
mod cli;
mod config;
mod login;
mod tui_main;
mod ui;
mod worker;

fn main() -> std::process::ExitCode {
    cli::main()
}
