//! `--rejects FILE`: the bad input lines, copied whole.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::CliError;

/// The rejects file. It only ever holds whole lines, each ended by `\n`, since a later tool
/// reads it as JSON lines: a line copied in parts (an overlong one, as it is read) that never
/// ends, or one whose write fails (a full disk), is cut off again.
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
    /// Opens `path`, emptied first when `afresh`, appended to otherwise. A file that ends in
    /// part of a line (left by a run killed while it copied an overlong one) has that part cut
    /// off, and a note says so: the next line would be glued to it.
    pub(crate) fn open(path: &Path, afresh: bool) -> Result<Self, CliError> {
        let error = |e: io::Error| {
            CliError::usage(format!(
                "cannot open the rejects file {}: {e}",
                path.display()
            ))
        };
        let file = File::options()
            .append(true)
            .create(true)
            .open(path)
            .map_err(error)?;
        let meta = file.metadata().map_err(error)?;
        // A device or a pipe (`/dev/stderr`, `>(gzip > r.gz)`) is written to as it is: it can be
        // neither emptied nor cut.
        let (len, whole) = match (meta.is_file(), afresh) {
            (false, _) => (0, 0),
            (true, true) => {
                file.set_len(0).map_err(error)?;
                (0, 0)
            }
            (true, false) => {
                let len = meta.len();
                let mut reading = File::open(path).map_err(error)?;
                (len, whole_lines(&mut reading, len).map_err(error)?)
            }
        };
        if whole < len {
            file.set_len(whole).map_err(error)?;
            eprintln!(
                "conveyor: note: the rejects file {} ended in half a line ({} bytes, left by a \
                 run stopped while it copied an overlong line): cut off, so that the file holds \
                 whole lines only",
                path.display(),
                len - whole
            );
        }
        Ok(Self {
            file,
            whole,
            len: whole,
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

/// The length of the whole lines of a file `len` bytes long: up to and with its last `\n`.
fn whole_lines(file: &mut File, len: u64) -> io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut chunk = vec![0; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let piece = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(piece)?;
        if let Some(i) = piece.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_lines_end_at_the_last_line_ending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        for (text, whole) in [("", 0), ("a\n", 2), ("a\nb", 2), ("half", 0), ("a\nb\n", 4)] {
            std::fs::write(&path, text).unwrap();
            let mut file = File::open(&path).unwrap();
            assert_eq!(whole_lines(&mut file, text.len() as u64).unwrap(), whole);
        }
        // Past a chunk's worth of half line.
        let long = format!("a\n{}", "x".repeat(200_000));
        std::fs::write(&path, &long).unwrap();
        let mut file = File::open(&path).unwrap();
        assert_eq!(whole_lines(&mut file, long.len() as u64).unwrap(), 2);
    }

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
