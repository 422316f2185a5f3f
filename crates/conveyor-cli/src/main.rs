//! `conveyor`: JSON lines in, ordered HTTP or program delivery out.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

mod args;
mod demo;
mod input;
mod journal;
mod ops;
mod rejects;
mod report;
mod send;
mod sink;

/// Exit codes; `args::EXIT_CODES_HELP` documents them for `--help`.
mod exit {
    pub(crate) const OK: u8 = 0;
    pub(crate) const SOME_FAILED: u8 = 1;
    pub(crate) const USAGE: u8 = 2;
    pub(crate) const INTERRUPTED: u8 = 3;
    pub(crate) const ABORTED: u8 = 130;
}

/// An error that ends the command, with the exit code it maps to.
#[derive(Debug)]
pub(crate) struct CliError {
    message: String,
    code: u8,
}

impl CliError {
    /// Bad arguments, configuration or input: exit code 2.
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: exit::USAGE,
        }
    }

    /// Output could not be written.
    pub(crate) fn io(e: std::io::Error) -> Self {
        Self::usage(format!("cannot write output: {e}"))
    }
}

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let result = match cli.command {
        args::Command::Send(send_args) => run_send(*send_args),
        args::Command::Demo(demo_args) => demo::run(demo_args),
        args::Command::Status(opts) => ops::status(&opts),
        args::Command::Dead(command) => ops::dead(&command),
        args::Command::Resume(resume) => ops::resume(&resume),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("conveyor: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

fn run_send(args: args::SendArgs) -> Result<u8, CliError> {
    for option in args::send_options_given_to_program(&args.exec) {
        eprintln!(
            "conveyor: note: `{option}` comes after --exec, so it is passed to the program, not \
             used by conveyor; put conveyor's options before --exec PROGRAM"
        );
    }
    let input = send::Input::from_arg(&args.input);
    if matches!(input, send::Input::Stdin) && std::io::stdin().is_terminal() {
        eprintln!("{}", args::terminal_stdin_note(&args.exec));
    }
    let plan = send::SendPlan::from_args(args, &input)?;
    let (tx, rx) = send::events()?;
    let summary = send::run(plan, input, tx, &rx);
    // Programs the run stopped waiting for (the drain deadline passed) must not outlive it.
    sink::stop_running_programs();
    Ok(summary?.exit_code)
}
