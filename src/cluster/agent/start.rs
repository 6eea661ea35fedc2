//! Starting one container: image (pull policy, credentials, back-off),
//! environment, mounts, CreateContainer, StartContainer and the postStart hook.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Container;

use super::config::{self, pod_name, pod_namespace};
use super::env::{self, Downward, Sources};
use super::status::Waiting;
use super::worker::Worker;
use super::{images, volumes};
use crate::cluster::events::EventType;
use crate::cri::proto::runtime as api;

/// Retry for configuration and runtime errors.
const CONFIG_RETRY: Duration = Duration::from_secs(5);
const POST_START_LIMIT: Duration = Duration::from_secs(60);
/// Termination messages are cut to this size, as kubelet does.
const MESSAGE_LIMIT: usize = 4096;
const DEFAULT_TERMINATION_PATH: &str = "/dev/termination-log";

type StartError = (Waiting, Instant);

fn waiting(reason: &str, message: impl Into<String>, retry: Duration) -> StartError {
    (
        Waiting {
            reason: reason.into(),
            message: message.into(),
        },
        Instant::now() + retry,
    )
}

impl Worker {
    fn termination_file(&self, name: &str, attempt: u32) -> std::path::PathBuf {
        volumes::pod_dir(&self.ctx.options, &self.uid)
            .join("containers")
            .join(name)
            .join(format!("{attempt}.termination-log"))
    }

    /// The message of an exited container: its termination-message file, else
    /// (with FallbackToLogsOnError) the end of its log.
    pub fn termination_message(&self, status: &api::ContainerStatus) -> String {
        if !status.message.is_empty() {
            return status.message.clone();
        }
        let Some(meta) = &status.metadata else {
            return String::new();
        };
        let mut text = std::fs::read(self.termination_file(&meta.name, meta.attempt)).unwrap_or_default();
        text.truncate(MESSAGE_LIMIT);
        let fallback = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .find(|c| c.name == meta.name)
            .and_then(|c| c.termination_message_policy.as_deref())
            == Some("FallbackToLogsOnError");
        if text.is_empty() && fallback && status.exit_code != 0 {
            let log = std::fs::read_to_string(&status.log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().filter_map(|l| l.splitn(4, ' ').nth(3)).collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            let start = tail.len().saturating_sub(2048);
            let start = (start..tail.len())
                .find(|i| tail.is_char_boundary(*i))
                .unwrap_or(tail.len());
            return tail[start..].to_string();
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// Makes sure the container's image is on the node; returns the image to run.
    async fn ensure_image(&mut self, container: &Container) -> Result<String, StartError> {
        let name = container.name.as_str();
        let image = container.image.clone().unwrap_or_default();
        let policy = images::pull_policy(container).to_string();
        let present = self
            .ctx
            .cri
            .image_present(&image)
            .await
            .map_err(|e| waiting("ErrImagePull", e.to_string(), CONFIG_RETRY))?;
        match (policy.as_str(), present) {
            ("Never", Some(id)) | ("IfNotPresent", Some(id)) => {
                let message = format!("Container image {image:?} already present on machine");
                self.emit(Some(name), EventType::Normal, "Pulled", message);
                return Ok(id);
            }
            ("Never", None) => {
                let message = format!("Container image {image:?} is not present with pull policy of Never");
                self.emit(Some(name), EventType::Warning, "ErrImageNeverPull", message.clone());
                return Err(waiting("ErrImageNeverPull", message, CONFIG_RETRY));
            }
            _ => {}
        }
        if let Some(until) = self.pulls.blocked_until(&image) {
            let message = format!("Back-off pulling image {image:?}");
            self.emit(Some(name), EventType::Normal, "BackOff", message.clone());
            return Err((
                Waiting {
                    reason: "ImagePullBackOff".into(),
                    message,
                },
                until,
            ));
        }
        self.emit(
            Some(name),
            EventType::Normal,
            "Pulling",
            format!("Pulling image {image:?}"),
        );
        let started = Instant::now();
        let mut sources = Sources::default();
        let auth = images::auth_for(&self.ctx.client, &mut sources, &self.pod, &image)
            .await
            .map_err(|e| waiting("ErrImagePull", e, CONFIG_RETRY))?;
        let sandbox_config = self.sandbox.as_ref().map(|s| s.config.clone());
        match self.ctx.cri.pull_image(&image, auth, sandbox_config).await {
            Ok(image_ref) => {
                self.pulls.succeeded(&image);
                let message = format!(
                    "Successfully pulled image {image:?} in {:.3}s",
                    started.elapsed().as_secs_f64()
                );
                self.emit(Some(name), EventType::Normal, "Pulled", message);
                Ok(image_ref)
            }
            Err(err) => {
                self.pulls.failed(&image);
                let message = format!("Failed to pull image {image:?}: {}", err.status.message());
                self.emit(Some(name), EventType::Warning, "Failed", message.clone());
                self.emit(Some(name), EventType::Warning, "Failed", "Error: ErrImagePull".into());
                let retry = self.pulls.blocked_until(&image).unwrap_or_else(Instant::now);
                Err((
                    Waiting {
                        reason: "ErrImagePull".into(),
                        message,
                    },
                    retry,
                ))
            }
        }
    }

    fn mounts(
        &self,
        container: &Container,
        attempt: u32,
        vars: &[(String, String)],
    ) -> Result<Vec<api::Mount>, String> {
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = self
                .volumes
                .get(&mount.name)
                .ok_or_else(|| format!("volume {:?} not found", mount.name))?;
            let sub = match (&mount.sub_path, &mount.sub_path_expr) {
                (Some(path), _) if !path.is_empty() => path.clone(),
                (_, Some(expr)) => env::expand(expr, vars),
                _ => String::new(),
            };
            let host_path = volumes::sub_path(volume, &sub)?;
            let propagation = match mount.mount_propagation.as_deref() {
                Some("HostToContainer") => api::MountPropagation::PropagationHostToContainer,
                Some("Bidirectional") => api::MountPropagation::PropagationBidirectional,
                _ => api::MountPropagation::PropagationPrivate,
            };
            mounts.push(api::Mount {
                container_path: mount.mount_path.clone(),
                host_path: host_path.display().to_string(),
                readonly: mount.read_only.unwrap_or(false) || volume.read_only,
                propagation: propagation as i32,
                recursive_read_only: mount.recursive_read_only.as_deref() == Some("Enabled"),
                ..Default::default()
            });
        }
        let target = container
            .termination_message_path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_TERMINATION_PATH.into());
        if !mounts.iter().any(|m| m.container_path == target) {
            let file = self.termination_file(&container.name, attempt);
            let create = || -> std::io::Result<()> {
                use std::os::unix::fs::PermissionsExt;
                std::fs::create_dir_all(file.parent().unwrap_or(&file))?;
                std::fs::write(&file, b"")?;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666))
            };
            create().map_err(|e| format!("creating the termination-message file: {e}"))?;
            mounts.push(api::Mount {
                container_path: target,
                host_path: file.display().to_string(),
                ..Default::default()
            });
        }
        Ok(mounts)
    }

    /// Creates and starts a container of the current sandbox. On failure: why
    /// it waits, and when to try again.
    pub async fn start_container(&mut self, container: &Container, attempt: u32) -> Result<String, StartError> {
        let name = container.name.clone();
        let Some(sandbox) = &self.sandbox else {
            return Err(waiting("ContainerCreating", "", CONFIG_RETRY));
        };
        let (sandbox_id, sandbox_config) = (sandbox.id.clone(), sandbox.config.clone());
        let pod_ip = sandbox.ip.clone().unwrap_or_default();
        let image = self.ensure_image(container).await?;
        let config_error = |this: &Self, message: String| {
            this.emit(Some(&name), EventType::Warning, "Failed", format!("Error: {message}"));
            waiting("CreateContainerConfigError", message, CONFIG_RETRY)
        };
        if let Err(message) = config::check_non_root(&self.pod, container) {
            return Err(config_error(self, message));
        }
        let host_ip = self.ctx.node_ip.to_string();
        let facts = Downward {
            pod: &self.pod,
            pod_ip: &pod_ip,
            host_ip: &host_ip,
            node_cpus: super::machine::cpus(),
            node_memory: super::machine::memory_bytes(),
        };
        let mut sources = Sources::default();
        let service_vars = match env::service_links(&self.ctx.client, &self.pod).await {
            Ok(vars) => vars,
            Err(message) => return Err(config_error(self, message)),
        };
        let vars = match env::resolve(&self.ctx.client, &mut sources, &facts, container, service_vars).await {
            Ok(vars) => vars,
            Err(message) => return Err(config_error(self, message)),
        };
        let mounts = match self.mounts(container, attempt, &vars) {
            Ok(mounts) => mounts,
            Err(message) => return Err(config_error(self, message)),
        };
        let expand = |list: &Option<Vec<String>>| list.iter().flatten().map(|a| env::expand(a, &vars)).collect();
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: name.clone(),
                attempt,
            }),
            image: Some(api::ImageSpec {
                image,
                user_specified_image: container.image.clone().unwrap_or_default(),
                ..Default::default()
            }),
            command: expand(&container.command),
            args: expand(&container.args),
            working_dir: container.working_dir.clone().unwrap_or_default(),
            envs: vars
                .iter()
                .map(|(key, value)| api::KeyValue {
                    key: key.clone(),
                    value: value.clone().into_bytes(),
                })
                .collect(),
            mounts,
            labels: config::container_labels(&self.ctx.options, &self.pod, &name),
            annotations: config::container_annotations(&self.pod, container, attempt),
            log_path: format!("{name}/{attempt}.log"),
            stdin: container.stdin.unwrap_or(false),
            stdin_once: container.stdin_once.unwrap_or(false),
            tty: container.tty.unwrap_or(false),
            linux: Some(api::LinuxContainerConfig {
                resources: Some(config::resources(&self.pod, container, super::machine::memory_bytes())),
                security_context: Some(config::security_context(&self.pod, container)),
            }),
            ..Default::default()
        };
        let _ = std::fs::create_dir_all(config::log_directory(&self.ctx.options, &self.pod).join(&name));
        let id = match self.ctx.cri.create_container(&sandbox_id, config, sandbox_config).await {
            Ok(id) => id,
            Err(err) => {
                let message = err.status.message().to_string();
                self.emit(Some(&name), EventType::Warning, "Failed", format!("Error: {message}"));
                return Err(waiting("CreateContainerError", message, CONFIG_RETRY));
            }
        };
        self.emit(
            Some(&name),
            EventType::Normal,
            "Created",
            format!("Created container {name}"),
        );
        if let Err(err) = self.ctx.cri.start_container(&id).await {
            let message = format!("failed to start container {name:?}: {}", err.status.message());
            self.emit(Some(&name), EventType::Warning, "Failed", format!("Error: {message}"));
            let _ = self.ctx.cri.remove_container(&id).await;
            return Err(waiting("RunContainerError", message, CONFIG_RETRY));
        }
        self.emit(
            Some(&name),
            EventType::Normal,
            "Started",
            format!("Started container {name}"),
        );
        tracing::debug!(pod = %format!("{}/{}", pod_namespace(&self.pod), pod_name(&self.pod)), container = %name, id = %id, "container started");
        if let Some(hook) = container.lifecycle.as_ref().and_then(|l| l.post_start.clone()) {
            let target = self.probe_target(container, &id);
            if let Err(message) = super::probes::run_hook(&self.ctx, &target, &hook, POST_START_LIMIT).await {
                let text = format!("PostStartHook failed: {message}");
                self.emit(Some(&name), EventType::Warning, "FailedPostStartHook", text);
                let reason = format!("Container {name} failed postStart hook, will be restarted");
                self.kill_container(container, &id, reason, None).await;
            }
        }
        Ok(id)
    }
}
