//! Recovery at start: records are reloaded and reconciled with what really
//! runs. Containers whose monitor survived are adopted and watched; those
//! that ended meanwhile get the exit their monitor recorded.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::records::{ContainerState, SandboxState, process_ended};
use super::{EventKind, Manager, container_name_key, sandbox_name_key};
use crate::image::ImageStore;

impl Manager {
    pub(super) async fn recover(&self) {
        for record in self.inner.store.load_sandboxes() {
            let mut record = record;
            if record.state == SandboxState::Ready && !record.runtime.dir.exists() {
                // The state directory is gone (a reboot): nothing of it runs any more.
                record.state = SandboxState::NotReady;
                let _ = self.inner.store.save_sandbox(&record);
            }
            let key = sandbox_name_key(&record.spec);
            self.names().insert(key, record.id.clone());
            self.sandboxes().insert(record.id.clone(), record);
        }
        for mut record in self.inner.store.load_containers() {
            if record.state == ContainerState::Running && record.vm.is_some() {
                // Recorded before the loop below inserts it; the watcher reads it later.
                self.containers().insert(record.id.clone(), record.clone());
                self.recover_vm(&mut record).await;
            } else if record.state == ContainerState::Running {
                let alive = record
                    .monitor_pid
                    .is_some_and(|pid| !process_ended(pid, record.monitor_start_time));
                if alive {
                    self.watch_adopted(
                        record.id.clone(),
                        record.monitor_pid.unwrap_or_default(),
                        record.monitor_start_time,
                    );
                } else {
                    self.settle_exit(&mut record);
                    let _ = self.inner.store.save_container(&record);
                    self.emit(&record, EventKind::Stopped);
                }
            }
            let key = container_name_key(&record.sandbox_id, &record.spec);
            self.names().insert(key, record.id.clone());
            let content = if record.image_content.is_empty() {
                // Records written before content was kept: the image, if it is still there.
                self.inner
                    .images
                    .resolve(&record.image_id)
                    .map(|i| ImageStore::content_of(&i))
                    .unwrap_or_default()
            } else {
                record.image_content.clone()
            };
            self.inner.images.pin(&record.id, content);
            self.containers().insert(record.id.clone(), record);
        }
        let known_sandboxes: std::collections::HashSet<String> = self.sandboxes().keys().cloned().collect();
        let known_containers: std::collections::HashSet<String> = self.containers().keys().cloned().collect();
        for (id, dir) in self.inner.linux.orphan_sandboxes(&known_sandboxes) {
            self.inner.network.detach_orphan(&id, &dir).await;
            self.inner.linux.remove_orphan_sandbox(&id);
        }
        self.inner.linux.remove_orphan_containers(&known_containers);
        self.sweep_vm_orphans().await;
        self.inner.network.start().await;
        let sandboxes = self.sandboxes().len();
        let containers = self.containers().len();
        if sandboxes + containers > 0 {
            tracing::info!(sandboxes, containers, "recovered state");
        }
    }

    /// Watches a monitor that is not our child: through a pidfd, with a slow
    /// poll as a safety net (an ended monitor may linger as a zombie of an init
    /// that does not reap).
    fn watch_adopted(&self, container_id: String, monitor_pid: i32, start_time: Option<u64>) {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, monitor_pid, 0) } as i32;
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: fd was just returned by pidfd_open and is owned here.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        let manager = self.clone();
        tokio::spawn(async move {
            // SAFETY: the OwnedFd moves into the AsyncFd, so it stays open while registered.
            let async_fd = pidfd.and_then(|fd| unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE).ok()
            });
            while !process_ended(monitor_pid, start_time) {
                match &async_fd {
                    Some(async_fd) => {
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async_fd.readable()).await;
                        let _ = async_fd.as_raw_fd();
                    }
                    None => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
                }
            }
            manager.monitor_ended(&container_id).await;
        });
    }
}
