//! The kernel programs stamp packets with the coarse monotonic clock
//! (`bpf_ktime_get_coarse_ns`, i.e. `CLOCK_MONOTONIC_COARSE`); this reads the
//! same clock in user space and converts its stamps to wall-clock time.
use std::time::{Duration, SystemTime};

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer and the clock ids below exist on
    // every Linux the agent supports.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall-clock now in Unix milliseconds (the contract's time unit).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Now, on the clock the kernel programs stamp with (ns).
pub fn kernel_now_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC_COARSE)
}

/// Wall-clock time of a kernel stamp.
pub fn kernel_to_wall(stamp_ns: u64) -> SystemTime {
    // The fine clock, so the offset to wall time is exact to the tick.
    let now_mono = read(libc::CLOCK_MONOTONIC);
    let now_wall = SystemTime::now();
    if stamp_ns <= now_mono {
        now_wall - Duration::from_nanos(now_mono - stamp_ns)
    } else {
        now_wall + Duration::from_nanos(stamp_ns - now_mono)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_advance_and_convert_near_now() {
        let a = kernel_now_ns();
        std::thread::sleep(Duration::from_millis(20));
        let b = kernel_now_ns();
        assert!(b > a, "coarse clock did not advance in 20 ms");
        let skew = SystemTime::now()
            .duration_since(kernel_to_wall(b))
            .unwrap_or_default();
        assert!(skew < Duration::from_secs(1), "skew {skew:?}");
    }
}
