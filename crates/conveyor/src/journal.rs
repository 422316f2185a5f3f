//! The durable journal: a SQLite file (WAL mode) holding every accepted item until it is settled,
//! the dead letters, the paused lanes and an opaque input cursor.
//!
//! The engine talks to it through a handful of crate-private operations (append a batch, record a
//! batch of settlements, page through what is pending); operators use the public [`Journal`] type
//! offline, while no conveyor has the file open.
//!
//! # File layout
//! - `items(seq, lane, key, payload)`: accepted, not yet settled. A settled item is deleted.
//! - `dead(seq, lane, key, payload, error, attempts, failed_at)`: items that failed permanently.
//! - `paused(lane, error, since)`: lanes stopped by `OnFailure::Pause`.
//! - `meta(name, value)`: the journal id, the highest seq handed out or reserved (`last_seq`),
//!   the input cursor, the ordering of the conveyor that last used it (`ordering`), and the kind
//!   of items it holds (`kind`, when the conveyor named one).
//!
//! The database header carries [`APPLICATION_ID`] and the schema version in `user_version`, so a
//! foreign or newer file is recognised before anything is written to it.
//!
//! Durability: WAL with `synchronous = FULL`, so a commit is on disk when it returns (power cut
//! included); the engine batches commits to pay one fsync per group.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::limits::Limit;
use rusqlite::{
    params, Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

use crate::fork::ParentOnlyFile;

/// Written into the SQLite header (`PRAGMA application_id`): ASCII "Conv".
const APPLICATION_ID: i32 = 0x436f_6e76;
/// Schema version in `PRAGMA user_version`. Bump it with a migration when the layout changes.
const SCHEMA_VERSION: i32 = 1;
/// Suffix of the lock file next to the journal, in the style of SQLite's own `-wal` sidecar.
const LOCK_SUFFIX: &str = "-lock";
/// The WAL is cut back to this size after each checkpoint, so a burst does not leave a large
/// `-wal` file behind for the rest of the run.
const WAL_SIZE_LIMIT: i64 = 8 * 1024 * 1024;
/// How many write transactions pass between two looks at the free-page count.
const COMPACT_EVERY: u32 = 256;
/// Compact when free pages exceed this many…
const COMPACT_MIN_FREE_PAGES: i64 = 1024;
/// …and this fraction (1/n) of the file.
const COMPACT_FREE_FRACTION: i64 = 4;

/// The longest error text a dead letter or a paused lane keeps; longer ones are cut.
const MAX_ERROR_TEXT: usize = 64 * 1024;
/// What a journal row needs besides its item's payload and key: the error text of a dead
/// letter, the other columns and SQLite's record header. SQLite refuses a row longer than its
/// length limit, so an item's entry may take up that limit less this.
const ROW_HEADROOM: usize = MAX_ERROR_TEXT + 1024;

#[cfg(test)]
thread_local! {
    /// A lower `SQLITE_LIMIT_LENGTH` for the journals this thread opens: tests reach the limit
    /// without allocating a gigabyte.
    pub(crate) static TEST_LENGTH_LIMIT: std::cell::Cell<Option<i32>> =
        const { std::cell::Cell::new(None) };
    /// Run once by `LockFile::acquire` on this thread when it found the lock held and will try
    /// again: a test's stand-in for the holder letting go at that moment.
    static LOCK_RETRY_HOOK: std::cell::Cell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::Cell::new(None) };
}

/// The orderings a journal records (`meta.ordering`), as [`Ordering`](crate::Ordering) names them.
const KEYED: &str = "keyed";

const DEAD_COLUMNS: &str = "SELECT seq, lane, key, payload, error, attempts, failed_at FROM dead";

const SCHEMA: &str = "
CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID;
CREATE TABLE items (
    seq INTEGER PRIMARY KEY,
    lane TEXT NOT NULL,
    key TEXT,
    payload BLOB NOT NULL
);
-- Pending counts per lane (status) without reading the payloads.
CREATE INDEX items_by_lane ON items (lane, seq);
CREATE TABLE dead (
    seq INTEGER PRIMARY KEY,
    lane TEXT NOT NULL,
    key TEXT,
    payload BLOB NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at INTEGER NOT NULL
);
CREATE TABLE paused (
    lane TEXT PRIMARY KEY NOT NULL,
    error TEXT,
    since INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (name, value) VALUES ('id', lower(hex(randomblob(8)))), ('last_seq', 0);
";

/// An error from opening, reading or writing a [`Journal`].
///
/// Every message names the journal file and says what to do. A journal that could not be written
/// keeps what it held before the failing operation: SQLite rolls the transaction back.
///
/// # Examples
/// ```
/// use conveyor::{Journal, JournalError};
///
/// let dir = tempfile::tempdir()?;
/// let err = Journal::open(dir.path()).unwrap_err();
/// assert!(matches!(err, JournalError::IsADirectory { .. }));
/// // The message names the file and says what to do.
/// assert!(err.to_string().contains("give the path of a file"), "{err}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Another process (or another `Journal` in this process) has the journal open.
    #[error("journal {} is in use by {}", path.display(), locked_by(*pid))]
    Locked {
        /// The journal file.
        path: PathBuf,
        /// The process holding it, when the lock file names one.
        pid: Option<u32>,
    },
    /// There is no journal at this path: no file, or one that holds no journal yet
    /// ([`Journal::open_read_only`] and [`Journal::open_existing`] create none).
    #[error(
        "no journal at {}: pass the path of a journal a conveyor has used (Journal::open creates \
         one; open_existing and open_read_only do not)",
        path.display()
    )]
    Missing {
        /// The path given.
        path: PathBuf,
    },
    /// The journal was opened with [`Journal::open_read_only`], which changes nothing.
    #[error(
        "journal {} was opened read-only: make changes through the conveyor that owns it \
         (Conveyor::retry_dead, Conveyor::resume...), or open it with Journal::open once none does",
        path.display()
    )]
    ReadOnly {
        /// The journal file.
        path: PathBuf,
    },
    /// The file is not a readable SQLite database, or its content is damaged.
    #[error(
        "journal {} is damaged ({reason}); it was left untouched: move it aside to start an empty \
         journal, or restore it from a backup",
        path.display()
    )]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// What SQLite reported.
        reason: String,
    },
    /// The path is a directory, not a file.
    #[error(
        "{} is a directory, not a journal file: give the path of a file (created if it does not \
         exist), such as {}",
        path.display(), path.join("events.journal").display()
    )]
    IsADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// The path given is empty (an unset setting or environment variable, say).
    #[error(
        "the journal path is empty: give the path of a file (created if it does not exist), such \
         as events.journal"
    )]
    EmptyPath,
    /// The file is not a Conveyor journal: it does not even start like a SQLite database.
    #[error(
        "{} is not a Conveyor journal (it does not start like a SQLite database, which a journal \
         is); it was left untouched: pass the path of a journal, or of a file that does not \
         exist yet (if it was a journal, its start is damaged: restore it from a backup)",
        path.display()
    )]
    NotAJournal {
        /// The file.
        path: PathBuf,
    },
    /// The file is a SQLite database, but not a Conveyor journal.
    #[error(
        "{} is a SQLite database but not a Conveyor journal; it was left untouched: pass the path \
         of a Conveyor journal or of a file that does not exist yet",
        path.display()
    )]
    Foreign {
        /// The file.
        path: PathBuf,
    },
    /// The journal was written by a newer Conveyor with a schema this build does not know.
    #[error(
        "journal {} has format version {found}, newer than version {supported} that this build \
         reads: use a newer Conveyor",
        path.display()
    )]
    UnsupportedVersion {
        /// The journal file.
        path: PathBuf,
        /// The version in the file.
        found: i64,
        /// The newest version this build reads.
        supported: i64,
    },
    /// The journal holds pending items or paused lanes of a conveyor whose ordering sorts items
    /// into other lanes than this one's: keyed ordering keeps a lane per key, strict and
    /// pipelined one lane for all. Delivering them would skip the pauses and mix the lanes, so
    /// the journal is refused until it holds nothing pending or paused.
    #[error(
        "journal {} was written with {written} ordering and still holds {pending} pending \
         item(s) and {paused} paused lane(s), which {opened} ordering would put in the wrong \
         lanes (keyed ordering keeps a lane per key, strict and pipelined one lane for all); it \
         was left untouched: open it with {written} ordering to deliver them (resuming its \
         paused lanes), or use another journal file. Once it holds nothing pending or paused, \
         any ordering may use it",
        path.display()
    )]
    OtherOrdering {
        /// The journal file.
        path: PathBuf,
        /// The ordering the journal was last used with: `"keyed"`, `"strict"` or `"pipelined"`.
        written: String,
        /// The ordering it was opened with.
        opened: String,
        /// Items pending in it.
        pending: u64,
        /// Lanes paused in it.
        paused: u64,
    },
    /// The journal holds items of another kind than this conveyor's (see
    /// [`Builder::journal_kind`](crate::Builder::journal_kind)): another program wrote them,
    /// and this one could not decode them.
    #[error(
        "journal {} holds items of kind {written:?}, written by another program than this one \
         (kind {opened:?}), which could not read them; it was left untouched: use another \
         journal file, or open this one with the program that wrote it",
        path.display()
    )]
    OtherKind {
        /// The journal file.
        path: PathBuf,
        /// The kind recorded in the journal.
        written: String,
        /// The kind of the conveyor that opened it.
        opened: String,
    },
    /// The disk (or the file system's quota) is full.
    #[error(
        "journal {} could not be written: the disk is full; nothing from this write was kept and \
         the journal's earlier content is intact: free some space and try again",
        path.display()
    )]
    DiskFull {
        /// The journal file.
        path: PathBuf,
    },
    /// A file could not be created, opened or written: read-only directory, missing directory,
    /// permissions, I/O failure.
    #[error(
        "journal {}: cannot {action} {} ({source}): check that the directory exists and is \
         writable by this user",
        path.display(), file.display()
    )]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The file the operation was on: the journal, or its lock file.
        file: PathBuf,
        /// What was being done, e.g. "create".
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// No dead letter has this seq (it was retried, discarded, or never failed).
    #[error("journal {} holds no dead letter with seq {seq} (it was retried, discarded, or never failed)", path.display())]
    NoSuchDeadLetter {
        /// The journal file.
        path: PathBuf,
        /// The seq asked for.
        seq: u64,
    },
    /// A dead letter's payload no longer decodes as the conveyor's item type (it was kept
    /// under another one), so it cannot be retried by this conveyor.
    #[error(
        "dead letter {seq} in journal {} cannot be decoded as this conveyor's item type \
         ({reason}); it stays a dead letter: retry it from a program whose item type decodes \
         it, or drop it with discard_dead",
        path.display()
    )]
    Undecodable {
        /// The journal file.
        path: PathBuf,
        /// The dead letter's seq.
        seq: u64,
        /// The decoder's error.
        reason: String,
    },
    /// The conveyor's journal writer stopped on a bug (a panic) and commits nothing more. The
    /// conveyor refuses new items; those it accepted but had not committed are not delivered
    /// (nothing reaches the sink before it is on disk), and its close reports them as left.
    #[error(
        "journal {}: its writer stopped on an internal error ({reason}) and commits nothing \
         more: new items are refused, and items accepted since the last commit are not \
         delivered (closing the conveyor counts them as left); close it and build a new \
         conveyor on this journal to deliver what the journal holds, and please report this \
         bug",
        path.display()
    )]
    WriterStopped {
        /// The journal file.
        path: PathBuf,
        /// The panic's message.
        reason: String,
    },
    /// The conveyor was built without a journal.
    #[error("this conveyor has no journal: build it with Builder::journal(path) to keep dead letters and a cursor")]
    NoJournal,
    /// The conveyor that used this journal was closed, and released the file.
    #[error("the conveyor using journal {} was closed and released the file: open it with Journal::open", path.display())]
    Closed {
        /// The journal file.
        path: PathBuf,
    },
    /// [`Conveyor::retry_dead`](crate::Conveyor::retry_dead) was called from inside the
    /// conveyor's own sink call or receipt callback, on a full queue that no other worker can
    /// make room in: waiting would wait for itself. The dead letter stays where it was.
    #[error(
        "the queue of the conveyor using journal {} is full, and retry_dead was called from inside \
         its own sink or receipt callback, where waiting for room would wait for itself: retry \
         the dead letter from another thread",
        path.display()
    )]
    WouldWaitForItself {
        /// The journal file.
        path: PathBuf,
    },
    /// [`Conveyor::retry_dead_timeout`](crate::Conveyor::retry_dead_timeout) found the queue
    /// full for the whole timeout. The dead letter stays where it was.
    #[error(
        "the queue of the conveyor using journal {} stayed full until the timeout: the dead \
         letter stays where it was; retry it later or with a longer timeout",
        path.display()
    )]
    QueueFull {
        /// The journal file.
        path: PathBuf,
    },
    /// Any other error reported by SQLite.
    #[error("journal {}: {source}", path.display())]
    Sqlite {
        /// The journal file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Starts a write transaction that takes the write lock at once: a commit then never fails
/// half-way for want of it.
fn immediate<'c>(conn: &'c mut Connection, path: &Path) -> Result<Transaction<'c>, JournalError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| JournalError::sqlite(path, e))
}

/// Who holds a locked journal, and what to do about it.
fn locked_by(pid: Option<u32>) -> String {
    match pid {
        Some(pid) if pid == std::process::id() => format!(
            "this process ({pid}), through another Journal or conveyor opened on it: close that \
             one first, or give this one another journal file"
        ),
        Some(pid) => {
            format!("process {pid}: stop that process first, or give this one another journal file")
        }
        None => "another process: stop it first, or give this one another journal file".to_owned(),
    }
}

impl JournalError {
    /// Sorts a SQLite error into the variant that tells the user what to do.
    fn sqlite(path: &Path, err: rusqlite::Error) -> Self {
        let path = path.to_path_buf();
        match err.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => JournalError::Corrupt {
                path,
                reason: err.to_string(),
            },
            Some(ErrorCode::DiskFull) => JournalError::DiskFull { path },
            // A busy database past SQLite's busy timeout means some other SQLite client (not a
            // conveyor, which would have been stopped by the lock file) holds it.
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                JournalError::Locked { path, pid: None }
            }
            Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => {
                JournalError::Io {
                    file: path.clone(),
                    path,
                    action: "write",
                    source: io::Error::new(io::ErrorKind::PermissionDenied, err.to_string()),
                }
            }
            _ => JournalError::Sqlite {
                path,
                source: Box::new(err),
            },
        }
    }
}

/// What a journal holds, from [`Journal::status`].
///
/// # Examples
/// ```
/// use conveyor::{Conveyor, Journal};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("j");
/// let c: Conveyor<String> = Conveyor::builder().journal(&path).build(|_d| Ok(()))?;
/// for (n, line) in ["a", "b", "c"].iter().enumerate() {
///     c.send_and_set_cursor(line.to_string(), n as u64 + 1).unwrap();
/// }
/// c.close();
/// let status = Journal::open(&path)?.status()?;
/// assert_eq!((status.pending, status.cursor), (0, Some(3)));
/// assert!(status.last_seq >= 3, "seqs are reserved ahead of use");
/// assert_eq!(status.keyed, Some(false)); // last used with strict ordering
/// assert!(status.lanes.is_empty(), "nothing pending or paused");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalStatus {
    /// The journal's id, the prefix of every delivery's idempotency key.
    pub id: String,
    /// Lanes with pending items or a pause, sorted by name. In `Strict` and `Pipelined` mode
    /// there is one lane, named `""`.
    pub lanes: Vec<LaneStatus>,
    /// Items accepted and not settled, all lanes together.
    pub pending: u64,
    /// Dead letters held.
    pub dead_letters: u64,
    /// The highest seq the journal has handed out or reserved; the next item gets a greater one.
    pub last_seq: u64,
    /// The input cursor last stored with [`Journal::set_cursor`] or with an append.
    pub cursor: Option<u64>,
    /// Bytes on disk: the database plus its write-ahead log.
    pub file_bytes: u64,
    /// Whether the conveyor that last used the journal had keyed ordering (`Some(true)`) or
    /// strict or pipelined ordering (`Some(false)`); `None` if no conveyor used it yet. A
    /// journal written before the ordering was recorded counts as keyed if a lane is named
    /// after a key, and tells nothing (`None`) otherwise.
    pub keyed: Option<bool>,
}

/// Another user of a journal than the [`Journal`] asking: see [`Journal::holder`].
///
/// # Examples
/// ```
/// use conveyor::Journal;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("j");
/// let owner = Journal::open(&path)?;
/// let holder = Journal::open_read_only(&path)?.holder().expect("the owner holds it");
/// assert_eq!(holder.pid, Some(std::process::id()));
/// # drop(owner);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Holder {
    /// Its process id, as its lock file names it; `None` for an instant after it took the lock.
    pub pid: Option<u32>,
}

/// One lane in a [`JournalStatus`].
///
/// # Examples
/// ```
/// use conveyor::{Conveyor, Journal, OnFailure, Ordering, SinkError};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("j");
/// let c: Conveyor<u32> = Conveyor::builder()
///     .journal(&path)
///     .ordering(Ordering::Keyed { concurrency: 2 })
///     .on_failure(OnFailure::Pause)
///     .build(|_d| Err(SinkError::permanent("account locked")))?;
/// c.send_keyed("ann", 1).unwrap();
/// c.send_keyed("ann", 2).unwrap(); // held behind the first
/// c.flush();
/// c.close();
/// let status = Journal::open(&path)?.status()?;
/// let lane = &status.lanes[0];
/// assert_eq!((lane.lane.as_str(), lane.pending), ("ann", 2));
/// assert_eq!(lane.paused.as_deref(), Some("account locked"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LaneStatus {
    /// The lane's name: the key in `Keyed` mode, `""` otherwise.
    pub lane: String,
    /// Items accepted and not settled in this lane.
    pub pending: u64,
    /// `Some(error)` when the lane is paused; the error of the item that paused it (empty if
    /// none was recorded).
    pub paused: Option<String>,
}

/// An item that failed permanently and was kept, from [`Journal::dead_letters`].
///
/// # Examples
/// ```
/// use conveyor::{Conveyor, Journal, Retry, SinkError};
/// use std::time::Duration;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("j");
/// let c: Conveyor<String> = Conveyor::builder()
///     .journal(&path)
///     .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(2))
///     .build(|_d| Err(SinkError::retryable("503 Service Unavailable")))?;
/// c.send_keyed("ann", "hello".to_owned()).unwrap().wait().unwrap_err();
/// c.close();
/// let dead = Journal::open(&path)?.dead_letters()?;
/// assert_eq!((dead[0].seq, dead[0].key.as_deref(), dead[0].attempts), (1, Some("ann"), 2));
/// assert_eq!(dead[0].payload, br#""hello""#, "the item as JSON");
/// assert_eq!(dead[0].error, "503 Service Unavailable");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The item's seq when it was accepted.
    pub seq: u64,
    /// Its lane (`""` outside `Keyed` mode).
    pub lane: String,
    /// The key it was sent with, if any.
    pub key: Option<String>,
    /// The encoded item, as the conveyor stored it (JSON for the serde codec).
    pub payload: Vec<u8>,
    /// The sink's last error, as text.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When it failed.
    pub failed_at: SystemTime,
}

/// An accepted item as the engine hands it to the journal, and as recovery reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) seq: u64,
    /// Shared with the engine's lane and node (no copy per item).
    pub(crate) lane: Arc<str>,
    pub(crate) key: Option<Arc<str>>,
    pub(crate) payload: Vec<u8>,
    /// An input position to store as the cursor in the same transaction as this item
    /// (`Conveyor::send_and_set_cursor`); never read back.
    pub(crate) cursor: Option<u64>,
    /// The dead letter this item is sent again as (`Conveyor::retry_dead`), removed in the
    /// same transaction as this append: in a later one, a crash or a failed commit between
    /// the two would leave the item both pending and dead, to be retried (and delivered) twice.
    /// Never read back.
    pub(crate) replaces_dead: Option<u64>,
}

/// How an item, or a lane, ended up; recorded in the same transaction as the appends around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Delivered (or dropped): the item leaves the journal.
    Delivered(u64),
    /// Failed permanently under `Skip`: the item becomes a dead letter.
    Failed {
        seq: u64,
        error: String,
        attempts: u32,
    },
    /// The lane stopped under `Pause`; its head item stays pending.
    Paused { lane: String, error: String },
    /// The lane was resumed.
    Resumed(String),
}

/// One write transaction: appends first, then settlements (which may refer to those appends),
/// then the cursor.
#[derive(Debug, Default, Clone)]
pub(crate) struct WriteBatch {
    pub(crate) appends: Vec<Record>,
    pub(crate) settlements: Vec<Settlement>,
    pub(crate) cursor: Option<u64>,
    /// Raises the seq high-water mark: seqs up to here may be handed out before their items are
    /// committed, and a restart continues after it, so no seq is ever given to two items.
    pub(crate) reserve: Option<u64>,
}

impl WriteBatch {
    pub(crate) fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.settlements.is_empty()
            && self.cursor.is_none()
            && self.reserve.is_none()
    }

    pub(crate) fn clear(&mut self) {
        self.appends.clear();
        self.settlements.clear();
        self.cursor = None;
        self.reserve = None;
    }
}

/// A durable journal file, opened by one process at a time.
///
/// A conveyor opens its journal itself (`Builder::journal`); open a `Journal` directly to inspect
/// or repair one while no conveyor uses it: see what is pending, list, retry or discard dead
/// letters, resume paused lanes. [`Journal::open_read_only`] inspects one while a conveyor uses
/// it.
///
/// # Locking
/// Opening takes an OS lock (`flock`) on `PATH-lock`, a small file next to the journal that holds
/// the owner's PID. The kernel releases the lock when the owner exits, however it exits, so a
/// `kill -9` never leaves a stale lock. The lock file is never deleted: deleting it would let two
/// processes lock two different files of the same name. Readers take no lock:
/// [`open_read_only`](Journal::open_read_only) looks at a journal while its owner writes
/// (SQLite's WAL mode gives each read a consistent snapshot, through the `-shm` file beside it).
///
/// A child made by `fork()` does not share the lock (on Unix, its copy of the lock file's
/// descriptor points at `/dev/null` from the fork on): the owner may close the journal and open
/// it again, and another process may take it once the owner is gone, while children forked
/// earlier still run. Such a child must not use, nor drop, a `Journal` or a
/// [`Conveyor`](crate::Conveyor) it inherited: SQLite forbids using one connection in two
/// processes, and closing it can checkpoint and delete the parent's write-ahead log.
///
/// # Examples
/// ```
/// use conveyor::Journal;
///
/// let dir = tempfile::tempdir()?;
/// let journal = Journal::open(dir.path().join("events.journal"))?;
/// let status = journal.status()?;
/// assert_eq!(status.pending, 0);
/// assert!(journal.dead_letters()?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Journal {
    // Field order matters: the connection closes (and checkpoints) before the lock is released,
    // so the next owner never sees a half-closed database.
    conn: Connection,
    /// Held for the journal's lifetime; dropping it releases the `flock`. `None` when opened
    /// read-only.
    lock: Option<LockFile>,
    path: PathBuf,
    id: String,
    /// Write transactions since the last look at the free-page count.
    writes_since_compact: u32,
    /// The most bytes an item's payload and key may take together (see `max_entry_bytes`).
    max_entry: usize,
    /// Reads of pending items still to fail, as on an I/O error (see `fail_reads`).
    #[cfg(test)]
    failing_reads: std::sync::atomic::AtomicU32,
    /// The next compaction fails, as on a full disk (see `compact_if_sparse`).
    #[cfg(test)]
    failing_compaction: std::sync::atomic::AtomicBool,
    /// The next `write` panics, as a bug in the commit path would (see `durable::Writer`).
    #[cfg(test)]
    pub(crate) panicking_write: bool,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens the journal at `path`, creating it (owner-only, 0600) if it does not exist.
    ///
    /// # Errors
    /// - [`JournalError::Locked`] if another process has it open (naming that process), after
    ///   trying for 100 ms: a reader asking for its [`holder`](Journal::holder) holds the lock
    ///   for an instant (for up to 5 s when the lock names this process but no `Journal` of it
    ///   holds it: a child process forked or being spawned meanwhile keeps it until it execs);
    /// - [`JournalError::Corrupt`] / [`JournalError::Foreign`] / [`JournalError::NotAJournal`] /
    ///   [`JournalError::UnsupportedVersion`] if the file is damaged, not a journal, or from a
    ///   newer version: the file is left untouched;
    /// - [`JournalError::IsADirectory`] for a directory;
    /// - [`JournalError::Io`] if it cannot be created or written (read-only or missing directory).
    ///
    /// # Examples
    /// ```
    /// use conveyor::{Journal, JournalError};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("events.journal");
    /// let first = Journal::open(&path)?;
    /// // One process at a time: a second open fails and says who holds the file.
    /// assert!(matches!(Journal::open(&path), Err(JournalError::Locked { .. })));
    /// drop(first);
    /// let again = Journal::open(&path)?;
    /// assert_eq!(again.path(), path);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Journal, JournalError> {
        Journal::open_owned(path.as_ref(), true)
    }

    /// Opens the journal at `path` as [`open`](Journal::open) does, but only if there is one:
    /// for tools that inspect or repair a journal, where a mistyped path must not leave a new,
    /// empty journal behind.
    ///
    /// # Errors
    /// [`JournalError::Missing`] if there is no file at `path`, or it holds no journal (an empty
    /// file, or one whose creation was interrupted); otherwise as for [`open`](Journal::open).
    ///
    /// # Examples
    /// ```
    /// use conveyor::{Journal, JournalError};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let typo = dir.path().join("evnets.journal");
    /// assert!(matches!(Journal::open_existing(&typo), Err(JournalError::Missing { .. })));
    /// assert!(!typo.exists(), "nothing was created");
    /// let path = dir.path().join("events.journal");
    /// drop(Journal::open(&path)?);
    /// let mut journal = Journal::open_existing(&path)?;
    /// journal.set_cursor(10)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Journal, JournalError> {
        Journal::open_owned(path.as_ref(), false)
    }

    /// `open` (`create`), or `open_existing`.
    fn open_owned(path: &Path, create: bool) -> Result<Journal, JournalError> {
        let path = path.to_path_buf();
        // Before the lock file is created next to it: a path that cannot be a journal leaves
        // nothing behind.
        refuse_what_is_no_journal(&path)?;
        let missing = || JournalError::Missing { path: path.clone() };
        if !create && holds_nothing(&path) {
            return Err(missing());
        }
        let lock = LockFile::acquire(&path)?;
        if create {
            // SQLite would create the file with the umask's permissions (usually 0644); the
            // journal holds user data, so create it first, owner-only. An existing file keeps its
            // mode, and is never truncated. SQLite gives its `-wal` and `-shm` files the database
            // file's mode.
            owner_only()
                .open(&path)
                .map_err(|source| JournalError::Io {
                    path: path.clone(),
                    file: path.clone(),
                    action: create_or_open(&path),
                    source,
                })?;
        }
        let sql = |e| JournalError::sqlite(&path, e);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        #[cfg(test)]
        if let Some(limit) = TEST_LENGTH_LIMIT.with(std::cell::Cell::get) {
            conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, limit);
        }
        // SQLite's normal locking, not its exclusive mode: the lock file keeps other writers out,
        // and readers (`open_read_only`) may look in while the owner writes.
        if read_header(&conn, &path)? {
            set_wal(&conn, &path)?;
        } else if !create {
            return Err(missing());
        } else {
            // An empty database (a new file, or one whose creation was interrupted): set it up in
            // one transaction, so a crash leaves either nothing or a complete journal.
            // auto_vacuum only takes effect before the first table exists.
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(sql)?;
            set_wal(&conn, &path)?;
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {SCHEMA} PRAGMA application_id = {APPLICATION_ID}; \
                 PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(sql)?;
        }
        Journal::from_connection(conn, Some(lock), path)
    }

    /// Opens the journal at `path` to read it, even while a conveyor (in this process or
    /// another) owns it: [`status`](Journal::status), [`dead_letters`](Journal::dead_letters)
    /// and [`cursor`](Journal::cursor) then show what the owner has committed so far. Each call
    /// reads one consistent snapshot. It never creates or changes the journal, and takes no lock
    /// that keeps an owner out; the methods that change a journal return
    /// [`JournalError::ReadOnly`]. SQLite reads a journal through its `-wal` and `-shm` files:
    /// when no conveyor has it open, it creates them beside it, and they stay until the next
    /// owner closes the journal.
    ///
    /// # Errors
    /// - [`JournalError::Missing`] if there is no file at `path`, or it holds no journal yet;
    /// - [`JournalError::Corrupt`] / [`JournalError::Foreign`] / [`JournalError::NotAJournal`] /
    ///   [`JournalError::UnsupportedVersion`] / [`JournalError::IsADirectory`] as for
    ///   [`open`](Journal::open);
    /// - [`JournalError::Io`] if the `-wal` and `-shm` files are missing and cannot be created
    ///   (a read-only directory).
    ///
    /// # Examples
    /// ```
    /// use conveyor::{Conveyor, Durability, Journal, JournalError};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("events.journal");
    /// // A conveyor owns the journal, and its sink holds every item for now.
    /// let (hold, held) = std::sync::mpsc::channel::<()>();
    /// let held = std::sync::Mutex::new(held);
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .journal(&path)
    ///     .durability(Durability::Sync)
    ///     .build(move |_d| { let _ = held.lock().unwrap().recv(); Ok(()) })?;
    /// for event in ["signup", "login", "logout"] {
    ///     c.send(event.to_owned())?;
    /// }
    /// // Meanwhile, a monitor (here or in another process) looks in.
    /// let mut journal = Journal::open_read_only(&path)?;
    /// assert_eq!(journal.status()?.pending, 3);
    /// assert!(matches!(journal.discard_dead(1), Err(JournalError::ReadOnly { .. })));
    /// drop(hold);
    /// c.close();
    /// assert_eq!(journal.status()?.pending, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Journal, JournalError> {
        let path = path.as_ref().to_path_buf();
        refuse_what_is_no_journal(&path)?;
        let missing = || JournalError::Missing { path: path.clone() };
        if holds_nothing(&path) {
            return Err(missing());
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| JournalError::sqlite(&path, e))?;
        if !read_header(&conn, &path)? {
            return Err(missing());
        }
        Journal::from_connection(conn, None, path)
    }

    /// The journal on `conn`, whose header `read_header` accepted.
    fn from_connection(
        conn: Connection,
        lock: Option<LockFile>,
        path: PathBuf,
    ) -> Result<Journal, JournalError> {
        let length_limit = usize::try_from(conn.limit(Limit::SQLITE_LIMIT_LENGTH)).unwrap_or(0);
        let id: String = conn
            .query_row("SELECT value FROM meta WHERE name = 'id'", [], |r| r.get(0))
            .map_err(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => JournalError::Corrupt {
                    path: path.clone(),
                    reason: "the journal id is missing".to_owned(),
                },
                e => JournalError::sqlite(&path, e),
            })?;
        Ok(Journal {
            conn,
            lock,
            path,
            id,
            writes_since_compact: 0,
            max_entry: length_limit.saturating_sub(ROW_HEADROOM),
            #[cfg(test)]
            failing_reads: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            failing_compaction: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            panicking_write: false,
        })
    }

    /// Who else uses the journal now: the process holding its lock (a conveyor, or a `Journal`
    /// opened with [`open`](Journal::open)), if there is one. Always `None` for a journal opened
    /// with [`open`](Journal::open), which holds the lock itself. Looking takes the lock for an
    /// instant if nobody holds it; an owner starting meanwhile waits for it.
    ///
    /// # Examples
    /// ```
    /// use conveyor::{Conveyor, Journal};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("events.journal");
    /// let c: Conveyor<String> = Conveyor::builder().journal(&path).build(|_d| Ok(()))?;
    /// let journal = Journal::open_read_only(&path)?;
    /// let holder = journal.holder().expect("the conveyor uses it");
    /// assert_eq!(holder.pid, Some(std::process::id()));
    /// c.close();
    /// assert_eq!(journal.holder(), None);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn holder(&self) -> Option<Holder> {
        match self.lock {
            Some(_) => None,
            None => LockFile::holder(&self.path),
        }
    }

    /// Refuses a change to a journal opened with [`open_read_only`](Journal::open_read_only).
    fn writable(&self) -> Result<(), JournalError> {
        match self.lock {
            Some(_) => Ok(()),
            None => Err(JournalError::ReadOnly {
                path: self.path.clone(),
            }),
        }
    }

    /// The journal file's path, as given to [`open`](Journal::open).
    ///
    /// # Examples
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("events.journal");
    /// let journal = conveyor::Journal::open(&path)?;
    /// println!("inspecting {}", journal.path().display());
    /// assert_eq!(journal.path(), path);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal's id: random, fixed when the file was created. Idempotency keys are
    /// `"{id}-{seq}"`, so they stay unique across journals and stable across restarts.
    ///
    /// # Examples
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let journal = conveyor::Journal::open(dir.path().join("j"))?;
    /// assert_eq!(journal.id().len(), 16);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the journal holds: pending items per lane, paused lanes, dead letters, size on disk.
    ///
    /// # Errors
    /// A [`JournalError`] if the file cannot be read.
    ///
    /// # Examples
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let journal = conveyor::Journal::open(dir.path().join("j"))?;
    /// let status = journal.status()?;
    /// println!("{} pending, {} dead, {} bytes", status.pending, status.dead_letters, status.file_bytes);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn status(&self) -> Result<JournalStatus, JournalError> {
        let sql = |e| JournalError::sqlite(&self.path, e);
        // One snapshot for every query below: an owner writing meanwhile (see `open_read_only`)
        // could otherwise move an item from pending to dead between two of them. Rolled back
        // when dropped, as there is nothing to write.
        let _snapshot = self.conn.unchecked_transaction().map_err(sql)?;
        let mut lanes: Vec<LaneStatus> = Vec::new();
        {
            // Both sides of the union are read in lane order, so one ordered merge lists each
            // lane once with its count and its pause.
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT lane, sum(n), max(paused), max(error) FROM (
                         SELECT lane, count(*) AS n, 0 AS paused, NULL AS error FROM items GROUP BY lane
                         UNION ALL
                         SELECT lane, 0, 1, coalesce(error, '') FROM paused
                     ) GROUP BY lane ORDER BY lane",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| {
                    let paused: i64 = r.get(2)?;
                    Ok(LaneStatus {
                        lane: r.get(0)?,
                        pending: r.get::<_, i64>(1)? as u64,
                        paused: if paused == 1 {
                            Some(r.get::<_, Option<String>>(3)?.unwrap_or_default())
                        } else {
                            None
                        },
                    })
                })
                .map_err(sql)?;
            for lane in rows {
                lanes.push(lane.map_err(sql)?);
            }
        }
        let pending = lanes.iter().map(|l| l.pending).sum();
        let dead_letters: i64 = self
            .conn
            .query_row("SELECT count(*) FROM dead", [], |r| r.get(0))
            .map_err(sql)?;
        let file_bytes = [self.path.clone(), sidecar(&self.path, "-wal")]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        Ok(JournalStatus {
            id: self.id.clone(),
            lanes,
            pending,
            dead_letters: dead_letters as u64,
            last_seq: self.max_seq()?,
            cursor: self.cursor()?,
            file_bytes,
            keyed: written_ordering(&self.conn)
                .map_err(sql)?
                .map(|ordering| ordering == KEYED),
        })
    }

    /// Every dead letter, oldest seq first.
    ///
    /// # Errors
    /// A [`JournalError`] if the file cannot be read.
    ///
    /// # Examples
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let journal = conveyor::Journal::open(dir.path().join("j"))?;
    /// for dead in journal.dead_letters()? {
    ///     println!("#{} after {} attempts: {}", dead.seq, dead.attempts, dead.error);
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, JournalError> {
        self.read_dead(&format!("{DEAD_COLUMNS} ORDER BY seq"), [])
    }

    /// One dead letter, if there is one with this seq.
    pub(crate) fn dead_letter(&self, seq: u64) -> Result<Option<DeadLetter>, JournalError> {
        self.read_dead(&format!("{DEAD_COLUMNS} WHERE seq = ?1"), [seq as i64])
            .map(|mut found| found.pop())
    }

    fn read_dead(
        &self,
        query: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<DeadLetter>, JournalError> {
        let sql = |e| JournalError::sqlite(&self.path, e);
        let mut stmt = self.conn.prepare(query).map_err(sql)?;
        let rows = stmt
            .query_map(params, |r| {
                Ok(DeadLetter {
                    seq: r.get::<_, i64>(0)? as u64,
                    lane: r.get(1)?,
                    key: r.get(2)?,
                    payload: r.get(3)?,
                    error: r.get(4)?,
                    attempts: r.get::<_, i64>(5)?.clamp(0, i64::from(u32::MAX)) as u32,
                    failed_at: UNIX_EPOCH
                        + Duration::from_millis(r.get::<_, i64>(6)?.max(0) as u64),
                })
            })
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Puts dead letter `seq` back at the end of its lane, with a new seq, and returns that seq.
    /// The next conveyor opened on this journal delivers it after what is already pending.
    ///
    /// The new seq gives it a new idempotency key (`"{id}-{seq}"`): a receiver that drops
    /// repeats by that key does not recognise it as the item that failed. Retry only what the
    /// receiver did not take.
    ///
    /// # Errors
    /// [`JournalError::NoSuchDeadLetter`] if there is none with this seq; another
    /// [`JournalError`] if the file cannot be written (then nothing changed).
    ///
    /// # Examples
    /// ```no_run
    /// let mut journal = conveyor::Journal::open("events.journal")?;
    /// for dead in journal.dead_letters()? {
    ///     let new_seq = journal.retry_dead(dead.seq)?;
    ///     println!("#{} will be delivered again as #{new_seq}", dead.seq);
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn retry_dead(&mut self, seq: u64) -> Result<u64, JournalError> {
        self.writable()?;
        let new_seq = self.max_seq()? + 1;
        self.retry_dead_as(seq, new_seq)?;
        Ok(new_seq)
    }

    /// Deletes dead letter `seq` for good.
    ///
    /// # Errors
    /// [`JournalError::NoSuchDeadLetter`] if there is none with this seq; another
    /// [`JournalError`] if the file cannot be written.
    ///
    /// # Examples
    /// ```no_run
    /// let mut journal = conveyor::Journal::open("events.journal")?;
    /// journal.discard_dead(42)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn discard_dead(&mut self, seq: u64) -> Result<(), JournalError> {
        self.writable()?;
        let n = self
            .conn
            .execute("DELETE FROM dead WHERE seq = ?1", [seq as i64])
            .map_err(|e| JournalError::sqlite(&self.path, e))?;
        if n == 0 {
            return Err(JournalError::NoSuchDeadLetter {
                path: self.path.clone(),
                seq,
            });
        }
        Ok(())
    }

    /// Clears the pause on `lane`; returns whether it was paused. The next conveyor opened on
    /// this journal delivers that lane again, starting with the item that paused it.
    ///
    /// A lane held by an item that no longer decodes as the conveyor's item type is not paused
    /// here: that hold is made anew at each start (see [`Builder::journal_kind`](crate::Builder::journal_kind)),
    /// and only [`Conveyor::resume`](crate::Conveyor::resume) on the running conveyor gives the
    /// item up.
    ///
    /// # Errors
    /// A [`JournalError`] if the file cannot be written.
    ///
    /// # Examples
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let mut journal = conveyor::Journal::open(dir.path().join("j"))?;
    /// assert!(!journal.resume("customer-7")?); // it was not paused
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn resume(&mut self, lane: &str) -> Result<bool, JournalError> {
        self.writable()?;
        let n = self
            .conn
            .execute("DELETE FROM paused WHERE lane = ?1", [lane])
            .map_err(|e| JournalError::sqlite(&self.path, e))?;
        Ok(n > 0)
    }

    /// The input cursor: an opaque position the producer stored (the CLI stores the last input
    /// line it accepted), or `None` if none was stored.
    ///
    /// # Errors
    /// A [`JournalError`] if the file cannot be read.
    ///
    /// # Examples
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let mut journal = conveyor::Journal::open(dir.path().join("j"))?;
    /// assert_eq!(journal.cursor()?, None);
    /// journal.set_cursor(1200)?;
    /// assert_eq!(journal.cursor()?, Some(1200));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn cursor(&self) -> Result<Option<u64>, JournalError> {
        meta::<i64>(&self.conn, "cursor")
            .map(|c| c.map(|c| c as u64))
            .map_err(|e| JournalError::sqlite(&self.path, e))
    }

    /// Stores the input cursor (see [`cursor`](Journal::cursor)).
    ///
    /// # Errors
    /// A [`JournalError`] if the file cannot be written; the old cursor then stays.
    ///
    /// # Examples
    /// ```
    /// use conveyor::Journal;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("j");
    /// let mut journal = Journal::open(&path)?;
    /// journal.set_cursor(1200)?; // the next run skips the first 1200 input lines
    /// drop(journal);
    /// assert_eq!(Journal::open(&path)?.cursor()?, Some(1200));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_cursor(&mut self, cursor: u64) -> Result<(), JournalError> {
        self.writable()?;
        self.write(&WriteBatch {
            cursor: Some(cursor),
            ..WriteBatch::default()
        })
    }

    /// Closes the journal, reporting any error (dropping it closes too, silently).
    ///
    /// # Errors
    /// A [`JournalError`] if SQLite fails to close the file cleanly; the content stays intact.
    ///
    /// # Examples
    /// ```
    /// use conveyor::{BuildError, Conveyor, Journal, JournalError};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("j");
    /// let journal = Journal::open(&path)?;
    /// let busy = Conveyor::<u32>::builder().journal(&path).build(|_d| Ok(()));
    /// assert!(matches!(busy, Err(BuildError::Journal(JournalError::Locked { .. }))));
    /// journal.close()?; // releases the file, and reports what a drop would not
    /// let c: Conveyor<u32> = Conveyor::builder().journal(&path).build(|_d| Ok(()))?;
    /// # drop(c);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn close(self) -> Result<(), JournalError> {
        let Journal {
            conn,
            lock: _lock,
            path,
            ..
        } = self;
        conn.close()
            .map_err(|(_, e)| JournalError::sqlite(&path, e))
    }

    // ---- engine operations ------------------------------------------------------------------

    /// Checks that a conveyor with `ordering` (an [`Ordering`](crate::Ordering) name) and
    /// items of `kind` can deliver what the journal holds, and records both for the next one,
    /// in one transaction: a refused journal is left as it was.
    ///
    /// Keyed ordering keeps a lane per key, strict and pipelined one lane for all: pending
    /// items and paused lanes of one cannot be delivered by the other (the pauses would be
    /// lost, and the lanes mixed), so that switch waits until the journal holds neither. A
    /// journal of another kind is refused while it holds anything of its own (dead letters and
    /// the input cursor included: they mean nothing to another program).
    pub(crate) fn claim(&mut self, ordering: &str, kind: Option<&str>) -> Result<(), JournalError> {
        let path = &self.path;
        let sql = |e| JournalError::sqlite(path, e);
        let tx = immediate(&mut self.conn, path)?;
        let count = |table: &str| -> Result<u64, JournalError> {
            tx.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(sql)
        };
        let (pending, paused) = (count("items")?, count("paused")?);
        if let Some(kind) = kind {
            let written = meta::<String>(&tx, "kind").map_err(sql)?;
            if let Some(written) = written.filter(|written| written != kind) {
                let holds_anything = pending > 0
                    || paused > 0
                    || count("dead")? > 0
                    || meta::<i64>(&tx, "cursor").map_err(sql)?.is_some();
                if holds_anything {
                    return Err(JournalError::OtherKind {
                        path: path.clone(),
                        written,
                        opened: kind.to_owned(),
                    });
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('kind', ?1)",
                [kind],
            )
            .map_err(sql)?;
        }
        // After the kind: another program's journal is refused as such, whatever its ordering.
        if let Some(written) = written_ordering(&tx).map_err(sql)? {
            if (written == KEYED) != (ordering == KEYED) && (pending > 0 || paused > 0) {
                return Err(JournalError::OtherOrdering {
                    path: path.clone(),
                    written,
                    opened: ordering.to_owned(),
                    pending,
                    paused,
                });
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES ('ordering', ?1)",
            [ordering],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// The most bytes an item's encoded payload and its key may take together (the key counts
    /// twice: it is stored as the lane too). SQLite refuses a longer row, and a write it refuses
    /// would be retried for ever, so the engine refuses such an item at `send`.
    pub(crate) fn max_entry_bytes(&self) -> usize {
        self.max_entry
    }

    /// Commits one batch in one transaction: appends, then settlements, then the cursor.
    /// (An item's append and its delivery never share a batch: the engine delivers an item
    /// only once its append is committed.)
    pub(crate) fn write(&mut self, batch: &WriteBatch) -> Result<(), JournalError> {
        if batch.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        assert!(
            !self.panicking_write,
            "a bug in the journal's commit (test)"
        );
        let path = &self.path;
        let sql = |e| JournalError::sqlite(path, e);
        let tx = immediate(&mut self.conn, path)?;
        if !batch.appends.is_empty() {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO items (seq, lane, key, payload) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(sql)?;
            let mut last = 0;
            for r in &batch.appends {
                last = last.max(r.seq);
                insert
                    .execute(params![r.seq as i64, &*r.lane, r.key.as_deref(), r.payload])
                    .map_err(sql)?;
                if let Some(dead) = r.replaces_dead {
                    tx.prepare_cached("DELETE FROM dead WHERE seq = ?1")
                        .map_err(sql)?
                        .execute([dead as i64])
                        .map_err(sql)?;
                }
            }
            tx.prepare_cached("UPDATE meta SET value = max(value, ?1) WHERE name = 'last_seq'")
                .map_err(sql)?
                .execute([last as i64])
                .map_err(sql)?;
        }
        for s in &batch.settlements {
            match s {
                Settlement::Delivered(seq) => {
                    tx.prepare_cached("DELETE FROM items WHERE seq = ?1")
                        .map_err(sql)?
                        .execute([*seq as i64])
                        .map_err(sql)?;
                }
                Settlement::Failed {
                    seq,
                    error,
                    attempts,
                } => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO dead (seq, lane, key, payload, error, attempts, failed_at)
                         SELECT seq, lane, key, payload, ?2, ?3, ?4 FROM items WHERE seq = ?1",
                    )
                    .map_err(sql)?
                    .execute(params![
                        *seq as i64,
                        stored_error(error),
                        attempts,
                        now_millis()
                    ])
                    .map_err(sql)?;
                    tx.prepare_cached("DELETE FROM items WHERE seq = ?1")
                        .map_err(sql)?
                        .execute([*seq as i64])
                        .map_err(sql)?;
                }
                Settlement::Paused { lane, error } => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO paused (lane, error, since) VALUES (?1, ?2, ?3)",
                    )
                    .map_err(sql)?
                    .execute(params![lane, stored_error(error), now_millis()])
                    .map_err(sql)?;
                }
                Settlement::Resumed(lane) => {
                    tx.prepare_cached("DELETE FROM paused WHERE lane = ?1")
                        .map_err(sql)?
                        .execute([lane])
                        .map_err(sql)?;
                }
            }
        }
        if let Some(upto) = batch.reserve {
            tx.prepare_cached("UPDATE meta SET value = max(value, ?1) WHERE name = 'last_seq'")
                .map_err(sql)?
                .execute([upto as i64])
                .map_err(sql)?;
        }
        if let Some(cursor) = batch.cursor {
            tx.prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES ('cursor', ?1)")
                .map_err(sql)?
                .execute([cursor as i64])
                .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        self.writes_since_compact += 1;
        if self.writes_since_compact >= COMPACT_EVERY {
            self.writes_since_compact = 0;
            // The batch is committed: an error here must not say otherwise, or the writer
            // would retry the batch, and its appends would fail as duplicates for ever.
            // Compaction is tried again after the next writes.
            if let Err(error) = self.compact_if_sparse() {
                tracing::warn!(%error, "journal compaction failed; the journal is intact");
            }
        }
        Ok(())
    }

    /// Appends accepted items, and optionally the cursor, in one transaction.
    #[cfg(test)]
    pub(crate) fn append(
        &mut self,
        records: &[Record],
        cursor: Option<u64>,
    ) -> Result<(), JournalError> {
        self.write(&WriteBatch {
            appends: records.to_vec(),
            settlements: Vec::new(),
            cursor,
            ..WriteBatch::default()
        })
    }

    /// Records settlements in one transaction.
    #[cfg(test)]
    pub(crate) fn settle(&mut self, settlements: &[Settlement]) -> Result<(), JournalError> {
        self.write(&WriteBatch {
            appends: Vec::new(),
            settlements: settlements.to_vec(),
            cursor: None,
            ..WriteBatch::default()
        })
    }

    /// Up to `limit` pending items with seq greater than `after`, in seq order, all lanes. Page
    /// with the last seq returned, so recovery never holds more than a page.
    pub(crate) fn pending_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Record>, JournalError> {
        #[cfg(test)]
        if self
            .failing_reads
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            let io = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR);
            return Err(JournalError::sqlite(
                &self.path,
                rusqlite::Error::SqliteFailure(io, Some("injected by a test".into())),
            ));
        }
        self.read_page(
            "SELECT seq, lane, key, payload FROM items WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![after as i64, limit as i64],
        )
    }

    fn read_page(
        &self,
        query: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Record>, JournalError> {
        let sql = |e| JournalError::sqlite(&self.path, e);
        let mut stmt = self.conn.prepare_cached(query).map_err(sql)?;
        let rows = stmt
            .query_map(params, |r| {
                let lane: Arc<str> = Arc::from(r.get::<_, String>(1)?);
                // In keyed mode the lane is the key: share one allocation.
                let key = r.get::<_, Option<String>>(2)?.map(|k| {
                    if *k == *lane {
                        lane.clone()
                    } else {
                        Arc::from(k)
                    }
                });
                Ok(Record {
                    seq: r.get::<_, i64>(0)? as u64,
                    lane,
                    key,
                    payload: r.get(3)?,
                    cursor: None,
                    replaces_dead: None,
                })
            })
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Lanes paused when the journal was last written, so they stay paused after a restart,
    /// each with the error that paused it (empty if none was recorded).
    pub(crate) fn paused_lanes(&self) -> Result<Vec<(String, String)>, JournalError> {
        let sql = |e| JournalError::sqlite(&self.path, e);
        let mut stmt = self
            .conn
            .prepare("SELECT lane, coalesce(error, '') FROM paused ORDER BY lane")
            .map_err(sql)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// The highest seq ever handed out (pending, dead or already settled), so seqs, and with them
    /// idempotency keys, never repeat after a restart.
    pub(crate) fn max_seq(&self) -> Result<u64, JournalError> {
        self.conn
            .query_row(
                "SELECT max(
                     (SELECT value FROM meta WHERE name = 'last_seq'),
                     coalesce((SELECT max(seq) FROM items), 0),
                     coalesce((SELECT max(seq) FROM dead), 0))",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|s| s as u64)
            .map_err(|e| JournalError::sqlite(&self.path, e))
    }

    /// Moves dead letter `seq` to the end of its lane as `new_seq` (the engine picks the seq
    /// from its own counter; [`Journal::retry_dead`] from the journal's).
    pub(crate) fn retry_dead_as(&mut self, seq: u64, new_seq: u64) -> Result<(), JournalError> {
        let path = &self.path;
        let sql = |e| JournalError::sqlite(path, e);
        let tx = immediate(&mut self.conn, path)?;
        let moved = tx
            .execute(
                "INSERT INTO items (seq, lane, key, payload) SELECT ?2, lane, key, payload FROM dead WHERE seq = ?1",
                [seq as i64, new_seq as i64],
            )
            .map_err(sql)?;
        if moved == 0 {
            return Err(JournalError::NoSuchDeadLetter {
                path: path.clone(),
                seq,
            });
        }
        tx.execute("DELETE FROM dead WHERE seq = ?1", [seq as i64])
            .map_err(sql)?;
        tx.execute(
            "UPDATE meta SET value = max(value, ?1) WHERE name = 'last_seq'",
            [new_seq as i64],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Returns free pages to the file system when they make up a large part of the file, and
    /// empties the WAL. Settled items leave free pages behind; SQLite reuses them, but after a
    /// backlog drains they would otherwise stay allocated for the rest of the file's life.
    pub(crate) fn compact_if_sparse(&mut self) -> Result<bool, JournalError> {
        let sql = |e| JournalError::sqlite(&self.path, e);
        #[cfg(test)]
        if self
            .failing_compaction
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(JournalError::DiskFull {
                path: self.path.clone(),
            });
        }
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))
            .map_err(sql)?;
        let total: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .map_err(sql)?;
        if free < COMPACT_MIN_FREE_PAGES || free * COMPACT_FREE_FRACTION < total {
            return Ok(false);
        }
        self.compact()?;
        Ok(true)
    }

    /// Unconditional compaction: incremental vacuum, then a truncating checkpoint.
    pub(crate) fn compact(&mut self) -> Result<(), JournalError> {
        let sql = |e| JournalError::sqlite(&self.path, e);
        // incremental_vacuum does its work as its rows are stepped through, so drain them all.
        let mut stmt = self
            .conn
            .prepare("PRAGMA incremental_vacuum")
            .map_err(sql)?;
        let mut rows = stmt.query([]).map_err(sql)?;
        while rows.next().map_err(sql)?.is_some() {}
        drop(rows);
        drop(stmt);
        // A reader (`open_read_only`) may hold an older snapshot, which keeps the WAL from being
        // emptied until its read ends. SQLite would wait for that (its busy timeout, 5 s), and
        // every commit, and every `Durability::Sync` send, with it: so it does not wait. The
        // checkpoint then copies what no reader needs, and a later one (SQLite's own, every
        // 1000 pages, or the next compaction) lets the WAL start over.
        let busy_timeout: i64 = self
            .conn
            .pragma_query_value(None, "busy_timeout", |r| r.get(0))
            .map_err(sql)?;
        self.conn.busy_timeout(Duration::ZERO).map_err(sql)?;
        let checkpoint = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        self.conn
            .busy_timeout(Duration::from_millis(busy_timeout.max(0) as u64))
            .map_err(sql)?;
        checkpoint.map_err(sql)
    }

    /// Makes the next `n` reads of pending items fail with an I/O error; returns how many
    /// failures were still to come.
    #[cfg(test)]
    pub(crate) fn fail_reads(&self, n: u32) -> u32 {
        self.failing_reads
            .swap(n, std::sync::atomic::Ordering::SeqCst)
    }

    /// The file's size in pages, for `limit_pages`.
    #[cfg(test)]
    pub(crate) fn page_count(&self) -> i64 {
        self.conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap()
    }

    /// Caps the file's size, so that writes fail as on a full disk (SQLite reports both as
    /// `SQLITE_FULL`).
    #[cfg(test)]
    pub(crate) fn limit_pages(&self, pages: i64) {
        self.conn
            .pragma_update(None, "max_page_count", pages)
            .unwrap();
    }
}

/// The first bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Refuses an empty path, a directory, and a file that does not start like a SQLite database
/// (a JSON-lines input given by mistake). An empty file, or one that starts with zeros, is left
/// to SQLite: a journal whose creation was cut short looks like that. A file that cannot be read
/// is left to the open, which says why.
fn refuse_what_is_no_journal(path: &Path) -> Result<(), JournalError> {
    // Otherwise the lock file's creation fails first, and its message names no path at all.
    if path.as_os_str().is_empty() {
        return Err(JournalError::EmptyPath);
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Err(JournalError::IsADirectory {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => {}
        Err(_) => return Ok(()),
    }
    let mut head = Vec::with_capacity(SQLITE_HEADER.len());
    let read = File::open(path)
        .and_then(|file| file.take(SQLITE_HEADER.len() as u64).read_to_end(&mut head));
    if read.is_err() || head.iter().all(|b| *b == 0) || SQLITE_HEADER.starts_with(&head) {
        return Ok(());
    }
    Err(JournalError::NotAJournal {
        path: path.to_path_buf(),
    })
}

/// Reads the header of the database on `conn`: true for a journal this build reads, false for
/// an empty database (a new file, or one whose creation was interrupted).
fn read_header(conn: &Connection, path: &Path) -> Result<bool, JournalError> {
    let sql = |e| JournalError::sqlite(path, e);
    // Every read below in one snapshot: a reader (`open_read_only`) may look while the owner
    // creates the journal, and the creating commit between two of them would show its tables
    // without its application id, that is, another program's database. Rolled back when
    // dropped, as it writes nothing.
    let _snapshot = conn.unchecked_transaction().map_err(sql)?;
    // The first read of the header: a file that is not SQLite fails here, unmodified.
    let app_id: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(sql)?;
    if app_id == APPLICATION_ID {
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        if version > i64::from(SCHEMA_VERSION) {
            return Err(JournalError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: i64::from(SCHEMA_VERSION),
            });
        }
        return Ok(true);
    }
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(sql)?;
    if app_id != 0 || tables != 0 {
        return Err(JournalError::Foreign {
            path: path.to_path_buf(),
        });
    }
    Ok(false)
}

/// WAL mode with a commit that is on disk when it returns (`synchronous = FULL` fsyncs the WAL on
/// every commit; batching commits is what makes that affordable).
fn set_wal(conn: &Connection, path: &Path) -> Result<(), JournalError> {
    let sql = |e| JournalError::sqlite(path, e);
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(JournalError::Sqlite {
            path: path.to_path_buf(),
            source: format!("SQLite refused WAL mode (it runs in {mode} mode)").into(),
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
        .map_err(sql)?;
    Ok(())
}

/// One value of the `meta` table, if it is set.
fn meta<V: rusqlite::types::FromSql>(conn: &Connection, name: &str) -> rusqlite::Result<Option<V>> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
}

/// The ordering the journal was last used with (`meta.ordering`). A journal written before that
/// was recorded was keyed if a lane is named after a key; otherwise nothing tells.
fn written_ordering(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let recorded = meta::<String>(conn, "ordering")?;
    if recorded.is_some() {
        return Ok(recorded);
    }
    let keyed: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM items WHERE lane != '')
             OR EXISTS (SELECT 1 FROM paused WHERE lane != '')
             OR EXISTS (SELECT 1 FROM dead WHERE lane != '')",
        [],
        |r| r.get(0),
    )?;
    Ok(keyed.then(|| KEYED.to_owned()))
}

/// An error text as the journal keeps it: at most [`MAX_ERROR_TEXT`] bytes, so that a dead
/// letter (its item and the error together) stays within SQLite's length limit.
fn stored_error(error: &str) -> &str {
    let mut end = error.len().min(MAX_ERROR_TEXT);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Options that open a file read-write, creating it owner-only (0600 on Unix) and never
/// truncating an existing one.
fn owner_only() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// `PATH` + `suffix`, e.g. `events.journal-lock`.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// An exclusive `flock` on `PATH-lock`, holding the owner's PID for the error message others get.
///
/// Why `flock` on a side file rather than SQLite's own locking alone: SQLite's busy error cannot
/// say who holds the file, and the kernel drops an `flock` when its owner dies, so a crashed
/// owner never blocks the next start. `fs4` wraps the call (and the Windows equivalent) without
/// unsafe code here; `std::fs::File::try_lock` would do the same but needs Rust 1.89, above the
/// workspace's MSRV. A [`ParentOnlyFile`] because a forked child must not keep the lock.
struct LockFile {
    _file: ParentOnlyFile,
    /// The lock file's device and inode, listed in [`HELD_HERE`] while this lives.
    id: (u64, u64),
}

/// The lock files (device, inode) that a [`LockFile`] of this process holds. A lock whose file
/// names this process's PID but which none of them holds is held by a child this process
/// forked or is spawning, whose copy of the file description keeps the `flock` until the child
/// drops it (at once, see `fork.rs`) or execs: soon, but later than [`LOCK_PATIENCE`] on a busy
/// machine (a spawned test binary was seen to take longer).
static HELD_HERE: std::sync::Mutex<Vec<(u64, u64)>> = std::sync::Mutex::new(Vec::new());

/// How long opening a journal waits for a lock held as [`HELD_HERE`] describes.
const CHILD_PATIENCE: Duration = Duration::from_secs(5);

fn held_here() -> std::sync::MutexGuard<'static, Vec<(u64, u64)>> {
    HELD_HERE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let mut held = held_here();
        if let Some(at) = held.iter().position(|id| *id == self.id) {
            held.swap_remove(at);
        }
    }
}

impl LockFile {
    fn acquire(journal: &Path) -> Result<LockFile, JournalError> {
        let lock_path = sidecar(journal, LOCK_SUFFIX);
        let io_err = |action, source| JournalError::Io {
            path: journal.to_path_buf(),
            file: lock_path.clone(),
            action,
            source,
        };
        let mut file = ParentOnlyFile::open(&owner_only(), &lock_path)
            .map_err(|e| io_err(create_or_open(&lock_path), e))?;
        let id = {
            use std::os::unix::fs::MetadataExt;
            let meta = file.metadata().map_err(|e| io_err("open", e))?;
            (meta.dev(), meta.ino())
        };
        // A reader looking for the holder (`holder`) takes the lock for an instant: an owner
        // starting then must not fail for it.
        let started = Instant::now();
        let mut patience = started + LOCK_PATIENCE;
        loop {
            match fs4::FileExt::try_lock(&*file) {
                Ok(()) => break,
                Err(fs4::TryLockError::WouldBlock)
                    if Instant::now() >= patience
                        && patience < started + CHILD_PATIENCE
                        && holder_pid(&mut file) == Some(std::process::id())
                        && !held_here().contains(&id) =>
                {
                    patience = started + CHILD_PATIENCE;
                }
                Err(fs4::TryLockError::WouldBlock) if Instant::now() < patience => {
                    #[cfg(test)]
                    if let Some(hook) = LOCK_RETRY_HOOK.with(std::cell::Cell::take) {
                        hook();
                    }
                    std::thread::sleep(LOCK_PATIENCE / 20);
                }
                Err(fs4::TryLockError::WouldBlock) => {
                    return Err(JournalError::Locked {
                        path: journal.to_path_buf(),
                        pid: holder_pid(&mut file),
                    });
                }
                Err(fs4::TryLockError::Error(e)) => return Err(io_err("lock", e)),
            }
        }
        file.set_len(0).map_err(|e| io_err("write", e))?;
        file.rewind().map_err(|e| io_err("write", e))?;
        writeln!(file, "{}", std::process::id()).map_err(|e| io_err("write", e))?;
        held_here().push(id);
        Ok(LockFile { _file: file, id })
    }

    /// Who holds the lock of `journal`, if anyone does, without keeping it: if nobody does, it
    /// is taken and released at once. No lock file means no owner ever opened the journal.
    fn holder(journal: &Path) -> Option<Holder> {
        let mut file = File::open(sidecar(journal, LOCK_SUFFIX)).ok()?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {
                let _ = fs4::FileExt::unlock(&file);
                None
            }
            Err(fs4::TryLockError::WouldBlock) => Some(Holder {
                pid: holder_pid(&mut file),
            }),
            // Cannot tell: say nothing rather than something wrong.
            Err(fs4::TryLockError::Error(_)) => None,
        }
    }
}

/// The PID a held lock file names. The holder may be between taking the lock and writing its
/// PID: then none.
fn holder_pid(file: &mut File) -> Option<u32> {
    file.rewind().ok()?;
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text.trim().parse().ok()
}

/// No file at `path`, or an empty one with no write-ahead log content beside it: what
/// `Journal::open` would make a new journal of.
fn holds_nothing(path: &Path) -> bool {
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    !path.exists() || (path.is_file() && len(path) == 0 && len(&sidecar(path, "-wal")) == 0)
}

/// What opening `path` with `owner_only` was doing, for its error message.
fn create_or_open(path: &Path) -> &'static str {
    if path.exists() {
        "open"
    } else {
        "create"
    }
}

/// How long opening a journal retries while its lock is held, before it reports
/// [`JournalError::Locked`].
const LOCK_PATIENCE: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    fn rec(seq: u64, lane: &str) -> Record {
        Record {
            seq,
            lane: Arc::from(lane),
            key: Some(Arc::from(lane)),
            payload: format!("item {seq}").into_bytes(),
            cursor: None,
            replaces_dead: None,
        }
    }

    fn all_pending(j: &Journal) -> Vec<Record> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = j.pending_after(after, 7).unwrap();
            let Some(last) = page.last() else { return out };
            after = last.seq;
            out.extend(page);
        }
    }

    fn seqs(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn appended_items_survive_reopen_in_seq_order_with_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let id;
        {
            let mut j = Journal::open(&path).unwrap();
            id = j.id().to_owned();
            j.append(
                &(1..=20)
                    .map(|s| rec(s, if s % 2 == 0 { "a" } else { "b" }))
                    .collect::<Vec<_>>(),
                Some(99),
            )
            .unwrap();
            j.settle(&[Settlement::Delivered(3), Settlement::Delivered(4)])
                .unwrap();
        }
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.id(), id, "the id is fixed when the file is created");
        let pending = all_pending(&j);
        let expected: Vec<u64> = (1..=20).filter(|s| *s != 3 && *s != 4).collect();
        assert_eq!(seqs(&pending), expected);
        assert_eq!(pending[0], rec(1, "b"));
        assert_eq!(j.cursor().unwrap(), Some(99));
        assert_eq!(j.max_seq().unwrap(), 20);
        let status = j.status().unwrap();
        assert_eq!(status.pending, 18);
        assert_eq!(
            status
                .lanes
                .iter()
                .map(|l| (l.lane.as_str(), l.pending))
                .collect::<Vec<_>>(),
            vec![("a", 9), ("b", 9)]
        );
        assert!(status.file_bytes > 0);
    }

    #[test]
    fn a_read_only_journal_follows_its_owner_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut owner = Journal::open(&path).unwrap();
        owner
            .append(&[rec(1, "a"), rec(2, "a"), rec(3, "b")], None)
            .unwrap();
        owner
            .settle(&[Settlement::Failed {
                seq: 1,
                error: "HTTP 400".into(),
                attempts: 2,
            }])
            .unwrap();
        // Opened while the owner holds the journal (its lock and its connection).
        let mut reader = Journal::open_read_only(&path).unwrap();
        assert_eq!(reader.id(), owner.id());
        let status = reader.status().unwrap();
        assert_eq!(
            (status.pending, status.dead_letters, status.last_seq),
            (2, 1, 3)
        );
        assert_eq!(reader.dead_letters().unwrap()[0].error, "HTTP 400");

        // Later commits show in the next call.
        owner.settle(&[Settlement::Delivered(2)]).unwrap();
        owner.set_cursor(40).unwrap();
        assert_eq!(reader.status().unwrap().pending, 1);
        assert_eq!(reader.cursor().unwrap(), Some(40));
        // The owner's compaction (a truncating checkpoint) is not held up by the reader.
        owner.compact().unwrap();
        assert_eq!(reader.status().unwrap().pending, 1);

        let read_only =
            |r: Result<_, JournalError>| matches!(r, Err(JournalError::ReadOnly { .. }));
        assert!(read_only(reader.retry_dead(1).map(drop)));
        assert!(read_only(reader.discard_dead(1)));
        assert!(read_only(reader.resume("a").map(drop)));
        assert!(read_only(reader.set_cursor(0)));
        drop(reader);
        assert_eq!(owner.dead_letters().unwrap().len(), 1, "nothing changed");
        assert_eq!(owner.cursor().unwrap(), Some(40));

        // Without an owner too, and it leaves the lock free.
        drop(owner);
        let reader = Journal::open_read_only(&path).unwrap();
        assert_eq!(reader.status().unwrap().pending, 1);
        let owner = Journal::open(&path).unwrap();
        assert_eq!(all_pending(&owner).len(), 1);
    }

    #[test]
    fn a_journal_read_while_its_owner_creates_it_is_missing_until_it_is_whole() {
        // A reader opens it again and again while the owner creates it: the creating commit may
        // fall between any two of its reads, and must never make the journal look like another
        // program's database (8 to 38 in 100 did, when the header was read in two snapshots).
        let dir = tempfile::tempdir().unwrap();
        for i in 0..100 {
            let path = dir.path().join(format!("j{i}"));
            let reader = {
                let path = path.clone();
                std::thread::spawn(move || loop {
                    match Journal::open_read_only(&path) {
                        Err(JournalError::Missing { .. }) => continue,
                        other => return other.map(|j| j.id().to_owned()),
                    }
                })
            };
            let owner = Journal::open(&path).unwrap();
            let seen = reader.join().unwrap().map_err(|e| e.to_string());
            assert_eq!(seen.as_deref(), Ok(owner.id()), "journal {i}");
        }
    }

    #[test]
    fn an_owner_starting_while_a_reader_looks_for_the_holder_waits_its_turn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        drop(Journal::open(&path).unwrap());
        let reader = Journal::open_read_only(&path).unwrap();
        assert_eq!(reader.holder(), None, "nobody uses it");
        // A reader's look at the lock, caught in the act: the lock is held when the owner
        // starts, and let go once the owner found it held.
        let lock = File::open(sidecar(&path, LOCK_SUFFIX)).unwrap();
        fs4::FileExt::try_lock(&lock).unwrap();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (let_go, gone) = std::sync::mpsc::channel::<()>();
        let looking = std::thread::spawn(move || {
            released.recv().unwrap();
            drop(lock);
            let_go.send(()).unwrap();
        });
        LOCK_RETRY_HOOK.with(|hook| {
            hook.set(Some(Box::new(move || {
                release.send(()).unwrap();
                gone.recv().unwrap();
            })))
        });
        let owner = Journal::open(&path).expect("the owner waits for the look to end");
        looking.join().unwrap();
        assert!(
            LOCK_RETRY_HOOK.with(|hook| hook.take().is_none()),
            "the owner found the lock held"
        );
        assert_eq!(owner.holder(), None, "the owner holds the lock itself");
        assert_eq!(
            reader.holder(),
            Some(Holder {
                pid: Some(std::process::id())
            })
        );
        drop(owner);
        assert_eq!(reader.holder(), None);
    }

    #[test]
    fn opening_read_only_or_existing_where_no_journal_is_creates_nothing() {
        type Open = fn(&Path) -> Result<Journal, JournalError>;
        let openers: [(&str, Open); 2] = [
            ("open_read_only", |p| Journal::open_read_only(p)),
            ("open_existing", |p| Journal::open_existing(p)),
        ];
        for (name, open) in openers {
            let dir = tempfile::tempdir().unwrap();
            let missing = dir.path().join("missing");
            let err = open(&missing).unwrap_err();
            assert!(
                matches!(err, JournalError::Missing { .. }),
                "{name}: {err:?}"
            );
            assert!(err.to_string().contains("no journal at"), "{name}: {err}");
            let empty = dir.path().join("empty");
            std::fs::write(&empty, b"").unwrap();
            let err = open(&empty).unwrap_err();
            assert!(
                matches!(err, JournalError::Missing { .. }),
                "{name}: {err:?}"
            );
            let mut left: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            assert_eq!(left, ["empty"], "{name}");
            assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0, "{name}");
            let text = dir.path().join("notes.txt");
            std::fs::write(&text, "not a journal\n").unwrap();
            assert!(
                matches!(open(&text), Err(JournalError::NotAJournal { .. })),
                "{name}"
            );
            // A journal whose creation was interrupted: a database with nothing in it yet.
            let unfinished = dir.path().join("unfinished");
            rusqlite::Connection::open(&unfinished)
                .unwrap()
                .execute_batch("PRAGMA user_version = 0; VACUUM;")
                .unwrap();
            let err = open(&unfinished).unwrap_err();
            assert!(
                matches!(err, JournalError::Missing { .. }),
                "{name}: {err:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        drop(Journal::open(&path).unwrap());
        Journal::open_existing(&path)
            .unwrap()
            .set_cursor(3)
            .unwrap();
        assert_eq!(
            Journal::open_read_only(&path).unwrap().cursor().unwrap(),
            Some(3)
        );
    }

    #[test]
    fn a_failed_compaction_does_not_fail_the_write_it_follows() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path().join("j")).unwrap();
        j.writes_since_compact = COMPACT_EVERY - 1;
        j.failing_compaction
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let batch = WriteBatch {
            appends: vec![rec(1, "")],
            ..WriteBatch::default()
        };
        j.write(&batch).expect("the batch was committed");
        assert!(
            !j.failing_compaction
                .load(std::sync::atomic::Ordering::SeqCst),
            "the compaction was tried"
        );
        assert_eq!(seqs(&all_pending(&j)), vec![1]);
        let again = j.write(&batch).unwrap_err();
        assert!(
            again.to_string().contains("UNIQUE"),
            "what a retry of the committed batch meets: {again}"
        );
    }

    #[test]
    fn max_seq_survives_when_everything_was_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let mut j = Journal::open(&path).unwrap();
            j.append(&[rec(1, ""), rec(2, "")], None).unwrap();
            j.settle(&[Settlement::Delivered(1), Settlement::Delivered(2)])
                .unwrap();
        }
        let j = Journal::open(&path).unwrap();
        assert!(all_pending(&j).is_empty());
        assert_eq!(
            j.max_seq().unwrap(),
            2,
            "seqs must not restart at 1, or idempotency keys repeat"
        );
    }

    #[test]
    fn items_delivered_in_the_batch_of_their_append_are_not_left_pending() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path().join("j")).unwrap();
        j.write(&WriteBatch {
            appends: vec![rec(1, ""), rec(2, ""), rec(3, "")],
            settlements: vec![Settlement::Delivered(1), Settlement::Delivered(3)],
            cursor: None,
            ..WriteBatch::default()
        })
        .unwrap();
        assert_eq!(seqs(&all_pending(&j)), vec![2]);
        assert_eq!(j.max_seq().unwrap(), 3);
        // A delivery of an item appended in an earlier batch still deletes it.
        j.write(&WriteBatch {
            appends: vec![rec(4, "")],
            settlements: vec![Settlement::Delivered(2)],
            cursor: None,
            ..WriteBatch::default()
        })
        .unwrap();
        assert_eq!(seqs(&all_pending(&j)), vec![4]);
    }

    #[test]
    fn failed_items_become_dead_letters_that_can_be_retried_or_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let mut j = Journal::open(&path).unwrap();
            j.write(&WriteBatch {
                appends: vec![rec(1, "k"), rec(2, "k"), rec(3, "k")],
                settlements: vec![Settlement::Failed {
                    seq: 1,
                    error: "HTTP 400: bad item".into(),
                    attempts: 5,
                }],
                cursor: None,
                ..WriteBatch::default()
            })
            .unwrap();
            j.settle(&[Settlement::Failed {
                seq: 2,
                error: "gone".into(),
                attempts: 1,
            }])
            .unwrap();
        }
        let mut j = Journal::open(&path).unwrap();
        let dead = j.dead_letters().unwrap();
        assert_eq!(dead.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            (dead[0].error.as_str(), dead[0].attempts),
            ("HTTP 400: bad item", 5)
        );
        assert_eq!(
            (dead[0].lane.as_str(), dead[0].key.as_deref()),
            ("k", Some("k"))
        );
        assert_eq!(dead[0].payload, b"item 1");
        assert!(dead[0].failed_at > UNIX_EPOCH + Duration::from_secs(1_600_000_000));
        assert_eq!(j.status().unwrap().dead_letters, 2);

        let new_seq = j.retry_dead(1).unwrap();
        assert_eq!(
            new_seq, 4,
            "re-enqueued behind everything handed out so far"
        );
        let pending = all_pending(&j);
        assert_eq!(seqs(&pending), vec![3, 4]);
        assert_eq!(pending[1].payload, b"item 1");
        j.discard_dead(2).unwrap();
        assert!(j.dead_letters().unwrap().is_empty());
        assert!(matches!(
            j.discard_dead(2),
            Err(JournalError::NoSuchDeadLetter { seq: 2, .. })
        ));
        let err = j.retry_dead(1).unwrap_err();
        assert!(
            matches!(err, JournalError::NoSuchDeadLetter { seq: 1, .. }),
            "{err}"
        );
        assert_eq!(j.max_seq().unwrap(), 4, "a failed retry hands out no seq");
    }

    #[test]
    fn paused_lanes_are_remembered_until_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let mut j = Journal::open(&path).unwrap();
            j.append(&[rec(1, "x"), rec(2, "y")], None).unwrap();
            j.settle(&[
                Settlement::Paused {
                    lane: "x".into(),
                    error: "503".into(),
                },
                Settlement::Paused {
                    lane: "z".into(),
                    error: "timeout".into(),
                },
                Settlement::Resumed("z".into()),
            ])
            .unwrap();
        }
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(
            j.paused_lanes().unwrap(),
            vec![("x".to_owned(), "503".to_owned())]
        );
        let lanes = j.status().unwrap().lanes;
        assert_eq!(
            lanes[0],
            LaneStatus {
                lane: "x".into(),
                pending: 1,
                paused: Some("503".into())
            }
        );
        assert_eq!(
            lanes[1],
            LaneStatus {
                lane: "y".into(),
                pending: 1,
                paused: None
            }
        );
        assert!(j.resume("x").unwrap());
        assert!(!j.resume("x").unwrap());
        assert!(j.paused_lanes().unwrap().is_empty());
    }

    #[test]
    fn a_journal_from_before_the_ordering_was_recorded_counts_as_keyed_if_a_lane_is_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut keyed = Journal::open(dir.path().join("keyed")).unwrap();
        assert_eq!(keyed.status().unwrap().keyed, None, "nothing tells yet");
        keyed.append(&[rec(1, "alice")], None).unwrap();
        assert_eq!(keyed.status().unwrap().keyed, Some(true));
        let err = keyed.claim("strict", None).unwrap_err();
        assert!(
            matches!(&err, JournalError::OtherOrdering { written, pending: 1, .. } if written == KEYED),
            "{err:?}"
        );
        keyed.claim(KEYED, None).unwrap();

        // Items in the one lane `""` fit either kind; the first claim records its own.
        let mut single = Journal::open(dir.path().join("single")).unwrap();
        single.append(&[rec(1, "")], None).unwrap();
        assert_eq!(single.status().unwrap().keyed, None);
        single.claim("pipelined", None).unwrap();
        assert_eq!(single.status().unwrap().keyed, Some(false));
        single.claim("strict", None).unwrap();
        assert!(single.claim(KEYED, None).is_err());
    }

    #[test]
    fn the_file_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        j.append(&[rec(1, "")], None).unwrap();
        for file in [
            path.clone(),
            sidecar(&path, "-wal"),
            // The WAL index: what the owner writes shows in it before it is checkpointed.
            sidecar(&path, "-shm"),
            sidecar(&path, LOCK_SUFFIX),
        ] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", file.display());
        }
    }

    #[test]
    fn a_second_open_in_this_process_is_refused_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let _first = Journal::open(&path).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(
            matches!(&err, JournalError::Locked { pid: Some(pid), .. } if *pid == std::process::id()),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains(&std::process::id().to_string()),
            "{msg}"
        );
        // Not "stop that process": it is this one.
        assert!(
            msg.contains("this process") && msg.contains("close that one first"),
            "{msg}"
        );
    }

    #[test]
    fn a_lock_a_child_of_this_process_still_holds_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        drop(Journal::open(&path).unwrap());
        // What a child forked or being spawned holds until it drops its copy or execs: the
        // lock, on a file description of its own, naming this process.
        let child = File::options()
            .read(true)
            .write(true)
            .open(sidecar(&path, LOCK_SUFFIX))
            .unwrap();
        fs4::FileExt::try_lock(&child).unwrap();
        let let_go = std::thread::spawn(move || {
            std::thread::sleep(LOCK_PATIENCE * 3);
            drop(child);
        });
        let opened = Journal::open(&path);
        let_go.join().unwrap();
        opened.unwrap();
    }

    /// Runs this test binary again as a child executing only `test`, with `env` set; see
    /// [`a_second_process_is_refused_and_a_killed_holder_does_not_block`].
    fn spawn_self(test: &str, env: (&str, &Path)) -> std::process::Child {
        Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(env.0, env.1)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    #[test]
    fn a_second_process_is_refused_and_a_killed_holder_does_not_block() {
        const CHILD: &str = "CONVEYOR_JOURNAL_TEST_HOLDER";
        // In the child: open, say so, and hold the journal until killed.
        if let Some(path) = std::env::var_os(CHILD) {
            // The parent's test process may fork other children (other tests) while it held
            // the journal; such a fork keeps the lock until it execs, so allow a moment.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let _j = loop {
                match Journal::open(PathBuf::from(&path)) {
                    Err(JournalError::Locked { .. }) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    other => break other.unwrap(),
                }
            };
            println!("holding");
            let _ = io::stdin().read(&mut [0u8; 1]);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        Journal::open(&path)
            .unwrap()
            .append(&[rec(1, "")], None)
            .unwrap();
        let mut child = spawn_self(
            "journal::tests::a_second_process_is_refused_and_a_killed_holder_does_not_block",
            (CHILD, &path),
        );
        let mut out = io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("holding") {
            line.clear();
            assert!(
                io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
                "the child exited before holding the journal"
            );
        }
        let err = Journal::open(&path).unwrap_err();
        assert!(
            matches!(&err, JournalError::Locked { pid: Some(pid), .. } if *pid == child.id()),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&format!("process {}", child.id())),
            "{err}"
        );

        child.kill().unwrap(); // SIGKILL: no destructor runs, the lock file stays behind
        child.wait().unwrap();
        assert!(sidecar(&path, LOCK_SUFFIX).exists());
        let j = Journal::open(&path).expect("a lock left by a killed process must not block");
        assert_eq!(seqs(&all_pending(&j)), vec![1]);
    }

    #[test]
    fn a_stale_lock_file_naming_a_dead_pid_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(sidecar(&path, LOCK_SUFFIX), "4000000\n").unwrap();
        Journal::open(&path).unwrap();
        let pid = std::fs::read_to_string(sidecar(&path, LOCK_SUFFIX)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
    }

    fn assert_untouched(path: &Path, content: &[u8], err: &JournalError) {
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "the error must name the file: {err}"
        );
        assert_eq!(
            std::fs::read(path).unwrap(),
            content,
            "the file must not be modified"
        );
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_refused_untouched_with_no_lock_file_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        let content = b"these are my notes, not a journal\n".repeat(200);
        std::fs::write(&path, &content).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(matches!(err, JournalError::NotAJournal { .. }), "{err:?}");
        assert!(
            err.to_string().contains("is not a Conveyor journal")
                && !err.to_string().contains("move it aside"),
            "{err}"
        );
        assert_untouched(&path, &content, &err);
        assert!(
            !sidecar(&path, LOCK_SUFFIX).exists(),
            "nothing is left next to it"
        );
    }

    #[test]
    fn a_directory_is_refused_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = Journal::open(dir.path()).unwrap_err();
        assert!(matches!(err, JournalError::IsADirectory { .. }), "{err:?}");
        assert!(
            err.to_string().contains("is a directory")
                && err.to_string().contains("events.journal"),
            "{err}"
        );
        assert!(!sidecar(dir.path(), LOCK_SUFFIX).exists());
    }

    #[test]
    fn an_empty_path_is_refused_as_one_by_every_open() {
        let opened = [
            Journal::open(""),
            Journal::open_existing(""),
            Journal::open_read_only(""),
        ];
        for err in opened.into_iter().map(Result::unwrap_err) {
            assert!(matches!(err, JournalError::EmptyPath), "{err:?}");
            assert!(err.to_string().contains("path is empty"), "{err}");
        }
    }

    #[test]
    fn a_foreign_sqlite_database_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann');")
            .unwrap();
        let content = std::fs::read(&path).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(matches!(err, JournalError::Foreign { .. }), "{err:?}");
        assert_untouched(&path, &content, &err);
    }

    #[test]
    fn a_journal_from_a_newer_version_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        Journal::open(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let content = std::fs::read(&path).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::UnsupportedVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_untouched(&path, &content, &err);
    }

    #[test]
    fn a_damaged_journal_is_reported_and_not_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let mut j = Journal::open(&path).unwrap();
            let big: Vec<Record> = (1..=2000)
                .map(|s| Record {
                    payload: vec![7; 200],
                    ..rec(s, "")
                })
                .collect();
            j.append(&big, None).unwrap();
        }
        // Overwrite pages in the middle of the file (b-tree pages of the items table).
        let mut content = std::fs::read(&path).unwrap();
        assert!(
            content.len() > 64 * 1024,
            "the journal should span many pages"
        );
        for b in &mut content[8192..40960] {
            *b = 0xA5;
        }
        std::fs::write(&path, &content).unwrap();
        let result =
            Journal::open(&path).and_then(|j| j.pending_after(0, 10_000).map(|_| j.status()));
        let err = match result {
            Err(e) => e,
            Ok(status) => panic!("damage went unnoticed: {status:?}"),
        };
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err:?}");
        assert_untouched(&path, &content, &err);
    }

    #[test]
    fn a_full_disk_fails_the_write_and_keeps_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        j.append(&(1..=10).map(|s| rec(s, "")).collect::<Vec<_>>(), Some(10))
            .unwrap();
        // SQLite reports a page limit exactly as a full disk (SQLITE_FULL), down the same paths.
        let pages: i64 = j
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        j.limit_pages(pages);
        let big: Vec<Record> = (11..=5000)
            .map(|s| Record {
                payload: vec![1; 500],
                ..rec(s, "")
            })
            .collect();
        let err = j.append(&big, Some(5000)).unwrap_err();
        assert!(matches!(err, JournalError::DiskFull { .. }), "{err:?}");
        assert!(err.to_string().contains("disk is full"), "{err}");
        // The journal stays usable and holds exactly what was committed before.
        assert_eq!(seqs(&all_pending(&j)), (1..=10).collect::<Vec<_>>());
        assert_eq!(
            j.cursor().unwrap(),
            Some(10),
            "the cursor is committed with its items, or not at all"
        );
        j.settle(&[Settlement::Delivered(1)]).unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(seqs(&all_pending(&j)), (2..=10).collect::<Vec<_>>());
        assert_eq!(j.max_seq().unwrap(), 10);
    }

    /// Makes `dir` read-only for this process until dropped: a read-only bind mount when running as
    /// root (root ignores permission bits), `chmod 555` otherwise.
    struct ReadOnlyDir {
        dir: PathBuf,
        mounted: bool,
    }

    impl ReadOnlyDir {
        fn new(dir: &Path) -> ReadOnlyDir {
            let is_root = Command::new("id")
                .arg("-u")
                .output()
                .map(|o| o.stdout == b"0\n")
                .unwrap_or(false);
            if is_root {
                let run = |args: &[&str]| {
                    let status = Command::new("mount").args(args).status().unwrap();
                    assert!(
                        status.success(),
                        "mount {args:?} failed; running as root, this test needs mount"
                    );
                };
                let d = dir.to_str().unwrap();
                run(&["--bind", d, d]);
                run(&["-o", "remount,bind,ro", d]);
            } else {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
            }
            ReadOnlyDir {
                dir: dir.to_path_buf(),
                mounted: is_root,
            }
        }
    }

    impl Drop for ReadOnlyDir {
        fn drop(&mut self) {
            if self.mounted {
                let _ = Command::new("umount").arg(&self.dir).status();
            } else {
                let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755));
            }
        }
    }

    #[test]
    fn a_read_only_directory_gives_an_error_naming_the_file_and_keeps_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let mut j = Journal::open(&path).unwrap();
            j.append(&[rec(1, ""), rec(2, "")], None).unwrap();
        }
        {
            let _ro = ReadOnlyDir::new(dir.path());
            let err = Journal::open(&path).unwrap_err();
            assert!(matches!(err, JournalError::Io { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains("writable"),
                "{msg}"
            );
            // The files exist: it could not open them (not "create").
            assert!(msg.contains("cannot open"), "{msg}");
            let fresh = dir.path().join("new.journal");
            let err = Journal::open(&fresh).unwrap_err();
            assert!(
                err.to_string().contains(&fresh.display().to_string())
                    && err.to_string().contains("cannot create"),
                "{err}"
            );
        }
        let j = Journal::open(&path).unwrap();
        assert_eq!(seqs(&all_pending(&j)), vec![1, 2]);
    }

    #[test]
    fn settled_items_are_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        // A backlog of 20k items of 400 bytes (~9 MB), then all delivered.
        for chunk in (1..=20_000u64).collect::<Vec<_>>().chunks(1000) {
            let batch: Vec<Record> = chunk
                .iter()
                .map(|s| Record {
                    payload: vec![3; 400],
                    ..rec(*s, "")
                })
                .collect();
            j.append(&batch, None).unwrap();
        }
        let peak = std::fs::metadata(&path).unwrap().len();
        assert!(peak > 8_000_000, "peak {peak}");
        for chunk in (1..=20_000u64).collect::<Vec<_>>().chunks(100) {
            j.settle(
                &chunk
                    .iter()
                    .map(|s| Settlement::Delivered(*s))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        }
        // 200 settle transactions: the periodic check has not necessarily fired yet; a long run
        // keeps writing, which is what makes it fire.
        for s in 20_001..=20_000 + u64::from(COMPACT_EVERY) {
            j.append(&[rec(s, "")], None).unwrap();
            j.settle(&[Settlement::Delivered(s)]).unwrap();
        }
        let db = std::fs::metadata(&path).unwrap().len();
        let wal = std::fs::metadata(sidecar(&path, "-wal")).unwrap().len();
        assert!(
            db < peak / 10,
            "the database should shrink once the backlog is settled: {peak} -> {db}"
        );
        // The WAL is reused from its start after each checkpoint and cut back to the size limit.
        assert!(
            wal <= WAL_SIZE_LIMIT as u64,
            "the WAL should stay bounded: {wal}"
        );
        drop(j);
        assert!(Journal::open(&path)
            .unwrap()
            .pending_after(0, 10)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn compaction_does_not_wait_for_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut owner = Journal::open(&path).unwrap();
        // SQLite's default wait (5 s) would do; a longer one makes the bound below generous.
        owner.conn.busy_timeout(Duration::from_secs(60)).unwrap();
        let batch: Vec<Record> = (1..=2000).map(|s| rec(s, "a")).collect();
        owner.append(&batch, None).unwrap();
        // A reader in the middle of a long read (a large `dead_letters`, say) holds its snapshot.
        let reader = Journal::open_read_only(&path).unwrap();
        reader.conn.execute_batch("BEGIN").unwrap();
        let count = |j: &Journal| -> i64 {
            j.conn
                .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count(&reader), 2000);
        let settled: Vec<Settlement> = (1..=2000).map(Settlement::Delivered).collect();
        owner.settle(&settled).unwrap();

        // The engine's writer compacts between two commits: waiting for the reader would hold
        // up every commit (and every `Durability::Sync` send) behind it.
        let started = std::time::Instant::now();
        owner.compact().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "compaction waited {:?} for the reader",
            started.elapsed()
        );
        assert_eq!(count(&reader), 2000, "the reader keeps its snapshot");
        assert_eq!(count(&owner), 0);
        let busy_timeout: i64 = owner
            .conn
            .pragma_query_value(None, "busy_timeout", |r| r.get(0))
            .unwrap();
        assert_eq!(busy_timeout, 60_000, "other waits keep theirs");
        // Once the reader is done, the next compaction empties the WAL.
        reader.conn.execute_batch("COMMIT").unwrap();
        owner.compact().unwrap();
        assert_eq!(std::fs::metadata(sidecar(&path, "-wal")).unwrap().len(), 0);
        assert_eq!(count(&reader), 0);
    }

    #[test]
    fn the_cursor_is_committed_with_the_items_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let mut j = Journal::open(&path).unwrap();
            j.append(&[rec(1, "")], Some(1)).unwrap();
            j.append(&[rec(2, "")], None).unwrap();
            assert_eq!(
                j.cursor().unwrap(),
                Some(1),
                "an append without a cursor keeps the old one"
            );
            j.set_cursor(7).unwrap();
        }
        assert_eq!(Journal::open(&path).unwrap().cursor().unwrap(), Some(7));
    }
}
