//! KVM or TCG: decided by actually running a tiny KVM domain, once per daemon.
//!
//! `/dev/kvm` being there proves little. On some hosts (nested, under other
//! hypervisors) a KVM guest with the CPU model podvisor uses aborts inside
//! QEMU at start, and with QEMU's default CPU model it "runs" but barely
//! makes progress. So the probe boots the firmware of a tiny KVM domain with
//! [`xml::kvm_cpu`] and requires it to reach its end ("No bootable device" on
//! the serial port) within a budget, and the domain to keep running for a
//! while. Measured here: TCG finishes the firmware in 0.9 s; KVM with the
//! passthrough CPU aborts at start (MSR 0x10a); KVM with QEMU's default CPU
//! needs 5.7 s.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use super::xml::{self, Element};
use super::{Accel, VmError, path_str};

/// The `hypervisor` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorMode {
    /// KVM if the probe succeeds, else TCG.
    #[default]
    Auto,
    /// KVM without a test domain; `/dev/kvm` must open.
    Kvm,
    /// Software emulation, no probing.
    Tcg,
}

impl FromStr for HypervisorMode {
    type Err = VmError;

    fn from_str(s: &str) -> Result<Self, VmError> {
        match s {
            "auto" => Ok(HypervisorMode::Auto),
            "kvm" => Ok(HypervisorMode::Kvm),
            "tcg" => Ok(HypervisorMode::Tcg),
            other => Err(VmError::Invalid(format!(
                "hypervisor must be auto, kvm or tcg, not {other:?}"
            ))),
        }
    }
}

/// The decision and why, for logs and the CRI Status verbose info.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HypervisorChoice {
    pub accel: Accel,
    pub reason: String,
}

/// The two checks the decision rests on; faked in tests.
pub trait KvmProbe {
    /// Opens `/dev/kvm` read-write and checks its API version.
    fn open_dev_kvm(&self) -> Result<(), String>;
    /// Runs a tiny KVM domain; `Ok` with a description when it ran properly.
    fn run_test_domain(&self) -> Result<String, String>;
}

/// Decides the accelerator for `mode`.
pub fn decide(mode: HypervisorMode, probe: &dyn KvmProbe) -> Result<HypervisorChoice, VmError> {
    let choice = |accel, reason: String| Ok(HypervisorChoice { accel, reason });
    match mode {
        HypervisorMode::Tcg => choice(Accel::Tcg, "tcg: configured".into()),
        HypervisorMode::Kvm => match probe.open_dev_kvm() {
            Ok(()) => choice(Accel::Kvm, "kvm: configured (not test-booted)".into()),
            Err(err) => Err(VmError::Invalid(format!(
                "hypervisor is set to kvm, but /dev/kvm is unusable: {err}"
            ))),
        },
        HypervisorMode::Auto => {
            if let Err(err) = probe.open_dev_kvm() {
                return choice(Accel::Tcg, format!("tcg: /dev/kvm is unusable: {err}"));
            }
            match probe.run_test_domain() {
                Ok(detail) => choice(Accel::Kvm, format!("kvm: test domain {detail}")),
                Err(err) => choice(
                    Accel::Tcg,
                    format!("tcg: /dev/kvm opens, but a KVM test domain failed: {err}"),
                ),
            }
        }
    }
}

/// The decision, made once and kept for the daemon's lifetime.
#[derive(Debug, Default)]
pub struct Hypervisor {
    choice: Mutex<Option<HypervisorChoice>>,
}

impl Hypervisor {
    pub fn new() -> Hypervisor {
        Hypervisor::default()
    }

    /// The cached choice, probing on first use (concurrent callers wait for one probe).
    /// Errors (a forced `kvm` without `/dev/kvm`) are not cached.
    pub fn get_or_probe(&self, mode: HypervisorMode, probe: &dyn KvmProbe) -> Result<HypervisorChoice, VmError> {
        let mut slot = self.choice.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(choice) = slot.as_ref() {
            return Ok(choice.clone());
        }
        let choice = decide(mode, probe)?;
        tracing::info!(accel = ?choice.accel, reason = %choice.reason, "VM hypervisor chosen");
        *slot = Some(choice.clone());
        Ok(choice)
    }

    /// The choice, if made already. Never waits for a probe under way (it takes seconds).
    pub fn cached(&self) -> Option<HypervisorChoice> {
        match self.choice.try_lock() {
            Ok(slot) => slot.clone(),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner().clone(),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// `KVM_GET_API_VERSION`: `_IO(0xAE, 0x00)`; stable KVM answers 12.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_API_VERSION: libc::c_int = 12;

/// What SeaBIOS prints on the serial port when it has tried every boot device.
const FIRMWARE_DONE: &str = "No bootable device";

/// The real probe: `/dev/kvm`, then a transient KVM domain through libvirt.
#[derive(Clone, Debug)]
pub struct LibvirtKvmProbe {
    pub uri: String,
    /// Holds the probe domain's serial output (libvirt opens the file as root).
    pub work_dir: PathBuf,
    /// How long the firmware may take; TCG needs about 0.9 s on the project's machines.
    pub progress_budget: Duration,
    /// How long after start the domain must still be running.
    pub hold: Duration,
    /// The guest CPU; the one real VMs use ([`xml::kvm_cpu`]), `None` for QEMU's default.
    pub cpu: Option<Element>,
}

impl LibvirtKvmProbe {
    pub fn new(uri: &str, work_dir: PathBuf) -> LibvirtKvmProbe {
        LibvirtKvmProbe {
            uri: uri.to_string(),
            work_dir,
            progress_budget: Duration::from_millis(2500),
            hold: Duration::from_secs(1),
            cpu: Some(xml::kvm_cpu()),
        }
    }

    fn domain_xml(&self, name: &str, serial: &str) -> String {
        let mut domain = Element::new("domain")
            .attr("type", "kvm")
            .child(Element::leaf("name", name))
            .child(Element::leaf("memory", "32").attr("unit", "MiB"))
            .child(Element::leaf("vcpu", "1"))
            .child(
                Element::new("os")
                    .child(
                        Element::new("type")
                            .attr("arch", "x86_64")
                            .attr("machine", "q35")
                            .text("hvm"),
                    )
                    .child(Element::new("boot").attr("dev", "hd"))
                    .child(
                        Element::new("bios")
                            .attr("useserial", "yes")
                            .attr("rebootTimeout", "-1"),
                    ),
            );
        if let Some(cpu) = &self.cpu {
            domain.push(cpu.clone());
        }
        domain
            .child(
                Element::new("devices")
                    .child(Element::new("controller").attr("type", "usb").attr("model", "none"))
                    .child(
                        Element::new("serial")
                            .attr("type", "file")
                            .child(Element::new("source").attr("path", serial)),
                    )
                    .child(Element::new("memballoon").attr("model", "none")),
            )
            .render()
    }
}

/// Destroys a transient domain when dropped.
struct Transient(Domain);

impl Drop for Transient {
    fn drop(&mut self) {
        let _ = self.0.destroy();
    }
}

fn running(domain: &Domain) -> Result<(), String> {
    match domain.get_state() {
        Ok((sys::VIR_DOMAIN_RUNNING, _)) => Ok(()),
        Ok((state, reason)) => Err(format!("domain stopped (state {state}, reason {reason})")),
        Err(err) => Err(format!("domain vanished: {}", err.message())),
    }
}

impl KvmProbe for LibvirtKvmProbe {
    fn open_dev_kvm(&self) -> Result<(), String> {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| e.to_string())?;
        // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
        let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
        if version != KVM_API_VERSION {
            return Err(format!("KVM API version {version}, expected {KVM_API_VERSION}"));
        }
        Ok(())
    }

    fn run_test_domain(&self) -> Result<String, String> {
        std::fs::create_dir_all(&self.work_dir).map_err(|e| format!("creating {}: {e}", self.work_dir.display()))?;
        let serial_path = self.work_dir.join(format!("kvm-probe-{}.serial", std::process::id()));
        let _ = std::fs::remove_file(&serial_path);
        let serial = path_str(&serial_path).map_err(|e| e.to_string())?;
        let name = format!("podvisor-kvm-probe-{}", std::process::id());
        let conn =
            Connect::open(Some(&self.uri)).map_err(|e| format!("connecting to {}: {}", self.uri, e.message()))?;
        let result = (|| {
            let started = Instant::now();
            // Autodestroy: the domain goes away with this connection whatever happens.
            let domain = Domain::create_xml(
                &conn,
                &self.domain_xml(&name, serial),
                sys::VIR_DOMAIN_START_AUTODESTROY,
            )
            .map_err(|e| format!("start failed: {}", e.message().trim().replace('\n', "; ")))?;
            let domain = Transient(domain);
            let progress = loop {
                running(&domain.0)?;
                let mut text = String::new();
                if let Ok(mut file) = std::fs::File::open(&serial_path) {
                    let _ = file.read_to_string(&mut text);
                }
                if text.contains(FIRMWARE_DONE) {
                    break started.elapsed();
                }
                if started.elapsed() > self.progress_budget {
                    return Err(format!(
                        "domain runs but its firmware did not finish within {:?} (TCG would be faster)",
                        self.progress_budget
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if let Some(rest) = self.hold.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
            running(&domain.0)?;
            Ok(format!(
                "finished its firmware in {} ms and kept running for {:?}",
                progress.as_millis(),
                self.hold
            ))
        })();
        let mut conn = conn;
        let _ = conn.close();
        let _ = std::fs::remove_file(&serial_path);
        result
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    struct Fake {
        dev: Result<(), String>,
        domain: Result<String, String>,
        domain_runs: Cell<u32>,
    }

    impl Fake {
        fn new(dev: Result<(), &str>, domain: Result<&str, &str>) -> Fake {
            Fake {
                dev: dev.map_err(str::to_string),
                domain: domain.map(str::to_string).map_err(str::to_string),
                domain_runs: Cell::new(0),
            }
        }
    }

    impl KvmProbe for Fake {
        fn open_dev_kvm(&self) -> Result<(), String> {
            self.dev.clone()
        }
        fn run_test_domain(&self) -> Result<String, String> {
            self.domain_runs.set(self.domain_runs.get() + 1);
            self.domain.clone()
        }
    }

    #[test]
    fn auto_uses_kvm_only_when_the_test_domain_runs() {
        let good = Fake::new(Ok(()), Ok("ran"));
        let choice = decide(HypervisorMode::Auto, &good).unwrap();
        assert_eq!(choice.accel, Accel::Kvm);
        assert!(choice.reason.contains("ran"), "{}", choice.reason);

        let aborts = Fake::new(Ok(()), Err("start failed: MSR assertion"));
        let choice = decide(HypervisorMode::Auto, &aborts).unwrap();
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("MSR assertion"), "{}", choice.reason);

        let no_dev = Fake::new(Err("No such file or directory"), Ok("ran"));
        let choice = decide(HypervisorMode::Auto, &no_dev).unwrap();
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("/dev/kvm is unusable"), "{}", choice.reason);
        assert_eq!(no_dev.domain_runs.get(), 0, "no test domain without /dev/kvm");
    }

    #[test]
    fn overrides_skip_the_test_domain() {
        let aborts = Fake::new(Ok(()), Err("abort"));
        assert_eq!(decide(HypervisorMode::Kvm, &aborts).unwrap().accel, Accel::Kvm);
        assert_eq!(decide(HypervisorMode::Tcg, &aborts).unwrap().accel, Accel::Tcg);
        assert_eq!(aborts.domain_runs.get(), 0);
        let no_dev = Fake::new(Err("EACCES"), Ok("ran"));
        assert!(matches!(decide(HypervisorMode::Kvm, &no_dev), Err(VmError::Invalid(_))));
        assert_eq!(decide(HypervisorMode::Tcg, &no_dev).unwrap().accel, Accel::Tcg);
    }

    #[test]
    fn probes_once_and_caches() {
        let probe = Fake::new(Ok(()), Ok("ran"));
        let hypervisor = Hypervisor::new();
        assert_eq!(hypervisor.cached(), None);
        let first = hypervisor.get_or_probe(HypervisorMode::Auto, &probe).unwrap();
        let second = hypervisor.get_or_probe(HypervisorMode::Auto, &probe).unwrap();
        assert_eq!(first, second);
        assert_eq!(probe.domain_runs.get(), 1);
        assert_eq!(hypervisor.cached(), Some(first));
    }

    #[test]
    fn errors_are_not_cached() {
        let hypervisor = Hypervisor::new();
        assert!(
            hypervisor
                .get_or_probe(HypervisorMode::Kvm, &Fake::new(Err("x"), Ok("ran")))
                .is_err()
        );
        assert_eq!(hypervisor.cached(), None);
        let choice = hypervisor
            .get_or_probe(HypervisorMode::Kvm, &Fake::new(Ok(()), Ok("ran")))
            .unwrap();
        assert_eq!(choice.accel, Accel::Kvm);
    }

    #[test]
    fn parses_modes() {
        assert_eq!("auto".parse::<HypervisorMode>().unwrap(), HypervisorMode::Auto);
        assert_eq!("kvm".parse::<HypervisorMode>().unwrap(), HypervisorMode::Kvm);
        assert_eq!("tcg".parse::<HypervisorMode>().unwrap(), HypervisorMode::Tcg);
        assert!("KVM".parse::<HypervisorMode>().is_err());
    }

    #[test]
    fn probe_domain_is_a_kvm_firmware_only_domain() {
        let probe = LibvirtKvmProbe::new("qemu:///system", "/run/x".into());
        let doc = xml::parse(&probe.domain_xml("p", "/run/x/s")).unwrap();
        assert_eq!(doc.get_attr("type"), Some("kvm"));
        assert_eq!(doc.find("cpu"), Some(&xml::kvm_cpu()));
        assert_eq!(doc.find_path("os/bios").unwrap().get_attr("useserial"), Some("yes"));
        assert!(doc.descendants("disk").is_empty());
        assert_eq!(
            doc.find_path("devices/serial/source").unwrap().get_attr("path"),
            Some("/run/x/s")
        );
    }
}
