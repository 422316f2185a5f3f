//! Files a forked child must not share with its parent: the journal's lock file.
//!
//! A journal's owner holds an `flock` on its lock file, and an `flock` belongs to the open file
//! description, which `fork()` shares with the child. A child that lives on (a multiprocessing
//! or gunicorn worker, anything forked by a program that owns a journal) kept the journal locked
//! for as long as it ran: its parent could not close the journal and open it again, and a
//! restarted service was refused it while a worker forked by the old one still ran. The child
//! cannot just unlock: through the shared description, that would release the parent's lock.
//!
//! So in the child, inside `fork()`, a `pthread_atfork` handler points each such descriptor at
//! `/dev/null` (`dup2`): the description, and its lock, stay the parent's alone, and the
//! descriptor number stays valid, so a [`ParentOnlyFile`] dropped in the child closes a
//! descriptor of its own, never one that a later `open` got.
//!
//! Why here rather than in the Python package's `os.register_at_fork` hook: the lock is held
//! inside the engine (by a conveyor's journal writer), out of the bindings' reach, and a handler
//! here covers every fork: Python's `os.fork()` and multiprocessing, and a Rust program's own.
//!
//! The child's handler runs where only async-signal-safe calls are allowed and where a lock held
//! by another thread of the parent stays held for good: it takes no lock and allocates nothing.
//! It reads a list of slots, one descriptor each, with atomic loads (slots are never freed; a
//! closed file's slot is reused), and calls `open`, `dup2`, `fcntl` and `close`. It then marks
//! those slots inherited: in the child the numbers are the child's own, which it may close and
//! give to files of its own, and a fork of the child must not point those at `/dev/null`.
//!
//! A descriptor opened while another thread forks could be missed (open, not yet in its slot),
//! and one being closed could be mistaken for a stranger that got its number. So opening and
//! recording, or closing and forgetting, is one step that a fork waits for, and that waits for
//! the forks under way (`between_forks`).

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
#[cfg(unix)]
use std::os::fd::AsRawFd;
use std::path::Path;

/// A file whose open file description stays with the process that opened it: in a child made by
/// `fork()`, its descriptor points at `/dev/null` instead (see the module's doc).
pub(crate) struct ParentOnlyFile {
    /// Closed in `Drop`, inside the same step that frees `slot`.
    file: ManuallyDrop<File>,
    /// Where the child's handler finds the descriptor.
    #[cfg(unix)]
    slot: &'static unix::Slot,
}

impl ParentOnlyFile {
    /// Opens `path` with `options`.
    pub(crate) fn open(options: &OpenOptions, path: &Path) -> io::Result<ParentOnlyFile> {
        #[cfg(unix)]
        {
            let slot = unix::Slot::claim();
            let opened = unix::between_forks(|| {
                let file = options.open(path)?;
                slot.record(file.as_raw_fd());
                Ok(file)
            });
            match opened {
                Ok(file) => Ok(ParentOnlyFile {
                    file: ManuallyDrop::new(file),
                    slot,
                }),
                Err(err) => {
                    slot.free();
                    Err(err)
                }
            }
        }
        #[cfg(not(unix))]
        {
            // No fork: nothing to guard against.
            Ok(ParentOnlyFile {
                file: ManuallyDrop::new(options.open(path)?),
            })
        }
    }
}

impl Deref for ParentOnlyFile {
    type Target = File;

    fn deref(&self) -> &File {
        &self.file
    }
}

impl DerefMut for ParentOnlyFile {
    fn deref_mut(&mut self) -> &mut File {
        &mut self.file
    }
}

impl Drop for ParentOnlyFile {
    fn drop(&mut self) {
        // SAFETY: `self.file` is never used again.
        let file = unsafe { ManuallyDrop::take(&mut self.file) };
        #[cfg(unix)]
        unix::between_forks(|| {
            drop(file);
            self.slot.free();
        });
        #[cfg(not(unix))]
        drop(file);
    }
}

#[cfg(unix)]
mod unix {
    use std::ptr;
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering::SeqCst};

    /// A slot no file uses.
    const FREE: i32 = -1;
    /// A slot taken by a file not open yet.
    const CLAIMED: i32 = -2;
    /// In a forked child, the slot of a file it inherited: the descriptor number is the
    /// child's own now, which it may close and reuse for a file of its own, so the child's own
    /// forks must leave it alone. Claimed by nothing until that file's drop frees it.
    const INHERITED: i32 = -3;

    /// One descriptor for the child's handler to point at `/dev/null`.
    pub(super) struct Slot {
        /// The descriptor, or `FREE`, `CLAIMED` or `INHERITED`.
        fd: AtomicI32,
        /// The slot made before this one. Set before this slot is published, never after.
        next: AtomicPtr<Slot>,
    }

    /// The newest slot; the others follow through `next`. Only ever holds leaked boxes, so a
    /// slot read from it lives for the rest of the process.
    static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(ptr::null_mut());

    fn slots() -> impl Iterator<Item = &'static Slot> {
        let first = SLOTS.load(SeqCst);
        // SAFETY: every pointer in the list comes from `Box::leak` (see `Slot::claim`).
        std::iter::successors(unsafe { first.as_ref() }, |slot| unsafe {
            slot.next.load(SeqCst).as_ref()
        })
    }

    impl Slot {
        /// A slot for a file about to be opened: a free one, or a new one.
        pub(super) fn claim() -> &'static Slot {
            install_handlers();
            if let Some(slot) = slots().find(|slot| {
                slot.fd
                    .compare_exchange(FREE, CLAIMED, SeqCst, SeqCst)
                    .is_ok()
            }) {
                return slot;
            }
            let slot: &'static Slot = Box::leak(Box::new(Slot {
                fd: AtomicI32::new(CLAIMED),
                next: AtomicPtr::new(ptr::null_mut()),
            }));
            let mut first = SLOTS.load(SeqCst);
            loop {
                slot.next.store(first, SeqCst);
                let this = ptr::from_ref(slot).cast_mut();
                match SLOTS.compare_exchange(first, this, SeqCst, SeqCst) {
                    Ok(_) => return slot,
                    Err(now) => first = now,
                }
            }
        }

        /// The file is open on `fd`: from now on, a forked child points `fd` at `/dev/null`.
        pub(super) fn record(&self, fd: i32) {
            self.fd.store(fd, SeqCst);
        }

        /// The file is closed (or never opened): the slot is free for another.
        pub(super) fn free(&self) {
            self.fd.store(FREE, SeqCst);
        }
    }

    /// Threads inside `between_forks`.
    static CHANGING: AtomicUsize = AtomicUsize::new(0);
    /// Forks under way: between `before_fork` and `after_fork_in_parent`.
    static FORKING: AtomicUsize = AtomicUsize::new(0);

    /// Runs `step` (open a file and record it, or close it and free its slot) while no fork is
    /// under way, so a child sees the step either wholly done or not begun.
    ///
    /// A thread that forks inside `step` (only possible from a signal handler) would wait for
    /// itself for good: none does.
    pub(super) fn between_forks<T>(step: impl FnOnce() -> T) -> T {
        // SeqCst on both counters: either this thread sees the fork's count and steps back, or
        // the fork sees this thread's count and waits for it to finish.
        loop {
            CHANGING.fetch_add(1, SeqCst);
            if FORKING.load(SeqCst) == 0 {
                break;
            }
            CHANGING.fetch_sub(1, SeqCst);
            while FORKING.load(SeqCst) != 0 {
                std::thread::yield_now();
            }
        }
        /// Leaves the step even if it panics: no fork may wait for it for good.
        struct Leave;
        impl Drop for Leave {
            fn drop(&mut self) {
                CHANGING.fetch_sub(1, SeqCst);
            }
        }
        let _leave = Leave;
        step()
    }

    /// Registers the handlers before the first file is opened.
    fn install_handlers() {
        // Not a `Once`: a fork while another thread ran it would leave the child's copy running
        // for good, and the child's first open waiting on it. Two threads may both register the
        // handlers at first instead; running them twice at each fork does no harm.
        static INSTALLED: AtomicBool = AtomicBool::new(false);
        if INSTALLED.load(SeqCst) {
            return;
        }
        // SAFETY: the handlers never unwind, and the child's makes only async-signal-safe calls.
        let err = unsafe {
            libc::pthread_atfork(
                Some(before_fork as unsafe extern "C" fn()),
                Some(after_fork_in_parent as unsafe extern "C" fn()),
                Some(after_fork_in_child as unsafe extern "C" fn()),
            )
        };
        if err != 0 {
            tracing::warn!(
                "cannot install the fork handler (pthread_atfork returned {err}): a child forked \
                 by this process keeps its journals locked until it exits"
            );
        }
        INSTALLED.store(true, SeqCst);
    }

    /// Runs in the parent before `fork()`: waits for the steps under way (opening or closing a
    /// file is brief).
    extern "C" fn before_fork() {
        FORKING.fetch_add(1, SeqCst);
        while CHANGING.load(SeqCst) != 0 {
            std::thread::yield_now();
        }
    }

    extern "C" fn after_fork_in_parent() {
        FORKING.fetch_sub(1, SeqCst);
    }

    /// Runs in the child, inside `fork()`: async-signal-safe calls only, no lock, no allocation.
    extern "C" fn after_fork_in_child() {
        // This thread is the child's only one: what the parent's other threads counted does
        // not concern it, and would make its own forks wait for good.
        FORKING.store(0, SeqCst);
        CHANGING.store(0, SeqCst);
        let mut null = -1;
        let mut tried_null = false;
        for slot in slots() {
            let fd = slot.fd.load(SeqCst);
            if fd < 0 {
                continue;
            }
            // From here on `fd` is the child's to close and reuse: should it open a file of
            // its own on that number, a child it forks must keep that file.
            slot.fd.store(INHERITED, SeqCst);
            if !tried_null {
                tried_null = true;
                // SAFETY: a NUL-terminated path; open is async-signal-safe.
                null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            }
            if null < 0 {
                // No /dev/null (a bare chroot): the child keeps the locks, as before.
                continue;
            }
            // SAFETY: dup2 and fcntl are async-signal-safe; `fd` is open, and `null` is not a
            // recorded descriptor (open gives the lowest free number).
            unsafe {
                // dup2 gives the copy no close-on-exec flag: put back the one std opened with.
                if libc::dup2(null, fd) == fd {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
        }
        if null >= 0 {
            // SAFETY: our own descriptor, closed once.
            unsafe { libc::close(null) };
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    use super::*;

    /// Whether a child forked by this process has a descriptor on `target` (dev and inode).
    fn child_has_a_descriptor_on(target: &libc::stat) -> bool {
        // SAFETY: the child makes only async-signal-safe calls (other threads may hold locks at
        // the fork), then `_exit`s; `status` and `st` are valid places to write.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let mut st: libc::stat = std::mem::zeroed();
                for fd in 0..4096 {
                    if libc::fstat(fd, &mut st) == 0
                        && (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)
                    {
                        libc::_exit(1);
                    }
                }
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            status != 0
        }
    }

    #[test]
    fn a_child_forked_while_files_open_and_close_has_none_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        File::create(&path).unwrap();
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path, and a place to write.
        let target = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::stat(c_path.as_ptr(), &mut st), 0);
            st
        };
        let held = ParentOnlyFile::open(OpenOptions::new().read(true), &path).unwrap();
        assert!(!child_has_a_descriptor_on(&target), "one file held");
        // Forks falling anywhere among opens and closes on other threads. Without the wait for
        // the steps under way, most children had a descriptor that was open and not yet
        // recorded.
        let stop = AtomicBool::new(false);
        let with_others = std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while !stop.load(SeqCst) {
                        drop(ParentOnlyFile::open(OpenOptions::new().read(true), &path).unwrap());
                    }
                });
            }
            let children = (0..300)
                .filter(|_| child_has_a_descriptor_on(&target))
                .count();
            stop.store(true, SeqCst);
            children
        });
        assert_eq!(with_others, 0, "children with a descriptor on the file");
        drop(held);
    }

    /// A forked child that closes what it inherited (a daemon closing every descriptor) and
    /// opens a file of its own on one of those numbers: a child it forks in turn (a subprocess,
    /// a worker) keeps that file. The parent's slots named the number; in a child they name
    /// nothing of the child's, and pointing the number at `/dev/null` swapped the file out.
    #[test]
    fn a_grandchild_keeps_a_file_its_parent_opened_on_an_inherited_number() {
        let dir = tempfile::tempdir().unwrap();
        let (lock, other) = (dir.path().join("lock"), dir.path().join("other"));
        File::create(&lock).unwrap();
        File::create(&other).unwrap();
        let c_other = CString::new(other.as_os_str().as_bytes()).unwrap();
        let held = ParentOnlyFile::open(OpenOptions::new().read(true), &lock).unwrap();
        let fd = held.as_raw_fd();
        // SAFETY: the child and the grandchild make only async-signal-safe calls (other threads
        // may hold locks at the fork), then `_exit`; `st`, `other_st` and the statuses are valid
        // places to write.
        let status = unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                libc::close(fd);
                let opened = libc::open(c_other.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if opened < 0 || (opened != fd && libc::dup2(opened, fd) != fd) {
                    libc::_exit(2);
                }
                let mut other_st: libc::stat = std::mem::zeroed();
                if libc::fstat(fd, &mut other_st) != 0 {
                    libc::_exit(2);
                }
                let grandchild = libc::fork();
                if grandchild == 0 {
                    let mut st: libc::stat = std::mem::zeroed();
                    let same = libc::fstat(fd, &mut st) == 0
                        && (st.st_dev, st.st_ino) == (other_st.st_dev, other_st.st_ino);
                    libc::_exit(if same { 0 } else { 1 });
                }
                let mut status = 0;
                if grandchild < 0 || libc::waitpid(grandchild, &mut status, 0) != grandchild {
                    libc::_exit(2);
                }
                libc::_exit(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    2
                });
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            status
        };
        assert!(libc::WIFEXITED(status), "the child did not exit: {status}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "1: the grandchild's descriptor no longer points at the child's file; 2: the child \
             could not set the test up"
        );
        drop(held);
    }
}
