//! Where `send` meets the engine's durable journal.
//!
//! Everything journal-specific that `send` does goes through the functions here; the operating
//! commands (`status`, `dead`, `resume`) are in `ops.rs`.

use std::path::Path;

use conveyor::{Builder, Conveyor, Durability, Journal, JournalError};

use crate::input::Line;
use crate::CliError;

/// Where `send` keeps its journals by default, relative to the working directory.
pub(crate) const JOURNAL_DIR: &str = ".conveyor";

/// Opens (or creates) the journal at `path` for this run; `sync` commits every line before
/// `send` returns instead of in groups.
pub(crate) fn attach(
    builder: Builder<Line>,
    path: &Path,
    sync: bool,
) -> Result<Builder<Line>, CliError> {
    ensure_dir(path)?;
    let builder = builder.journal(path);
    Ok(if sync {
        builder.durability(Durability::Sync)
    } else {
        builder
    })
}

/// The input position the journal at `path` holds (lines a previous run already took), read
/// before a conveyor opens it and starts delivering; `None` if there is no journal yet (none is
/// created here).
pub(crate) fn stored_cursor(path: &Path) -> Result<Option<u64>, CliError> {
    if !path.exists() {
        return Ok(None);
    }
    Journal::open(path)
        .and_then(|journal| journal.cursor())
        .map_err(|e| CliError::usage(format!("cannot read the journal's input position: {e}")))
}

/// Records the input position, committed with the items accepted before it. `Ok(false)` once
/// the run is shutting down: like a send refused then, the position stays where it was, and a
/// rerun reads the line again.
pub(crate) fn set_cursor(conveyor: &Conveyor<Line>, position: u64) -> Result<bool, String> {
    match conveyor.set_cursor(position) {
        Ok(()) => Ok(true),
        Err(JournalError::Closed { .. }) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Creates the journal's directory if needed, owner-only like the journal itself: it holds the
/// lines' bodies, which may be personal data.
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
