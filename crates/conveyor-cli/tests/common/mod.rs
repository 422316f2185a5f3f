//! Helpers shared by the CLI tests: the binary, input files, and the recording server.

#![allow(dead_code, unused_imports)] // each test file uses a different subset

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

pub use conveyor_cli::server::{Arrival, Reply, Server};

/// The `conveyor` binary under test, run in `dir` (so `.conveyor/` journals land there).
pub fn conveyor(dir: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("conveyor").expect("the conveyor binary builds");
    cmd.current_dir(dir).timeout(Duration::from_secs(60));
    cmd
}

/// The path of the binary, for tests that need a raw `std::process::Command` (signals, stdin).
pub fn conveyor_path() -> PathBuf {
    assert_cmd::cargo::cargo_bin("conveyor")
}

/// Writes `lines` to `dir/name`, one per line.
pub fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
    path
}

/// `{"id":i,"user":"u{i % users}"}` for i in 0..n.
pub fn items(n: u64, users: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!(r#"{{"id":{i},"user":"u{}"}}"#, i % users))
        .collect()
}

/// The `id` field of every arrival's body, in arrival order.
pub fn ids(arrivals: &[Arrival]) -> Vec<u64> {
    arrivals
        .iter()
        .map(|a| a.json().expect("JSON body")["id"].as_u64().expect("id"))
        .collect()
}

/// Waits until `condition` holds, failing the test after a generous deadline.
pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// stdout and stderr as text.
pub fn texts(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The `--json` summary (the last line of stdout).
pub fn summary(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no summary on stdout; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str(last).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {last}"))
}

/// `conveyor send INPUT --to URL --no-journal --json EXTRA...`, run to completion.
pub fn send_in_memory(dir: &Path, input: &Path, url: &str, extra: &[&str]) -> Output {
    conveyor(dir)
        .args([
            "send",
            input.to_str().unwrap(),
            "--to",
            url,
            "--no-journal",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// Asserts the exit code (showing both outputs if it differs) and returns (stdout, stderr).
pub fn expect_exit(output: &Output, code: i32) -> (String, String) {
    let (stdout, stderr) = texts(output);
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    (stdout, stderr)
}

/// Starts `conveyor ARGS...` in `dir` with stdin, stdout and stderr piped, for tests that signal
/// it, feed it, or close its output while it runs.
pub fn spawn(dir: &Path, args: &[&str]) -> std::process::Child {
    std::process::Command::new(conveyor_path())
        .current_dir(dir)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends signal `name` (`INT`, `TERM`, ...) to a running child.
pub fn signal(child: &std::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} failed");
}

/// Interrupts a running `send` twice, as a user pressing Ctrl-C twice does, and returns what it
/// printed and how it exited. The second SIGINT goes only once the run says it took the first:
/// two signals sent while the child is not scheduled in between merge into one, which the run
/// (rightly) takes as a single Ctrl-C.
pub fn interrupt_twice(mut child: std::process::Child) -> std::process::Output {
    use std::io::{BufRead, Read};
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            if line.contains("interrupted") {
                let _ = tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    signal(&child, "INT");
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("the run did not say it took the first Ctrl-C");
    signal(&child, "INT");
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout piped")
        .read_to_end(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap().into_bytes();
    std::process::Output {
        status,
        stdout,
        stderr,
    }
}

/// A server that answers `reply()` to the line with this `id` while the returned flag is set
/// (clear it to "fix the cause"), and 200 to every other line.
pub fn server_failing_id(
    id: u64,
    reply: impl Fn() -> Reply + Send + Sync + 'static,
) -> (Server, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let broken = std::sync::Arc::new(AtomicBool::new(true));
    let flag = std::sync::Arc::clone(&broken);
    let server = Server::start(move |a| {
        if a.json().unwrap()["id"] == id && flag.load(Ordering::SeqCst) {
            reply()
        } else {
            Reply::ok()
        }
    })
    .unwrap();
    (server, broken)
}

/// A tmpfs of `size` mounted on a fresh directory while it lives, for a real "disk full"
/// (`mount` needs root, as CI runs; the engine's tests do the same).
pub struct TinyDisk {
    pub dir: tempfile::TempDir,
}

impl TinyDisk {
    pub fn new(size: &str) -> TinyDisk {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "mounting a tmpfs failed: this test needs root (as CI has)"
        );
        TinyDisk { dir }
    }

    /// Gives the file system `size`, as an operator freeing space would.
    pub fn grow(&self, size: &str) {
        let remounted = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(remounted.success());
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}
