//! Child cgroups (v2) that a test's workload runs in.

use std::{
    env, fs,
    io::ErrorKind,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{Signal, kill},
        statfs::{CGROUP2_SUPER_MAGIC, statfs},
    },
    unistd::Pid,
};

use crate::naming::UniqueId;

/// Environment variable naming the cgroup v2 mount to create test cgroups under.
pub const CGROUP_ROOT_ENV: &str = "EXFILGUARD_CGROUP_ROOT";

/// Where this machine kind mounts cgroup v2 (hybrid hierarchy; v1 controllers live
/// beside it). On a Kubernetes node it is usually `/sys/fs/cgroup` itself.
const HYBRID_CGROUP2: &str = "/sys/fs/cgroup/unified";
const UNIFIED_CGROUP2: &str = "/sys/fs/cgroup";

/// How long `Drop` waits for killed members to leave before removing the directory.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);
/// `rmdir` attempts (with a short pause between) before `Drop` gives up and reports.
const RMDIR_ATTEMPTS: u32 = 20;

/// Whether `path` is the root (or any directory) of a cgroup v2 mount.
pub fn is_cgroup2(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 directory test cgroups are created under: `$EXFILGUARD_CGROUP_ROOT`
/// if set, else `/sys/fs/cgroup/unified` if that is a cgroup2 mount, else
/// `/sys/fs/cgroup`. Not checked here; see [`TestCgroup::new`].
pub fn cgroup_root() -> PathBuf {
    if let Some(root) = env::var_os(CGROUP_ROOT_ENV) {
        return root.into();
    }
    if is_cgroup2(Path::new(HYBRID_CGROUP2)) {
        HYBRID_CGROUP2.into()
    } else {
        UNIFIED_CGROUP2.into()
    }
}

/// A child cgroup `eg{pid}x{counter}` under [`cgroup_root`], removed on `Drop`.
///
/// Its id ([`TestCgroup::id`]) is the directory's inode number, which is what
/// `bpf_skb_cgroup_id` and `bpf_get_current_cgroup_id` return for it. Processes are put
/// into it with [`Netns::command`](crate::Netns::command) and friends. On `Drop`, any
/// process still inside is killed: the cgroup is ours, so its members are processes this
/// test started (or their children), never anyone else's.
#[derive(Debug)]
pub struct TestCgroup {
    name: String,
    path: PathBuf,
    id: u64,
}

impl TestCgroup {
    /// Creates the cgroup; panics if the root is not cgroup v2 or `mkdir` fails.
    pub fn new() -> Self {
        Self::under(&cgroup_root())
    }

    /// Creates a cgroup with a chosen (readable) name under `root`, e.g. a
    /// workload of the demo lab. The caller keeps names unique; a name that
    /// exists already is an error, so nobody else's cgroup is ever adopted.
    pub fn named_under(root: &Path, name: &str) -> Self {
        assert!(
            is_cgroup2(root),
            "{} is not a cgroup v2 mount (set {CGROUP_ROOT_ENV})",
            root.display()
        );
        let path = root.join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        let mut cg = Self {
            name: name.to_string(),
            path,
            id: 0,
        };
        cg.id = fs::metadata(&cg.path)
            .unwrap_or_else(|e| panic!("stat cgroup {}: {e}", cg.path.display()))
            .ino();
        cg
    }

    /// Creates the cgroup under an explicit cgroup v2 directory.
    pub fn under(root: &Path) -> Self {
        assert!(
            is_cgroup2(root),
            "{} is not a cgroup v2 mount (set {CGROUP_ROOT_ENV})",
            root.display()
        );
        let name = UniqueId::next().prefix();
        let path = root.join(&name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        // Owned by a guard before the next step can panic, so the directory goes away.
        let mut cg = Self { name, path, id: 0 };
        cg.id = fs::metadata(&cg.path)
            .unwrap_or_else(|e| panic!("stat cgroup {}: {e}", cg.path.display()))
            .ino();
        cg
    }

    /// The directory name (unique per test).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id: the directory's inode number, as `bpf_skb_cgroup_id` reports it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `cgroup.procs`: writing a PID moves that process in.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// PIDs currently in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        let procs = self.procs_file();
        let text =
            fs::read_to_string(&procs).unwrap_or_else(|e| panic!("read {}: {e}", procs.display()));
        parse_pids(&text)
    }

    /// Kills every member and waits (bounded) until none is left; `Err` says why not.
    fn empty(&self) -> Result<(), String> {
        let procs = self.procs_file();
        let deadline = Instant::now() + EMPTY_TIMEOUT;
        loop {
            let pids = match fs::read_to_string(&procs) {
                Ok(text) => parse_pids(&text),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(format!("read {}: {e}", procs.display())),
            };
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "pids {pids:?} still present after {EMPTY_TIMEOUT:?}"
                ));
            }
            for pid in pids {
                let Ok(raw) = i32::try_from(pid) else {
                    continue;
                };
                // ESRCH just means it exited meanwhile.
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

fn parse_pids(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Report, never panic: a Drop may run while a failed test unwinds.
        if let Err(e) = self.empty() {
            eprintln!("empty cgroup {}: {e}", self.path.display());
        }
        // A killed member that is not yet reaped (a zombie) no longer counts, but the
        // kernel may need a moment to notice the cgroup is unpopulated: retry briefly.
        for attempt in 1..=RMDIR_ATTEMPTS {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(e) if attempt == RMDIR_ATTEMPTS => {
                    eprintln!("remove cgroup {}: {e}", self.path.display());
                }
                Err(_) => thread::sleep(Duration::from_millis(25)),
            }
        }
    }
}
