//! Device access control for cgroup v2.
//!
//! cgroup2 has no `devices` controller: the kernel asks a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached
//! to the cgroup (and to its ancestors) whether a task may `open` or `mknod` a device node. This module
//! turns the v1-style rules podvisor already uses (`"c 1:3 rwm"`, `"b *:* m"`, `"a"`) into such a
//! program — allow rules in order, default deny — loads it and attaches it to a cgroup2 directory.
//!
//! Programs are attached with `BPF_F_ALLOW_MULTI`: the kernel then runs the programs of the cgroup *and*
//! those of its ancestors attached the same way for each access, and grants it only if all of them
//! return 1. A container cgroup
//! under a pod cgroup can therefore narrow, never widen, what the pod's filter allows, and it can attach
//! at all (with no flag, an ancestor's program forbids any program below it, and `BPF_F_ALLOW_OVERRIDE`
//! would let the child's program replace the parent's verdict).
//!
//! An attached program lives as long as the cgroup (or until detached); no file descriptor is kept.

use std::ffi::CStr;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, fstatfs, statfs};

/// Name given to every program this module loads; `apply` replaces only programs with this name.
pub const PROGRAM_NAME: &str = "podvisor_dev";

/// Why a device filter could not be parsed, loaded or attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceFilterError {
    /// A rule that is not `TYPE MAJOR:MINOR ACCESS` or `a`.
    #[error("invalid device rule {rule:?}: {reason}")]
    InvalidRule { rule: String, reason: &'static str },
    /// BPF_PROG_LOAD failed; `log` is the verifier's explanation (may be empty, e.g. for EPERM).
    #[error("loading the device filter program: {source}; verifier log:\n{log}")]
    Load { source: Errno, log: String },
    /// The cgroup directory could not be opened.
    #[error("opening cgroup {}: {source}", path.display())]
    Open { path: PathBuf, source: Errno },
    /// The directory is not on a cgroup2 filesystem.
    #[error("{} is not a cgroup2 directory", path.display())]
    NotCgroup2 { path: PathBuf },
    /// Attaching, detaching or querying programs failed.
    #[error("bpf({op}) on cgroup {}: {source}", path.display())]
    Bpf {
        op: &'static str,
        path: PathBuf,
        source: Errno,
    },
}

/// Which device nodes a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// `c`: character devices.
    Char,
    /// `b`: block devices.
    Block,
    /// `a`: both.
    All,
}

/// A set of device accesses; the bits are the kernel's `BPF_DEVCG_ACC_*` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Access(u8);

impl Access {
    /// `m`: create the node with mknod(2).
    pub const MKNOD: Access = Access(1);
    /// `r`: open for reading.
    pub const READ: Access = Access(2);
    /// `w`: open for writing.
    pub const WRITE: Access = Access(4);
    /// `rwm`.
    pub const ALL: Access = Access(7);

    /// The raw `BPF_DEVCG_ACC_*` bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Keeps only the known bits of `bits`.
    pub const fn from_bits_truncate(bits: u8) -> Access {
        Access(bits & Self::ALL.0)
    }

    /// Whether every access in `other` is in `self`.
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (flag, c) in [(Self::READ, 'r'), (Self::WRITE, 'w'), (Self::MKNOD, 'm')] {
            if self.contains(flag) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// One allow rule: device type, major and minor (`None` = `*`) and the accesses granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceRule {
    /// Device type.
    pub kind: DeviceKind,
    /// Major number; `None` matches any.
    pub major: Option<u32>,
    /// Minor number; `None` matches any.
    pub minor: Option<u32>,
    /// Accesses granted; a request is allowed if all it asks for is here.
    pub access: Access,
}

impl DeviceRule {
    /// `a`: every device, every access.
    pub const ALLOW_ALL: DeviceRule = DeviceRule {
        kind: DeviceKind::All,
        major: None,
        minor: None,
        access: Access::ALL,
    };
}

impl fmt::Display for DeviceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            DeviceKind::Char => 'c',
            DeviceKind::Block => 'b',
            DeviceKind::All => 'a',
        };
        let number = |n: Option<u32>| n.map_or_else(|| "*".to_owned(), |n| n.to_string());
        write!(
            f,
            "{kind} {}:{} {}",
            number(self.major),
            number(self.minor),
            self.access
        )
    }
}

impl FromStr for DeviceRule {
    type Err = DeviceFilterError;

    /// Parses `TYPE MAJOR:MINOR ACCESS` (`TYPE` one of `a b c`, numbers decimal or `*`, `ACCESS` a
    /// non-empty combination of `r w m`), or a lone `a` meaning everything.
    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        let bad = |reason| DeviceFilterError::InvalidRule {
            rule: rule.to_owned(),
            reason,
        };
        let mut fields = rule.split_ascii_whitespace();
        let kind = match fields.next() {
            Some("a") => DeviceKind::All,
            Some("b") => DeviceKind::Block,
            Some("c") => DeviceKind::Char,
            Some(_) => return Err(bad("the type must be a, b or c")),
            None => return Err(bad("empty rule")),
        };
        let Some(numbers) = fields.next() else {
            return match kind {
                DeviceKind::All => Ok(DeviceRule::ALLOW_ALL),
                _ => Err(bad("missing MAJOR:MINOR")),
            };
        };
        let (major, minor) = numbers.split_once(':').ok_or_else(|| bad("expected MAJOR:MINOR"))?;
        let major = parse_number(major).ok_or_else(|| bad("the major number must be * or a decimal u32"))?;
        let minor = parse_number(minor).ok_or_else(|| bad("the minor number must be * or a decimal u32"))?;
        let access = fields.next().ok_or_else(|| bad("missing access (r, w, m)"))?;
        let access = parse_access(access).ok_or_else(|| bad("the access must combine r, w and m, each once"))?;
        if fields.next().is_some() {
            return Err(bad("unexpected text after the access"));
        }
        Ok(DeviceRule {
            kind,
            major,
            minor,
            access,
        })
    }
}

/// `*` is `Some(None)`; a decimal u32 is `Some(Some(n))`; anything else `None`.
fn parse_number(text: &str) -> Option<Option<u32>> {
    if text == "*" {
        return Some(None);
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().map(Some)
}

fn parse_access(text: &str) -> Option<Access> {
    let mut access = Access::default();
    for c in text.chars() {
        let flag = match c {
            'r' => Access::READ,
            'w' => Access::WRITE,
            'm' => Access::MKNOD,
            _ => return None,
        };
        if access.contains(flag) {
            return None;
        }
        access = access | flag;
    }
    (access != Access::default()).then_some(access)
}

/// Parses v1-style device rules (see [`DeviceRule::from_str`]); the first malformed rule is an error.
pub fn parse_rules<S: AsRef<str>>(rules: &[S]) -> Result<Vec<DeviceRule>, DeviceFilterError> {
    rules.iter().map(|rule| rule.as_ref().parse()).collect()
}

// ---------------------------------------------------------------------------------------------------
// eBPF instructions (linux/bpf.h, linux/bpf_common.h).

/// One eBPF instruction, laid out like the kernel's `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// Opcode: class | size/mode or operation | source.
    pub code: u8,
    /// The `dst_reg:4, src_reg:4` bitfield byte.
    regs: u8,
    /// Jump or memory offset.
    pub off: i16,
    /// Immediate operand.
    pub imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        // C bitfields fill a byte from its least significant bit on little-endian targets, from its most
        // significant one on big-endian targets.
        let regs = if cfg!(target_endian = "little") {
            (dst & 0xf) | (src << 4)
        } else {
            (dst << 4) | (src & 0xf)
        };
        Insn { code, regs, off, imm }
    }

    /// The destination register.
    pub const fn dst(&self) -> u8 {
        if cfg!(target_endian = "little") {
            self.regs & 0xf
        } else {
            self.regs >> 4
        }
    }

    /// The source register.
    pub const fn src(&self) -> u8 {
        if cfg!(target_endian = "little") {
            self.regs >> 4
        } else {
            self.regs & 0xf
        }
    }
}

// Instruction classes, sizes, modes, operations and sources.
const BPF_LDX: u8 = 0x01;
const BPF_ALU: u8 = 0x04;
const BPF_JMP: u8 = 0x05;
const BPF_JMP32: u8 = 0x06;
const BPF_ALU64: u8 = 0x07;
const BPF_W: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_AND: u8 = 0x50;
const BPF_RSH: u8 = 0x70;
const BPF_MOV: u8 = 0xb0;
const BPF_JSET: u8 = 0x40;
const BPF_JNE: u8 = 0x50;
const BPF_EXIT: u8 = 0x90;
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;

// Registers: r0 holds the verdict, r1 the context; the program keeps the context fields in r2..r5.
const R0: u8 = 0;
const R1: u8 = 1;
const R_ACCESS: u8 = 2;
const R_TYPE: u8 = 3;
const R_MAJOR: u8 = 4;
const R_MINOR: u8 = 5;

// `struct bpf_cgroup_dev_ctx` field offsets and `access_type` encoding.
const CTX_ACCESS_TYPE: i16 = 0;
const CTX_MAJOR: i16 = 4;
const CTX_MINOR: i16 = 8;
const ACCESS_SHIFT: i32 = 16;
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;

const fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    Insn::new(BPF_LDX | BPF_W | BPF_MEM, dst, src, off, 0)
}
const fn alu32_imm(op: u8, dst: u8, imm: i32) -> Insn {
    Insn::new(BPF_ALU | op | BPF_K, dst, 0, 0, imm)
}
const fn mov32_reg(dst: u8, src: u8) -> Insn {
    Insn::new(BPF_ALU | BPF_MOV | BPF_X, dst, src, 0, 0)
}
const fn mov64_imm(dst: u8, imm: i32) -> Insn {
    Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, dst, 0, 0, imm)
}
/// 32-bit conditional jump against an immediate: compares all 32 bits of a u32 exactly.
const fn jmp32_imm(op: u8, dst: u8, imm: i32, off: i16) -> Insn {
    Insn::new(BPF_JMP32 | op | BPF_K, dst, 0, off, imm)
}
const fn exit() -> Insn {
    Insn::new(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
}

/// Compiles allow rules into a `BPF_PROG_TYPE_CGROUP_DEVICE` program: 1 (allow) if any rule matches, else 0.
///
/// Layout: a 6-instruction prologue loads the context into w2 (requested access), w3 (device type), w4
/// (major), w5 (minor). Each rule is one block of guards, `if w3 != TYPE`, `if w2 & ~ACCESS`,
/// `if w4 != MAJOR`, `if w5 != MINOR` (each only when the rule restricts it) jumping forward past the
/// block, followed by `r0 = 1; exit`. The program ends with `r0 = 0; exit`. A rule without guards
/// allows everything, so nothing is emitted after it (the verifier rejects unreachable code).
pub fn compile(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut prog = vec![
        ldx_w(R_ACCESS, R1, CTX_ACCESS_TYPE),
        mov32_reg(R_TYPE, R_ACCESS),
        alu32_imm(BPF_AND, R_TYPE, 0xffff),
        alu32_imm(BPF_RSH, R_ACCESS, ACCESS_SHIFT),
        ldx_w(R_MAJOR, R1, CTX_MAJOR),
        ldx_w(R_MINOR, R1, CTX_MINOR),
    ];
    for rule in rules {
        // (operation, register, immediate) of each guard that skips the block when it holds.
        let mut guards: Vec<(u8, u8, i32)> = Vec::with_capacity(4);
        match rule.kind {
            DeviceKind::Char => guards.push((BPF_JNE, R_TYPE, DEV_CHAR)),
            DeviceKind::Block => guards.push((BPF_JNE, R_TYPE, DEV_BLOCK)),
            DeviceKind::All => {}
        }
        let denied = !rule.access.bits() & Access::ALL.bits();
        if denied != 0 {
            guards.push((BPF_JSET, R_ACCESS, i32::from(denied)));
        }
        if let Some(major) = rule.major {
            guards.push((BPF_JNE, R_MAJOR, i32::from_ne_bytes(major.to_ne_bytes())));
        }
        if let Some(minor) = rule.minor {
            guards.push((BPF_JNE, R_MINOR, i32::from_ne_bytes(minor.to_ne_bytes())));
        }
        let count = guards.len(); // at most 4
        for (i, (op, reg, imm)) in guards.into_iter().enumerate() {
            // Past the guards after this one and `r0 = 1; exit`.
            let skip = (count - i + 1) as i16;
            prog.push(jmp32_imm(op, reg, imm, skip));
        }
        prog.extend([mov64_imm(R0, 1), exit()]);
        if count == 0 {
            return prog;
        }
    }
    prog.extend([mov64_imm(R0, 0), exit()]);
    prog
}

// ---------------------------------------------------------------------------------------------------
// The bpf(2) system call.

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_DETACH: libc::c_int = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_int = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
const BPF_OBJ_NAME_LEN: usize = 16;
/// No helper is called, so no GPL-only helper needs a GPL-compatible license; this is podvisor's own.
const LICENSE: &CStr = c"Apache-2.0";
const LOG_SIZE: usize = 1 << 20;

/// The `union bpf_attr` member of one command followed by zeros: the kernel wants unused bytes zero and
/// writes some results (e.g. the query revision) past the fields older headers list.
#[repr(C)]
struct Attr<T> {
    cmd: T,
    zero: [u64; 16],
}

impl<T> Attr<T> {
    fn new(cmd: T) -> Attr<T> {
        Attr { cmd, zero: [0; 16] }
    }
}

/// BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; BPF_OBJ_NAME_LEN],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// BPF_PROG_ATTACH / BPF_PROG_DETACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    relative_fd: u32,
}

/// BPF_PROG_QUERY, up to `revision`.
#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// BPF_PROG_GET_FD_BY_ID.
#[repr(C)]
#[derive(Default)]
struct GetFdById {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
    pad: u32,
}

/// BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_prog_info`, up to `name`.
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; BPF_OBJ_NAME_LEN],
}

// The UAPI sizes; none of these structs has implicit padding.
const _: () = {
    use std::mem::size_of;
    assert!(size_of::<Insn>() == 8 && size_of::<ProgLoad>() == 72 && size_of::<ProgAttach>() == 24);
    assert!(size_of::<ProgQuery>() == 64 && size_of::<GetFdById>() == 16 && size_of::<InfoByFd>() == 16);
    assert!(size_of::<ProgInfo>() == 80);
};

/// bpf(cmd, attr): the non-negative result or the errno.
fn sys_bpf<T>(cmd: libc::c_int, attr: &mut Attr<T>) -> Result<libc::c_long, Errno> {
    let size = std::mem::size_of::<Attr<T>>() as libc::c_uint;
    // SAFETY: `attr` is an exclusively borrowed, fully initialised #[repr(C)] struct without padding that
    // matches the kernel's `union bpf_attr` layout for `cmd` and is zero past it, `size` is its size, and
    // any pointer stored in it refers to a live buffer of the length stated next to it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size) };
    Errno::result(ret)
}

/// Takes ownership of a file descriptor the kernel just returned.
fn owned_fd(ret: libc::c_long) -> Result<OwnedFd, Errno> {
    let fd = RawFd::try_from(ret).map_err(|_| Errno::EBADF)?;
    // SAFETY: `fd` is a new descriptor returned by bpf(2) and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_u32(fd: &OwnedFd) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// Loads `insns` as a cgroup device program; on failure, reloads with a log to return the verifier's words.
fn load(insns: &[Insn]) -> Result<OwnedFd, DeviceFilterError> {
    let Ok(insn_cnt) = u32::try_from(insns.len()) else {
        let log = format!("{} instructions is too many", insns.len());
        return Err(DeviceFilterError::Load {
            source: Errno::E2BIG,
            log,
        });
    };
    let mut name = [0u8; BPF_OBJ_NAME_LEN];
    name[..PROGRAM_NAME.len()].copy_from_slice(PROGRAM_NAME.as_bytes());
    let attr = |log: &mut [u8]| {
        Attr::new(ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt,
            insns: insns.as_ptr() as u64,
            license: LICENSE.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: u32::try_from(log.len()).unwrap_or(0),
            log_buf: if log.is_empty() { 0 } else { log.as_mut_ptr() as u64 },
            prog_name: name,
            expected_attach_type: BPF_CGROUP_DEVICE,
            ..ProgLoad::default()
        })
    };
    let source = match sys_bpf(BPF_PROG_LOAD, &mut attr(&mut [])).and_then(owned_fd) {
        Ok(fd) => return Ok(fd),
        Err(errno) => errno,
    };
    let mut log = vec![0u8; LOG_SIZE];
    if let Ok(fd) = sys_bpf(BPF_PROG_LOAD, &mut attr(&mut log)).and_then(owned_fd) {
        return Ok(fd); // failed without a log, loaded with one: take it
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let log = String::from_utf8_lossy(&log[..end]).trim_end().to_owned();
    Err(DeviceFilterError::Load { source, log })
}

/// A cgroup2 directory opened for bpf(2).
struct CgroupDir<'a> {
    path: &'a Path,
    fd: OwnedFd,
}

impl<'a> CgroupDir<'a> {
    fn open(path: &'a Path) -> Result<CgroupDir<'a>, DeviceFilterError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(path, flags, Mode::empty()).map_err(|source| DeviceFilterError::Open {
            path: path.to_owned(),
            source,
        })?;
        match fstatfs(&fd) {
            Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Ok(CgroupDir { path, fd }),
            _ => Err(DeviceFilterError::NotCgroup2 { path: path.to_owned() }),
        }
    }

    fn error(&self, op: &'static str) -> impl FnOnce(Errno) -> DeviceFilterError {
        let path = self.path.to_owned();
        move |source| DeviceFilterError::Bpf { op, path, source }
    }

    fn attach(&self, prog: &OwnedFd, flags: u32) -> Result<(), DeviceFilterError> {
        let mut attr = Attr::new(ProgAttach {
            target_fd: fd_u32(&self.fd),
            attach_bpf_fd: fd_u32(prog),
            attach_type: BPF_CGROUP_DEVICE,
            attach_flags: flags,
            ..ProgAttach::default()
        });
        sys_bpf(BPF_PROG_ATTACH, &mut attr).map_err(self.error("BPF_PROG_ATTACH"))?;
        Ok(())
    }

    /// Detaches program `id`; false if it was no longer attached.
    fn detach(&self, id: u32) -> Result<bool, DeviceFilterError> {
        let Some(prog) = prog_fd_by_id(id).map_err(self.error("BPF_PROG_GET_FD_BY_ID"))? else {
            return Ok(false);
        };
        let mut attr = Attr::new(ProgAttach {
            target_fd: fd_u32(&self.fd),
            attach_bpf_fd: fd_u32(&prog),
            attach_type: BPF_CGROUP_DEVICE,
            ..ProgAttach::default()
        });
        match sys_bpf(BPF_PROG_DETACH, &mut attr) {
            Ok(_) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(source) => Err(self.error("BPF_PROG_DETACH")(source)),
        }
    }

    /// Ids of the device programs attached to this cgroup itself (not inherited ones).
    fn query(&self) -> Result<Vec<u32>, DeviceFilterError> {
        let mut ids = vec![0u32; 16];
        for _ in 0..8 {
            let mut attr = Attr::new(ProgQuery {
                target_fd: fd_u32(&self.fd),
                attach_type: BPF_CGROUP_DEVICE,
                prog_ids: ids.as_mut_ptr() as u64,
                prog_cnt: u32::try_from(ids.len()).unwrap_or(u32::MAX),
                ..ProgQuery::default()
            });
            let result = sys_bpf(BPF_PROG_QUERY, &mut attr);
            let count = usize::try_from(attr.cmd.prog_cnt).unwrap_or(usize::MAX);
            match result {
                Ok(_) => {
                    ids.truncate(count);
                    return Ok(ids);
                }
                Err(Errno::ENOSPC) if count > ids.len() => ids.resize(count, 0),
                Err(source) => return Err(self.error("BPF_PROG_QUERY")(source)),
            }
        }
        Err(self.error("BPF_PROG_QUERY")(Errno::ENOSPC))
    }

    fn programs(&self) -> Result<Vec<AttachedProgram>, DeviceFilterError> {
        let mut programs = Vec::new();
        for id in self.query()? {
            let name = match prog_fd_by_id(id).map_err(self.error("BPF_PROG_GET_FD_BY_ID"))? {
                Some(fd) => prog_name(&fd).map_err(self.error("BPF_OBJ_GET_INFO_BY_FD"))?,
                None => continue, // gone meanwhile
            };
            programs.push(AttachedProgram { id, name });
        }
        Ok(programs)
    }
}

/// A descriptor of program `id`, or `None` if it no longer exists.
fn prog_fd_by_id(id: u32) -> Result<Option<OwnedFd>, Errno> {
    let mut attr = Attr::new(GetFdById {
        prog_id: id,
        ..GetFdById::default()
    });
    match sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).and_then(owned_fd) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT) => Ok(None),
        Err(errno) => Err(errno),
    }
}

fn prog_name(prog: &OwnedFd) -> Result<String, Errno> {
    let mut info = ProgInfo::default();
    let mut attr = Attr::new(InfoByFd {
        bpf_fd: fd_u32(prog),
        info_len: std::mem::size_of::<ProgInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    });
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let end = info.name.iter().position(|&b| b == 0).unwrap_or(BPF_OBJ_NAME_LEN);
    Ok(String::from_utf8_lossy(&info.name[..end]).into_owned())
}

/// A device program attached directly to a cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedProgram {
    /// The kernel's program id.
    pub id: u32,
    /// Its name ([`PROGRAM_NAME`] for ours).
    pub name: String,
}

/// Installs a filter allowing only `rules` on the cgroup2 directory `cgroup_dir`, replacing the filter a
/// previous `apply` attached. The new program is attached before the old one is detached: in between
/// both run and only what both allow is allowed, so there is never a moment without a filter.
pub fn apply(cgroup_dir: &Path, rules: &[DeviceRule]) -> Result<(), DeviceFilterError> {
    let cgroup = CgroupDir::open(cgroup_dir)?;
    let prog = load(&compile(rules))?;
    let old = cgroup.programs()?;
    cgroup.attach(&prog, BPF_F_ALLOW_MULTI)?;
    for program in old.into_iter().filter(|p| p.name == PROGRAM_NAME) {
        cgroup.detach(program.id)?;
    }
    Ok(())
}

/// Detaches every device program attached to `cgroup_dir` itself (ours or not); returns how many.
pub fn detach_all(cgroup_dir: &Path) -> Result<usize, DeviceFilterError> {
    let cgroup = CgroupDir::open(cgroup_dir)?;
    let mut detached = 0;
    for id in cgroup.query()? {
        detached += usize::from(cgroup.detach(id)?);
    }
    Ok(detached)
}

/// The device programs attached to `cgroup_dir` itself, in the order they run.
pub fn attached(cgroup_dir: &Path) -> Result<Vec<AttachedProgram>, DeviceFilterError> {
    CgroupDir::open(cgroup_dir)?.programs()
}

/// Whether a cgroup2 hierarchy is mounted (pure or hybrid) and this process can load a device program.
/// Checked once per process.
pub fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let mounted = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .iter()
            .any(|dir| statfs(*dir).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC));
        mounted && load(&compile(&[])).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::process::{Command, Output};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    fn rules(text: &[&str]) -> Vec<DeviceRule> {
        match parse_rules(text) {
            Ok(rules) => rules,
            Err(err) => panic!("{err}"),
        }
    }

    // ---- parsing -------------------------------------------------------------------------------

    #[test]
    fn parses_valid_and_wildcard_rules() {
        let parsed = rules(&[
            "c 1:3 rwm",
            "b *:* m",
            "c 136:* rwm",
            "a",
            "c 4294967295:0 wr",
            " c  5:2\tmr \n",
        ]);
        let rule = |kind, major, minor, access| DeviceRule {
            kind,
            major,
            minor,
            access,
        };
        assert_eq!(
            parsed,
            [
                rule(DeviceKind::Char, Some(1), Some(3), Access::ALL),
                rule(DeviceKind::Block, None, None, Access::MKNOD),
                rule(DeviceKind::Char, Some(136), None, Access::ALL),
                DeviceRule::ALLOW_ALL,
                rule(DeviceKind::Char, Some(u32::MAX), Some(0), Access::READ | Access::WRITE),
                rule(DeviceKind::Char, Some(5), Some(2), Access::READ | Access::MKNOD),
            ]
        );
        assert_eq!(rules(&["a *:5 r"])[0].to_string(), "a *:5 r");
        assert_eq!(rules(&["c 1:3 mwr"])[0].to_string(), "c 1:3 rwm");
    }

    #[test]
    fn rejects_malformed_rules() {
        for bad in [
            "",
            "   ",
            "x 1:3 rwm",
            "c",
            "c 1:3",
            "c 1 rwm",
            "c 1:3:4 rwm",
            "c :3 rwm",
            "c 1: rwm",
            "c -1:3 rwm",
            "c +1:3 rwm",
            "c 4294967296:0 r",
            "c 1:3 rwx",
            "c 1:3 rr",
            "c 1:3 rwm extra",
            "c 1:** r",
            "c 0x1:3 r",
            "cc 1:3 r",
            "a 1:3",
        ] {
            match bad.parse::<DeviceRule>() {
                Err(DeviceFilterError::InvalidRule { rule, reason }) => {
                    assert_eq!(rule, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        let err = parse_rules(&["c 1:3 rwm", "c 1:3 q"]).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("invalid device rule \"c 1:3 q\": the access must combine r, w and m, each once")
        );
    }

    // ---- an interpreter for the instructions `compile` emits -----------------------------------

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Reg {
        Uninit,
        Ctx,
        Scalar(u64),
    }

    /// Runs `prog` on a `bpf_cgroup_dev_ctx`; rejects what the verifier would (unknown opcodes,
    /// backward or out-of-range jumps, uninitialised reads, bad context accesses).
    fn run(prog: &[Insn], ctx: [u32; 3]) -> Result<u64, String> {
        let mut regs = [Reg::Uninit; 11];
        regs[1] = Reg::Ctx;
        let mut pc = 0usize;
        loop {
            let insn = prog.get(pc).ok_or(format!("fell off the end at {pc}"))?;
            let (dst, src) = (usize::from(insn.dst()), usize::from(insn.src()));
            if dst > 10 || src > 10 {
                return Err(format!("bad register at {pc}"));
            }
            let scalar = |r: Reg| match r {
                Reg::Scalar(v) => Ok(v),
                other => Err(format!("{other:?} used as a scalar at {pc}")),
            };
            let imm32 = insn.imm as u32;
            let mut next = pc + 1;
            match insn.code {
                0x61 => {
                    if regs[src] != Reg::Ctx {
                        return Err(format!("load from non-context at {pc}"));
                    }
                    let field = match insn.off {
                        0 => ctx[0],
                        4 => ctx[1],
                        8 => ctx[2],
                        off => return Err(format!("context offset {off} at {pc}")),
                    };
                    regs[dst] = Reg::Scalar(u64::from(field));
                }
                0xbc => regs[dst] = Reg::Scalar(u64::from(scalar(regs[src])? as u32)),
                0x54 => regs[dst] = Reg::Scalar(u64::from(scalar(regs[dst])? as u32 & imm32)),
                0x74 if imm32 < 32 => regs[dst] = Reg::Scalar(u64::from((scalar(regs[dst])? as u32) >> imm32)),
                0xb7 => regs[dst] = Reg::Scalar(i64::from(insn.imm) as u64),
                0x56 | 0x46 => {
                    let value = scalar(regs[dst])? as u32;
                    let taken = if insn.code == 0x56 {
                        value != imm32
                    } else {
                        value & imm32 != 0
                    };
                    if insn.off < 0 {
                        return Err(format!("backward jump at {pc}"));
                    }
                    if taken {
                        next = pc + 1 + insn.off as usize;
                    }
                }
                0x95 => return scalar(regs[0]),
                code => return Err(format!("unexpected opcode {code:#x} at {pc}")),
            }
            pc = next;
        }
    }

    const BLOCK: u32 = 1;
    const CHAR: u32 = 2;

    fn verdict(prog: &[Insn], dev_type: u32, major: u32, minor: u32, access: Access) -> bool {
        let ctx = [(u32::from(access.bits()) << 16) | dev_type, major, minor];
        match run(prog, ctx) {
            Ok(1) => true,
            Ok(0) => false,
            other => panic!("{ctx:?}: {other:?}"),
        }
    }

    /// What the rules mean, independently of the compiler.
    fn reference(rules: &[DeviceRule], dev_type: u32, major: u32, minor: u32, access: Access) -> bool {
        rules.iter().any(|r| {
            let kind = match r.kind {
                DeviceKind::All => true,
                DeviceKind::Char => dev_type == CHAR,
                DeviceKind::Block => dev_type == BLOCK,
            };
            kind && r.major.is_none_or(|m| m == major)
                && r.minor.is_none_or(|m| m == minor)
                && r.access.contains(access)
        })
    }

    const DEFAULT_DEVICE_RULES: [&str; 10] = [
        "c *:* m",
        "b *:* m",
        "c 1:3 rwm",
        "c 1:5 rwm",
        "c 1:7 rwm",
        "c 1:8 rwm",
        "c 1:9 rwm",
        "c 5:0 rwm",
        "c 5:2 rwm",
        "c 136:* rwm",
    ];

    #[test]
    fn verdict_table() {
        let r = Access::READ;
        let w = Access::WRITE;
        let m = Access::MKNOD;
        let test_rules = rules(&["c 1:3 rwm", "c 1:5 r"]);
        let prog = compile(&test_rules);
        for (dev_type, major, minor, access, allowed) in [
            (CHAR, 1, 3, r | w, true),
            (CHAR, 1, 3, m, true),
            (CHAR, 1, 5, r, true),
            (CHAR, 1, 5, w, false),
            (CHAR, 1, 5, r | w, false),
            (CHAR, 1, 5, m, false),
            (CHAR, 1, 7, r, false),
            (BLOCK, 1, 3, r, false),
            (BLOCK, 8, 0, m, false),
            (CHAR, 3, 1, r, false),
        ] {
            assert_eq!(
                verdict(&prog, dev_type, major, minor, access),
                allowed,
                "{dev_type} {major}:{minor} {access}"
            );
        }
        let prog = compile(&rules(&DEFAULT_DEVICE_RULES));
        for (dev_type, major, minor, access, allowed) in [
            (CHAR, 10, 200, m, true),
            (CHAR, 10, 200, r, false),
            (BLOCK, 8, 0, m, true),
            (BLOCK, 8, 0, r, false),
            (CHAR, 136, 7, r | w, true),
            (CHAR, 137, 7, r, false),
            (CHAR, 5, 2, r | w | m, true),
            (CHAR, 5, 1, r, false),
        ] {
            assert_eq!(
                verdict(&prog, dev_type, major, minor, access),
                allowed,
                "{dev_type} {major}:{minor} {access}"
            );
        }
        // Nothing allowed; everything allowed.
        assert!(!verdict(&compile(&[]), CHAR, 1, 3, r));
        assert!(verdict(&compile(&rules(&["a"])), BLOCK, 8, 0, r | w | m));
    }

    #[test]
    fn compiled_programs_match_the_reference() {
        let sets: [&[&str]; 7] = [
            &DEFAULT_DEVICE_RULES,
            &["c 1:3 rwm", "c 1:5 r"],
            &["b 8:* rw", "c *:7 w", "a 2147483648:4294967295 m"],
            &["a 1:* r", "b *:0 wm", "c 4294967295:2147483647 rm"],
            &["c *:* rwm", "b 7:7 r"],
            &["a", "c 1:3 r"],
            &[],
        ];
        let numbers = [0, 1, 3, 5, 7, 8, 136, 0x7fff_ffff, 0x8000_0000, u32::MAX];
        for set in sets {
            let rules = rules(set);
            let prog = compile(&rules);
            for dev_type in [BLOCK, CHAR, 0, 3] {
                for major in numbers {
                    for minor in numbers {
                        for bits in 0..8 {
                            let access = Access::from_bits_truncate(bits);
                            assert_eq!(
                                verdict(&prog, dev_type, major, minor, access),
                                reference(&rules, dev_type, major, minor, access),
                                "{set:?}: {dev_type} {major}:{minor} {access}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn program_shape() {
        // Prologue (6) + `c 1:3 rwm` (type, major, minor, allow: 5) + `c 1:5 r` (+ access: 6) + deny (2).
        let prog = compile(&rules(&["c 1:3 rwm", "c 1:5 r"]));
        assert_eq!(prog.len(), 6 + 5 + 6 + 2);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        // Every jump is forward and lands inside the program; the last instruction is an exit.
        for prog in [
            prog,
            compile(&rules(&DEFAULT_DEVICE_RULES)),
            compile(&rules(&["b *:* m", "a", "c 1:1 r"])),
        ] {
            for (pc, insn) in prog.iter().enumerate() {
                if insn.code & 0x07 == BPF_JMP32 {
                    assert!(
                        insn.off > 0 && pc + 1 + (insn.off as usize) < prog.len(),
                        "jump at {pc}"
                    );
                }
            }
            assert_eq!(prog.last(), Some(&exit()));
        }
        // Nothing after an unconditional rule (the verifier rejects unreachable instructions).
        assert_eq!(compile(&rules(&["a", "c 1:3 r"])).len(), 6 + 2);
    }

    // ---- the real kernel ------------------------------------------------------------------------

    const UNIFIED: &str = "/sys/fs/cgroup/unified";
    const V1_DEVICES: &str = "/sys/fs/cgroup/devices";
    const EPERM_TEXT: &str = "Operation not permitted";

    /// A fresh cgroup2 directory (and a scratch directory for mknod), removed on drop.
    struct TestCgroup {
        path: PathBuf,
        scratch: PathBuf,
    }

    impl TestCgroup {
        /// `None` (and a note) where the kernel or privileges don't allow the real tests.
        fn new() -> Option<TestCgroup> {
            if !supported() || statfs(UNIFIED).is_err() {
                eprintln!("skipping: needs root, a loadable device program and cgroup2 at {UNIFIED}");
                return None;
            }
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let unique = format!(
                "{}-{nanos}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let cgroup = TestCgroup {
                path: Path::new(UNIFIED).join(format!("devbpf-test-{unique}")),
                scratch: std::env::temp_dir().join(format!("devbpf-test-{unique}")),
            };
            if let Err(err) = fs::create_dir(&cgroup.path) {
                eprintln!("skipping: cannot create {}: {err}", cgroup.path.display());
                return None;
            }
            fs::create_dir(&cgroup.scratch).expect("create scratch dir");
            Some(cgroup)
        }

        fn child(&self, name: &str) -> PathBuf {
            let path = self.path.join(name);
            fs::create_dir(&path).expect("create child cgroup");
            path
        }
    }

    /// Moves every process out of `dir` and its descendants, then removes them, deepest first.
    fn remove_cgroup(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_cgroup(&entry.path());
                }
            }
        }
        for _ in 0..50 {
            for pid in fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines() {
                let _ = fs::write(Path::new(UNIFIED).join("cgroup.procs"), pid);
            }
            if fs::remove_dir(dir).is_ok() || !dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", dir.display());
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            remove_cgroup(&self.path);
            let _ = fs::remove_dir_all(&self.scratch);
        }
    }

    /// Runs `script` with `sh` in `cgroup` (and in the root v1 devices cgroup, which allows everything).
    fn run_in(cgroup: &Path, script: &str) -> Output {
        const ENTER: &str = r#"{ [ ! -e "$1" ] || echo $$ > "$1"; } && echo $$ > "$2" && exec sh -c "$3""#;
        let v1 = Path::new(V1_DEVICES).join("cgroup.procs");
        let procs = cgroup.join("cgroup.procs");
        let output = Command::new("sh")
            .args(["-c", ENTER, "sh"])
            .arg(v1)
            .arg(procs)
            .arg(script)
            .output();
        output.expect("spawn sh")
    }

    fn expect_ok(cgroup: &Path, script: &str) -> String {
        let out = run_in(cgroup, script);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{script:?} failed: {stderr}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn expect_eperm(cgroup: &Path, script: &str) {
        let out = run_in(cgroup, script);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(EPERM_TEXT),
            "{script:?}: {:?} {stderr}",
            out.status
        );
    }

    fn ours(cgroup: &Path) -> Vec<u32> {
        let programs = attached(cgroup).expect("query");
        programs
            .iter()
            .filter(|p| p.name == PROGRAM_NAME)
            .map(|p| p.id)
            .collect()
    }

    fn apply_ok(cgroup: &Path, text: &[&str]) {
        if let Err(err) = apply(cgroup, &rules(text)) {
            panic!("apply {text:?}: {err}");
        }
    }

    #[test]
    fn real_filter_verdicts() {
        let Some(cg) = TestCgroup::new() else { return };
        let (dir, scratch) = (&cg.path, cg.scratch.display());
        // The v1 devices cgroup the child lands in allows everything: the verdicts are ours.
        assert_eq!(
            fs::read_to_string(Path::new(V1_DEVICES).join("devices.list"))
                .ok()
                .as_deref(),
            Some("a *:* rwm\n")
        );
        apply_ok(dir, &["c 1:3 rwm", "c 1:5 r"]);
        let membership = expect_ok(dir, "cat /proc/self/cgroup");
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(membership.lines().any(|l| l == "5:devices:/"), "{membership}");
        assert!(membership.lines().any(|l| l == format!("0::/{name}")), "{membership}");

        expect_ok(dir, "echo hi > /dev/null");
        assert_eq!(expect_ok(dir, "head -c 4 /dev/zero | od -An -tx1"), " 00 00 00 00\n");
        expect_eperm(dir, "echo hi > /dev/zero");
        expect_eperm(dir, "head -c 1 /dev/full");
        expect_eperm(dir, "echo hi > /dev/full");
        expect_ok(dir, &format!("mknod {scratch}/null c 1 3"));
        expect_eperm(dir, &format!("mknod {scratch}/zero c 1 5"));
        expect_eperm(dir, &format!("mknod {scratch}/sda b 8 0"));
        // Outside the cgroup nothing is filtered.
        expect_ok(
            Path::new(UNIFIED),
            "echo hi > /dev/zero && head -c 1 /dev/full >/dev/null",
        );
        assert_eq!(ours(dir).len(), 1);
    }

    #[test]
    fn real_reapply_replaces_and_detach_all_removes() {
        let Some(cg) = TestCgroup::new() else { return };
        let dir = &cg.path;
        apply_ok(dir, &["c 1:3 rwm", "c 1:5 r"]);
        let first = ours(dir);
        assert_eq!(first.len(), 1);
        expect_eperm(dir, "head -c 1 /dev/full");

        apply_ok(dir, &["c 1:3 rwm", "c 1:7 r"]);
        let second = ours(dir);
        assert_eq!(second.len(), 1, "exactly one program of ours after re-applying");
        assert_ne!(first, second);
        assert_eq!(attached(dir).expect("query").len(), 1);
        expect_ok(dir, "head -c 1 /dev/full > /dev/null");
        expect_eperm(dir, "head -c 1 /dev/zero");

        assert_eq!(detach_all(dir).expect("detach_all"), 1);
        assert!(attached(dir).expect("query").is_empty());
        expect_ok(dir, "echo hi > /dev/zero");
        assert_eq!(detach_all(dir).expect("detach_all"), 0);
    }

    #[test]
    fn real_child_cannot_widen_parent() {
        let Some(cg) = TestCgroup::new() else { return };
        let parent = &cg.path;
        let child = cg.child("container");
        apply_ok(parent, &["c 1:3 rwm", "c 1:5 r"]);
        // The child allows everything, yet the parent's program still runs (ALLOW_MULTI) and denies.
        apply_ok(&child, &["a"]);
        expect_ok(&child, "echo hi > /dev/null && head -c 1 /dev/zero > /dev/null");
        expect_eperm(&child, "echo hi > /dev/zero");
        expect_eperm(&child, "head -c 1 /dev/full");
        // A narrower child filter narrows further.
        apply_ok(&child, &["c 1:3 rwm"]);
        expect_eperm(&child, "head -c 1 /dev/zero");
        expect_ok(parent, "head -c 1 /dev/zero > /dev/null");
        // Only the parent's own program is listed on the parent.
        assert_eq!(ours(parent).len(), 1);
        assert_eq!(ours(&child).len(), 1);
    }

    #[test]
    fn real_parent_without_multi_blocks_child_programs() {
        // The alternative flag choice: a parent program attached with no flag forbids any program below it.
        let Some(cg) = TestCgroup::new() else { return };
        let child = cg.child("container");
        let parent = CgroupDir::open(&cg.path).expect("open");
        let prog = load(&compile(&rules(&["a"]))).expect("load");
        parent.attach(&prog, 0).expect("attach without flags");
        match apply(&child, &rules(&["c 1:3 rwm"])) {
            Err(DeviceFilterError::Bpf { op, source, .. }) => {
                assert_eq!((op, source), ("BPF_PROG_ATTACH", Errno::EPERM));
            }
            other => panic!("child attach under a flagless parent: {other:?}"),
        }
    }

    #[test]
    fn real_load_error_carries_the_verifier_log() {
        let Some(_cg) = TestCgroup::new() else { return };
        // Reads past the end of `struct bpf_cgroup_dev_ctx`.
        let prog = [ldx_w(R0, R1, 12), exit()];
        match load(&prog) {
            Err(DeviceFilterError::Load { source, log }) => {
                assert_eq!(source, Errno::EACCES, "{log}");
                assert!(log.contains("invalid bpf_context access"), "{log}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn real_errors_on_non_cgroup_directories() {
        let Some(cg) = TestCgroup::new() else { return };
        assert!(matches!(
            apply(&cg.scratch, &[]),
            Err(DeviceFilterError::NotCgroup2 { .. })
        ));
        assert!(matches!(
            detach_all(&cg.scratch.join("missing")),
            Err(DeviceFilterError::Open { .. })
        ));
    }
}
