//! Pod sandboxes as Linux namespaces held by bind mounts, without a pause
//! process: network, IPC and UTS namespaces are made on a short-lived thread
//! and pinned under the sandbox's state directory. A pod-wide PID namespace
//! needs an init: `podvisor pod-init`, a tiny reaper, is started for it.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

use super::LinuxError;
use crate::spec::{NamespaceMode, SandboxSpec, UserNamespace};

/// What the backend keeps about a running sandbox (stored in the sandbox record).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRuntime {
    pub dir: PathBuf,
    pub netns: Option<PathBuf>,
    pub ipcns: Option<PathBuf>,
    pub utsns: Option<PathBuf>,
    pub pidns: Option<PathBuf>,
    /// The pod's own user namespace (`hostUsers: false`), owner of its net/IPC/UTS namespaces.
    #[serde(default)]
    pub userns: Option<PathBuf>,
    pub pod_init_pid: Option<i32>,
    pub cgroup_path: String,
    /// Whether podvisor made the pod cgroup (no cgroup parent was given), and so removes it.
    #[serde(default)]
    pub owns_cgroup: bool,
    /// The pod's /dev/shm (a tmpfs), unless it uses the node's IPC namespace.
    pub shm: Option<PathBuf>,
    pub hostname_file: PathBuf,
    pub hosts_file: PathBuf,
    pub resolv_file: PathBuf,
}

const SHM_SIZE: &str = "size=65536k";

/// Sysctls that belong to a namespace a pod owns, and which one.
fn sysctl_namespace(key: &str) -> Option<NsKind> {
    if key.starts_with("net.") {
        Some(NsKind::Net)
    } else if key.starts_with("kernel.shm")
        || key.starts_with("kernel.msg")
        || key == "kernel.sem"
        || key.starts_with("fs.mqueue.")
    {
        Some(NsKind::Ipc)
    } else if key == "kernel.hostname" || key == "kernel.domainname" {
        Some(NsKind::Uts)
    } else {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NsKind {
    Net,
    Ipc,
    Uts,
}

impl NsKind {
    fn name(self) -> &'static str {
        match self {
            NsKind::Net => "net",
            NsKind::Ipc => "ipc",
            NsKind::Uts => "uts",
        }
    }
    fn flag(self) -> CloneFlags {
        match self {
            NsKind::Net => CloneFlags::CLONE_NEWNET,
            NsKind::Ipc => CloneFlags::CLONE_NEWIPC,
            NsKind::Uts => CloneFlags::CLONE_NEWUTS,
        }
    }
}

/// Checks the sysctls before anything is made: each must belong to a
/// namespace of the pod's own.
pub fn validate_sysctls(spec: &SandboxSpec) -> Result<(), LinuxError> {
    for key in spec.sysctls.keys() {
        let host = match sysctl_namespace(key) {
            Some(NsKind::Net) => spec.namespaces.network == NamespaceMode::Node,
            Some(NsKind::Ipc) => spec.namespaces.ipc == NamespaceMode::Node,
            Some(NsKind::Uts) => false,
            None => true,
        };
        if host || key.contains("..") || key.contains('/') {
            return Err(LinuxError::Invalid(format!(
                "sysctl {key:?} is not namespaced to this pod (allowed: net.* without host network, kernel.shm*/msg*/sem and fs.mqueue.* without host IPC)"
            )));
        }
    }
    Ok(())
}

/// A pod user namespace cannot be combined with the node's other namespaces
/// (kubelet never asks for it; the pod would own nothing its root could use).
pub fn validate_user_namespace(spec: &SandboxSpec) -> Result<(), LinuxError> {
    let ns = &spec.namespaces;
    if ns.user.is_some() && [ns.network, ns.pid, ns.ipc].contains(&NamespaceMode::Node) {
        return Err(LinuxError::Invalid(
            "a pod user namespace cannot be combined with host network, PID or IPC".into(),
        ));
    }
    Ok(())
}

pub fn create(dir: &Path, spec: &SandboxSpec, exe: &Path) -> Result<SandboxRuntime, LinuxError> {
    validate_sysctls(spec)?;
    validate_user_namespace(spec)?;
    crate::sys::fs::ensure_dir(dir, 0o711).map_err(LinuxError::io("creating sandbox directory"))?;
    let mut runtime = SandboxRuntime {
        dir: dir.to_path_buf(),
        hostname_file: dir.join("hostname"),
        hosts_file: dir.join("hosts"),
        resolv_file: dir.join("resolv.conf"),
        ..Default::default()
    };
    let mut kinds = vec![NsKind::Uts];
    if spec.namespaces.network != NamespaceMode::Node {
        kinds.push(NsKind::Net);
    }
    if spec.namespaces.ipc != NamespaceMode::Node {
        kinds.push(NsKind::Ipc);
    }
    let hostname = if spec.namespaces.network == NamespaceMode::Node {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        spec.hostname.clone()
    };
    let pinned = match &spec.namespaces.user {
        None => pin_namespaces(dir, &kinds, &hostname, &spec.sysctls)?,
        Some(user) => {
            let (userns, pinned) = pin_namespaces_in_userns(dir, &kinds, &hostname, &spec.sysctls, user, exe)?;
            runtime.userns = Some(userns);
            pinned
        }
    };
    for (kind, path) in pinned {
        match kind {
            NsKind::Net => runtime.netns = Some(path),
            NsKind::Ipc => runtime.ipcns = Some(path),
            NsKind::Uts => runtime.utsns = Some(path),
        }
    }
    if spec.namespaces.network == NamespaceMode::Node {
        // The node's network: its own namespace when it has one (never released by the pod).
        runtime.netns = crate::sys::netns::node().map(Path::to_path_buf);
    }
    write_files(&runtime, spec, &hostname)?;
    if spec.namespaces.ipc != NamespaceMode::Node {
        let shm = dir.join("shm");
        crate::sys::fs::ensure_dir(&shm, 0o1777).map_err(LinuxError::io("creating shm directory"))?;
        nix::mount::mount(
            Some("shm"),
            &shm,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(format!("mode=1777,{SHM_SIZE}").as_str()),
        )
        .map_err(|e| LinuxError::Sys("mounting pod /dev/shm", e))?;
        runtime.shm = Some(shm);
    }
    if spec.namespaces.pid == NamespaceMode::Pod {
        let (pid, pidns) = start_pod_init(dir, exe)?;
        runtime.pod_init_pid = Some(pid);
        runtime.pidns = Some(pidns);
    }
    Ok(runtime)
}

/// Unshares the namespaces on a fresh thread, sets them up from inside and
/// bind-mounts them under `dir/ns/`, so they outlive the thread.
fn pin_namespaces(
    dir: &Path,
    kinds: &[NsKind],
    hostname: &str,
    sysctls: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(NsKind, PathBuf)>, LinuxError> {
    let ns_dir = dir.join("ns");
    crate::sys::fs::ensure_dir(&ns_dir, 0o711).map_err(LinuxError::io("creating namespace directory"))?;
    let kinds = kinds.to_vec();
    let hostname = hostname.to_string();
    let sysctls = sysctls.clone();
    let ns_dir_thread = ns_dir.clone();
    let result = std::thread::spawn(move || -> Result<Vec<(NsKind, PathBuf)>, LinuxError> {
        let flags = kinds.iter().fold(CloneFlags::empty(), |acc, k| acc | k.flag());
        nix::sched::unshare(flags).map_err(|e| LinuxError::Sys("creating pod namespaces", e))?;
        configure_thread_namespaces(&kinds, &hostname, &sysctls)?;
        let mut pinned = Vec::new();
        for kind in &kinds {
            let target = ns_dir_thread.join(kind.name());
            pin_namespace(&format!("/proc/thread-self/ns/{}", kind.name()), &target)?;
            pinned.push((*kind, target));
        }
        Ok(pinned)
    })
    .join()
    .map_err(|_| LinuxError::Invalid("namespace thread panicked".into()))?;
    if result.is_err() {
        release_namespaces(&ns_dir);
    }
    result
}

/// Sets up the namespaces the calling thread is in: hostname, `lo`, sysctls.
fn configure_thread_namespaces(
    kinds: &[NsKind],
    hostname: &str,
    sysctls: &std::collections::BTreeMap<String, String>,
) -> Result<(), LinuxError> {
    if kinds.contains(&NsKind::Uts) && !hostname.is_empty() {
        nix::unistd::sethostname(hostname).map_err(|e| LinuxError::Sys("setting pod hostname", e))?;
    }
    if kinds.contains(&NsKind::Net) {
        loopback_up()?;
    }
    for (key, value) in sysctls {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| LinuxError::Invalid(format!("setting sysctl {key}={value}: {e}")))?;
    }
    Ok(())
}

/// Like `pin_namespaces`, with the namespaces owned by a new user namespace
/// with the pod's ID mappings. A thread cannot enter a user namespace, so a
/// short-lived `podvisor userns-holder` process makes them: it unshares the
/// user namespace, waits for the daemon to write its ID maps, unshares the
/// rest and waits again while the daemon pins them all. The namespaces are
/// then configured from a thread that joins them (which a thread may do).
fn pin_namespaces_in_userns(
    dir: &Path,
    kinds: &[NsKind],
    hostname: &str,
    sysctls: &std::collections::BTreeMap<String, String>,
    user: &UserNamespace,
    exe: &Path,
) -> Result<(PathBuf, Vec<(NsKind, PathBuf)>), LinuxError> {
    use std::io::{BufRead, Write};
    use std::os::unix::process::CommandExt;
    let ns_dir = dir.join("ns");
    crate::sys::fs::ensure_dir(&ns_dir, 0o711).map_err(LinuxError::io("creating namespace directory"))?;
    let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    let mut holder = std::process::Command::new(exe)
        .arg("userns-holder")
        .arg(names.join(","))
        .process_group(0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(LinuxError::io("starting the user namespace holder"))?;
    let pid = holder.id();
    let mut steps = || -> Result<(PathBuf, Vec<(NsKind, PathBuf)>), LinuxError> {
        let (Some(stdin), Some(stdout)) = (holder.stdin.as_mut(), holder.stdout.take()) else {
            return Err(LinuxError::Invalid("user namespace holder has no pipes".into()));
        };
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut expect = |want: &str| -> Result<(), LinuxError> {
            match lines.next() {
                Some(Ok(line)) if line == want => Ok(()),
                Some(Ok(line)) => Err(LinuxError::Invalid(format!("user namespace holder: {line}"))),
                _ => Err(LinuxError::Invalid("user namespace holder ended early".into())),
            }
        };
        expect("ready")?;
        for (file, m) in [("uid_map", user.uids), ("gid_map", user.gids)] {
            std::fs::write(
                format!("/proc/{pid}/{file}"),
                format!("{} {} {}\n", m.container_id, m.host_id, m.length),
            )
            .map_err(|e| LinuxError::Invalid(format!("writing the pod's {file}: {e}")))?;
        }
        stdin
            .write_all(b"go\n")
            .map_err(LinuxError::io("resuming the user namespace holder"))?;
        expect("ok")?;
        let userns = ns_dir.join("user");
        pin_namespace(&format!("/proc/{pid}/ns/user"), &userns)?;
        let mut pinned = Vec::new();
        for kind in kinds {
            let target = ns_dir.join(kind.name());
            pin_namespace(&format!("/proc/{pid}/ns/{}", kind.name()), &target)?;
            pinned.push((*kind, target));
        }
        Ok((userns, pinned))
    };
    let result = steps();
    let _ = holder.kill();
    let _ = holder.wait();
    let result = result.and_then(|(userns, pinned)| {
        let kinds = kinds.to_vec();
        let hostname = hostname.to_string();
        let sysctls = sysctls.clone();
        let files: Vec<PathBuf> = pinned.iter().map(|(_, path)| path.clone()).collect();
        std::thread::spawn(move || -> Result<(), LinuxError> {
            for file in &files {
                let ns = std::fs::File::open(file).map_err(LinuxError::io("opening pod namespace"))?;
                nix::sched::setns(&ns, CloneFlags::empty()).map_err(|e| LinuxError::Sys("joining pod namespace", e))?;
            }
            configure_thread_namespaces(&kinds, &hostname, &sysctls)
        })
        .join()
        .map_err(|_| LinuxError::Invalid("namespace thread panicked".into()))??;
        Ok((userns, pinned))
    });
    if result.is_err() {
        release_namespaces(&ns_dir);
    }
    result
}

/// `podvisor userns-holder KINDS`: unshares a user namespace, reports
/// `ready`, waits for a line (its ID maps are written by then), unshares the
/// comma-separated namespace KINDS (net, ipc, uts), reports `ok` and waits
/// until stdin closes or it is killed.
pub fn userns_holder_main(kinds: &str) -> ! {
    use std::io::{BufRead, Write};
    let mut out = std::io::stdout();
    let fail = |out: &mut std::io::Stdout, what: &str, err: nix::errno::Errno| -> ! {
        let _ = writeln!(out, "{what}: {err}");
        std::process::exit(1)
    };
    if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWUSER) {
        fail(&mut out, "creating the user namespace", e);
    }
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    let mut line = String::new();
    let mut input = std::io::stdin().lock();
    if input.read_line(&mut line).unwrap_or(0) == 0 {
        std::process::exit(1);
    }
    let flags = kinds.split(',').fold(CloneFlags::empty(), |acc, name| {
        acc | match name {
            "net" => CloneFlags::CLONE_NEWNET,
            "ipc" => CloneFlags::CLONE_NEWIPC,
            "uts" => CloneFlags::CLONE_NEWUTS,
            _ => CloneFlags::empty(),
        }
    });
    if let Err(e) = nix::sched::unshare(flags) {
        fail(&mut out, "creating the pod namespaces", e);
    }
    let _ = writeln!(out, "ok");
    let _ = out.flush();
    while input.read_line(&mut line).unwrap_or(0) > 0 {}
    std::process::exit(0)
}

/// Brings `lo` up in the calling thread's network namespace.
fn loopback_up() -> Result<(), LinuxError> {
    // SAFETY: a plain socket() call; the fd is wrapped at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(LinuxError::Sys("opening socket", nix::errno::Errno::last()));
    }
    use std::os::fd::FromRawFd;
    // SAFETY: fd was just created and is owned here.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS with a valid ifreq on a valid socket.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(LinuxError::Sys("reading lo flags", nix::errno::Errno::last()));
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(LinuxError::Sys("bringing lo up", nix::errno::Errno::last()));
        }
    }
    Ok(())
}

fn write_files(runtime: &SandboxRuntime, spec: &SandboxSpec, hostname: &str) -> Result<(), LinuxError> {
    let write = |path: &Path, text: String| std::fs::write(path, text).map_err(LinuxError::io("writing pod files"));
    write(&runtime.hostname_file, format!("{hostname}\n"))?;
    let hosts = if spec.namespaces.network == NamespaceMode::Node {
        std::fs::read_to_string("/etc/hosts").unwrap_or_default()
    } else {
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n".to_string()
    };
    write(&runtime.hosts_file, hosts)?;
    let dns = &spec.dns;
    let resolv = if dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty() {
        std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
    } else {
        let mut text = String::new();
        if !dns.searches.is_empty() {
            text.push_str(&format!("search {}\n", dns.searches.join(" ")));
        }
        for server in &dns.servers {
            text.push_str(&format!("nameserver {server}\n"));
        }
        if !dns.options.is_empty() {
            text.push_str(&format!("options {}\n", dns.options.join(" ")));
        }
        text
    };
    write(&runtime.resolv_file, resolv)
}

/// Starts `podvisor pod-init` and returns the PID (host view) of the new
/// namespace's init and the pinned namespace file.
fn start_pod_init(dir: &Path, exe: &Path) -> Result<(i32, PathBuf), LinuxError> {
    use std::os::unix::process::CommandExt;
    let output = std::process::Command::new(exe)
        .arg("pod-init")
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(LinuxError::io("starting pod init"))?;
    let pid: i32 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| LinuxError::Invalid("pod init did not report its pid".into()))?;
    let target = dir.join("ns").join("pid");
    pin_namespace(&format!("/proc/{pid}/ns/pid"), &target)?;
    Ok((pid, target))
}

/// Keeps a namespace alive after its processes are gone: a bind mount of its
/// `/proc/.../ns/` file onto `target`.
fn pin_namespace(source: &str, target: &Path) -> Result<(), LinuxError> {
    std::fs::File::create(target).map_err(LinuxError::io("creating namespace file"))?;
    nix::mount::mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| LinuxError::Sys("pinning namespace", e))
}

/// `podvisor pod-init`: makes a PID namespace whose init reaps orphans until killed.
pub fn pod_init_main() -> ! {
    if nix::sched::unshare(CloneFlags::CLONE_NEWPID).is_err() {
        std::process::exit(1);
    }
    // SAFETY: this process is single-threaded.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            println!("{}", child.as_raw());
            std::process::exit(0)
        }
        Ok(nix::unistd::ForkResult::Child) => {
            // Let go of the daemon's pipe, so it sees the report end with our parent.
            if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
                use std::os::fd::AsRawFd;
                for fd in 0..3 {
                    // SAFETY: dup2 onto the standard fds of this single-threaded process.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            let _ = nix::unistd::setsid();
            let _ = nix::unistd::chdir("/");
            crate::sys::memory::release_startup_pages();
            loop {
                match nix::sys::wait::wait() {
                    Ok(_) => {}
                    Err(_) => {
                        nix::unistd::pause();
                    }
                }
            }
        }
        Err(_) => std::process::exit(1),
    }
}

/// One interface's counters from `/proc/net/dev`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

/// The counters of every interface but `lo` in the network namespace `netns`,
/// read on a short-lived thread that joins it.
pub fn interface_counters(netns: &Path) -> Vec<InterfaceCounters> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).ok()?;
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).ok()?;
        std::fs::read_to_string("/proc/thread-self/net/dev").ok()
    })
    .join()
    .ok()
    .flatten()
    .map(|text| parse_net_dev(&text))
    .unwrap_or_default()
}

fn parse_net_dev(text: &str) -> Vec<InterfaceCounters> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let n: Vec<u64> = counters.split_whitespace().filter_map(|v| v.parse().ok()).collect();
            (n.len() >= 11 && name.trim() != "lo").then(|| InterfaceCounters {
                name: name.trim().to_string(),
                rx_bytes: n[0],
                rx_errors: n[2],
                tx_bytes: n[8],
                tx_errors: n[10],
            })
        })
        .collect()
}

/// Stops what keeps the sandbox alive: the pod init and the network namespace.
pub fn stop(runtime: &SandboxRuntime) {
    if let Some(pid) = runtime.pod_init_pid {
        kill_if_pod_init(pid);
    }
}

fn kill_if_pod_init(pid: i32) {
    // Only kill it if the PID still belongs to a pod init (PIDs are reused).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if cmdline.split(|b| *b == 0).any(|arg| arg == b"pod-init") {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Unmounts and deletes everything under the sandbox directory. Idempotent.
pub fn remove(runtime: &SandboxRuntime) -> Result<(), LinuxError> {
    stop(runtime);
    release_namespaces(&runtime.dir.join("ns"));
    if let Some(shm) = &runtime.shm {
        let _ = nix::mount::umount2(shm, MntFlags::MNT_DETACH);
    }
    crate::sys::fs::remove_tree(&runtime.dir).map_err(LinuxError::io("removing sandbox directory"))
}

fn release_namespaces(ns_dir: &Path) {
    for name in ["net", "ipc", "uts", "pid", "user"] {
        let path = ns_dir.join(name);
        let _ = nix::mount::umount2(&path, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_counters() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  eth0:    5000      10    2    0    0     0          0         0     7000      12    3    0    0     0       0          0\n";
        assert_eq!(
            parse_net_dev(text),
            vec![InterfaceCounters {
                name: "eth0".into(),
                rx_bytes: 5000,
                rx_errors: 2,
                tx_bytes: 7000,
                tx_errors: 3,
            }]
        );
    }

    #[test]
    fn sysctls_must_belong_to_the_pod() {
        let mut spec = SandboxSpec::default();
        spec.sysctls.insert("net.ipv4.ip_forward".into(), "1".into());
        spec.sysctls.insert("kernel.shm_rmid_forced".into(), "1".into());
        assert!(validate_sysctls(&spec).is_ok());
        spec.namespaces.network = NamespaceMode::Node;
        assert!(validate_sysctls(&spec).is_err(), "net.* with host network");
        let mut spec = SandboxSpec::default();
        spec.sysctls.insert("vm.swappiness".into(), "1".into());
        assert!(validate_sysctls(&spec).is_err(), "a node-wide sysctl");
    }
}
