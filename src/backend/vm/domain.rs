//! Domain lifecycle over libvirt: define, start (paused, for the console relay
//! to connect first), ACPI shutdown then destroy, undefine, state with the
//! reason mapped to an exit code, stats, and the list of podvisor's domains.

use std::sync::Once;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

use super::{METADATA_NS, PodvisorMetadata, VmError, xml};

/// The default connection URI (QEMU's system instance; podvisor runs as root).
pub const DEFAULT_URI: &str = "qemu:///system";

/// How often [`VmDomain::shutdown`] presses the power button again.
pub const REPRESS_INTERVAL: Duration = Duration::from_secs(5);

static QUIET: Once = Once::new();

/// A connection to libvirtd.
pub struct Libvirt {
    conn: Connect,
    uri: String,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt").field("uri", &self.uri).finish()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let _ = self.conn.close();
    }
}

fn is_no_domain(err: &virt::error::Error) -> bool {
    err.code() == ErrorNumber::NoDomain
}

impl Libvirt {
    /// Connects to `uri` (e.g. [`DEFAULT_URI`]). libvirt's default error
    /// printer (to stderr) is turned off; errors come back as values.
    pub fn connect(uri: &str) -> Result<Libvirt, VmError> {
        QUIET.call_once(virt::error::clear_error_callback);
        let conn = Connect::open(Some(uri)).map_err(VmError::libvirt(format!("connecting to {uri}")))?;
        Ok(Libvirt {
            conn,
            uri: uri.to_string(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// False once libvirtd went away; the caller then connects again.
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// Defines a persistent domain (validated against libvirt's schema).
    pub fn define(&self, domain_xml: &str) -> Result<VmDomain, VmError> {
        let domain = Domain::define_xml_flags(&self.conn, domain_xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .map_err(VmError::libvirt("defining domain"))?;
        VmDomain::new(domain)
    }

    /// The domain called `name`, if it exists.
    pub fn lookup(&self, name: &str) -> Result<Option<VmDomain>, VmError> {
        match Domain::lookup_by_name(&self.conn, name) {
            Ok(domain) => VmDomain::new(domain).map(Some),
            Err(err) if is_no_domain(&err) => Ok(None),
            Err(err) => Err(VmError::libvirt(format!("looking up domain {name}"))(err)),
        }
    }

    /// Every domain (running or not) that carries podvisor's metadata; the
    /// rest of the host's domains are left alone.
    pub fn podvisor_domains(&self) -> Result<Vec<PodvisorDomain>, VmError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(VmError::libvirt("listing domains"))?;
        let mut found = Vec::new();
        for domain in domains {
            let xml = match domain.get_metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(METADATA_NS), 0) {
                Ok(xml) => xml,
                // Not ours, or gone since the listing.
                Err(err) if matches!(err.code(), ErrorNumber::NoDomainMetadata | ErrorNumber::NoDomain) => continue,
                Err(err) => return Err(VmError::libvirt("reading domain metadata")(err)),
            };
            let Some(metadata) = xml::parse_metadata(&xml) else {
                tracing::warn!(%xml, "unreadable podvisor metadata on a domain");
                continue;
            };
            let Ok(domain) = VmDomain::new(domain) else { continue };
            let state = match domain.state() {
                Ok(state) => state,
                Err(VmError::NotFound(_)) => continue,
                Err(err) => return Err(err),
            };
            found.push(PodvisorDomain {
                name: domain.name.clone(),
                uuid: domain.uuid().unwrap_or_default(),
                metadata,
                state,
            });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }
}

/// One of podvisor's domains, as found by [`Libvirt::podvisor_domains`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodvisorDomain {
    pub name: String,
    pub uuid: String,
    pub metadata: PodvisorMetadata,
    pub state: VmState,
}

/// Why a domain is shut off (libvirt's `virDomainShutoffReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutoffReason {
    Unknown,
    /// The guest powered off.
    Shutdown,
    /// Killed (by us, or by someone with `virsh destroy`).
    Destroyed,
    /// The guest crashed (needs a panic device and driver).
    Crashed,
    Migrated,
    Saved,
    /// QEMU failed to start.
    Failed,
    FromSnapshot,
    /// libvirtd killed it while reconnecting after its own restart.
    Daemon,
}

impl ShutoffReason {
    fn from_raw(reason: i32) -> ShutoffReason {
        match reason as sys::virDomainShutoffReason {
            sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN => ShutoffReason::Shutdown,
            sys::VIR_DOMAIN_SHUTOFF_DESTROYED => ShutoffReason::Destroyed,
            sys::VIR_DOMAIN_SHUTOFF_CRASHED => ShutoffReason::Crashed,
            sys::VIR_DOMAIN_SHUTOFF_MIGRATED => ShutoffReason::Migrated,
            sys::VIR_DOMAIN_SHUTOFF_SAVED => ShutoffReason::Saved,
            sys::VIR_DOMAIN_SHUTOFF_FAILED => ShutoffReason::Failed,
            sys::VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT => ShutoffReason::FromSnapshot,
            sys::VIR_DOMAIN_SHUTOFF_DAEMON => ShutoffReason::Daemon,
            _ => ShutoffReason::Unknown,
        }
    }
}

/// A domain's state, reduced to what the pod needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    /// ACPI shutdown in progress.
    ShuttingDown,
    ShutOff(ShutoffReason),
    /// Crashed and kept (`on_crash` preserve).
    Crashed,
    /// Guest-initiated suspend to RAM.
    Suspended,
    Unknown,
}

/// How a stopped VM counts as a container exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmExit {
    pub exit_code: i32,
    /// The CRI reason string.
    pub reason: &'static str,
}

impl VmState {
    fn from_raw(state: sys::virDomainState, reason: i32) -> VmState {
        match state {
            sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => VmState::Running,
            sys::VIR_DOMAIN_PAUSED => VmState::Paused,
            sys::VIR_DOMAIN_SHUTDOWN => VmState::ShuttingDown,
            sys::VIR_DOMAIN_SHUTOFF => VmState::ShutOff(ShutoffReason::from_raw(reason)),
            sys::VIR_DOMAIN_CRASHED => VmState::Crashed,
            sys::VIR_DOMAIN_PMSUSPENDED => VmState::Suspended,
            _ => VmState::Unknown,
        }
    }

    /// Whether QEMU is (still) there.
    pub fn is_active(self) -> bool {
        !matches!(self, VmState::ShutOff(_))
    }

    /// The exit this state stands for, once the VM has ended: a guest
    /// poweroff is a clean exit, a crash or a kill an error.
    pub fn exit(self) -> Option<VmExit> {
        let exit = |exit_code, reason| Some(VmExit { exit_code, reason });
        match self {
            VmState::ShutOff(ShutoffReason::Shutdown) => exit(0, "Completed"),
            VmState::ShutOff(ShutoffReason::Destroyed) => exit(137, "Error"),
            VmState::ShutOff(ShutoffReason::Crashed) | VmState::Crashed => exit(1, "Error"),
            VmState::ShutOff(ShutoffReason::Failed) => exit(128, "StartError"),
            VmState::ShutOff(_) => exit(255, "Error"),
            _ => None,
        }
    }
}

/// How [`VmDomain::shutdown`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    AlreadyStopped,
    /// The guest powered off within the grace period.
    ShutDown,
    /// The grace period ran out and the domain was destroyed.
    Destroyed,
}

/// Block usage of one disk (`virDomainGetBlockInfo`), in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    pub target: String,
    /// What the guest sees.
    pub capacity: u64,
    /// Host storage in use (highest allocated extent).
    pub allocation: u64,
    /// Size of the image file on the host.
    pub physical: u64,
}

/// Resource usage of a running domain. Memory in KiB; the balloon figures
/// need the guest's virtio-balloon driver.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    pub cpu_time_ns: u64,
    pub vcpus: u32,
    pub memory_max_kib: u64,
    /// Current balloon size (what the guest has).
    pub memory_actual_kib: Option<u64>,
    /// Resident set of the QEMU process on the host.
    pub memory_rss_kib: Option<u64>,
    /// Guest-reported total, unused and usable memory.
    pub memory_available_kib: Option<u64>,
    pub memory_unused_kib: Option<u64>,
    pub memory_usable_kib: Option<u64>,
    pub disks: Vec<DiskUsage>,
}

/// One libvirt domain.
pub struct VmDomain {
    domain: Domain,
    name: String,
}

impl std::fmt::Debug for VmDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmDomain").field("name", &self.name).finish()
    }
}

impl VmDomain {
    fn new(domain: Domain) -> Result<VmDomain, VmError> {
        let name = domain.get_name().map_err(VmError::libvirt("reading domain name"))?;
        Ok(VmDomain { domain, name })
    }

    fn err(&self, what: &str) -> impl FnOnce(virt::error::Error) -> VmError + '_ {
        let what = what.to_string();
        move |err| {
            if is_no_domain(&err) {
                VmError::NotFound(self.name.clone())
            } else {
                VmError::Libvirt {
                    context: format!("{what} domain {}", self.name),
                    source: err,
                }
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uuid(&self) -> Result<String, VmError> {
        self.domain.get_uuid_string().map_err(self.err("reading UUID of"))
    }

    pub(crate) fn raw(&self) -> &Domain {
        &self.domain
    }

    /// Starts the domain; `paused` leaves its vCPUs stopped until [`Self::resume`]
    /// (QEMU and its sockets exist, the guest has not run yet).
    pub fn start(&self, paused: bool) -> Result<(), VmError> {
        let flags = if paused { sys::VIR_DOMAIN_START_PAUSED } else { 0 };
        self.domain.create_with_flags(flags).map_err(self.err("starting"))?;
        Ok(())
    }

    pub fn resume(&self) -> Result<(), VmError> {
        self.domain.resume().map_err(self.err("resuming"))?;
        Ok(())
    }

    pub fn state(&self) -> Result<VmState, VmError> {
        let (state, reason) = self.domain.get_state().map_err(self.err("reading state of"))?;
        Ok(VmState::from_raw(state, reason))
    }

    /// Kills QEMU; fine if it is not running.
    pub fn destroy(&self) -> Result<(), VmError> {
        match self.domain.destroy() {
            Ok(()) => Ok(()),
            Err(err) if err.code() == ErrorNumber::OperationInvalid && !self.state()?.is_active() => Ok(()),
            Err(err) => Err(self.err("destroying")(err)),
        }
    }

    /// Presses the ACPI power button (again every [`REPRESS_INTERVAL`]: a
    /// guest still booting misses a press) and waits up to `grace` for the
    /// guest to power off, then destroys it.
    pub fn shutdown(&self, grace: Duration) -> Result<StopOutcome, VmError> {
        if !self.state()?.is_active() {
            return Ok(StopOutcome::AlreadyStopped);
        }
        let deadline = Instant::now() + grace;
        let mut next_press = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next_press {
                next_press += REPRESS_INTERVAL;
                if let Err(err) = self.domain.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) {
                    if !self.state()?.is_active() {
                        return Ok(StopOutcome::ShutDown);
                    }
                    // Paused or no ACPI: the grace period cannot help.
                    tracing::debug!(domain = %self.name, error = %err, "ACPI shutdown refused");
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
            if !self.state()?.is_active() {
                return Ok(StopOutcome::ShutDown);
            }
        }
        self.destroy()?;
        Ok(StopOutcome::Destroyed)
    }

    /// Removes the definition (and managed save, snapshot/checkpoint
    /// metadata, NVRAM), destroying the domain first if it runs.
    pub fn undefine(self) -> Result<(), VmError> {
        self.destroy()?;
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        match self.domain.undefine_flags(flags) {
            Ok(()) => Ok(()),
            Err(err) if is_no_domain(&err) => Ok(()),
            // Older libvirt without some of the flags.
            Err(err) if err.code() == ErrorNumber::InvalidArg => self.domain.undefine().map_err(self.err("undefining")),
            Err(err) => Err(self.err("undefining")(err)),
        }
    }

    /// podvisor's metadata on this domain, if any.
    pub fn metadata(&self) -> Result<Option<PodvisorMetadata>, VmError> {
        match self
            .domain
            .get_metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(METADATA_NS), 0)
        {
            Ok(xml) => Ok(xml::parse_metadata(&xml)),
            Err(err) if err.code() == ErrorNumber::NoDomainMetadata => Ok(None),
            Err(err) => Err(self.err("reading metadata of")(err)),
        }
    }

    /// The live domain XML (or the defined one when stopped).
    pub fn xml(&self) -> Result<String, VmError> {
        self.domain.get_xml_desc(0).map_err(self.err("reading XML of"))
    }

    /// CPU time, memory (balloon and QEMU RSS) and per-disk block usage.
    pub fn stats(&self) -> Result<VmStats, VmError> {
        let info = self.domain.get_info().map_err(self.err("reading info of"))?;
        let mut stats = VmStats {
            cpu_time_ns: info.cpu_time,
            vcpus: info.nr_virt_cpu,
            memory_max_kib: info.max_mem,
            ..VmStats::default()
        };
        if info.state != sys::VIR_DOMAIN_SHUTOFF {
            let memory = self
                .domain
                .memory_stats(0)
                .map_err(self.err("reading memory stats of"))?;
            for stat in memory {
                let slot = match stat.tag as sys::virDomainMemoryStatTags {
                    sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON => &mut stats.memory_actual_kib,
                    sys::VIR_DOMAIN_MEMORY_STAT_RSS => &mut stats.memory_rss_kib,
                    sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE => &mut stats.memory_available_kib,
                    sys::VIR_DOMAIN_MEMORY_STAT_UNUSED => &mut stats.memory_unused_kib,
                    sys::VIR_DOMAIN_MEMORY_STAT_USABLE => &mut stats.memory_usable_kib,
                    _ => continue,
                };
                *slot = Some(stat.val);
            }
        }
        for target in xml::disk_targets(&self.xml()?) {
            let info = self
                .domain
                .get_block_info(&target, 0)
                .map_err(self.err("reading block info of"))?;
            stats.disks.push(DiskUsage {
                target,
                capacity: info.capacity,
                allocation: info.allocation,
                physical: info.physical,
            });
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shutoff_reason() {
        let exit = |state, reason| VmState::from_raw(state, reason).exit();
        assert_eq!(
            exit(sys::VIR_DOMAIN_SHUTOFF, sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN as i32),
            Some(VmExit {
                exit_code: 0,
                reason: "Completed"
            })
        );
        let crashed = exit(sys::VIR_DOMAIN_SHUTOFF, sys::VIR_DOMAIN_SHUTOFF_CRASHED as i32).unwrap();
        assert_eq!(crashed.reason, "Error");
        assert_ne!(crashed.exit_code, 0);
        assert_eq!(exit(sys::VIR_DOMAIN_CRASHED, 0).unwrap().reason, "Error");
        assert_eq!(
            exit(sys::VIR_DOMAIN_SHUTOFF, sys::VIR_DOMAIN_SHUTOFF_DESTROYED as i32)
                .unwrap()
                .exit_code,
            137
        );
        assert_eq!(
            exit(sys::VIR_DOMAIN_SHUTOFF, sys::VIR_DOMAIN_SHUTOFF_FAILED as i32)
                .unwrap()
                .reason,
            "StartError"
        );
        assert_eq!(exit(sys::VIR_DOMAIN_SHUTOFF, 99).unwrap().exit_code, 255);
        assert_eq!(exit(sys::VIR_DOMAIN_RUNNING, 1), None);
        assert_eq!(exit(sys::VIR_DOMAIN_PAUSED, 0), None);
    }

    #[test]
    fn states_map() {
        assert_eq!(VmState::from_raw(sys::VIR_DOMAIN_BLOCKED, 0), VmState::Running);
        assert_eq!(VmState::from_raw(sys::VIR_DOMAIN_SHUTDOWN, 0), VmState::ShuttingDown);
        assert_eq!(VmState::from_raw(sys::VIR_DOMAIN_PMSUSPENDED, 0), VmState::Suspended);
        assert!(VmState::Paused.is_active());
        assert!(!VmState::ShutOff(ShutoffReason::Unknown).is_active());
    }
}
