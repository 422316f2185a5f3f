//! A child made by `fork()` does not keep its parent's journal: the parent closes the journal and
//! opens it again while the child lives. Nor does the child release the parent's lock, neither
//! at the fork nor when it exits.
#![cfg(unix)]

use std::path::Path;

use conveyor::{BuildError, Conveyor, Journal, JournalError};

/// A child made by `fork()` that waits for a byte from the parent, then exits.
struct Child {
    pid: libc::pid_t,
    /// The parent's end of the pipe the child reads.
    release: libc::c_int,
}

impl Child {
    fn fork() -> Child {
        let mut pipe = [0; 2];
        // SAFETY: `pipe` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child makes only async-signal-safe calls (other test threads may have
        // held locks at the fork), and leaves with `_exit`: no destructor, no test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe {
                let mut byte = 0u8;
                // A byte, not the end of the pipe: a child forked by a test running alongside
                // may hold a copy of the write end.
                libc::read(pipe[0], std::ptr::from_mut(&mut byte).cast(), 1);
                libc::_exit(0);
            }
        }
        // SAFETY: the read end is the child's; closed once.
        unsafe { libc::close(pipe[0]) };
        Child {
            pid,
            release: pipe[1],
        }
    }

    /// Lets the child exit, and waits for it.
    fn exit(self) {
        // `Drop` does it, also when an assertion failed first.
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let byte = 1u8;
        let mut status = 0;
        // SAFETY: our own descriptor, closed once; `status` is a valid place to write.
        unsafe {
            libc::write(self.release, std::ptr::from_ref(&byte).cast(), 1);
            libc::close(self.release);
            libc::waitpid(self.pid, &mut status, 0);
        }
    }
}

/// Asserts that this process holds the journal at `path`.
fn assert_held_here(path: &Path) {
    let err = Journal::open(path).unwrap_err();
    assert!(
        matches!(err, JournalError::Locked { pid: Some(pid), .. } if pid == std::process::id()),
        "{err:?}"
    );
}

#[test]
fn a_journal_is_opened_again_while_a_child_forked_by_its_owner_lives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.journal");
    let journal = Journal::open(&path).unwrap();
    let child = Child::fork();
    // The child let go of the lock without releasing it for its parent.
    assert_held_here(&path);
    drop(journal);
    let again = Journal::open(&path).expect("a forked child must not keep the journal locked");
    child.exit();
    // The child's exit leaves the lock with its parent.
    assert_held_here(&path);
    drop(again);
}

#[test]
fn a_conveyor_opens_its_journal_again_while_a_child_forked_by_the_last_one_lives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.journal");
    let build = || -> Result<Conveyor<u64>, BuildError> {
        Conveyor::builder().journal(&path).build(|_d| Ok(()))
    };
    let first = build().unwrap();
    first.send(1).unwrap();
    let child = Child::fork();
    assert!(first.close().drained);
    let again = build().expect("a forked child must not keep the journal locked");
    again.send(2).unwrap();
    child.exit();
    assert_held_here(&path);
    assert!(again.close().drained);
    assert_eq!(Journal::open(&path).unwrap().status().unwrap().pending, 0);
}
