//! The VM backend as the manager uses it: a VM pod's one container is a
//! libvirt domain. Every call blocks (libvirt, `qemu-img`, `ip`): async
//! callers use `spawn_blocking`.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cloudinit::{self, NetworkSpec, Seed, UserData};
use super::dhcp::{self, Lease};
use super::domain::{Libvirt, StopOutcome, VmState};
use super::helper::HelperConfig;
use super::net::{self, PodNet};
use super::probe::{Hypervisor, HypervisorChoice, HypervisorMode, KvmProbe, LibvirtKvmProbe};
use super::{Accel, CpuTune, NicAttachment, PodvisorMetadata, VmDisk, VmError, VmNic, VmSpec, agent, disk, xml};
use crate::config::VmConfig;

/// Annotations, podvisor's own first, then Virtlet's alias.
pub const ANNOTATION_VCPUS: [&str; 2] = ["vm.podvisor.io/vcpus", "VirtletVCPUCount"];
pub const ANNOTATION_ROOT_VOLUME_SIZE: [&str; 2] = ["vm.podvisor.io/root-volume-size", "VirtletRootVolumeSize"];
pub const ANNOTATION_USER_DATA: [&str; 2] = ["vm.podvisor.io/cloud-init-user-data", "VirtletCloudInitUserData"];
pub const ANNOTATION_SSH_KEYS: [&str; 2] = ["vm.podvisor.io/ssh-keys", "VirtletSSHKeys"];
pub const ANNOTATION_META_DATA: [&str; 2] = ["vm.podvisor.io/cloud-init-meta-data", "VirtletCloudInitMetaData"];
pub const ANNOTATION_KERNEL_CMDLINE: &str = "vm.podvisor.io/kernel-cmdline";
/// The kernel command line of direct-kernel-boot images without the annotation.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// How long StartContainer waits for the helper to connect to the console.
const HELPER_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A VM container, as recorded with the container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmContainer {
    pub domain: String,
    /// Overlay, seed ISO, sockets, helper config and log.
    pub dir: PathBuf,
    pub tap: Option<String>,
    pub net: Option<PodNet>,
    pub netns: Option<PathBuf>,
    pub accel: Accel,
    pub log_path: PathBuf,
    pub helper_pid: Option<i32>,
    pub helper_start_time: Option<u64>,
}

impl VmContainer {
    pub fn attach_socket(&self) -> PathBuf {
        self.dir.join("attach.sock")
    }
}

/// What a VM image boots, found in its unpacked layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmImage {
    /// A KubeVirt containerDisk: the one disk under `/disk/`.
    ContainerDisk(PathBuf),
    /// `/boot/vmlinuz` and maybe `/boot/initrd`.
    Kernel { kernel: PathBuf, initrd: Option<PathBuf> },
}

/// Finds the VM image layout in `layer_dirs` (lowest layer first; upper layers win).
pub fn find_vm_image(layer_dirs: &[PathBuf]) -> Result<VmImage, VmError> {
    let mut disks: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut kernel = None;
    let mut initrd = None;
    for dir in layer_dirs {
        if let Ok(entries) = std::fs::read_dir(dir.join("disk")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ext = name.rsplit('.').next().unwrap_or_default();
                if name.contains('.') && ["qcow2", "img", "raw"].contains(&ext) && entry.path().is_file() {
                    disks.insert(name, entry.path());
                }
            }
        }
        let boot = dir.join("boot");
        if boot.join("vmlinuz").is_file() {
            kernel = Some(boot.join("vmlinuz"));
        }
        if boot.join("initrd").is_file() {
            initrd = Some(boot.join("initrd"));
        }
    }
    match (disks.len(), kernel) {
        (1, _) => Ok(VmImage::ContainerDisk(disks.into_values().next().unwrap_or_default())),
        (0, Some(kernel)) => Ok(VmImage::Kernel { kernel, initrd }),
        (0, None) => Err(VmError::Invalid(
            "the image is not a VM image: it needs exactly one disk (*.qcow2, *.img or *.raw) under /disk/ \
             (a KubeVirt containerDisk) or a kernel at /boot/vmlinuz (direct kernel boot)"
                .into(),
        )),
        (n, _) => Err(VmError::Invalid(format!(
            "the image has {n} disks under /disk/ ({}); a containerDisk holds exactly one",
            disks.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// An annotation from the container, else the pod, by any of its names.
pub fn annotation<'a>(
    names: &[&str],
    container: &'a BTreeMap<String, String>,
    pod: &'a BTreeMap<String, String>,
) -> Option<&'a str> {
    names
        .iter()
        .find_map(|name| container.get(*name).or_else(|| pod.get(*name)))
        .map(String::as_str)
}

/// `10Gi`, `512M`, `1073741824` as bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" => 1,
        "K" | "k" => 1000,
        "Ki" | "KiB" => 1 << 10,
        "M" => 1000 * 1000,
        "Mi" | "MiB" => 1 << 20,
        "G" => 1000 * 1000 * 1000,
        "Gi" | "GiB" => 1 << 30,
        "T" => 1000u64.pow(4),
        "Ti" | "TiB" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// vCPUs: the annotation, else the CPU limit rounded up, else 1.
pub fn vcpus(annotation: Option<&str>, resources: &crate::cgroups::Resources) -> Result<u32, VmError> {
    if let Some(text) = annotation {
        return match text.trim().parse::<u32>() {
            Ok(n) if (1..=255).contains(&n) => Ok(n),
            _ => Err(VmError::Invalid(format!("vCPU count {text:?} must be 1 to 255"))),
        };
    }
    match (resources.cpu_quota, resources.cpu_period) {
        (Some(quota), Some(period)) if quota > 0 && period > 0 => {
            Ok((quota as u64).div_ceil(period).clamp(1, 255) as u32)
        }
        _ => Ok(1),
    }
}

/// Everything CreateContainer needs beyond the backend.
pub struct VmPlan<'a> {
    pub sandbox_id: &'a str,
    pub container_id: &'a str,
    pub pod_name: &'a str,
    pub pod_annotations: &'a BTreeMap<String, String>,
    pub spec: &'a crate::spec::ContainerSpec,
    pub layer_dirs: Vec<PathBuf>,
    pub netns: Option<PathBuf>,
    pub resolv_conf: PathBuf,
    pub log_path: PathBuf,
}

pub struct VmBackend {
    config: VmConfig,
    mode: HypervisorMode,
    dir: PathBuf,
    hypervisor: Hypervisor,
    exe: PathBuf,
}

impl VmBackend {
    pub fn new(config: &VmConfig, state: &Path) -> VmBackend {
        VmBackend {
            config: config.clone(),
            mode: HypervisorMode::from_str(&config.hypervisor).unwrap_or_default(),
            dir: state.join("vm"),
            hypervisor: Hypervisor::new(),
            exe: std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("podvisor")),
        }
    }

    /// `podvisor-vm-helper` next to this binary (no libvirt linked: a smaller resident helper), else
    /// this binary's `vm-helper` subcommand.
    fn helper_command(&self) -> Command {
        let standalone = self.exe.with_file_name("podvisor-vm-helper");
        if standalone.is_file() {
            Command::new(standalone)
        } else {
            let mut command = Command::new(&self.exe);
            command.arg("vm-helper");
            command
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn connect(&self) -> Result<Libvirt, VmError> {
        Libvirt::connect(&self.config.libvirt_uri)
    }

    /// KVM or TCG, probed once (the first call runs the probe).
    pub fn hypervisor(&self) -> Result<HypervisorChoice, VmError> {
        let probe = LibvirtKvmProbe::new(&self.config.libvirt_uri, self.dir.join("probe"));
        let _ = std::fs::create_dir_all(&probe.work_dir);
        self.hypervisor_with(&probe)
    }

    pub fn hypervisor_with(&self, probe: &dyn KvmProbe) -> Result<HypervisorChoice, VmError> {
        self.hypervisor.get_or_probe(self.mode, probe)
    }

    /// The choice if it was made already.
    pub fn cached_hypervisor(&self) -> Option<HypervisorChoice> {
        self.hypervisor.cached()
    }

    pub fn create(&self, plan: &VmPlan) -> Result<VmContainer, VmError> {
        let image = find_vm_image(&plan.layer_dirs)?;
        let annotations = &plan.spec.annotations;
        let pod = plan.pod_annotations;
        let vcpus = vcpus(annotation(&ANNOTATION_VCPUS, annotations, pod), &plan.spec.resources)?;
        let root_size = match annotation(&ANNOTATION_ROOT_VOLUME_SIZE, annotations, pod) {
            Some(text) => Some(
                parse_size(text).ok_or_else(|| VmError::Invalid(format!("root volume size {text:?} is not a size")))?,
            ),
            None => None,
        };
        let memory_mib = match plan.spec.resources.memory_limit {
            Some(limit) if limit > 0 => (limit as u64).div_ceil(1 << 20).max(16),
            _ => self.config.default_memory_mib,
        };
        let accel = self.hypervisor()?.accel;
        if let Some(parent) = plan.log_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(VmError::io(format!("creating {}", parent.display())))?;
        }
        let dir = self.dir.join(&plan.container_id[..plan.container_id.len().min(12)]);
        std::fs::create_dir_all(&dir).map_err(VmError::io(format!("creating {}", dir.display())))?;
        let result = self.create_in(plan, &dir, image, vcpus, memory_mib, root_size, accel);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn create_in(
        &self,
        plan: &VmPlan,
        dir: &Path,
        image: VmImage,
        vcpus: u32,
        memory_mib: u64,
        root_size: Option<u64>,
        accel: Accel,
    ) -> Result<VmContainer, VmError> {
        let net = match &plan.netns {
            Some(netns) => Some(net::read_pod_net(netns, &plan.resolv_conf)?),
            None => None,
        };
        let disk = match image {
            VmImage::ContainerDisk(base) => {
                let overlay = dir.join("root.qcow2");
                disk::create_overlay(&base, &overlay, root_size)?;
                VmDisk::Qcow2Overlay(overlay)
            }
            VmImage::Kernel { kernel, initrd } => VmDisk::DirectKernel {
                kernel,
                initrd,
                cmdline: plan
                    .spec
                    .annotations
                    .get(ANNOTATION_KERNEL_CMDLINE)
                    .or_else(|| plan.pod_annotations.get(ANNOTATION_KERNEL_CMDLINE))
                    .cloned()
                    .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
                root: None,
            },
        };
        let seed_iso = dir.join("cidata.iso");
        cloudinit::build_seed_iso(&self.seed(plan, net.as_ref())?, &seed_iso)?;
        let tap = net.as_ref().map(|_| net::tap_name(plan.sandbox_id));
        let spec = VmSpec {
            name: super::domain_name(plan.sandbox_id),
            uuid: uuid(),
            vcpus,
            memory_mib,
            cpu: CpuTune {
                shares: plan.spec.resources.cpu_shares,
                quota: plan.spec.resources.cpu_quota.filter(|q| *q > 0),
                period: plan
                    .spec
                    .resources
                    .cpu_period
                    .filter(|_| plan.spec.resources.cpu_quota.is_some_and(|q| q > 0)),
            },
            disk,
            seed_iso: Some(seed_iso),
            nic: net.as_ref().zip(tap.as_ref()).map(|(net, tap)| VmNic {
                attachment: NicAttachment::Tap(tap.clone()),
                mac: net.mac.clone(),
            }),
            console_socket: dir.join("console.sock"),
            console_raw_log: None,
            agent_socket: dir.join("agent.sock"),
            metadata: PodvisorMetadata {
                sandbox_id: plan.sandbox_id.to_string(),
                container_id: plan.container_id.to_string(),
            },
        };
        let conn = self.connect()?;
        if let Some(old) = conn.lookup(&spec.name)? {
            return Err(VmError::Invalid(format!("domain {} already exists", old.name())));
        }
        conn.define(&xml::domain_xml(&spec, accel)?)?;
        Ok(VmContainer {
            domain: spec.name,
            dir: dir.to_path_buf(),
            tap,
            net,
            netns: plan.netns.clone(),
            accel,
            log_path: plan.log_path.clone(),
            helper_pid: None,
            helper_start_time: None,
        })
    }

    fn seed(&self, plan: &VmPlan, net: Option<&PodNet>) -> Result<Seed, VmError> {
        let annotations = &plan.spec.annotations;
        let pod = plan.pod_annotations;
        let mut meta_data = cloudinit::meta_data(plan.container_id, plan.pod_name);
        if let Some(extra) = annotation(&ANNOTATION_META_DATA, annotations, pod) {
            meta_data = extra.to_string();
            if !meta_data.contains("instance-id") {
                meta_data.push_str(&format!("\ninstance-id: {}\n", plan.container_id));
            }
        }
        let data = UserData {
            hostname: plan.pod_name.to_string(),
            ssh_authorized_keys: annotation(&ANNOTATION_SSH_KEYS, annotations, pod)
                .map(|keys| {
                    keys.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            env: plan.spec.envs.clone(),
        };
        let network_config = match net {
            Some(net) => Some(cloudinit::network_config(&NetworkSpec {
                mac: net.mac.clone(),
                interface: "eth0".into(),
                addresses: vec![format!("{}/{}", net.address, net.prefix)],
                gateway4: net.gateway.map(|g| g.to_string()),
                gateway6: None,
                nameservers: net.nameservers.iter().map(|n| n.to_string()).collect(),
                searches: net.searches.clone(),
                mtu: Some(net.mtu),
            })?),
            None => None,
        };
        Ok(Seed {
            meta_data,
            user_data: cloudinit::user_data(&data, annotation(&ANNOTATION_USER_DATA, annotations, pod)),
            network_config,
        })
    }

    /// Boots the domain: paused, the NIC joined to the pod, the helper
    /// (console relay, DHCP) connected, then resumed.
    pub fn start(&self, vm: &mut VmContainer) -> Result<(), VmError> {
        let conn = self.connect()?;
        let domain = conn
            .lookup(&vm.domain)?
            .ok_or_else(|| VmError::NotFound(vm.domain.clone()))?;
        if let Some(tap) = &vm.tap {
            net::create_tap(tap)?;
        }
        let _ = std::fs::remove_file(vm.dir.join("ready"));
        domain.start(true)?;
        let result = (|| {
            if let (Some(tap), Some(net), Some(netns)) = (&vm.tap, &vm.net, &vm.netns) {
                net::join_pod(netns, tap, net)?;
            }
            self.spawn_helper(vm)?;
            domain.resume()
        })();
        if let Err(err) = result {
            let _ = domain.destroy();
            if let Some(tap) = &vm.tap {
                net::delete_tap(tap, vm.netns.as_deref());
            }
            return Err(err);
        }
        Ok(())
    }

    fn helper_config(&self, vm: &VmContainer) -> HelperConfig {
        let lease = vm.net.as_ref().map(|net| Lease {
            mac: dhcp::parse_mac(&net.mac).unwrap_or_default(),
            address: net.address,
            prefix: net.prefix,
            router: net.gateway,
            routes: net.routes.clone(),
            dns: net.nameservers.clone(),
            domain: net.searches.first().cloned(),
            hostname: None,
            mtu: net.mtu,
            server: net.gateway.unwrap_or(net.address),
        });
        HelperConfig {
            netns: vm.netns.clone(),
            bridge: net::POD_BRIDGE.to_string(),
            lease,
            console_socket: vm.dir.join("console.sock"),
            log_path: vm.log_path.clone(),
            attach_socket: vm.attach_socket(),
            ready_file: vm.dir.join("ready"),
        }
    }

    /// Starts the VM's helper in a session of its own and waits until it
    /// relays the console.
    pub fn spawn_helper(&self, vm: &mut VmContainer) -> Result<(), VmError> {
        let config_path = vm.dir.join("helper.json");
        let ready = vm.dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let config = serde_json::to_vec(&self.helper_config(vm)).map_err(|e| VmError::Invalid(e.to_string()))?;
        std::fs::write(&config_path, config).map_err(VmError::io("writing helper config"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(vm.dir.join("helper.log"))
            .map_err(VmError::io("opening helper log"))?;
        let mut command = self.helper_command();
        command
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(VmError::io("starting the VM helper"))?;
        let pid = child.id() as i32;
        vm.helper_pid = Some(pid);
        vm.helper_start_time = crate::manager::records::process_start_time(pid);
        let deadline = Instant::now() + HELPER_READY_TIMEOUT;
        while !ready.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(vm.dir.join("helper.log")).unwrap_or_default();
                return Err(VmError::Invalid(format!(
                    "the VM helper exited ({status}): {}",
                    log.trim()
                )));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VmError::Timeout(HELPER_READY_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Reap it whenever it ends, while this daemon lives.
        std::thread::spawn(move || child.wait());
        Ok(())
    }

    /// Whether the helper recorded in `vm` still runs.
    pub fn helper_alive(vm: &VmContainer) -> bool {
        vm.helper_pid
            .is_some_and(|pid| !crate::manager::records::process_ended(pid, vm.helper_start_time))
    }

    pub fn state(&self, vm: &VmContainer) -> Result<VmState, VmError> {
        let conn = self.connect()?;
        match conn.lookup(&vm.domain)? {
            Some(domain) => domain.state(),
            None => Err(VmError::NotFound(vm.domain.clone())),
        }
    }

    /// ACPI shutdown, destroy after `grace`.
    pub fn stop(&self, vm: &VmContainer, grace: Duration) -> Result<StopOutcome, VmError> {
        let conn = self.connect()?;
        match conn.lookup(&vm.domain)? {
            Some(domain) if grace.is_zero() => {
                if !domain.state()?.is_active() {
                    return Ok(StopOutcome::AlreadyStopped);
                }
                domain.destroy()?;
                Ok(StopOutcome::Destroyed)
            }
            Some(domain) => domain.shutdown(grace),
            None => Ok(StopOutcome::AlreadyStopped),
        }
    }

    /// Undefines the domain and deletes its overlay, seed, sockets and tap.
    pub fn remove(&self, vm: &VmContainer) -> Result<(), VmError> {
        let conn = self.connect()?;
        if let Some(domain) = conn.lookup(&vm.domain)? {
            domain.undefine()?;
        }
        if let Some(pid) = vm.helper_pid.filter(|_| Self::helper_alive(vm)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        if let Some(tap) = &vm.tap {
            net::delete_tap(tap, vm.netns.as_deref());
        }
        match std::fs::remove_dir_all(&vm.dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(VmError::io(format!("removing {}", vm.dir.display()))(err))
            }
            _ => Ok(()),
        }
    }

    /// Runs a command through the guest agent.
    pub fn exec(
        &self,
        vm: &VmContainer,
        command: &[String],
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<agent::ExecOutput, VmError> {
        let conn = self.connect()?;
        let domain = conn
            .lookup(&vm.domain)?
            .ok_or_else(|| VmError::NotFound(vm.domain.clone()))?;
        let request = agent::ExecRequest {
            path: command.first().cloned().unwrap_or_default(),
            args: command.iter().skip(1).cloned().collect(),
            env: Vec::new(),
            stdin,
            timeout,
        };
        agent::ping(&domain, Duration::from_secs(2))?;
        agent::exec(&domain, &request)
    }

    pub fn stats(&self, vm: &VmContainer) -> Result<super::domain::VmStats, VmError> {
        let conn = self.connect()?;
        let domain = conn
            .lookup(&vm.domain)?
            .ok_or_else(|| VmError::NotFound(vm.domain.clone()))?;
        domain.stats()
    }

    /// Destroys and undefines podvisor domains of this daemon (their files
    /// live under its state directory) whose container no record knows.
    /// Returns their names.
    pub fn sweep_orphans(&self, known_containers: &HashSet<String>) -> Vec<String> {
        if !self.dir.exists() {
            return Vec::new();
        }
        let Ok(conn) = self.connect() else {
            return Vec::new();
        };
        let Ok(domains) = conn.podvisor_domains() else {
            return Vec::new();
        };
        let ours = format!("{}/", self.dir.display());
        let mut removed = Vec::new();
        for found in domains {
            if known_containers.contains(&found.metadata.container_id) {
                continue;
            }
            let Ok(Some(domain)) = conn.lookup(&found.name) else {
                continue;
            };
            if !domain.xml().is_ok_and(|xml| xml.contains(&ours)) {
                continue;
            }
            tracing::info!(domain = %found.name, container = %found.metadata.container_id, "removing orphaned VM");
            let id = &found.metadata.container_id;
            let dir = self.dir.join(&id[..id.len().min(12)]);
            if domain.undefine().is_ok() {
                let _ = std::fs::remove_dir_all(dir);
                net::delete_tap(&net::tap_name(&found.metadata.sandbox_id), None);
                removed.push(found.name);
            }
        }
        removed
    }
}

fn uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10Gi"), Some(10 << 30));
        assert_eq!(parse_size("512M"), Some(512_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("1Q"), None);
    }

    #[test]
    fn vcpus_from_annotation_or_limit() {
        let mut r = crate::cgroups::Resources::default();
        assert_eq!(vcpus(None, &r).unwrap(), 1);
        r.cpu_quota = Some(150_000);
        r.cpu_period = Some(100_000);
        assert_eq!(vcpus(None, &r).unwrap(), 2);
        assert_eq!(vcpus(Some("4"), &r).unwrap(), 4);
        assert!(vcpus(Some("0"), &r).is_err());
    }

    #[test]
    fn annotations_prefer_podvisor_names_and_the_container() {
        let pod = BTreeMap::from([("VirtletVCPUCount".to_string(), "2".to_string())]);
        let mut container = BTreeMap::new();
        assert_eq!(annotation(&ANNOTATION_VCPUS, &container, &pod), Some("2"));
        container.insert("vm.podvisor.io/vcpus".to_string(), "3".to_string());
        assert_eq!(annotation(&ANNOTATION_VCPUS, &container, &pod), Some("3"));
    }

    #[test]
    fn image_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("l1");
        std::fs::create_dir_all(layer.join("etc")).unwrap();
        let err = find_vm_image(std::slice::from_ref(&layer)).unwrap_err();
        assert!(err.to_string().contains("not a VM image"), "{err}");
        std::fs::create_dir_all(layer.join("boot")).unwrap();
        std::fs::write(layer.join("boot/vmlinuz"), b"k").unwrap();
        assert!(matches!(
            find_vm_image(std::slice::from_ref(&layer)).unwrap(),
            VmImage::Kernel { initrd: None, .. }
        ));
        let upper = dir.path().join("l2");
        std::fs::create_dir_all(upper.join("disk")).unwrap();
        std::fs::write(upper.join("disk/disk.qcow2"), b"q").unwrap();
        let layers = vec![layer.clone(), upper.clone()];
        assert_eq!(
            find_vm_image(&layers).unwrap(),
            VmImage::ContainerDisk(upper.join("disk/disk.qcow2"))
        );
        std::fs::write(upper.join("disk/second.img"), b"r").unwrap();
        assert!(find_vm_image(&layers).unwrap_err().to_string().contains("2 disks"));
        assert!(uuid().len() == 36);
    }
}
