//! Running child processes with errors that name the command that failed.
use std::{
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", describe(cmd)))?;
    check(cmd, status)
}

/// Fails, naming `cmd`, unless `status` is success.
pub fn check(cmd: &Command, status: ExitStatus) -> anyhow::Result<()> {
    if !status.success() {
        bail!("`{}` failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` with its output captured, and shows that output only if it
/// fails: for chatty installers whose success needs no page of log.
pub fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{}`", describe(cmd)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed: {}\n{}{}",
            describe(cmd),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; stderr is passed through so a failure
/// explains itself.
pub fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{}`", describe(cmd)))?;
    check(cmd, output.status)?;
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", describe(cmd)))
}

/// Runs `cmd` with its output discarded; `Ok(false)` if it failed or was
/// still running after `timeout` (then it is killed). Meant for attempts that
/// have a fallback, such as a download that may hang on a closed network.
pub fn try_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<bool> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting `{}`", describe(cmd)))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for `{}`", describe(cmd)))?
        {
            return Ok(status.success());
        }
        if Instant::now() >= deadline {
            // Our own child, killed by its pid; reaped right after.
            child
                .kill()
                .with_context(|| format!("stopping `{}` after {timeout:?}", describe(cmd)))?;
            child
                .wait()
                .with_context(|| format!("waiting for `{}`", describe(cmd)))?;
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(100));
    }
}
