//! A paced bulk upload from one workload cgroup, measured end to end: when
//! the payload crossed the threshold, when the controller opened the
//! incident, when the last byte reached the receiver (the kernel drops the
//! rest), and how much got out. Used by the demo and the time-to-contain
//! benchmark.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::bail;
use exfilguard_tests::{ChildGuard, Lab, TestCgroup, process::python3};

use crate::{
    demo::{check_interrupt, clock, mb, note, short_workload},
    scripts,
    stack::Stack,
};

/// What to send, from where, to where.
pub struct Upload<'a> {
    /// The lab.
    pub lab: &'a Lab,
    /// The sending workload.
    pub cg: &'a TestCgroup,
    /// A [`scripts::PROGRESS_SINK`] at `to`.
    pub sink: &'a ChildGuard,
    /// exfilguard.
    pub stack: &'a Stack,
    /// Destination.
    pub to: SocketAddr,
    /// Payload bytes if nothing stops it.
    pub total: u64,
    /// Pace, bytes/s.
    pub rate: u64,
    /// The volume threshold in force.
    pub threshold: u64,
}

/// The measurements (Unix ms; 0 when it did not happen).
#[derive(Debug, Default)]
pub struct Bulk {
    /// When the payload reached the threshold.
    pub crossed_ms: u64,
    /// When the incident was opened at the controller.
    pub detected_ms: u64,
    /// When the last byte reached the receiver.
    pub last_byte_ms: u64,
    /// When the agent confirmed the Block (timeline).
    pub block_ack_ms: u64,
    /// Bytes the receiver got.
    pub received: u64,
    /// How the sender ended (`stopped after … TimeoutError` or `done …`).
    pub sender_end: String,
}

fn parse_line(line: &str, tag: &str) -> Option<(f64, u64)> {
    let mut it = line.strip_prefix(tag)?.split_whitespace();
    let t: f64 = it.next()?.parse().ok()?;
    let n: u64 = it.next()?.parse().ok()?;
    Some((t, n))
}

/// Runs the upload; `verbose` prints progress for a person watching.
pub fn run(u: &Upload<'_>, verbose: bool) -> anyhow::Result<Bulk> {
    let sender = u.lab.client().spawn(
        Some(u.cg),
        &[
            python3(),
            "-c",
            scripts::RATE_SEND,
            &u.to.ip().to_string(),
            &u.to.port().to_string(),
            &u.total.to_string(),
            &u.rate.to_string(),
        ],
    );
    let mut bulk = Bulk::default();
    let mut prev: Option<(f64, u64)> = None;
    let step = (u.threshold / 4).max(1);
    let deadline = Instant::now() + Duration::from_secs(u.total / u.rate.max(1) + 20);
    loop {
        let Some(line) = sender.next_line(deadline.saturating_duration_since(Instant::now()))
        else {
            bail!("the upload said nothing: {}", sender.transcript());
        };
        if let Some((t, n)) = parse_line(&line, "progress ") {
            if bulk.crossed_ms == 0 && n >= u.threshold {
                // Interpolated between progress lines: when the payload
                // reached the threshold. The kernel's count (IP and TCP
                // headers once per GSO packet) gets there at most ~0.5%
                // of the payload earlier.
                let (t0, n0) = prev.unwrap_or((t, n));
                let frac = if n > n0 {
                    (u.threshold - n0.min(u.threshold)) as f64 / (n - n0) as f64
                } else {
                    0.0
                };
                bulk.crossed_ms = ((t0 + (t - t0) * frac) * 1000.0) as u64;
                if verbose {
                    note(&format!(
                        "{} the threshold ({}) is crossed",
                        clock(bulk.crossed_ms),
                        mb(u.threshold)
                    ));
                }
            }
            if verbose && n / step > prev.map_or(0, |(_, p)| p / step) {
                note(&format!(
                    "{} … {} sent",
                    clock((t * 1000.0) as u64),
                    mb(n / step * step)
                ));
            }
            prev = Some((t, n));
        } else if line.starts_with("stopped") || line.starts_with("done") {
            let mut it = line.split_whitespace();
            let word = it.next().unwrap_or_default();
            let _t = it.next();
            let sent: u64 = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let why = it.next().unwrap_or("");
            bulk.sender_end = format!("{word} after {} {why}", mb(sent));
            break;
        }
        check_interrupt()?;
    }
    if bulk.crossed_ms == 0
        && let Some((t, n)) = prev
        && n < u.threshold
        && bulk.sender_end.starts_with("stopped")
    {
        // Contained between two progress lines, before the payload itself
        // reached the threshold (the kernel's count includes headers): the
        // crossing is extrapolated at the pace from the last line.
        let at = t + (u.threshold - n) as f64 / u.rate.max(1) as f64;
        bulk.crossed_ms = (at * 1000.0) as u64;
    }
    let end = u.sink.wait_for_line(
        "the receiver closing",
        |l| l.starts_with("end "),
        Duration::from_secs(15),
    );
    if let Some((t, n)) = parse_line(&end, "end ") {
        bulk.last_byte_ms = (t * 1000.0) as u64;
        bulk.received = n;
    }
    let name = u.cg.name();
    // The Block's acknowledgement may trail the incident by a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(i) = u
            .stack
            .incidents()?
            .into_iter()
            .find(|i| short_workload(i) == name)
        {
            bulk.detected_ms = i.opened_at_unix_ms;
            bulk.block_ack_ms = i
                .timeline
                .iter()
                .find(|t| t.cause.contains("in-kernel Block applied"))
                .map(|t| t.at_unix_ms)
                .unwrap_or(0);
        }
        if bulk.block_ack_ms > 0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(bulk)
}
