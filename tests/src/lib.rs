//! Kernel-test harness: network namespaces joined by a veth pair, child cgroups,
//! private bpffs mounts, and traffic generators with exact byte accounting.
//!
//! Everything here needs root and changes kernel state, so every object is a guard
//! that undoes itself on `Drop` (also while unwinding from a failed assertion), and
//! every name carries a per-process, per-object prefix `eg{pid}x{counter}` so that
//! parallel test threads and parallel test runs never touch each other's state.
//!
//! A test starts with [`kernel_test_guard`], which says out loud why it skips:
//!
//! ```no_run
//! use exfilguard_tests::{Lab, TestCgroup, kernel_test_guard, traffic};
//!
//! if !kernel_test_guard(&["ip", "python3"]) {
//!     return;
//! }
//! let lab = Lab::new();
//! let cg = TestCgroup::new();
//! let sink = traffic::UdpSink::start(lab.peer(), (lab.peer_v4(), 9000).into());
//! traffic::send_udp(lab.client(), &cg, sink.addr(), 3, 200);
//! assert_eq!(sink.collect(3, std::time::Duration::from_secs(5)).units, 3);
//! ```

pub mod bpffs;
pub mod cgroup;
pub mod dns;
mod naming;
pub mod netns;
pub mod probe;
pub mod process;
pub mod skip;
pub mod traffic;
pub mod tunnel;

pub use bpffs::BpfFs;
pub use cgroup::TestCgroup;
pub use naming::unique_name;
pub use netns::{Lab, Netns};
pub use process::ChildGuard;
pub use skip::{kernel_test_guard, require_root};
pub use traffic::Family;
