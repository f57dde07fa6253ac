//! The `openrun` binary: one program for every verb.

#![forbid(unsafe_code)]

mod cli;
mod commands;
mod image_build;
mod image_cmd;
mod local_server;
mod mcp;
mod output;
mod remote;
mod session;
mod snapshot_cmd;
mod terminal;
mod up;

fn main() {
    let cli = cli::Cli::parse_checked();
    // Warnings only, unless OPENRUN_LOG asks for more (e.g. OPENRUN_LOG=debug).
    // Colours only for a terminal: logs of `openrun serve` or `openrun mcp` often go to files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match tracing_subscriber::EnvFilter::try_from_env("OPENRUN_LOG") {
        Ok(filter) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .init(),
        Err(_) => tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .init(),
    }
    let code = match commands::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("openrun: {}", cli::describe_error(&err));
            cli::ERROR_EXIT_CODE
        }
    };
    // `std::process::exit`, unless `run` started a sandbox's cleaner, which may take this
    // process's memory over as it is.
    openrun_runtime::exit_process(code);
}
