//! A reference `cgroup_skb/egress` byte counter, independent of the product.
//!
//! Fourteen hand-assembled BPF instructions that add `skb->len` and 1 to a two-counter
//! array map for every packet a cgroup sends, attached with a BPF link (closing the link
//! detaches it, so a crashed test leaves nothing attached). It exists so the harness can
//! check its own accounting rules ([`crate::traffic`]) against the kernel, and so agent
//! tests can compare the agent's numbers with an independent count. It uses nothing but
//! `bpf(2)`: no ELF, no loader library, no compiler.
//!
//! It attaches as a multi-program link, so it coexists with the agent's programs on the
//! same cgroup; it always returns 1 (pass), so it never changes a verdict.

use std::{
    fs::File,
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use crate::cgroup::TestCgroup;

// bpf(2) commands and constants, from include/uapi/linux/bpf.h.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;

/// `struct bpf_insn`: opcode, dst (low nibble) and src (high nibble) registers, offset,
/// immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The program. Registers: r1 = ctx (`struct __sk_buff *`), r6 = saved ctx,
/// r10 = frame pointer, r0 = return value.
fn program(map_fd: RawFd) -> [Insn; 14] {
    // Opcodes: ALU64|MOV|X = 0xbf, ALU64|MOV|K = 0xb7, ALU64|ADD|K = 0x07,
    // ST|MEM|W = 0x62, LD|IMM|DW = 0x18, JMP|CALL = 0x85, JMP|JEQ|K = 0x15,
    // LDX|MEM|W = 0x61, STX|ATOMIC|DW = 0xdb (imm BPF_ADD = 0), JMP|EXIT = 0x95.
    [
        insn(0xbf, 6, 1, 0, 0),                        // r6 = r1
        insn(0x62, 10, 0, -4, 0),                      // *(u32 *)(r10 - 4) = 0      (key)
        insn(0xbf, 2, 10, 0, 0),                       // r2 = r10
        insn(0x07, 2, 0, 0, -4),                       // r2 += -4                   (&key)
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),   // r1 = map (64-bit immediate, ...
        insn(0, 0, 0, 0, 0),                           // ... second half)
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM), // r0 = lookup(map, &key)
        insn(0x15, 0, 0, 4, 0),                        // if r0 == NULL goto pass
        insn(0x61, 1, 6, 0, 0), // r1 = skb->len              (offset 0 of __sk_buff)
        insn(0xdb, 0, 1, 0, 0), // atomic *(u64 *)(r0 + 0) += r1   (bytes)
        insn(0xb7, 1, 0, 0, 1), // r1 = 1
        insn(0xdb, 0, 1, 8, 0), // atomic *(u64 *)(r0 + 8) += r1   (packets)
        insn(0xb7, 0, 0, 0, 1), // pass: r0 = 1 (allow)
        insn(0x95, 0, 0, 0, 0), // exit
    ]
}

/// The leading fields of `union bpf_attr` for `BPF_MAP_CREATE`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    _pad: u32,
}

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The leading fields of `union bpf_attr` for `BPF_MAP_LOOKUP_ELEM`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The leading fields of `union bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// Calls `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `attr` must be the attribute struct `cmd` expects, and every pointer inside it must
/// be valid for the kernel to read (or write, for outputs) for the duration of the call.
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: upheld by the caller; the size passed is the struct's, and the kernel
    // zero-extends attributes shorter than its own `union bpf_attr`.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Wraps a file descriptor returned by `bpf(2)`.
fn owned_fd(ret: libc::c_long) -> OwnedFd {
    let fd = RawFd::try_from(ret).expect("bpf(2) returned an fd out of range");
    // SAFETY: the kernel just created `fd` for us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Bytes and packets a cgroup sent, as `cgroup_skb/egress` saw them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressCounts {
    /// Sum of `skb->len`.
    pub bytes: u64,
    /// Number of skbs.
    pub packets: u64,
}

/// A reference counter attached to one cgroup's egress; detached on `Drop`.
#[derive(Debug)]
pub struct EgressCounter {
    map: OwnedFd,
    // Dropping the link fd detaches the program; the program and map fds keep the
    // objects alive only as long as this guard.
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl EgressCounter {
    /// Loads the counter and attaches it to `cgroup`'s egress; panics with the verifier
    /// log if the kernel refuses it.
    pub fn attach(cgroup: &TestCgroup) -> Self {
        let map = Self::create_map().unwrap_or_else(|e| panic!("create counter map: {e}"));
        let prog = Self::load(map.as_raw_fd());
        let dir = File::open(cgroup.path())
            .unwrap_or_else(|e| panic!("open cgroup {}: {e}", cgroup.path().display()));
        let mut attr = LinkCreateAttr {
            prog_fd: fd_u32(prog.as_raw_fd()),
            target_fd: fd_u32(dir.as_raw_fd()),
            attach_type: BPF_CGROUP_INET_EGRESS,
            flags: 0,
        };
        // SAFETY: a BPF_LINK_CREATE attribute without pointers.
        let link = unsafe { sys_bpf(BPF_LINK_CREATE, &mut attr) }
            .map(owned_fd)
            .unwrap_or_else(|e| {
                panic!(
                    "attach egress counter to cgroup {}: {e}",
                    cgroup.path().display()
                )
            });
        Self {
            map,
            _link: link,
            _prog: prog,
        }
    }

    fn create_map() -> io::Result<OwnedFd> {
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 16,
            max_entries: 1,
            map_name: *b"eg_ref_egress\0\0\0",
            ..Default::default()
        };
        // SAFETY: a BPF_MAP_CREATE attribute without pointers.
        unsafe { sys_bpf(BPF_MAP_CREATE, &mut attr) }.map(owned_fd)
    }

    fn load(map_fd: RawFd) -> OwnedFd {
        let insns = program(map_fd);
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_SKB,
            insn_cnt: u32::try_from(insns.len()).expect("few instructions"),
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: u32::try_from(log.len()).expect("small log"),
            log_buf: log.as_mut_ptr() as u64,
            prog_name: *b"eg_ref_egress\0\0\0",
            expected_attach_type: BPF_CGROUP_INET_EGRESS,
            ..Default::default()
        };
        // SAFETY: `insns`, `license` and `log` outlive the call; `log_size` is `log`'s
        // length.
        match unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) } {
            Ok(fd) => owned_fd(fd),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                panic!(
                    "load egress counter: {e}\nverifier log:\n{}",
                    String::from_utf8_lossy(&log[..end])
                );
            }
        }
    }

    /// The counts so far (since attach).
    pub fn read(&self) -> EgressCounts {
        let key = 0u32;
        let mut value = [0u64; 2];
        let mut attr = MapElemAttr {
            map_fd: fd_u32(self.map.as_raw_fd()),
            key: std::ptr::from_ref(&key) as u64,
            value: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: `key` (4 bytes) and `value` (16 bytes) match the map's sizes and
        // outlive the call.
        unsafe { sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) }
            .unwrap_or_else(|e| panic!("read egress counter: {e}"));
        EgressCounts {
            bytes: value[0],
            packets: value[1],
        }
    }
}

fn fd_u32(fd: RawFd) -> u32 {
    u32::try_from(fd).expect("file descriptors are non-negative")
}
