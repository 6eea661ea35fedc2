//! The last steps of starting any process inside a container (its init or an
//! exec): identity, capabilities, no_new_privs, seccomp, then execve. Runs in
//! a freshly forked single-threaded child; every failure is reported to the
//! parent through an error pipe before exiting.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::PathBuf;

use caps::{CapSet, Capability, CapsHashSet};
use serde::{Deserialize, Serialize};

/// Everything about the process itself, as the daemon resolved it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub capabilities: CapabilitySets,
    pub no_new_privs: bool,
    /// A compiled seccomp filter (raw `sock_filter` array) to install last.
    pub seccomp_filter: Option<PathBuf>,
    pub rlimits: Vec<Rlimit>,
    pub oom_score_adj: Option<i64>,
    pub tty: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilitySets {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub permitted: Vec<String>,
    pub inheritable: Vec<String>,
    pub ambient: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_NOFILE` style name.
    pub name: String,
    pub soft: u64,
    pub hard: u64,
}

/// Writes `message` to the error pipe and exits; used by setup children.
pub fn fail(error_fd: RawFd, message: &str) -> ! {
    let bytes = message.as_bytes();
    // SAFETY: writing a valid buffer to an fd we own; _exit never returns.
    unsafe {
        libc::write(error_fd, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// Formats a failed step with the OS error, for [`fail`].
pub fn step_error(step: &str, err: impl std::fmt::Display) -> String {
    format!("{step}: {err}")
}

/// Applies identity and privileges and execs. Returns only on failure.
pub fn exec_process(config: &ProcessConfig, seccomp: Option<&[u8]>) -> String {
    if let Err(message) = prepare(config, seccomp) {
        return message;
    }
    let Some(program) = config.args.first() else {
        return "no command to run".to_string();
    };
    let path = match resolve_program(program, &config.env) {
        Some(path) => path,
        None => return format!("executable {program:?} not found in $PATH"),
    };
    let to_c = |s: &str| CString::new(s.as_bytes()).map_err(|_| format!("{s:?} contains a NUL byte"));
    let result = (|| -> Result<std::convert::Infallible, String> {
        let path = to_c(&path)?;
        let args = config.args.iter().map(|a| to_c(a)).collect::<Result<Vec<_>, _>>()?;
        let env = config.env.iter().map(|e| to_c(e)).collect::<Result<Vec<_>, _>>()?;
        nix::unistd::execve(&path, &args, &env).map_err(|err| step_error(&format!("exec {program}"), err))
    })();
    match result {
        Err(message) => message,
        Ok(never) => match never {},
    }
}

/// Exec keeps ignored signals ignored, and Rust programs start with SIGPIPE
/// ignored (the daemon may also inherit others): the workload starts with every
/// disposition at its default, as from any other runtime. The raw system call
/// also reaches the signals glibc keeps for itself (32 and 33).
fn reset_signal_dispositions() {
    /// The kernel's `struct sigaction` (x86_64 layout; all zero, which is SIG_DFL
    /// with no flags and an empty mask whatever the architecture's field order).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads a valid struct of the kernel's layout and the
        // size of its signal mask; no old action is asked for.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &default as *const KernelSigaction,
                std::ptr::null::<KernelSigaction>(),
                8usize,
            )
        };
    }
}

fn prepare(config: &ProcessConfig, seccomp: Option<&[u8]>) -> Result<(), String> {
    reset_signal_dispositions();
    for limit in &config.rlimits {
        set_rlimit(limit)?;
    }
    if let Some(adj) = config.oom_score_adj {
        // Best effort: lowering it is refused on some hosts.
        let _ = std::fs::write("/proc/self/oom_score_adj", adj.to_string());
    }
    // Without no_new_privs the kernel only takes a filter from a process with
    // CAP_SYS_ADMIN: install it now, while we still have it (runc does the same).
    let seccomp_early = seccomp.filter(|_| !config.no_new_privs);
    if let Some(filter) = seccomp_early {
        crate::backend::linux::seccomp::install(filter).map_err(|e| step_error("installing seccomp filter", e))?;
    }
    let bounding = parse_caps(&config.capabilities.bounding)?;
    // Drop from the bounding set while still privileged.
    for cap in caps::all() {
        if !bounding.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| step_error("dropping bounding capability", e))?;
        }
    }
    // Keep permitted capabilities across the uid change, then set them exactly.
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(step_error("keeping capabilities", std::io::Error::last_os_error()));
    }
    let groups: Vec<nix::unistd::Gid> = config
        .additional_gids
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| step_error("setting supplementary groups", e))?;
    let gid = nix::unistd::Gid::from_raw(config.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| step_error("setting gid", e))?;
    let uid = nix::unistd::Uid::from_raw(config.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| step_error("setting uid", e))?;
    // SAFETY: plain prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    let set = |which: CapSet, names: &[String]| -> Result<(), String> {
        caps::set(None, which, &parse_caps(names)?).map_err(|e| step_error("setting capabilities", e))
    };
    // Each capset must keep effective within permitted: shrink in this order.
    set(CapSet::Inheritable, &config.capabilities.inheritable)?;
    set(CapSet::Effective, &config.capabilities.effective)?;
    set(CapSet::Permitted, &config.capabilities.permitted)?;
    caps::clear(None, CapSet::Ambient).map_err(|e| step_error("clearing ambient capabilities", e))?;
    for cap in parse_caps(&config.capabilities.ambient)? {
        caps::raise(None, CapSet::Ambient, cap).map_err(|e| step_error("raising ambient capability", e))?;
    }
    if !config.cwd.is_empty() {
        std::env::set_current_dir(&config.cwd)
            .map_err(|e| step_error(&format!("changing to working directory {}", config.cwd), e))?;
    }
    if config.no_new_privs {
        // SAFETY: plain prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(step_error("setting no_new_privs", std::io::Error::last_os_error()));
        }
    }
    if let Some(filter) = seccomp.filter(|_| config.no_new_privs) {
        crate::backend::linux::seccomp::install(filter).map_err(|e| step_error("installing seccomp filter", e))?;
    }
    Ok(())
}

fn parse_caps(names: &[String]) -> Result<CapsHashSet, String> {
    names
        .iter()
        .map(|name| {
            let full = if name.starts_with("CAP_") {
                name.clone()
            } else {
                format!("CAP_{name}")
            };
            full.parse::<Capability>()
                .map_err(|_| format!("unknown capability {name:?}"))
        })
        .collect()
}

fn set_rlimit(limit: &Rlimit) -> Result<(), String> {
    use nix::sys::resource::Resource;
    let resource = match limit.name.as_str() {
        "RLIMIT_AS" => Resource::RLIMIT_AS,
        "RLIMIT_CORE" => Resource::RLIMIT_CORE,
        "RLIMIT_CPU" => Resource::RLIMIT_CPU,
        "RLIMIT_DATA" => Resource::RLIMIT_DATA,
        "RLIMIT_FSIZE" => Resource::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => Resource::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => Resource::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => Resource::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => Resource::RLIMIT_NICE,
        "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
        "RLIMIT_RSS" => Resource::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => Resource::RLIMIT_RTPRIO,
        "RLIMIT_SIGPENDING" => Resource::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => Resource::RLIMIT_STACK,
        other => return Err(format!("unknown rlimit {other}")),
    };
    nix::sys::resource::setrlimit(resource, limit.soft, limit.hard)
        .map_err(|e| step_error(&format!("setting {}", limit.name), e))
}

/// Finds `program` like execvp does, in the container's `$PATH`.
fn resolve_program(program: &str, env: &[String]) -> Option<String> {
    if program.contains('/') {
        return Some(program.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':').filter(|dir| !dir.is_empty()).find_map(|dir| {
        let candidate = format!("{dir}/{program}");
        let meta = std::fs::metadata(&candidate).ok()?;
        use std::os::unix::fs::PermissionsExt;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_programs_through_path() {
        let env = vec!["PATH=/nonexistent:/bin".to_string()];
        assert_eq!(resolve_program("busybox", &env).as_deref(), Some("/bin/busybox"));
        assert_eq!(resolve_program("/x/y", &env).as_deref(), Some("/x/y"));
        assert_eq!(resolve_program("surely-not-a-program", &env), None);
    }

    #[test]
    fn capability_names_with_or_without_prefix() {
        let parsed = parse_caps(&["CAP_CHOWN".into(), "NET_ADMIN".into()]).unwrap();
        assert!(parsed.contains(&Capability::CAP_CHOWN) && parsed.contains(&Capability::CAP_NET_ADMIN));
        assert!(parse_caps(&["CAP_NOPE".into()]).is_err());
    }
}
