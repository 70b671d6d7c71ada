//! exfilguard node agent.
//!
//! The data path reads in one direction: the kernel programs count and
//! capture ([`datapath`]), the agent collects deltas ([`flows`]) and DNS
//! payloads ([`datapath::events`]), and later stages attribute and detect.
pub mod cidr;
pub mod clock;
pub mod datapath;
pub mod flows;
pub mod stream;
pub mod telemetry;
