//! `qpq`: the terminal client. With a subcommand it runs one scriptable action; without one
//! it opens the terminal UI.

fn main() -> std::process::ExitCode {
    qpq_tui::cli::main()
}
