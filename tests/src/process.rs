//! Running helper programs with bounded waits, and guards for long-lived ones.
//!
//! Commands are built by [`Netns::command`](crate::Netns::command) (which places them in
//! a namespace and optionally a cgroup); this module runs them. Nothing here waits
//! without a deadline, and nothing signals a process it did not start: a
//! [`ChildGuard`] kills exactly its own child, by PID, on `Drop`.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver},
    },
    thread,
    time::{Duration, Instant},
};

/// Deadline for short helper commands (`ip`, `dig`, one-shot traffic senders).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a killed child gets to be reaped before `Drop` gives up and reports it.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait for a child's pipes to close after it exited; a grandchild that
/// inherited them would otherwise keep a reader blocked forever.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// `python3` for the inline traffic scripts.
///
/// Prefers the distribution interpreter: a pyenv shim also works under
/// `ip netns exec` (PATH is inherited) but costs a shell and a `pyenv` lookup per run.
pub fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Polls `child` until it exits or `timeout` passes; `None` on timeout.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("wait for pid {}: {e}", child.id()),
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Reads a whole pipe on a thread and hands the bytes over a channel, so the caller
/// can bound how long it waits for them.
fn drain<R: std::io::Read + Send + 'static>(mut pipe: R) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error (EIO after the writer vanished) just ends the capture.
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cmd` to completion within `timeout` and returns its output, whatever its exit
/// status. Panics (naming `what`) if it cannot start or overruns; an overrunning child
/// is killed and reaped first.
pub fn output(mut cmd: Command, what: &str, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: spawn {cmd:?}: {e}"));
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let status = wait_timeout(&mut child, timeout);
    let status = match status {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = wait_timeout(&mut child, REAP_TIMEOUT);
            let out = stdout.recv_timeout(PIPE_DRAIN_TIMEOUT).unwrap_or_default();
            let err = stderr.recv_timeout(PIPE_DRAIN_TIMEOUT).unwrap_or_default();
            panic!(
                "{what}: still running after {timeout:?}, killed pid {}\ncommand: {cmd:?}\nstdout: {}\nstderr: {}",
                child.id(),
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err),
            );
        }
    };
    let collect = |rx: Receiver<Vec<u8>>, name: &str| {
        rx.recv_timeout(PIPE_DRAIN_TIMEOUT).unwrap_or_else(|_| {
            panic!("{what}: {name} still open {PIPE_DRAIN_TIMEOUT:?} after exit (a grandchild holds it?)")
        })
    };
    Output {
        status,
        stdout: collect(stdout, "stdout"),
        stderr: collect(stderr, "stderr"),
    }
}

/// Like [`output`], but panics unless the command succeeds; returns its stdout.
pub fn run_ok(cmd: Command, what: &str, timeout: Duration) -> String {
    let shown = format!("{cmd:?}");
    let out = output(cmd, what, timeout);
    if !out.status.success() {
        panic!(
            "{what}: {} failed\ncommand: {shown}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A long-lived child (a server, a sink) that is killed by PID and reaped on `Drop`.
///
/// Its stdout and stderr are read line by line on background threads: lines can be
/// awaited with a deadline ([`ChildGuard::wait_for_line`]) and the whole transcript is
/// kept for panic messages.
pub struct ChildGuard {
    child: Child,
    what: String,
    lines: Receiver<String>,
    transcript: Arc<Mutex<Vec<String>>>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured; `what` names it in
    /// messages.
    pub fn spawn(mut cmd: Command, what: impl Into<String>) -> Self {
        let what = what.into();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: spawn {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for (pipe, tag) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, "out"),
            (Box::new(stderr), "err"),
        ] {
            let tx = tx.clone();
            let transcript = Arc::clone(&transcript);
            // Detached on purpose: a grandchild holding the pipe must not block Drop.
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    transcript
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("[{tag}] {line}"));
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            what,
            lines,
            transcript,
        }
    }

    /// The child's PID (the final program's: `ip netns exec` and our `sh` wrapper exec
    /// in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child printed so far, stdout and stderr interleaved and tagged.
    pub fn transcript(&self) -> String {
        self.transcript
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// The next line (from stdout or stderr), or `None` if none arrives within `timeout`
    /// or the child closed both pipes.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits for a line satisfying `pred`, skipping others; panics with the transcript if
    /// none comes within `timeout`. `expected` describes the line for that message.
    pub fn wait_for_line(
        &self,
        expected: &str,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(e) => panic!(
                    "{}: no line {expected:?} within {timeout:?} ({e}); transcript:\n{}",
                    self.what,
                    self.transcript()
                ),
            }
        }
    }

    /// Whether the child is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the child to exit by itself; panics with the transcript on timeout.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        wait_timeout(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "{}: pid {} still running after {timeout:?}; transcript:\n{}",
                self.what,
                self.child.id(),
                self.transcript()
            )
        })
    }

    /// Kills the child (SIGKILL, by PID) if it is still running and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // `Child::kill` signals exactly this PID; it cannot have been reused because we
        // have not reaped it yet.
        if let Err(e) = self.child.kill() {
            eprintln!("{}: kill pid {}: {e}", self.what, self.child.id());
        }
        wait_timeout(&mut self.child, REAP_TIMEOUT)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.kill().is_none() {
            // Report, don't panic: we may already be unwinding.
            eprintln!(
                "{}: pid {} not reaped within {REAP_TIMEOUT:?} after SIGKILL",
                self.what,
                self.child.id()
            );
        }
    }
}

/// A binary of the workspace (`exfilguard-agent`, `exfilguard-controller`,
/// `exfilctl`): in `EXFILGUARD_BIN_DIR` (set by `cargo xtask test`, which
/// builds them first), else in the profile directory this executable was
/// built into.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("EXFILGUARD_BIN_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            // Test executables live in `target/<profile>/deps`, binaries in
            // `target/<profile>`.
            let exe = std::env::current_exe().ok()?;
            let dir = exe.parent()?;
            Some(if dir.ends_with("deps") {
                dir.parent()?.to_path_buf()
            } else {
                dir.to_path_buf()
            })
        })
        .expect("no EXFILGUARD_BIN_DIR and no test executable path");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p exfilguard-agent -p exfilguard-controller`), \
         or run the tests with `cargo xtask test`",
        bin.display()
    );
    bin
}
