//! `qpq`: the terminal client. With a subcommand it runs one scriptable action; without one
//! it will open the terminal UI.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
