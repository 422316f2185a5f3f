//! `--rejects FILE`: the bad input lines, copied whole.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::CliError;

/// The rejects file. What a run writes there is whole lines, each ended by `\n`, since a later
/// tool reads it line by line: a line copied in parts (an overlong one, as it is read) that
/// never ends, or one whose write fails (a full disk), is cut off again.
///
/// Unbuffered, one write per line or part (bad lines are few): a line copied is in the file,
/// whatever ends the run.
#[derive(Debug)]
pub(crate) struct Rejects {
    /// Opened to append, so that cutting the file short moves where the next write goes.
    file: File,
    /// The length of the whole lines in the file: where the line being copied began.
    whole: u64,
    /// The length of the file: `whole` and the parts of the line being copied.
    len: u64,
    /// Whether the file may hold more than `whole`: a line begun, or a write that failed after
    /// writing who knows how much.
    partial: bool,
}

impl Rejects {
    /// Opens `path`, emptied first when `afresh`, appended to otherwise. A file that ends
    /// without a line ending (half a line left by a run killed while it copied an overlong one,
    /// or a file of the user's own) gets one, and a note says so: the next line would be glued
    /// to it. Nothing already in the file is cut: this run cannot tell whose bytes they are, and
    /// a killed run's half line is copied whole again when the rerun reads its line again.
    pub(crate) fn open(path: &Path, afresh: bool) -> Result<Self, CliError> {
        let error = |e: io::Error| {
            CliError::usage(format!(
                "cannot open the rejects file {}: {e}",
                path.display()
            ))
        };
        let mut file = File::options()
            .append(true)
            .create(true)
            .open(path)
            .map_err(error)?;
        let meta = file.metadata().map_err(error)?;
        // A device or a pipe (`/dev/stderr`, `>(gzip > r.gz)`) is written to as it is: it can be
        // neither emptied nor cut.
        let len = match (meta.is_file(), afresh) {
            (false, _) => 0,
            (true, true) => {
                file.set_len(0).map_err(error)?;
                0
            }
            (true, false) => meta.len(),
        };
        if len > 0 && !ends_a_line(path, len).map_err(error)? {
            file.write_all(b"\n").map_err(error)?;
            eprintln!(
                "conveyor: note: the rejects file {} did not end with a line ending (half a line \
                 left by a run stopped while it copied an overlong line?): one was added, so \
                 that the next line starts on a line of its own",
                path.display()
            );
        }
        let len = file.metadata().map_err(error)?.len();
        Ok(Self {
            file,
            whole: len,
            len,
            partial: false,
        })
    }

    /// Copies the next part of a line, without its line ending.
    ///
    /// # Errors
    /// The write's; the line is cut off then.
    pub(crate) fn part(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.partial = true;
        self.write(bytes)
    }

    /// Copies the end of a line (all of it unless parts came before) and its `\n`.
    ///
    /// # Errors
    /// The write's; the line is cut off then.
    pub(crate) fn end_line(&mut self, rest: &[u8]) -> io::Result<()> {
        let mut end = Vec::with_capacity(rest.len() + 1);
        end.extend_from_slice(rest);
        end.push(b'\n');
        self.write(&end)?;
        self.whole = self.len;
        self.partial = false;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // What the failed write put in the file is unknown: back to the last whole line.
                self.partial = true;
                self.cut_partial();
                Err(e)
            }
        }
    }

    /// Cuts off a line begun but not ended (nothing to do when none was).
    fn cut_partial(&mut self) {
        if self.partial && self.file.set_len(self.whole).is_ok() {
            self.len = self.whole;
            self.partial = false;
        }
    }
}

impl Drop for Rejects {
    /// The input failed (or the run stopped) in the middle of an overlong line: its start must
    /// not stay as a line of its own, nor have the next run's first reject glued to it.
    fn drop(&mut self) {
        self.cut_partial();
    }
}

/// Whether the file at `path`, `len` bytes long, ends with a line ending.
fn ends_a_line(path: &Path, len: u64) -> io::Result<bool> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_copied_in_parts_counts_once_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let mut rejects = Rejects::open(&path, true).unwrap();
        rejects.end_line(b"one").unwrap();
        rejects.part(b"tw").unwrap();
        rejects.end_line(b"o").unwrap();
        rejects.part(b"thr").unwrap();
        drop(rejects);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        // Appended to, and emptied.
        let mut rejects = Rejects::open(&path, false).unwrap();
        rejects.end_line(b"four").unwrap();
        drop(rejects);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\nfour\n");
        drop(Rejects::open(&path, true).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
