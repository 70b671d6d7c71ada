//! The agent's stream to the controller (`AgentGateway.Connect`).
//!
//! Producers hand FlowReports and Detections to a [`StreamHandle`]; each gets
//! the next per-agent sequence number and is written to the on-disk
//! [`journal`] before anything is sent. A background task keeps one stream
//! open (reconnecting with jittered exponential [`backoff`]), says Hello with
//! the journal's drop counters, sends everything unacknowledged in order,
//! and removes what the controller acknowledges. Commands from the
//! controller (Block, Unblock, SetCap, PolicyUpdate) come out of
//! [`StreamHandle::commands`]; the caller applies them and answers with
//! [`StreamHandle::ack_command`].

pub mod backoff;
pub mod client;
pub mod journal;

pub use client::{Command, StreamConfig, StreamError, StreamHandle, StreamStats, TlsFiles};
