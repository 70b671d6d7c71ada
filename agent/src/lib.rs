//! exfilguard node agent.
//!
//! The data path reads in one direction: the kernel programs count and
//! capture ([`datapath`]), the agent collects deltas ([`flows`]) and DNS
//! payloads ([`datapath::events`]), attributes them to workloads
//! ([`attribution`], with pod names from [`pods`]), the detectors
//! ([`detect`]) turn them into detections under the [`policy`], and
//! [`stream`] carries them to the controller ([`uplink`] converts them and
//! applies the controller's commands).
pub mod analyze;
pub mod attribution;
pub mod cidr;
pub mod clock;
pub mod datapath;
pub mod detect;
pub mod engine;
pub mod flows;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod stream;
pub mod telemetry;
pub mod uplink;
