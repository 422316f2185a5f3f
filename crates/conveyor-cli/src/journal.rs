//! Where `send` meets the engine's durable journal.
//!
//! The journal (issue 3) is built alongside the CLI; until it is part of the engine,
//! `cfg(conveyor_journal)` is unset and journal-backed runs and the operating commands explain
//! that this build runs with `--no-journal` only. Everything journal-specific that `send` does
//! goes through the three functions here, so removing the gate changes nothing else.

use std::path::Path;

use conveyor::{Builder, Conveyor};

use crate::input::Line;
use crate::CliError;

/// Where `send` keeps its journals by default, relative to the working directory.
pub(crate) const JOURNAL_DIR: &str = ".conveyor";

/// Opens (or creates) the journal at `path` for this run.
#[cfg(conveyor_journal)]
pub(crate) fn attach(builder: Builder<Line>, path: &Path) -> Result<Builder<Line>, CliError> {
    ensure_dir(path)?;
    Ok(builder.journal(path))
}

/// The input position the journal holds: lines a previous run already took.
#[cfg(conveyor_journal)]
pub(crate) fn cursor(conveyor: &Conveyor<Line>) -> Result<Option<u64>, CliError> {
    conveyor
        .cursor()
        .map_err(|e| CliError::usage(format!("cannot read the journal's input position: {e}")))
}

/// Records the input position, committed with the items accepted before it.
#[cfg(conveyor_journal)]
pub(crate) fn set_cursor(conveyor: &Conveyor<Line>, position: u64) -> Result<(), String> {
    conveyor.set_cursor(position).map_err(|e| e.to_string())
}

#[cfg(not(conveyor_journal))]
pub(crate) fn attach(_: Builder<Line>, path: &Path) -> Result<Builder<Line>, CliError> {
    Err(CliError::usage(format!(
        "this build of conveyor has no journal yet, so it cannot keep {}: run with --no-journal",
        path.display()
    )))
}

#[cfg(not(conveyor_journal))]
pub(crate) fn cursor(_: &Conveyor<Line>) -> Result<Option<u64>, CliError> {
    Ok(None)
}

#[cfg(not(conveyor_journal))]
pub(crate) fn set_cursor(_: &Conveyor<Line>, _: u64) -> Result<(), String> {
    Ok(())
}

/// The error of the operating commands in a build without the journal.
#[cfg(not(conveyor_journal))]
pub(crate) fn unavailable() -> CliError {
    CliError::usage(
        "this build of conveyor has no journal yet: `status`, `dead` and `resume` need one",
    )
}

/// Creates the journal's directory if needed, owner-only like the journal itself: it holds the
/// lines' bodies, which may be personal data.
#[cfg(conveyor_journal)]
fn ensure_dir(path: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::DirBuilderExt;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                CliError::usage(format!(
                    "cannot create the journal directory {}: {e}",
                    dir.display()
                ))
            }),
        _ => Ok(()),
    }
}
