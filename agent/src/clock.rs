//! The kernel programs stamp packets with `bpf_ktime_get_boot_ns`
//! (`CLOCK_BOOTTIME`, which keeps counting through suspend); this converts
//! those stamps to wall-clock time.
use std::time::{Duration, SystemTime};

/// Nanoseconds on `CLOCK_BOOTTIME` now.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_BOOTTIME exists on every Linux the agent supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall-clock time of a `CLOCK_BOOTTIME` stamp.
pub fn boot_to_wall(boot_ns: u64) -> SystemTime {
    let now_boot = boottime_ns();
    let now_wall = SystemTime::now();
    if boot_ns <= now_boot {
        now_wall - Duration::from_nanos(now_boot - boot_ns)
    } else {
        now_wall + Duration::from_nanos(boot_ns - now_boot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_advances_and_converts_near_now() {
        let a = boottime_ns();
        let b = boottime_ns();
        assert!(b >= a);
        let wall = boot_to_wall(b);
        let skew = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(skew < Duration::from_secs(1), "skew {skew:?}");
    }
}
