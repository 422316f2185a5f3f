//! Where lines go: an HTTP endpoint (the library's `HttpSink`) or a program run per line.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use conveyor::{Delivery, HttpSink, SinkError};
use hdrhistogram::Histogram;
use wait_timeout::ChildExt;

use crate::input::Line;

/// Exit status that asks for a retry (EX_TEMPFAIL from sysexits.h).
const EX_TEMPFAIL: i32 = 75;
/// How much of a failing program's stderr goes into the error (characters).
const STDERR_TAIL: usize = 300;
/// How much of a program's stderr is kept in memory (bytes): enough for [`STDERR_TAIL`]
/// characters of any UTF-8, however much the program writes.
const STDERR_KEEP: usize = 4 * STDERR_TAIL + 4096;
/// How long after a program exits its stderr may take to close. What it wrote before exiting is
/// already in the pipe, so this only bounds the wait on a background process it left behind
/// holding the pipe; what such a process writes later is not waited for.
const STDERR_GRACE: Duration = Duration::from_millis(200);
/// How long a program stopped at exit (see [`stop_running_programs`]) has between SIGTERM and
/// SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// The target of `conveyor send`.
#[derive(Debug)]
pub(crate) enum Target {
    /// Boxed: the sink is several times the size of an `ExecSink`, and there is one target.
    Http(Box<HttpSink>),
    Exec(ExecSink),
}

impl Target {
    /// The program that `--exec` runs, as found on the PATH.
    pub(crate) fn program(&self) -> Option<&Path> {
        match self {
            Self::Http(_) => None,
            Self::Exec(exec) => Some(&exec.program),
        }
    }

    /// What to show as the destination (no secrets).
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Http(sink) => sink.display_url(),
            Self::Exec(exec) => exec.program.display().to_string(),
        }
    }

    fn deliver(&self, d: &Delivery<Line>) -> Result<(), SinkError> {
        match self {
            Self::Http(sink) => sink.send(d).map(drop),
            Self::Exec(exec) => exec.run(d),
        }
    }
}

/// Runs a program per line, without a shell.
#[derive(Debug)]
pub(crate) struct ExecSink {
    program: PathBuf,
    args: Vec<String>,
    timeout: Duration,
    /// Whether the program's stdout goes to our stderr: under `--json`, stdout holds the summary
    /// and nothing else, or a program's `ok` would turn it into `ok{"target":...}`.
    stdout_to_stderr: bool,
}

impl ExecSink {
    /// Checks that the program can be found and executed now, so a typo or a missing `chmod +x`
    /// fails once, not once per line. `stdout_to_stderr` keeps our stdout for the `--json`
    /// summary alone.
    pub(crate) fn new(
        argv: &[String],
        timeout: Duration,
        stdout_to_stderr: bool,
    ) -> Result<Self, String> {
        let (name, args) = argv.split_first().ok_or("--exec needs a program to run")?;
        let program = find_program(name)?;
        check_interpreter(name, &program)?;
        Ok(Self {
            program,
            args: args.to_vec(),
            timeout,
            stdout_to_stderr,
        })
    }

    fn run(&self, d: &Delivery<Line>) -> Result<(), SinkError> {
        let line = d.item();
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env("CONVEYOR_SEQ", d.seq().to_string())
            .env("CONVEYOR_LINE", line.line.to_string())
            .env("CONVEYOR_ATTEMPT", d.attempt().to_string())
            .env("CONVEYOR_IDEMPOTENCY_KEY", d.idempotency_key())
            .stdin(Stdio::piped())
            // The program's own output is data: it goes where ours does, unless our stdout is
            // the `--json` summary's. Its stderr explains failures.
            .stdout(if self.stdout_to_stderr {
                Stdio::from(std::io::stderr())
            } else {
                Stdio::inherit()
            })
            .stderr(Stdio::piped())
            // A process group of its own: a terminal's Ctrl-C goes to the whole foreground
            // group, and conveyor's shutdown, not that signal, decides what becomes of the line
            // in flight (it may finish within --drain-timeout). A timeout then stops whatever
            // the program started, too.
            .process_group(0);
        if let Some(key) = d.key() {
            command.env("CONVEYOR_KEY", key);
        }
        let mut child = command.spawn().map_err(|e| {
            SinkError::permanent(format!("cannot run `{}`: {e}", self.program.display()))
        })?;
        // Read stderr before writing the line: a program may fill its stderr before it reads a
        // byte.
        let stderr = child.stderr.take().map(StderrTail::start);
        let running = Running::register(child.id());
        let waited = feed_and_wait(&mut child, &line.body, self.timeout);
        if !matches!(waited, Ok(Some(_))) {
            // Out of time (or unable to wait): stop the program and whatever it started. Its
            // group is signalled before it is reaped, so the group id cannot have been reused.
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(running);
        let stderr = stderr.map(StderrTail::finish).unwrap_or_default();
        let describe = |what: String| {
            if stderr.is_empty() {
                what
            } else {
                format!("{what}: {stderr}")
            }
        };
        let program = self.program.display();
        let status = match waited {
            Ok(Some(status)) => status,
            Ok(None) => {
                return Err(SinkError::retryable(describe(format!(
                    "`{program}` did not finish within {}",
                    humantime::format_duration(self.timeout)
                ))))
            }
            Err(e) => {
                return Err(SinkError::retryable(format!(
                    "waiting for `{program}`: {e}"
                )))
            }
        };
        match (status.code(), status.signal()) {
            (Some(0), _) => Ok(()),
            (Some(EX_TEMPFAIL), _) => Err(SinkError::retryable(describe(format!(
                "`{program}` exited with 75 (temporary failure)"
            )))),
            (Some(code), _) => Err(SinkError::permanent(describe(format!(
                "`{program}` exited with {code}"
            )))),
            // Not a signal we sent (the timeout returned above): someone stopped the program,
            // or the OOM killer did. That says nothing against the line, so it is tried again
            // (and stays pending if the run is shutting down) rather than failed for good.
            (
                None,
                Some(signal @ (libc::SIGHUP | libc::SIGINT | libc::SIGKILL | libc::SIGTERM)),
            ) => Err(SinkError::retryable(describe(format!(
                "`{program}` was stopped by {} (retried)",
                signal_name(signal)
            )))),
            // A crash (SIGSEGV, SIGABRT, ...) would most likely happen again.
            (None, signal) => Err(SinkError::permanent(describe(format!(
                "`{program}` was killed by {}",
                signal.map_or_else(|| "a signal".into(), signal_name)
            )))),
        }
    }
}

/// Process groups of the programs running now, so that conveyor can stop them when it exits
/// without waiting for them. A plain mutex: one short lock per program run.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// The list in [`RUNNING`]. A thread that panicked holding it left the list whole (each change
/// is one push or retain), so a poisoned lock is used as it is.
fn running() -> MutexGuard<'static, Vec<u32>> {
    RUNNING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A program listed in [`RUNNING`] until this is dropped (after the program is reaped).
struct Running(u32);

impl Running {
    fn register(pid: u32) -> Self {
        running().push(pid);
        Self(pid)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        running().retain(|&pid| pid != self.0);
    }
}

/// Stops every `--exec` program still running (and what it started), for when conveyor exits
/// without waiting for them: the drain deadline passed, or a second Ctrl-C. Their lines stay
/// pending in the journal; a program in its own process group would otherwise outlive conveyor,
/// since a terminal's Ctrl-C no longer reaches it, and the rerun would run its line again beside
/// it. SIGTERM first, so a program may clean up; SIGKILL for what has not exited within
/// [`KILL_GRACE`] (one that ignores SIGTERM). Returns at once when nothing is running.
pub(crate) fn stop_running_programs() {
    if signal_running(libc::SIGTERM) == 0 {
        return;
    }
    let deadline = Instant::now() + KILL_GRACE;
    // A program that exits is reaped by the thread that ran it, which then unlists it.
    while Instant::now() < deadline && !running().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_running(libc::SIGKILL);
}

/// Sends `signal` to the process group of every program listed in [`RUNNING`]; returns how
/// many there are.
fn signal_running(signal: libc::c_int) -> usize {
    let listed = running();
    for &pid in listed.iter() {
        signal_group(pid, signal);
    }
    listed.len()
}

/// Sends `signal` to the process group led by `pid` (each program runs in its own).
fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) takes plain integers; a negative pid names a process group.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// `SIGTERM` for the common signals, `signal N` for the others.
fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.into()
}

/// How often a program's exit is looked for while its stdin pipe is full: the longest a line
/// can be held up after its program exited without reading all of it.
const FEED_POLL: Duration = Duration::from_millis(10);

/// Writes `body` and a newline to the program's stdin, then waits for it to exit, all within
/// `timeout`; `Ok(None)` when the time ran out.
///
/// The write never blocks (the pipe is made non-blocking), so it can stop as soon as the program
/// exits: a program may exit without reading a line bigger than the pipe buffer, and a process
/// it left behind may hold the pipe's other end without ever reading it. A blocking write would
/// then wait for that process (a writer thread left behind for each such line, or the line held
/// up). Instead our end is closed once the program's exit is seen; its status decides. A program
/// that exits before reading makes the write fail with EPIPE (Rust ignores SIGPIPE): the same.
fn feed_and_wait(
    child: &mut Child,
    body: &str,
    timeout: Duration,
) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    if let Some(mut stdin) = child.stdin.take() {
        let mut bytes = Vec::with_capacity(body.len() + 1);
        bytes.extend_from_slice(body.as_bytes());
        bytes.push(b'\n');
        set_nonblocking(&stdin)?;
        let mut written = 0;
        while written < bytes.len() {
            match stdin.write(&bytes[written..]) {
                // A pipe takes at least a byte when it does not refuse the write.
                Ok(0) => break,
                Ok(n) => {
                    written += n;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // EPIPE: nothing reads the pipe any more; the exit status will say why.
                Err(_) => break,
            }
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            wait_writable(&stdin, left.min(FEED_POLL));
        }
    }
    child.wait_timeout(deadline.saturating_duration_since(Instant::now()))
}

/// Makes writes to the pipe return `WouldBlock` instead of waiting for room. Only our end's file
/// description changes: the program's end stays as it was.
fn set_nonblocking(pipe: &ChildStdin) -> io::Result<()> {
    let fd = pipe.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until the pipe has room (or its reader went away) or `wait` passes.
fn wait_writable(pipe: &ChildStdin, wait: Duration) {
    let mut fds = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let millis = libc::c_int::try_from(wait.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, for the duration of the call. An error (EINTR) only means the
    // caller looks again sooner.
    unsafe {
        libc::poll(&mut fds, 1, millis);
    }
}

/// The end of a program's stderr, read on a thread of its own so that a chatty program never
/// blocks on a full pipe while we wait for it.
struct StderrTail {
    /// The last bytes read (at most about twice [`STDERR_KEEP`]). A mutex, since the run's thread
    /// takes the text while the reader may still be reading: a background process the program
    /// left behind can hold the pipe open long after the program exited.
    text: Arc<Mutex<Vec<u8>>>,
    /// Disconnected when the reader reaches the end of the pipe (its sender is dropped then).
    eof: Receiver<()>,
}

impl StderrTail {
    fn start(mut pipe: ChildStderr) -> Self {
        let text = Arc::new(Mutex::new(Vec::new()));
        let (reading, eof) = mpsc::channel::<()>();
        let kept = Arc::clone(&text);
        std::thread::spawn(move || {
            let _reading = reading;
            let mut chunk = [0; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut text = kept.lock().unwrap_or_else(PoisonError::into_inner);
                        text.extend_from_slice(&chunk[..n]);
                        if text.len() > 2 * STDERR_KEEP {
                            let excess = text.len() - STDERR_KEEP;
                            text.drain(..excess);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
        Self { text, eof }
    }

    /// The tail of what the program wrote, once it has exited: all of it if the pipe closes
    /// within [`STDERR_GRACE`], else what has arrived by then. Never waits for the end of the
    /// pipe beyond that, since a process left behind may hold it open for as long as it likes.
    fn finish(self) -> String {
        let _ = self.eof.recv_timeout(STDERR_GRACE);
        let text = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        tail(&String::from_utf8_lossy(&text))
    }
}

/// The last line(s) of a program's stderr, short enough for one message.
fn tail(text: &str) -> String {
    let text = text.trim();
    let start = text
        .char_indices()
        .rev()
        .nth(STDERR_TAIL)
        .map_or(0, |(i, _)| i);
    text[start..].replace('\n', " | ")
}

/// Like a shell's lookup: a name with a `/` is a path, anything else is searched on PATH for a
/// file we may execute. The error says what to do.
fn find_program(name: &str) -> Result<PathBuf, String> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return match std::fs::metadata(&path) {
            Err(e) => Err(format!("cannot use `{name}` for --exec: {e}")),
            Ok(meta) if meta.is_dir() => Err(format!(
                "`{name}` is a directory: --exec needs a program to run"
            )),
            Ok(_) if !may_execute(&path) => Err(format!(
                "`{name}` is not executable: `chmod +x {name}`, or name its interpreter first \
                 (`--exec sh {name}`)"
            )),
            Ok(_) => Ok(path),
        };
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file() && may_execute(p))
        .ok_or_else(|| {
            format!("cannot find program `{name}` for --exec: give a path or put it on PATH")
        })
}

/// A script whose `#!` line names an interpreter that cannot be run passes `find_program`, then
/// fails every line with a bare "No such file or directory": said once, at the start, instead.
fn check_interpreter(name: &str, program: &Path) -> Result<(), String> {
    let mut head = [0u8; 256];
    let read = std::fs::File::open(program)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let Some(rest) = head[..read].strip_prefix(b"#!") else {
        return Ok(());
    };
    let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let Some(interpreter) = line.split_whitespace().next() else {
        return Ok(());
    };
    // A relative interpreter is looked up from wherever the program runs: left to exec.
    if interpreter.starts_with('/') && !may_execute(Path::new(interpreter)) {
        return Err(format!(
            "`{name}` starts with `#!{}`, and `{interpreter}` cannot be run (missing or not \
             executable): fix its #! line, or name an interpreter first (`--exec python3 {name}`)",
            line.trim_end()
        ));
    }
    Ok(())
}

/// Whether this process may execute `path`: access(2) with X_OK, the check exec itself makes
/// (permission bits alone would be wrong for another user's file, or for root).
fn may_execute(path: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(path.as_ptr(), libc::X_OK) == 0 }
}

/// Send latencies (each sink call, retries included), for the summary's p50/p99.
#[derive(Debug)]
pub(crate) struct Latencies {
    /// Microseconds, 3 significant digits. A mutex is enough: one short lock per request, next to
    /// a request that takes far longer.
    histogram: Mutex<Histogram<u64>>,
}

impl Latencies {
    pub(crate) fn new() -> Self {
        Self {
            // 1 µs to an hour: anything longer is recorded as an hour.
            histogram: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
        }
    }

    fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        if let Ok(mut h) = self.histogram.lock() {
            h.saturating_record(micros);
        }
    }

    /// (p50, p99), or `None` before any call.
    pub(crate) fn percentiles(&self) -> Option<(Duration, Duration)> {
        let h = self.histogram.lock().ok()?;
        (!h.is_empty()).then(|| {
            (
                Duration::from_micros(h.value_at_quantile(0.5)),
                Duration::from_micros(h.value_at_quantile(0.99)),
            )
        })
    }
}

/// The sink closure: delivers and times each call.
pub(crate) fn sink_fn(
    target: Target,
    latencies: Arc<Latencies>,
) -> impl Fn(Delivery<Line>) -> Result<(), SinkError> + Send + Sync + 'static {
    move |d| {
        let started = Instant::now();
        let result = target.deliver(&d);
        latencies.record(started.elapsed());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_or_by_path() {
        assert!(find_program("sh").is_ok());
        assert!(find_program("/bin/sh").is_ok());
        assert!(find_program("no-such-program-conveyor").is_err());
        assert!(find_program("/").unwrap_err().contains("directory"));
        let err = ExecSink::new(
            &["no-such-program-conveyor".into()],
            Duration::from_secs(1),
            false,
        )
        .unwrap_err();
        assert!(err.contains("PATH"), "{err}");
    }

    #[test]
    fn a_script_whose_interpreter_cannot_run_is_refused_at_the_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            vec![path.to_str().unwrap().to_owned()]
        };
        let new = |argv: Vec<String>| ExecSink::new(&argv, Duration::from_secs(1), false);
        let err = new(script("bad.py", "#!/no/such/python3 -u\nprint(1)\n")).unwrap_err();
        assert!(err.contains("#!/no/such/python3 -u"), "{err}");
        assert!(err.contains("--exec python3"), "{err}");
        assert!(new(script("good.sh", "#!/bin/sh\ncat\n")).is_ok());
        assert!(new(script("env.sh", "#! /usr/bin/env sh\ncat\n")).is_ok());
        assert!(new(script("plain", "cat\n")).is_ok());
    }

    #[test]
    fn stderr_tail_is_short_and_one_line() {
        assert_eq!(tail("a\nb\n"), "a | b");
        let long = "x".repeat(1000);
        assert_eq!(tail(&long).len(), STDERR_TAIL + 1);
    }

    #[test]
    fn only_the_end_of_a_long_stderr_is_kept() {
        let mut child = Command::new("sh")
            .args([
                "-c",
                "head -c 100000 /dev/zero | tr '\\0' x >&2; echo last words >&2",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = StderrTail::start(child.stderr.take().unwrap());
        child.wait().unwrap();
        let _ = stderr.eof.recv();
        assert!(stderr.text.lock().unwrap().len() <= 2 * STDERR_KEEP);
        let tail = stderr.finish();
        assert!(tail.ends_with("xxlast words"), "{tail}");
        assert_eq!(tail.chars().count(), STDERR_TAIL + 1);
    }

    #[test]
    fn latency_percentiles() {
        let l = Latencies::new();
        assert!(l.percentiles().is_none());
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let (p50, p99) = l.percentiles().unwrap();
        assert!(
            p50 >= Duration::from_millis(49) && p50 <= Duration::from_millis(51),
            "{p50:?}"
        );
        assert!(
            p99 >= Duration::from_millis(98) && p99 <= Duration::from_millis(100),
            "{p99:?}"
        );
    }
}
