//! Seccomp policies: compile once in the daemon, install in the container's setup child.
//!
//! [`compile`] runs in the (multi-threaded) daemon and uses libseccomp to turn a
//! [`Policy`] into a classic BPF program. [`install`] runs in the single-threaded child
//! after `fork` and only issues the `seccomp`/`prctl` syscall on memory the caller
//! already owns, so it is async-signal-safe.
//!
//! Two policy sources exist: podvisor's built-in `RuntimeDefault` profile (the tables
//! below) and OCI runtime-spec `linux.seccomp` JSON files (`Localhost`), including the
//! older Docker extensions (`archMap`, `includes`/`excludes`, singular `name`).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;

use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use serde::{Deserialize, Deserializer};

/// Where a container's seccomp policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// podvisor's built-in default profile.
    RuntimeDefault,
    /// No filter at all.
    Unconfined,
    /// An OCI runtime-spec `linux.seccomp` JSON document on the host.
    Localhost(PathBuf),
}

/// A classic BPF program ready for [`install`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledFilter {
    /// Raw `struct sock_filter` array in native byte order.
    pub bpf: Vec<u8>,
}

impl CompiledFilter {
    /// Number of BPF instructions in the program.
    pub fn instructions(&self) -> usize {
        self.bpf.len() / INSN_SIZE
    }
}

/// Why a policy could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The Localhost profile file could not be read.
    #[error("cannot read seccomp profile {path}")]
    ProfileRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The profile is not valid JSON or not a valid OCI seccomp profile.
    #[error("invalid seccomp profile: {message}")]
    ProfileInvalid { message: String },
    /// Not produced today: like runc, `compile` skips names that libseccomp cannot
    /// resolve (with a `tracing` event), so profiles written for newer kernels load.
    #[error("unknown syscall {0:?}")]
    UnknownSyscall(String),
    /// libseccomp failed, or the program does not fit the kernel's limits.
    #[error("cannot compile the seccomp filter: {context}")]
    Compile {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

const INSN_SIZE: usize = size_of::<libc::sock_filter>();
/// The kernel's limit on a single filter program (`BPF_MAXINSNS`).
const MAX_INSNS: usize = 4096;

/// Compiles `policy` to BPF; `None` for [`Policy::Unconfined`].
///
/// `privileged_caps` are the container's effective capabilities (`CAP_SYS_ADMIN` or
/// `SYS_ADMIN`); they unlock the capability-gated syscalls of the default profile and
/// select Docker-style `includes`/`excludes` rules of a Localhost profile.
pub fn compile(policy: &Policy, privileged_caps: &[String]) -> Result<Option<CompiledFilter>, SeccompError> {
    let caps: HashSet<String> = privileged_caps.iter().map(|c| normalize_cap(c)).collect();
    match policy {
        Policy::Unconfined => Ok(None),
        Policy::RuntimeDefault => build(&runtime_default(&caps)).map(Some),
        Policy::Localhost(path) => {
            let text = std::fs::read(path).map_err(|source| SeccompError::ProfileRead {
                path: path.clone(),
                source,
            })?;
            let oci: OciProfile =
                serde_json::from_slice(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            build(&oci.lower(&caps)?).map(Some)
        }
    }
}

/// Installs `filter` (a raw `sock_filter` array) for the calling thread.
///
/// Async-signal-safe: no allocation, only the `seccomp` syscall (or `prctl` on kernels
/// older than 3.17) on caller-provided memory. The thread must have `no_new_privs` set
/// or hold `CAP_SYS_ADMIN`.
pub fn install(filter: &[u8]) -> io::Result<()> {
    let insns = filter.len() / INSN_SIZE;
    if insns == 0 || !filter.len().is_multiple_of(INSN_SIZE) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let Ok(len) = u16::try_from(insns) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // The kernel copies the program with copy_from_user, so the byte buffer's alignment
    // does not matter; the pointer is never dereferenced on the Rust side.
    let prog = libc::sock_fprog {
        len,
        filter: filter.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    let prog_ptr: *const libc::sock_fprog = &prog;
    // SAFETY: seccomp(2) only reads `prog` and the `len * 8` bytes it points to, all of
    // which are borrowed for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::c_ulong::from(libc::SECCOMP_SET_MODE_FILTER),
            0 as libc::c_ulong,
            prog_ptr,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    // SAFETY: as above; PR_SET_SECCOMP reads the same program and ignores the rest.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::c_ulong::from(libc::SECCOMP_MODE_FILTER),
            prog_ptr,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------
// The built-in RuntimeDefault profile: deny with EPERM unless listed here.
// ---------------------------------------------------------------------------

/// Syscalls every container may use. Names that only exist on some architectures (or
/// that this host's libseccomp does not know yet) are fine: they are resolved per
/// architecture and skipped where unknown.
#[rustfmt::skip]
const ALLOWED: &[&[&str]] = &[
    // File descriptors and plain I/O.
    &[
        "read", "readv", "pread64", "preadv", "preadv2", "write", "writev", "pwrite64",
        "pwritev", "pwritev2", "lseek", "_llseek", "close", "close_range", "dup", "dup2",
        "dup3", "fcntl", "fcntl64", "ioctl", "flock", "pipe", "pipe2", "sendfile",
        "sendfile64", "splice", "tee", "vmsplice", "copy_file_range", "fsync", "fdatasync",
        "sync", "syncfs", "sync_file_range", "readahead", "fadvise64", "fadvise64_64",
        "fallocate", "truncate", "truncate64", "ftruncate", "ftruncate64", "cachestat",
    ],
    // Opening files, paths and metadata.
    &[
        "open", "openat", "openat2", "creat", "access", "faccessat", "faccessat2", "stat",
        "stat64", "lstat", "lstat64", "fstat", "fstat64", "newfstatat", "fstatat64", "statx",
        "statfs", "statfs64", "fstatfs", "fstatfs64", "getdents", "getdents64", "getcwd",
        "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "rename", "renameat", "renameat2",
        "link", "linkat", "unlink", "unlinkat", "symlink", "symlinkat", "readlink",
        "readlinkat", "mknod", "mknodat", "umask", "chmod", "fchmod", "fchmodat", "fchmodat2",
        "chown", "chown32", "fchown", "fchown32", "fchownat", "lchown", "lchown32", "utime",
        "utimes", "futimesat", "utimensat", "utimensat_time64", "name_to_handle_at",
        "file_getattr", "file_setattr",
    ],
    // Extended attributes.
    &[
        "getxattr", "lgetxattr", "fgetxattr", "getxattrat", "setxattr", "lsetxattr",
        "fsetxattr", "setxattrat", "listxattr", "llistxattr", "flistxattr", "listxattrat",
        "removexattr", "lremovexattr", "fremovexattr", "removexattrat",
    ],
    // File change notification (creating a fanotify group is gated below).
    &["inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch", "fanotify_mark"],
    // Memory management (NUMA placement is gated below).
    &[
        "brk", "mmap", "mmap2", "munmap", "mremap", "mprotect", "pkey_mprotect", "pkey_alloc",
        "pkey_free", "madvise", "mincore", "msync", "mlock", "mlock2", "munlock", "mlockall",
        "munlockall", "remap_file_pages", "membarrier", "memfd_create", "memfd_secret",
        "map_shadow_stack", "mseal", "get_mempolicy",
    ],
    // Waiting for descriptors, events and timers on descriptors.
    &[
        "poll", "ppoll", "ppoll_time64", "select", "_newselect", "pselect6", "pselect6_time64",
        "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
        "epoll_pwait2", "eventfd", "eventfd2", "signalfd", "signalfd4", "timerfd_create",
        "timerfd_settime", "timerfd_settime64", "timerfd_gettime", "timerfd_gettime64",
    ],
    // Linux AIO; io_uring is deliberately absent (a large, frequently exploited surface).
    &[
        "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents",
        "io_pgetevents_time64",
    ],
    // Futexes, threads and thread-local storage.
    &[
        "futex", "futex_time64", "futex_waitv", "futex_wake", "futex_wait", "futex_requeue",
        "set_robust_list", "get_robust_list", "set_tid_address", "rseq", "gettid",
        "arch_prctl", "set_thread_area", "get_thread_area", "set_tls",
    ],
    // Processes: fork/exec/exit/wait, sessions, self-sandboxing (clone/clone3: see below).
    &[
        "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid",
        "waitpid", "getpid", "getppid", "getpgid", "setpgid", "getpgrp", "getsid", "setsid",
        "prctl", "pidfd_open", "pidfd_send_signal", "process_mrelease", "seccomp",
        "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    ],
    // Debugging own processes; safe with seccomp since Linux 4.8, the kernel still
    // applies its ptrace access checks.
    &["ptrace", "process_vm_readv", "process_vm_writev"],
    // Credentials and capabilities (the kernel decides what may change).
    &[
        "getuid", "getuid32", "geteuid", "geteuid32", "getgid", "getgid32", "getegid",
        "getegid32", "getresuid", "getresuid32", "getresgid", "getresgid32", "getgroups",
        "getgroups32", "setuid", "setuid32", "setgid", "setgid32", "setreuid", "setreuid32",
        "setregid", "setregid32", "setresuid", "setresuid32", "setresgid", "setresgid32",
        "setgroups", "setgroups32", "setfsuid", "setfsuid32", "setfsgid", "setfsgid32",
        "capget", "capset",
    ],
    // Scheduling, priorities and resource limits.
    &[
        "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getparam",
        "sched_setparam", "sched_getscheduler", "sched_setscheduler", "sched_getattr",
        "sched_setattr", "sched_get_priority_max", "sched_get_priority_min",
        "sched_rr_get_interval", "sched_rr_get_interval_time64", "getpriority", "setpriority",
        "nice", "ioprio_get", "ioprio_set", "getrlimit", "ugetrlimit", "setrlimit",
        "prlimit64", "getrusage", "times", "getcpu",
    ],
    // Signals.
    &[
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend",
        "rt_sigtimedwait", "rt_sigtimedwait_time64", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
        "sigaction", "sigprocmask", "sigreturn", "sigpending", "sigsuspend", "signal",
        "sigaltstack", "pause", "alarm", "kill", "tkill", "tgkill", "restart_syscall",
    ],
    // Clocks and timers. The adjtimex family only reads without CAP_SYS_TIME (glibc's
    // ntp_gettime uses it); setting the clock directly is gated below.
    &[
        "clock_gettime", "clock_gettime64", "clock_getres", "clock_getres_time64",
        "clock_nanosleep", "clock_nanosleep_time64", "nanosleep", "gettimeofday", "time",
        "adjtimex", "clock_adjtime", "clock_adjtime64", "timer_create", "timer_delete", "timer_settime", "timer_settime64",
        "timer_gettime", "timer_gettime64", "timer_getoverrun", "getitimer", "setitimer",
    ],
    // Sockets (socketcall is the 32-bit x86 multiplexer).
    &[
        "socket", "socketpair", "socketcall", "bind", "listen", "accept", "accept4", "connect",
        "getsockname", "getpeername", "getsockopt", "setsockopt", "shutdown", "sendto", "send",
        "sendmsg", "sendmmsg", "recvfrom", "recv", "recvmsg", "recvmmsg", "recvmmsg_time64",
    ],
    // System V and POSIX IPC, namespaced per pod (ipc is the 32-bit x86 multiplexer).
    &[
        "ipc", "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semctl", "semtimedop",
        "semtimedop_time64", "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink",
        "mq_timedsend", "mq_timedsend_time64", "mq_timedreceive", "mq_timedreceive_time64",
        "mq_notify", "mq_getsetattr",
    ],
    // System information.
    &["uname", "sysinfo", "getrandom"],
    // Architecture-specific helpers (ARM, PowerPC, RISC-V, s390).
    &[
        "arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint",
        "cacheflush", "swapcontext", "riscv_flush_icache", "s390_pci_mmio_read",
        "s390_pci_mmio_write", "s390_runtime_instr",
    ],
];

/// Syscalls allowed only when the container holds the given capability.
#[rustfmt::skip]
const CAP_GATED: &[(&str, &[&str])] = &[
    // Mounts, namespaces, host-wide names and kernel tracing/observability.
    (
        "CAP_SYS_ADMIN",
        &[
            "mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount",
            "fspick", "open_tree", "open_tree_attr", "move_mount", "mount_setattr",
            "statmount", "listmount", "unshare", "setns", "sethostname", "setdomainname",
            "quotactl", "quotactl_fd", "fanotify_init", "lookup_dcookie", "bpf",
            "perf_event_open", "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules",
        ],
    ),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
    // Rebooting or replacing the running kernel.
    ("CAP_SYS_BOOT", &["reboot", "kexec_load", "kexec_file_load"]),
    // Kernel modules.
    ("CAP_SYS_MODULE", &["init_module", "finit_module", "delete_module"]),
    // Setting the (host-wide) clock.
    (
        "CAP_SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    // Inspecting or manipulating other processes' resources.
    ("CAP_SYS_PTRACE", &["kcmp", "pidfd_getfd", "process_madvise", "userfaultfd"]),
    // NUMA memory placement.
    (
        "CAP_SYS_NICE",
        &["mbind", "set_mempolicy", "set_mempolicy_home_node", "migrate_pages", "move_pages"],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    ("CAP_SYS_PACCT", &["acct"]),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    // Opening files by handle bypasses path-based confinement ("shocker").
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
];

/// `personality(2)` values allowed: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32
/// and the 0xffffffff query.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// `clone` flags that create namespaces; CLONE_NEWTIME shares bits with CSIGNAL in
/// `clone` and can only be requested through `unshare`/`clone3`.
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

fn runtime_default(caps: &HashSet<String>) -> Profile<'static> {
    let native = ScmpArch::native();
    let admin = caps.contains("CAP_SYS_ADMIN");
    let allow = |names: &[&'static str]| Rule::new(names.to_vec(), ScmpAction::Allow);

    let mut rules: Vec<Rule<'static>> = ALLOWED.iter().map(|names| allow(names)).collect();
    rules.extend(
        CAP_GATED
            .iter()
            .filter(|(cap, _)| caps.contains(*cap))
            .map(|(_, names)| allow(names)),
    );
    // Several conditions on one argument are OR-ed (see `add_rule`).
    let mut personality = allow(&["personality"]);
    personality.args = PERSONALITIES
        .iter()
        .map(|&v| (0, ScmpArgCompare::new(0, ScmpCompareOp::Equal, v)))
        .collect();
    rules.push(personality);
    if admin {
        rules.push(allow(&["clone", "clone3"]));
    } else {
        // clone's flags are its second argument on s390.
        let index = if matches!(native, ScmpArch::S390 | ScmpArch::S390X) {
            1
        } else {
            0
        };
        let mut clone = allow(&["clone"]);
        clone.args = vec![(
            index,
            ScmpArgCompare::new(index, ScmpCompareOp::MaskedEqual(CLONE_NAMESPACES), 0),
        )];
        rules.push(clone);
        // clone3 passes its flags in memory, which BPF cannot inspect: answer ENOSYS
        // so that libc falls back to clone.
        rules.push(Rule::new(vec!["clone3"], ScmpAction::Errno(libc::ENOSYS)));
    }
    Profile {
        default: ScmpAction::Errno(libc::EPERM),
        arches: compat_arches(native).to_vec(),
        rules,
    }
}

// ---------------------------------------------------------------------------
// Compiling a profile with libseccomp.
// ---------------------------------------------------------------------------

/// A profile in the form libseccomp consumes.
struct Profile<'a> {
    default: ScmpAction,
    /// Architectures besides the native one, which is always present.
    arches: Vec<ScmpArch>,
    rules: Vec<Rule<'a>>,
}

struct Rule<'a> {
    names: Vec<&'a str>,
    action: ScmpAction,
    /// (argument index, comparison): AND-ed across indices, OR-ed within one index.
    args: Vec<(u32, ScmpArgCompare)>,
}

impl<'a> Rule<'a> {
    fn new(names: Vec<&'a str>, action: ScmpAction) -> Self {
        Rule {
            names,
            action,
            args: Vec::new(),
        }
    }
}

fn build(profile: &Profile<'_>) -> Result<CompiledFilter, SeccompError> {
    let mut ctx =
        ScmpFilterContext::new(profile.default).map_err(|e| compile_error("creating the filter context", e))?;
    for &arch in &profile.arches {
        ctx.add_arch(arch)
            .map_err(|e| compile_error(format!("adding architecture {arch:?}"), e))?;
    }
    // Binary search over syscall numbers instead of a linear chain.
    ctx.set_ctl_optimize(2)
        .map_err(|e| compile_error("enabling the binary-tree optimizer", e))?;
    let allows_by_default = matches!(profile.default, ScmpAction::Allow | ScmpAction::Log);

    for rule in &profile.rules {
        if rule.action == profile.default {
            tracing::debug!(syscalls = ?rule.names, "seccomp: rule repeats the default action, skipped");
            continue;
        }
        for &name in &rule.names {
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                if allows_by_default && !matches!(rule.action, ScmpAction::Allow | ScmpAction::Log) {
                    tracing::warn!(syscall = name, action = ?rule.action,
                        "seccomp: libseccomp does not know this syscall, so it stays allowed");
                } else {
                    tracing::debug!(syscall = name, "seccomp: syscall unknown to libseccomp, skipped");
                }
                continue;
            };
            add_rule(&mut ctx, syscall, rule).map_err(|e| compile_error(format!("adding the rule for {name}"), e))?;
        }
    }
    let bpf = export(&ctx)?;
    let filter = CompiledFilter { bpf };
    if filter.instructions() > MAX_INSNS {
        return Err(compile_error(
            "the program is too long",
            format!("{} instructions, the kernel accepts {MAX_INSNS}", filter.instructions()),
        ));
    }
    Ok(filter)
}

/// Adds one rule for `syscall`. libseccomp rejects two comparisons of the same argument
/// in one rule, so (like runc) such conditions become separate rules, i.e. an OR.
fn add_rule(
    ctx: &mut ScmpFilterContext,
    syscall: ScmpSyscall,
    rule: &Rule<'_>,
) -> Result<(), libseccomp::error::SeccompError> {
    let repeated_index = rule
        .args
        .iter()
        .enumerate()
        .any(|(i, (index, _))| rule.args[..i].iter().any(|(other, _)| other == index));
    if rule.args.is_empty() {
        ctx.add_rule(rule.action, syscall)?;
    } else if repeated_index {
        for (_, cmp) in &rule.args {
            ctx.add_rule_conditional(rule.action, syscall, &[*cmp])?;
        }
    } else {
        let cmps: Vec<ScmpArgCompare> = rule.args.iter().map(|(_, cmp)| *cmp).collect();
        ctx.add_rule_conditional(rule.action, syscall, &cmps)?;
    }
    Ok(())
}

/// Exports the program through a memfd (`export_bpf_mem` needs libseccomp >= 2.6).
fn export(ctx: &ScmpFilterContext) -> Result<Vec<u8>, SeccompError> {
    let io_error = |e: io::Error| compile_error("exporting the BPF program", e);
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"podvisor-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io_error(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    ctx.export_bpf(&file)
        .map_err(|e| compile_error("exporting the BPF program", e))?;
    let mut bpf = Vec::new();
    file.seek(SeekFrom::Start(0)).map_err(io_error)?;
    file.read_to_end(&mut bpf).map_err(io_error)?;
    if bpf.is_empty() || !bpf.len().is_multiple_of(INSN_SIZE) {
        return Err(compile_error(
            "exporting the BPF program",
            format!("libseccomp wrote {} bytes", bpf.len()),
        ));
    }
    Ok(bpf)
}

/// Architectures whose processes also run on a given native kernel.
const COMPAT_ARCHES: &[(ScmpArch, &[ScmpArch])] = &[
    (ScmpArch::X8664, &[ScmpArch::X86, ScmpArch::X32]),
    (ScmpArch::Aarch64, &[ScmpArch::Arm]),
    (ScmpArch::Ppc64, &[ScmpArch::Ppc]),
    (ScmpArch::S390X, &[ScmpArch::S390]),
    (ScmpArch::Parisc64, &[ScmpArch::Parisc]),
    (ScmpArch::Mips64, &[ScmpArch::Mips, ScmpArch::Mips64N32]),
    (ScmpArch::Mipsel64, &[ScmpArch::Mipsel, ScmpArch::Mipsel64N32]),
];

fn compat_arches(native: ScmpArch) -> &'static [ScmpArch] {
    COMPAT_ARCHES
        .iter()
        .find(|(n, _)| *n == native)
        .map_or(&[], |(_, arches)| arches)
}

fn is_compatible(native: ScmpArch, arch: ScmpArch) -> bool {
    arch == native || compat_arches(native).contains(&arch)
}

// ---------------------------------------------------------------------------
// OCI runtime-spec (and Docker) JSON profiles.
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciProfile {
    default_action: String,
    default_errno_ret: Option<u32>,
    #[serde(default, deserialize_with = "null_default")]
    architectures: Vec<String>,
    /// Docker: `{architecture, subArchitectures}`; the native entry applies.
    #[serde(default, deserialize_with = "null_default")]
    arch_map: Vec<ArchMap>,
    #[serde(default, deserialize_with = "null_default")]
    flags: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    syscalls: Vec<OciSyscall>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMap {
    architecture: String,
    #[serde(default, deserialize_with = "null_default")]
    sub_architectures: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciSyscall {
    #[serde(default, deserialize_with = "null_default")]
    names: Vec<String>,
    /// Docker's older single-name form.
    name: Option<String>,
    action: String,
    errno_ret: Option<u32>,
    #[serde(default, deserialize_with = "null_default")]
    args: Vec<OciArg>,
    #[serde(default, deserialize_with = "null_default")]
    includes: Condition,
    #[serde(default, deserialize_with = "null_default")]
    excludes: Condition,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciArg {
    index: u32,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

/// Docker's `includes`/`excludes`: a rule applies when its `includes` all hold and
/// none of its `excludes` does.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Condition {
    #[serde(default, deserialize_with = "null_default")]
    caps: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    arches: Vec<String>,
    min_kernel: Option<String>,
}

/// Go encoders write `null` for empty lists; treat it like an absent field.
fn null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

impl OciProfile {
    fn lower(&self, caps: &HashSet<String>) -> Result<Profile<'_>, SeccompError> {
        let default = parse_action(&self.default_action, self.default_errno_ret)
            .map_err(|m| invalid(format!("defaultAction: {m}")))?;
        if !self.flags.is_empty() {
            tracing::debug!(flags = ?self.flags, "seccomp: profile flags are not applied");
        }
        let mut rules = Vec::with_capacity(self.syscalls.len());
        for (i, call) in self.syscalls.iter().enumerate() {
            let at = |m: String| invalid(format!("syscalls[{i}]: {m}"));
            let action = parse_action(&call.action, call.errno_ret).map_err(at)?;
            let names: Vec<&str> = call
                .names
                .iter()
                .chain(call.name.as_ref())
                .map(String::as_str)
                .collect();
            if names.is_empty() || names.iter().any(|n| n.is_empty()) {
                return Err(at("a rule needs non-empty syscall names".into()));
            }
            let args = call.args.iter().map(parse_arg).collect::<Result<_, _>>().map_err(at)?;
            if call.includes.all_hold(caps).map_err(at)? && !call.excludes.any_holds(caps).map_err(at)? {
                rules.push(Rule { names, action, args });
            }
        }
        Ok(Profile {
            default,
            arches: self.arches()?,
            rules,
        })
    }

    /// The listed architectures that can run here; the native one is always included.
    fn arches(&self) -> Result<Vec<ScmpArch>, SeccompError> {
        if !self.architectures.is_empty() && !self.arch_map.is_empty() {
            return Err(invalid("both architectures and archMap are set".into()));
        }
        let native = ScmpArch::native();
        let mut names: Vec<&String> = self.architectures.iter().collect();
        for map in &self.arch_map {
            if parse_arch(&map.architecture)? == native {
                names.push(&map.architecture);
                names.extend(&map.sub_architectures);
            }
        }
        let mut arches = Vec::new();
        for name in names {
            let arch = parse_arch(name)?;
            if is_compatible(native, arch) {
                arches.push(arch);
            } else {
                tracing::debug!(arch = %name, "seccomp: architecture cannot run here, skipped");
            }
        }
        Ok(arches)
    }
}

impl Condition {
    /// `includes`: every listed criterion holds (all caps, the native arch, the kernel).
    fn all_hold(&self, caps: &HashSet<String>) -> Result<bool, String> {
        Ok(self.caps.iter().all(|c| caps.contains(&normalize_cap(c)))
            && (self.arches.is_empty() || self.names_native_arch())
            && self.kernel_at_least_min()?.unwrap_or(true))
    }

    /// `excludes`: any listed criterion holds.
    fn any_holds(&self, caps: &HashSet<String>) -> Result<bool, String> {
        Ok(self.caps.iter().any(|c| caps.contains(&normalize_cap(c)))
            || self.names_native_arch()
            || self.kernel_at_least_min()?.unwrap_or(false))
    }

    fn names_native_arch(&self) -> bool {
        let native = native_arch_names();
        self.arches.iter().any(|a| native.contains(&a.as_str()))
    }

    /// `None` without `minKernel`; an unreadable kernel version counts as too old.
    fn kernel_at_least_min(&self) -> Result<Option<bool>, String> {
        let Some(min) = &self.min_kernel else {
            return Ok(None);
        };
        let min = parse_version(min).ok_or_else(|| format!("invalid minKernel {min:?}"))?;
        Ok(Some(kernel_version().is_some_and(|k| k >= min)))
    }
}

fn parse_action(name: &str, errno: Option<u32>) -> Result<ScmpAction, String> {
    let errno = || -> Result<u16, String> {
        match errno {
            None => Ok(libc::EPERM as u16),
            // The kernel clamps larger values to MAX_ERRNO (4095).
            Some(n) => u16::try_from(n).map_err(|_| format!("errnoRet {n} is out of range")),
        }
    };
    Ok(match name {
        "SCMP_ACT_ALLOW" => ScmpAction::Allow,
        "SCMP_ACT_LOG" => ScmpAction::Log,
        "SCMP_ACT_ERRNO" => ScmpAction::Errno(errno()?.into()),
        "SCMP_ACT_TRACE" => ScmpAction::Trace(errno()?),
        "SCMP_ACT_TRAP" => ScmpAction::Trap,
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => ScmpAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => ScmpAction::KillProcess,
        "SCMP_ACT_NOTIFY" => {
            return Err("SCMP_ACT_NOTIFY is not supported (no seccomp agent)".into());
        }
        other => return Err(format!("unknown action {other:?}")),
    })
}

fn parse_arg(arg: &OciArg) -> Result<(u32, ScmpArgCompare), String> {
    if arg.index > 5 {
        return Err(format!("argument index {} is out of range (0..=5)", arg.index));
    }
    // For MASKED_EQ, `value` is the mask and `valueTwo` the expected result.
    let (op, datum) = match arg.op.as_str() {
        "SCMP_CMP_EQ" => (ScmpCompareOp::Equal, arg.value),
        "SCMP_CMP_NE" => (ScmpCompareOp::NotEqual, arg.value),
        "SCMP_CMP_LT" => (ScmpCompareOp::Less, arg.value),
        "SCMP_CMP_LE" => (ScmpCompareOp::LessOrEqual, arg.value),
        "SCMP_CMP_GT" => (ScmpCompareOp::Greater, arg.value),
        "SCMP_CMP_GE" => (ScmpCompareOp::GreaterEqual, arg.value),
        "SCMP_CMP_MASKED_EQ" => (ScmpCompareOp::MaskedEqual(arg.value), arg.value_two),
        other => return Err(format!("unknown comparison {other:?}")),
    };
    Ok((arg.index, ScmpArgCompare::new(arg.index, op, datum)))
}

fn parse_arch(name: &str) -> Result<ScmpArch, SeccompError> {
    ScmpArch::from_str(name).map_err(|_| invalid(format!("unknown architecture {name:?}")))
}

/// Names Docker profiles use for the native architecture in `includes.arches`.
fn native_arch_names() -> [&'static str; 2] {
    let go = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        "mips" if cfg!(target_endian = "little") => "mipsle",
        other => other,
    };
    [go, std::env::consts::ARCH]
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> Option<(u32, u32)> {
    static VERSION: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        parse_version(release.trim())
    })
}

/// Parses the leading "major.minor" of a kernel release such as "6.1.0-18-amd64".
fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map_or(Some(0), |m| m.parse().ok())?;
    Some((major, minor))
}

/// "sys_admin" and "CAP_SYS_ADMIN" both become "CAP_SYS_ADMIN".
fn normalize_cap(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

fn invalid(message: String) -> SeccompError {
    SeccompError::ProfileInvalid { message }
}

fn compile_error(
    context: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> SeccompError {
    SeccompError::Compile {
        context: context.into(),
        source: source.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;
    use std::process::Command;

    use libc::c_long;

    /// Environment of a child test process: which case to run, where the BPF is.
    const CHILD_CASE: &str = "PODVISOR_SECCOMP_TEST_CASE";
    const CHILD_BPF: &str = "PODVISOR_SECCOMP_TEST_BPF";
    /// Exit code of a child whose checks all passed (0 would also mean "no test ran").
    const CHILD_OK: i32 = 77;

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn default_filter(with: &[&str]) -> CompiledFilter {
        compile(&Policy::RuntimeDefault, &caps(with)).unwrap().unwrap()
    }

    fn profile_file(json: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), json).unwrap();
        file
    }

    fn compile_json(json: &str, with: &[&str]) -> Result<CompiledFilter, SeccompError> {
        let file = profile_file(json);
        compile(&Policy::Localhost(file.path().into()), &caps(with)).map(Option::unwrap)
    }

    fn invalid_message(json: &str) -> String {
        match compile_json(json, &[]) {
            Err(SeccompError::ProfileInvalid { message }) => message,
            other => panic!("expected ProfileInvalid, got {other:?}"),
        }
    }

    #[test]
    fn runtime_default_compiles() {
        let filter = default_filter(&[]);
        assert!(filter.instructions() > 100 && filter.instructions() <= MAX_INSNS);
        assert!(filter.bpf.len().is_multiple_of(INSN_SIZE));
        assert_ne!(filter, default_filter(&["SYS_ADMIN"]));
        assert_eq!(default_filter(&["SYS_ADMIN"]), default_filter(&["CAP_SYS_ADMIN"]));
    }

    #[test]
    fn unconfined_has_no_filter() {
        assert!(compile(&Policy::Unconfined, &[]).unwrap().is_none());
    }

    #[test]
    fn default_tables_have_no_duplicates_or_typos() {
        // Newer than some libseccomp releases that podvisor may run with.
        #[rustfmt::skip]
        const RECENT: &[&str] = &[
            "cachestat", "fchmodat2", "map_shadow_stack", "futex_wake", "futex_wait",
            "futex_requeue", "statmount", "listmount", "lsm_get_self_attr", "lsm_set_self_attr",
            "lsm_list_modules", "mseal", "setxattrat", "getxattrat", "listxattrat",
            "removexattrat", "open_tree_attr", "file_getattr", "file_setattr",
        ];
        let mut seen = HashSet::new();
        for &name in ALLOWED.iter().flat_map(|group| group.iter()) {
            assert!(seen.insert(name), "{name} is listed twice");
        }
        for (_, names) in CAP_GATED {
            for &name in *names {
                assert!(!seen.contains(name), "{name} is both allowed and gated");
                assert!(
                    ScmpSyscall::from_name(name).is_ok() || RECENT.contains(&name),
                    "libseccomp does not know {name}"
                );
            }
        }
        for &name in &seen {
            assert!(
                ScmpSyscall::from_name(name).is_ok() || RECENT.contains(&name),
                "libseccomp does not know {name}"
            );
        }
    }

    #[test]
    fn missing_profile_is_a_read_error() {
        let policy = Policy::Localhost("/nonexistent/seccomp.json".into());
        assert!(matches!(compile(&policy, &[]), Err(SeccompError::ProfileRead { .. })));
    }

    #[test]
    fn malformed_profiles_are_invalid() {
        assert!(invalid_message("{ not json").contains("key must be a string"));
        assert!(invalid_message(r#"{"syscalls": []}"#).contains("defaultAction"));
        let bad_action = r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_EXPLODE"}]}"#;
        assert!(invalid_message(bad_action).contains("syscalls[0]: unknown action \"SCMP_ACT_EXPLODE\""));
        let bad_op = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"],
            "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ABOUT"}]}]}"#;
        assert!(invalid_message(bad_op).contains("unknown comparison"));
        let bad_index = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"],
            "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}"#;
        assert!(invalid_message(bad_index).contains("index 6"));
        let bad_arch = r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]}"#;
        assert!(invalid_message(bad_arch).contains("SCMP_ARCH_Z80"));
        let bad_errno = r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}"#;
        assert!(invalid_message(bad_errno).contains("70000"));
        let no_names = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ERRNO"}]}"#;
        assert!(invalid_message(no_names).contains("names"));
        let notify = r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#;
        assert!(invalid_message(notify).contains("not supported"));
    }

    #[test]
    fn unknown_syscalls_are_skipped() {
        let profile = |names: &str| {
            format!(
                r#"{{"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                    "syscalls": [{{"names": [{names}], "action": "SCMP_ACT_ALLOW"}}]}}"#
            )
        };
        let with_unknown = compile_json(&profile(r#""getpid", "no_such_syscall""#), &[]).unwrap();
        let without = compile_json(&profile(r#""getpid""#), &[]).unwrap();
        assert_eq!(with_unknown, without);
    }

    #[test]
    fn docker_style_conditions_follow_capabilities() {
        // Go-encoded Docker profile: nulls, archMap, singular name, includes/excludes.
        let json = r#"{
            "defaultAction": "SCMP_ACT_ERRNO", "architectures": null, "syscalls": [
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW", "args": null,
                 "includes": {}, "excludes": {}},
                {"name": "mount", "action": "SCMP_ACT_ALLOW", "args": [],
                 "includes": {"caps": ["CAP_SYS_ADMIN"], "minKernel": "3.0"}},
                {"names": ["umount2"], "action": "SCMP_ACT_ALLOW",
                 "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["getppid"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"minKernel": "99.0"}}
            ],
            "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                         "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}]
        }"#;
        let only = |names: &str| {
            compile_json(
                &format!(
                    r#"{{"defaultAction": "SCMP_ACT_ERRNO", "archMap": [{{"architecture": "SCMP_ARCH_X86_64",
                        "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}},
                        {{"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}}],
                        "syscalls": [{{"names": [{names}], "action": "SCMP_ACT_ALLOW"}}]}}"#
                ),
                &[],
            )
            .unwrap()
        };
        assert_eq!(
            compile_json(json, &["CAP_SYS_ADMIN"]).unwrap(),
            only(r#""getpid", "mount""#)
        );
        assert_eq!(compile_json(json, &[]).unwrap(), only(r#""getpid", "umount2""#));
    }

    #[test]
    fn parses_kernel_versions() {
        assert_eq!(parse_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_version("4.8"), Some((4, 8)));
        assert_eq!(parse_version("5"), Some((5, 0)));
        assert_eq!(parse_version("x.1"), None);
        assert!(kernel_version().is_some());
    }

    #[test]
    fn install_rejects_malformed_programs() {
        for bpf in [&[][..], &[0u8; 12][..]] {
            assert_eq!(install(bpf).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        }
    }

    // --- Child-process tests: a filter is per thread and irreversible, so each case
    // --- re-runs this test binary with only `child_entry` selected.

    fn run_child(case: &str, filter: &CompiledFilter) {
        let bpf = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(bpf.path(), &filter.bpf).unwrap();
        // Test names omit the crate, module_path!() does not.
        let module = module_path!().split_once("::").map_or(module_path!(), |(_, m)| m);
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("{module}::child_entry"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_CASE, case)
            .env(CHILD_BPF, bpf.path())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(CHILD_OK),
            "child case {case:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn child_entry() {
        let Ok(case) = std::env::var(CHILD_CASE) else {
            return;
        };
        let bpf = std::fs::read(std::env::var(CHILD_BPF).unwrap()).unwrap();
        let checks = match case.as_str() {
            "default" => check_default,
            "admin" => check_admin,
            "mkdir" => check_mkdir,
            "args" => check_args,
            other => panic!("unknown child case {other}"),
        };
        nix::sys::prctl::set_no_new_privs().unwrap();
        install(&bpf).unwrap();
        let code = match checks() {
            Ok(()) => CHILD_OK,
            Err(message) => {
                eprintln!("{case}: {message}");
                1
            }
        };
        // SAFETY: ends the process without running anything that could hit the filter.
        unsafe { libc::_exit(code) }
    }

    type Outcome = Result<c_long, i32>;

    /// Converts a libc return value (-1 and errno on failure) into a Result.
    fn outcome(rc: c_long) -> Outcome {
        if rc == -1 {
            Err(io::Error::last_os_error().raw_os_error().unwrap())
        } else {
            Ok(rc)
        }
    }

    /// A syscall whose arguments are all integers (no pointers).
    fn int_syscall(nr: c_long, args: [c_long; 3]) -> Outcome {
        // SAFETY: integer arguments only, so the kernel dereferences no user memory.
        outcome(unsafe { libc::syscall(nr, args[0], args[1], args[2]) })
    }

    /// A syscall on a path and integers.
    fn path_syscall(nr: c_long, path: &CStr, args: [c_long; 2]) -> Outcome {
        // SAFETY: the only pointer is a live NUL-terminated string the kernel only reads.
        outcome(unsafe { libc::syscall(nr, path.as_ptr(), args[0], args[1]) })
    }

    fn at_path_syscall(nr: c_long, path: &CStr, args: [c_long; 2]) -> Outcome {
        // SAFETY: as for `path_syscall`, with AT_FDCWD first.
        outcome(unsafe { libc::syscall(nr, libc::AT_FDCWD, path.as_ptr(), args[0], args[1]) })
    }

    fn expect_ok(what: &str, got: Outcome) -> Result<c_long, String> {
        got.map_err(|e| format!("{what}: expected success, got {}", io::Error::from_raw_os_error(e)))
    }

    fn expect_errno(what: &str, got: Outcome, want: &[i32]) -> Result<(), String> {
        match got {
            Err(e) if want.contains(&e) => Ok(()),
            Err(e) => Err(format!("{what}: expected errno {want:?}, got {e}")),
            Ok(v) => Err(format!("{what}: expected errno {want:?}, got success ({v})")),
        }
    }

    fn mount_tmpfs() -> Outcome {
        // SAFETY: NUL-terminated literals and a null data pointer.
        outcome(
            unsafe {
                libc::mount(
                    c"none".as_ptr(),
                    c"/nonexistent".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            }
            .into(),
        )
    }

    fn clone3_null() -> Outcome {
        int_syscall(libc::SYS_clone3, [0, 0, 0])
    }

    /// Raw clone(flags | SIGCHLD); a child that gets through exits at once.
    fn raw_fork(flags: c_long) -> Outcome {
        let pid = int_syscall(libc::SYS_clone, [flags | libc::SIGCHLD as c_long, 0, 0])?;
        if pid == 0 {
            // SAFETY: the new process only exits.
            unsafe { libc::_exit(0) }
        }
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        status.map(|_| pid).map_err(|e| e as i32)
    }

    fn check_default() -> Result<(), String> {
        expect_ok("getpid", int_syscall(libc::SYS_getpid, [0; 3]))?;
        let fd = expect_ok(
            "open /dev/null",
            at_path_syscall(libc::SYS_openat, c"/dev/null", [libc::O_WRONLY as c_long, 0]),
        )?;
        // SAFETY: writes 5 bytes from a static buffer to a descriptor we own.
        let wrote = unsafe { libc::write(fd as i32, b"hello".as_ptr().cast(), 5) };
        expect_ok("write", outcome(wrote as c_long))?;
        expect_ok("close", int_syscall(libc::SYS_close, [fd, 0, 0]))?;

        let eperm = [libc::EPERM];
        let newuser = libc::CLONE_NEWUSER as c_long;
        expect_errno(
            "unshare(CLONE_NEWUSER)",
            int_syscall(libc::SYS_unshare, [newuser, 0, 0]),
            &eperm,
        )?;
        expect_errno("clone(CLONE_NEWUSER)", raw_fork(newuser), &eperm)?;
        expect_errno("mount", mount_tmpfs(), &eperm)?;
        expect_errno(
            "umount2",
            path_syscall(libc::SYS_umount2, c"/nonexistent", [0; 2]),
            &eperm,
        )?;
        expect_errno("clone3", clone3_null(), &[libc::ENOSYS])?;
        let mut params = [0u64; 16]; // struct io_uring_params is 120 bytes
        // SAFETY: the kernel writes at most sizeof(io_uring_params) into `params`.
        let rc = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) };
        expect_errno("io_uring_setup", outcome(rc), &eperm)?;

        let personality = |p: c_long| int_syscall(libc::SYS_personality, [p, 0, 0]);
        expect_ok("personality(query)", personality(0xffff_ffff))?;
        expect_ok("personality(PER_LINUX)", personality(0))?;
        expect_errno("personality(ADDR_NO_RANDOMIZE)", personality(0x0040000), &eperm)?;

        // Everyday process machinery: fork, threads (clone3 -> clone fallback), exec.
        expect_ok("fork", raw_fork(0))?;
        let joined = std::thread::spawn(|| 42).join();
        if joined.ok() != Some(42) {
            return Err("spawning a thread failed".into());
        }
        match Command::new("/bin/true").status() {
            Ok(status) if status.success() => Ok(()),
            other => Err(format!("running /bin/true: {other:?}")),
        }
    }

    fn check_admin() -> Result<(), String> {
        let not_filtered = [libc::ENOENT, libc::EINVAL];
        expect_errno(
            "umount2",
            path_syscall(libc::SYS_umount2, c"/nonexistent", [0; 2]),
            &not_filtered,
        )?;
        expect_errno("mount", mount_tmpfs(), &not_filtered)?;
        expect_errno("clone3", clone3_null(), &[libc::EINVAL])?;
        expect_ok("fork", raw_fork(0)).map(drop)
    }

    fn check_mkdir() -> Result<(), String> {
        // SAFETY: a NUL-terminated literal.
        let mkdir = outcome(unsafe { libc::mkdir(c"/tmp".as_ptr(), 0o755) }.into());
        expect_errno("mkdir", mkdir, &[38])?;
        // SAFETY: a NUL-terminated literal.
        let rmdir = outcome(unsafe { libc::rmdir(c"/nonexistent".as_ptr()) }.into());
        expect_errno("rmdir", rmdir, &[libc::ENOENT])?;
        expect_ok("getpid", int_syscall(libc::SYS_getpid, [0; 3])).map(drop)
    }

    fn check_args() -> Result<(), String> {
        let personality = |p: c_long| int_syscall(libc::SYS_personality, [p, 0, 0]);
        expect_ok("personality(0)", personality(0))?;
        expect_ok("personality(8)", personality(8))?;
        expect_errno("personality(0x20000)", personality(0x20000), &[libc::EACCES])?;
        let getpriority = |which: c_long| int_syscall(libc::SYS_getpriority, [which, 0, 0]);
        expect_ok("getpriority(PRIO_PROCESS)", getpriority(libc::PRIO_PROCESS as c_long))?;
        expect_errno(
            "getpriority(PRIO_USER)",
            getpriority(libc::PRIO_USER as c_long),
            &[libc::EACCES],
        )?;
        expect_errno("getppid", int_syscall(libc::SYS_getppid, [0; 3]), &[libc::EACCES])
    }

    #[test]
    fn runtime_default_in_child() {
        run_child("default", &default_filter(&["CAP_CHOWN", "CAP_SETUID"]));
    }

    #[test]
    fn runtime_default_with_sys_admin_in_child() {
        // The check tells the filter's EPERM from the kernel's, so it needs a kernel
        // that lets this process (un)mount.
        let unfiltered = path_syscall(libc::SYS_umount2, c"/nonexistent", [0; 2]);
        if unfiltered == Err(libc::EPERM) {
            eprintln!("skipped: this process may not unmount even without a filter");
            return;
        }
        run_child("admin", &default_filter(&["CAP_SYS_ADMIN"]));
    }

    #[test]
    fn localhost_errno_rule_in_child() {
        let json = r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
            "syscalls": [{"names": ["mkdir", "mkdirat", "no_such_syscall"], "action": "SCMP_ACT_ERRNO",
                          "errnoRet": 38}]}"#;
        run_child("mkdir", &compile_json(json, &[]).unwrap());
    }

    #[test]
    fn localhost_argument_rules_in_child() {
        // Deny by default with EACCES; just enough allowed for the child to report and exit.
        let json = r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 13,
            "syscalls": [
                {"names": ["write", "exit", "exit_group", "brk", "mmap", "munmap", "futex",
                           "rt_sigprocmask", "sigaltstack", "getpid"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [
                    {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                    {"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["getpriority"], "action": "SCMP_ACT_ALLOW", "args": [
                    {"index": 0, "value": 255, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"},
                    {"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]}
            ]}"#;
        run_child("args", &compile_json(json, &[]).unwrap());
    }
}
