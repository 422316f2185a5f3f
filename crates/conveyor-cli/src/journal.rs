//! Where `send` meets the engine's durable journal.
//!
//! Everything journal-specific that `send` does goes through the functions here; the operating
//! commands (`status`, `dead`, `resume`) are in `ops.rs`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use conveyor::{BuildError, Builder, Conveyor, Durability, Journal, JournalError};

use crate::input::Line;
use crate::CliError;

/// Where `send` keeps its journals by default, relative to the working directory.
pub(crate) const JOURNAL_DIR: &str = ".conveyor";

/// The kind of items `send` journals (see `conveyor::Builder::journal_kind`): a journal another
/// program wrote is refused rather than read as lines.
const KIND: &str = "conveyor-cli";

/// Opens (or creates) the journal at `path` for this run; `sync` commits every line before
/// `send` returns instead of in groups.
pub(crate) fn attach(
    builder: Builder<Line>,
    path: &Path,
    sync: bool,
) -> Result<Builder<Line>, CliError> {
    ensure_dir(path)?;
    let builder = builder.journal(path).journal_kind(KIND);
    Ok(if sync {
        builder.durability(Durability::Sync)
    } else {
        builder
    })
}

/// How much of the start of an input file its fingerprint covers (see [`remember_input`]).
const FINGERPRINT_BYTES: u64 = 64 * 1024;

/// `JOURNAL-input`: the fingerprint of the file input the journal's first run read.
fn fingerprint_path(journal: &Path) -> PathBuf {
    let mut name = journal.as_os_str().to_owned();
    name.push("-input");
    PathBuf::from(name)
}

/// The length and FNV-1a hash of the first [`FINGERPRINT_BYTES`] (at most `limit`) of `input`.
fn fingerprint(input: &Path, limit: u64) -> std::io::Result<(u64, u64)> {
    let mut head = Vec::new();
    File::open(input)?
        .take(limit.min(FINGERPRINT_BYTES))
        .read_to_end(&mut head)?;
    Ok((head.len() as u64, fnv1a(&head)))
}

/// 64-bit FNV-1a, for default journal names and input fingerprints (not against an adversary):
/// stable across Rust releases, unlike std's DefaultHasher, so an upgraded binary still finds
/// yesterday's journal.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Remembers the start of the file a run reads from its first line, next to its journal: a
/// rerun resumes by line position, and a file rewritten since with at least as many lines
/// would otherwise have its first lines skipped without a word. Written before any line is
/// read; a file that only grew since (a log appended to) keeps its start, and resumes.
pub(crate) fn remember_input(journal: &Path, input: &Path) -> Result<(), CliError> {
    let sidecar = fingerprint_path(journal);
    let written = fingerprint(input, FINGERPRINT_BYTES).and_then(|(len, hash)| {
        let mut file = File::create(&sidecar)?;
        writeln!(file, "conveyor input fingerprint 1\n{len} {hash:016x}")?;
        file.sync_all()
    });
    written.map_err(|e| {
        CliError::usage(format!(
            "cannot write {} (the fingerprint of the input, which a rerun checks): {e}",
            sidecar.display()
        ))
    })
}

/// Checks that `input` starts as the file did when the journal's first run read it (see
/// [`remember_input`]); `taken`: the lines earlier runs took. A journal without a fingerprint
/// (made before fingerprints, or crashed before writing it) is not checked.
pub(crate) fn check_input(journal: &Path, input: &Path, taken: u64) -> Result<(), CliError> {
    let Some((len, hash)) = stored_fingerprint(journal) else {
        return Ok(());
    };
    let now = fingerprint(input, len)
        .map_err(|e| CliError::usage(format!("cannot read input {}: {e}", input.display())))?;
    if now == (len, hash) {
        return Ok(());
    }
    let journal = journal.display();
    Err(CliError::usage(format!(
        "the input {} is not the file the journal {journal} was started with: its first {len} \
         bytes changed since, and an earlier run already took its first {taken} lines, so \
         resuming by position would skip lines of the new content. To send it as a new input, \
         pass a new --journal PATH, or delete {journal} once `conveyor status --journal \
         {journal}` shows nothing pending",
        input.display()
    )))
}

/// The fingerprint [`remember_input`] wrote next to `journal`: `None` if there is none, or it
/// cannot be read.
fn stored_fingerprint(journal: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(fingerprint_path(journal)).ok()?;
    let line = text.lines().nth(1)?;
    let (len, hash) = line.split_once(' ')?;
    Some((
        len.parse::<u64>().ok()?,
        u64::from_str_radix(hash, 16).ok()?,
    ))
}

/// Whether `input` may be the file the journal's first run read: it starts as that file did,
/// or the journal has no fingerprint to tell (see [`check_input`]).
pub(crate) fn started_with(journal: &Path, input: &Path) -> bool {
    stored_fingerprint(journal).map_or(true, |(len, hash)| {
        fingerprint(input, len).is_ok_and(|now| now == (len, hash))
    })
}

/// How many items the journal at `path` holds pending, read without its lock (a `send` may be
/// running on it); `None` if it cannot be read.
pub(crate) fn pending(path: &Path) -> Option<u64> {
    Journal::open_read_only(path)
        .and_then(|journal| journal.status())
        .ok()
        .map(|status| status.pending)
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
        .map_err(|e| CliError::usage(e.to_string()))
}

/// Whether the journal at `path` was written by a keyed run, as far as it tells. A journal that
/// cannot be read counts as keyed: it is then used, and opening it for the run reports why.
pub(crate) fn written_keyed(path: &Path) -> bool {
    Journal::open(path)
        .and_then(|journal| journal.status())
        .map_or(true, |status| status.keyed == Some(true))
}

/// The error for a conveyor that could not start, in the command's terms where the engine's
/// speak of its API.
pub(crate) fn build_error(e: BuildError) -> CliError {
    let message = match e {
        BuildError::Journal(JournalError::OtherOrdering {
            path,
            written,
            opened,
            pending,
            paused,
        }) => format!(
            "journal {} was written by a run with `--ordering {}` and still holds {pending} \
             pending line(s) and {paused} paused lane(s), which `--ordering {}` would put in the \
             wrong lanes; it was left untouched: rerun with `--ordering {}` to deliver them \
             (after `conveyor resume{} KEY` for a paused lane), or give this run another \
             --journal PATH",
            path.display(),
            ordering_arg(&written),
            ordering_arg(&opened),
            ordering_arg(&written),
            crate::ops::journal_option(&path),
        ),
        BuildError::Journal(JournalError::OtherKind { path, written, .. }) => format!(
            "{} is a journal of another program (its items are of kind {written:?}), not of \
             `conveyor send`, which could not read them; it was left untouched: give this run \
             another --journal PATH",
            path.display()
        ),
        other => other.to_string(),
    };
    CliError::usage(format!("cannot start: {message}"))
}

/// An engine ordering name as `--ordering` takes it.
fn ordering_arg(name: &str) -> String {
    match name {
        "keyed" => "keyed:N --key FIELD".to_owned(),
        "pipelined" => "pipelined:N".to_owned(),
        other => other.to_owned(),
    }
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
