//! The busybox initramfs: `/init`, busybox applets, the cloud kernel's virtio
//! modules, DHCP, an HTTP server, a guest agent and a console shell.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::CpioWriter;
use crate::{Kernel, other_err};

/// Printed on the serial console once DHCP, HTTP and the agent are set up:
/// `PODVISOR-VM-READY ip=<addr>` (`ip=none` without a NIC or lease).
pub const READY_MARKER: &str = "PODVISOR-VM-READY";
/// Printed before `READY_MARKER`, followed by the kernel command line.
pub const CMDLINE_MARKER: &str = "PODVISOR-VM-CMDLINE";
/// Printed when the guest powers off on an ACPI power-button press.
pub const ACPI_POWEROFF_MARKER: &str = "PODVISOR-VM-POWEROFF acpi";
/// Served at `http://<vm>/`.
pub const INDEX_HTML: &str = "hello from vm";
/// virtio-serial port name the agent listens on (libvirt's `org.qemu.guest_agent.0` channel).
pub const AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// Insmod'ed in this order; a failure is reported on the console.
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
];
/// Loaded after [`VIRTIO_MODULES`], silently best-effort: the ACPI power button
/// as an input device (for `acpid`), and virtio-vsock for later agents.
pub const OPTIONAL_MODULES: &[&str] = &[
    "button",
    "evdev",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Which QEMU guest agent runs on the `org.qemu.guest_agent.0` port.
#[derive(Clone, Debug)]
pub enum GuestAgent {
    None,
    /// This crate's static `podvisor-test-agent` binary.
    Builtin(PathBuf),
    /// Debian's `qemu-ga` (package qemu-guest-agent) plus the shared
    /// libraries `ldd` reports for it.
    QemuGa(PathBuf),
}

impl GuestAgent {
    /// Debian's qemu-ga when installed (the real agent, as in production guests),
    /// else `builtin` (this crate's `podvisor-test-agent`).
    pub fn preferred(builtin: impl Into<PathBuf>) -> GuestAgent {
        let qemu_ga = Path::new("/usr/sbin/qemu-ga");
        if qemu_ga.is_file() {
            GuestAgent::QemuGa(qemu_ga.into())
        } else {
            GuestAgent::Builtin(builtin.into())
        }
    }
}

/// What goes into the initramfs.
#[derive(Clone, Debug)]
pub struct InitramfsSpec {
    pub kernel: Kernel,
    /// A static busybox (package busybox-static).
    pub busybox: PathBuf,
    pub agent: GuestAgent,
    /// Shell run by `/init` just before the ready marker.
    pub extra_init: String,
}

impl InitramfsSpec {
    pub fn new(kernel: Kernel, agent: GuestAgent) -> InitramfsSpec {
        InitramfsSpec {
            kernel,
            busybox: "/bin/busybox".into(),
            agent,
            extra_init: String::new(),
        }
    }

    /// The uncompressed newc archive (deterministic for the same inputs).
    pub fn build_cpio(&self) -> io::Result<Vec<u8>> {
        let mut files = Tree::default();
        for dir in [
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "etc",
            "dev",
            "proc",
            "sys",
            "run",
            "root",
            "var",
            "var/log",
            "www",
            "lib",
            "lib/modules",
        ] {
            files.dir(dir, 0o755);
        }
        files.dir("tmp", 0o1777);
        files.symlink("var/run", "../run");
        files.dev_console();

        let busybox = fs::read(&self.busybox)?;
        files.file("bin/busybox", 0o755, busybox);
        for applet in busybox_applets(&self.busybox)? {
            if applet != "busybox" {
                files.symlink(&format!("bin/{applet}"), "busybox");
            }
        }

        for name in VIRTIO_MODULES.iter().chain(OPTIONAL_MODULES) {
            let module = self.kernel.module(name)?;
            files.file(&format!("lib/modules/{name}.ko"), 0o644, module);
        }

        let agent_cmd = match &self.agent {
            GuestAgent::None => None,
            GuestAgent::Builtin(path) => {
                files.file("bin/podvisor-test-agent", 0o755, read_stripped(path)?);
                files.shared_libraries(path)?;
                Some("/bin/podvisor-test-agent \"$port\"".to_owned())
            }
            GuestAgent::QemuGa(path) => {
                files.file("usr/bin/qemu-ga", 0o755, fs::read(path)?);
                files.shared_libraries(path)?;
                Some("/usr/bin/qemu-ga -m virtio-serial -p \"$port\" -t /run/qemu-ga -l /run/qemu-ga.log".to_owned())
            }
        };

        files.file(
            "init",
            0o755,
            init_script(agent_cmd.as_deref(), &self.extra_init).into_bytes(),
        );
        files.file_with_parents("etc/udhcpc/default.script", 0o755, UDHCPC_SCRIPT.into());
        files.file_with_parents("etc/acpi/PWRF/00000080", 0o755, ACPI_POWER_SCRIPT.into());
        files.file("sbin/shutdown", 0o755, SHUTDOWN_SCRIPT.into());
        files.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n".to_vec());
        files.file("etc/group", 0o644, b"root:x:0:\n".to_vec());
        files.file("etc/hostname", 0o644, b"podvisor-vm\n".to_vec());
        files.file("etc/profile", 0o644, PROFILE.into());
        files.file("www/index.html", 0o644, INDEX_HTML.into());
        Ok(files.into_cpio())
    }

    /// [`build_cpio`](Self::build_cpio), gzip-compressed (what the kernel loads as initrd).
    pub fn build(&self) -> io::Result<Vec<u8>> {
        gzip(&self.build_cpio()?)
    }
}

pub(crate) fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data)?;
    enc.finish()
}

/// `binary` without symbols if binutils' `strip` is available (a debug build
/// of the agent is 16 MB with debug info, 2 MB without).
fn read_stripped(binary: &Path) -> io::Result<Vec<u8>> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let tmp = std::env::temp_dir().join(format!("vmimage-strip-{}-{nanos}", std::process::id()));
    let stripped = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&tmp)
        .arg(binary)
        .status()
        .is_ok_and(|s| s.success());
    let data = if stripped { fs::read(&tmp) } else { fs::read(binary) };
    let _ = fs::remove_file(&tmp);
    data
}

/// The applet names `busybox --list` prints.
fn busybox_applets(busybox: &Path) -> io::Result<Vec<String>> {
    let out = Command::new(busybox).arg("--list").output()?;
    if !out.status.success() {
        return Err(other_err(format!("{} --list failed", busybox.display())));
    }
    let list = String::from_utf8_lossy(&out.stdout);
    Ok(list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Absolute paths of the shared objects `ldd` lists for `binary` (the loader
/// included); empty for a static binary.
fn shared_libraries(binary: &Path) -> io::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    if !out.status.success() {
        if [&out.stdout, &out.stderr]
            .iter()
            .any(|o| String::from_utf8_lossy(o).contains("not a dynamic executable"))
        {
            return Ok(Vec::new());
        }
        return Err(other_err(format!("ldd {} failed", binary.display())));
    }
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
    let text = String::from_utf8_lossy(&out.stdout);
    let libs = text
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    Ok(libs)
}

/// Paths sorted so parents precede children; later inserts replace earlier ones.
#[derive(Default)]
struct Tree(BTreeMap<String, Node>);

enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Symlink(String),
    Console,
}

impl Tree {
    fn dir(&mut self, path: &str, mode: u32) {
        self.0.insert(path.into(), Node::Dir(mode));
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.0.insert(path.into(), Node::File(mode, data));
    }

    /// Adds missing parent directories (0755) as well.
    fn file_with_parents(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.and_then(Path::to_str).filter(|d| !d.is_empty()) {
            self.0.entry(dir.into()).or_insert(Node::Dir(0o755));
            parent = Path::new(dir).parent();
        }
        self.file(path, mode, data);
    }

    /// Copies what a dynamic `binary` needs (at the paths `ldd` names) into the tree.
    fn shared_libraries(&mut self, binary: &Path) -> io::Result<()> {
        for lib in shared_libraries(binary)? {
            let rel = lib.to_str().ok_or_else(|| other_err("non-UTF-8 library path"))?;
            self.file_with_parents(rel.trim_start_matches('/'), 0o755, fs::read(&lib)?);
        }
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.0.insert(path.into(), Node::Symlink(target.into()));
    }

    /// The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    fn dev_console(&mut self) {
        self.0.insert("dev/console".into(), Node::Console);
    }

    fn into_cpio(self) -> Vec<u8> {
        let mut w = CpioWriter::new();
        // BTreeMap order puts "a" before "a/b"; "a-b" sorts between them, harmless.
        for (path, node) in &self.0 {
            match node {
                Node::Dir(mode) => w.dir(path, *mode),
                Node::File(mode, data) => w.file(path, *mode, data),
                Node::Symlink(target) => w.symlink(path, target),
                Node::Console => w.char_device(path, 0o600, 5, 1),
            }
        }
        w.finish()
    }
}

/// `/init`, PID 1. `agent_cmd` runs with `$port` set to the agent's /dev/vport*p* node.
fn init_script(agent_cmd: Option<&str>, extra_init: &str) -> String {
    let modules = VIRTIO_MODULES.join(" ");
    let optional = OPTIONAL_MODULES.join(" ");
    let agent = match agent_cmd {
        Some(cmd) => format!(
            r#"# Guest agent on the virtio-serial port named {AGENT_PORT_NAME}; respawned if it exits.
(
    tries=0
    while [ "$tries" -lt 100 ]; do
        port=
        for d in /sys/class/virtio-ports/*; do
            [ "$(cat "$d/name" 2>/dev/null)" = {AGENT_PORT_NAME} ] && port=/dev/${{d##*/}}
        done
        if [ -n "$port" ] && [ -c "$port" ]; then
            echo "podvisor-init: guest agent on $port" >/dev/console
            {cmd}
            sleep 1
        else
            tries=$((tries + 1))
            usleep 100000
        fi
    done
) </dev/null >>/run/agent.log 2>&1 &
"#
        ),
        None => String::new(),
    };
    format!(
        r#"#!/bin/sh
# podvisor test VM init (PID 1).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=vt100
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run/qemu-ga
mount -t devpts devpts /dev/pts
hostname podvisor-vm
for m in {modules}; do
    insmod "/lib/modules/$m.ko" || echo "podvisor-init: insmod $m failed"
done
for m in {optional}; do
    insmod "/lib/modules/$m.ko" 2>/dev/null
done
ip link set lo up
echo "{CMDLINE_MARKER} $(cat /proc/cmdline)"

{agent}
# ACPI power button (button.ko + evdev) -> acpid -> /etc/acpi/PWRF/00000080.
(
    n=0
    while ! [ -e /dev/input/event0 ] && [ "$n" -lt 40 ]; do usleep 50000; n=$((n + 1)); done
    acpid -l /run/acpid.log
) </dev/null >/dev/null 2>&1 &

ip=none
if [ -e /sys/class/net/eth0 ]; then
    # Blocks until a lease (then keeps renewing in the background) or ~20 s.
    # MTU and classless routes (121) are only sent when asked for.
    udhcpc -i eth0 -s /etc/udhcpc/default.script -t 10 -T 1 -A 1 -b -O mtu -O staticroutes -x hostname:podvisor-vm
    [ -s /run/podvisor-ip ] && ip=$(cat /run/podvisor-ip)
fi
# /ip tells VMs behind one Service apart.
echo "$ip" >/www/ip
httpd -p 80 -h /www
{extra_init}
echo "{READY_MARKER} ip=$ip"

# Interactive shell on the serial console, respawned when it exits.
while :; do
    setsid cttyhack sh -l
    sleep 1
done
"#
    )
}

/// busybox udhcpc hook: `$1` is the event, the lease comes in environment variables.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
[ -n "$interface" ] || exit 1
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set dev "$interface" up
    rm -f /run/podvisor-ip
    ;;
bound|renew)
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    [ "$(cat /run/podvisor-ip 2>/dev/null)" = "$ip" ] || ip -4 addr flush dev "$interface"
    ip addr replace "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    ip link set dev "$interface" up
    while ip -4 route del default dev "$interface" 2>/dev/null; do :; done
    if [ -n "$staticroutes" ]; then
        # Option 121 ("dest/len gateway" pairs) replaces the router option (RFC 3442).
        set -- $staticroutes
        while [ $# -ge 2 ]; do
            if [ "$2" = 0.0.0.0 ]; then
                ip route replace "$1" dev "$interface"
            else
                ip route replace "$1" via "$2" dev "$interface"
            fi
            shift 2
        done
    else
        for r in $router; do
            ip route add default via "$r" dev "$interface" && break
        done
    fi
    {
        [ -n "$domain" ] && echo "search $domain"
        for s in $dns; do echo "nameserver $s"; done
    } >/etc/resolv.conf.new
    mv /etc/resolv.conf.new /etc/resolv.conf
    echo "$ip" >/run/podvisor-ip
    echo "podvisor-init: $1 $ip/$mask router=$router dns=$dns mtu=${mtu:-default}" >/dev/console
    ;;
esac
exit 0
"#;

const ACPI_POWER_SCRIPT: &str = r#"#!/bin/sh
echo "PODVISOR-VM-POWEROFF acpi" >/dev/console
sync
poweroff -f
"#;

/// What qemu-ga's guest-shutdown runs: `/sbin/shutdown -P|-H|-r +0 MESSAGE`.
const SHUTDOWN_SCRIPT: &str = r#"#!/bin/sh
sync
case "$1" in
-r) reboot -f ;;
-H) halt -f ;;
*) poweroff -f ;;
esac
"#;

const PROFILE: &str = "PS1='podvisor-vm:\\w# '\nexport PS1\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_script_mentions_everything() {
        let script = init_script(Some("/bin/agent \"$port\""), "echo extra");
        for needle in [
            "insmod \"/lib/modules/$m.ko\"",
            "virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover \
             virtio_net virtio_console",
            "/bin/agent \"$port\"",
            "org.qemu.guest_agent.0",
            "httpd -p 80 -h /www",
            "echo extra",
            "PODVISOR-VM-READY ip=$ip",
            "setsid cttyhack sh",
        ] {
            assert!(script.contains(needle), "init lacks {needle:?}:\n{script}");
        }
        assert!(!init_script(None, "").contains("virtio-ports"));
    }

    /// A dynamically linked agent brings its libraries along; a static one needs none.
    #[test]
    fn dynamic_agent_gets_its_libraries() {
        let Ok(kernel) = Kernel::find() else {
            eprintln!("no cloud kernel installed; skipping");
            return;
        };
        let dynamic = InitramfsSpec::new(kernel.clone(), GuestAgent::Builtin("/bin/true".into()));
        let names = crate::cpio::names(&dynamic.build_cpio().unwrap());
        let has = |name: &str| names.iter().any(|n| n == name);
        for name in [
            "bin/podvisor-test-agent",
            "lib/x86_64-linux-gnu/libc.so.6",
            "lib64/ld-linux-x86-64.so.2",
            "init",
            "dev/console",
            "bin/udhcpc",
            "lib/modules/virtio_net.ko",
            "etc/acpi/PWRF/00000080",
            "www/index.html",
        ] {
            assert!(has(name), "{name} missing");
        }
        let none = crate::cpio::names(&InitramfsSpec::new(kernel, GuestAgent::None).build_cpio().unwrap());
        assert!(!none.iter().any(|n| n.contains("libc.so")));
        assert!(!none.iter().any(|n| n.contains("agent")));
        assert!(shared_libraries(Path::new("/bin/busybox")).unwrap().is_empty());
    }

    #[test]
    fn tree_adds_parents_in_order() {
        let mut tree = Tree::default();
        tree.file_with_parents("lib/x86_64-linux-gnu/libc.so.6", 0o755, vec![1]);
        tree.dir("lib", 0o700);
        let paths: Vec<_> = tree.0.keys().cloned().collect();
        assert_eq!(paths, ["lib", "lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu/libc.so.6"]);
        assert!(matches!(tree.0["lib"], Node::Dir(0o700)));
    }
}
