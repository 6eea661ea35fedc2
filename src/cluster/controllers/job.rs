//! Job controller (batch/v1, NonIndexed): runs pods from the template until
//! `completions` of them succeed, at most `parallelism` at a time, and gives up
//! after more than `backoffLimit` failures or past `activeDeadlineSeconds`.
//! Status: active/ready/succeeded/failed counts, start and completion times,
//! and the `Complete` or `Failed` condition `kubectl wait` and `get jobs` read.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::workload::{
    Expectations, WorkQueue, controlled_by, controller_of, controller_ref, is_deleting, is_ready, name, uid,
};
use crate::cluster::client::{Client, ClientError, ListParams};
use crate::cluster::events::{EventType, Recorder, now, reference};
use crate::cluster::informer::{Change, Informer, object_key};

struct Controller {
    client: Client,
    pods: Informer<Pod>,
    jobs: Informer<Job>,
    recorder: Recorder,
    queue: WorkQueue,
    /// Pods made or deleted that the cache does not show yet (no double creations).
    expect: Expectations,
}

pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
        let jobs: Informer<Job> = Informer::spawn(client.clone(), None, ListParams::default());
        let mut pod_changes = pods.subscribe();
        let mut job_changes = jobs.subscribe();
        pods.wait_synced().await;
        jobs.wait_synced().await;
        let recorder = Recorder::new(client.clone(), "job-controller", None);
        let mut c = Controller {
            client,
            pods,
            jobs,
            recorder,
            queue: WorkQueue::default(),
            expect: Expectations::default(),
        };
        c.enqueue_all();
        loop {
            tokio::select! {
                change = pod_changes.recv() => if !c.on_pod(change) { return },
                change = job_changes.recv() => if !c.on_job(change) { return },
                _ = tokio::time::sleep_until(c.queue.next_due()) => {}
            }
            while let Ok(change) = pod_changes.try_recv() {
                c.on_pod(Ok(change));
            }
            while let Ok(change) = job_changes.try_recv() {
                c.on_job(Ok(change));
            }
            for key in c.queue.take() {
                match c.sync(&key).await {
                    Ok(after) => {
                        c.queue.succeeded(&key);
                        if let Some(after) = after {
                            c.queue.add_after(&key, after);
                        }
                    }
                    Err(err) => {
                        tracing::debug!(job = key, error = %err, "reconciling; will retry");
                        c.queue.retry(&key);
                    }
                }
            }
        }
    })
}

fn condition_true(job: &Job, type_: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

impl Controller {
    fn enqueue_all(&mut self) {
        for job in self.jobs.list() {
            self.queue.add(object_key(&job.metadata));
        }
    }

    fn on_job(&mut self, change: Result<Change<Job>, RecvError>) -> bool {
        match change {
            Ok(Change::Applied(job) | Change::Deleted(job)) => self.queue.add(object_key(&job.metadata)),
            Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => self.enqueue_all(),
            Err(RecvError::Closed) => return false,
        }
        true
    }

    fn on_pod(&mut self, change: Result<Change<Pod>, RecvError>) -> bool {
        match change {
            Ok(Change::Applied(pod) | Change::Deleted(pod)) => {
                if let Some(owner) = controller_of(&pod.metadata).filter(|r| r.kind == "Job") {
                    let ns = pod.metadata.namespace.clone().unwrap_or_default();
                    self.queue.add(format!("{ns}/{}", owner.name));
                }
            }
            Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => self.enqueue_all(),
            Err(RecvError::Closed) => return false,
        }
        true
    }

    async fn sync(&mut self, key: &str) -> Result<Option<Duration>, ClientError> {
        let Some(job) = self.jobs.get(key) else {
            self.expect.forget(key);
            return Ok(None);
        };
        let namespace = job.metadata.namespace.clone().unwrap_or_default();
        if is_deleting(&job.metadata) || !self.expect.caught_up(key, &namespace, &self.pods) {
            return Ok(None);
        }
        let job_uid = uid(&job.metadata).to_string();
        let ns = job.metadata.namespace.clone();
        let pods: Vec<Pod> = self
            .pods
            .list()
            .into_iter()
            .filter(|p| p.metadata.namespace == ns && controlled_by(&p.metadata, &job_uid))
            .collect();
        let spec = job.spec.clone().unwrap_or_default();
        // Counts never go down: finished pods may be garbage-collected later.
        let counted = |phase_: &str| pods.iter().filter(|p| phase(p) == phase_).count() as i32;
        let old = job.status.clone().unwrap_or_default();
        let succeeded = counted("Succeeded").max(old.succeeded.unwrap_or(0));
        let failed = counted("Failed").max(old.failed.unwrap_or(0));
        let active: Vec<&Pod> = pods
            .iter()
            .filter(|p| !matches!(phase(p), "Succeeded" | "Failed") && !is_deleting(&p.metadata))
            .collect();
        let ready = active.iter().filter(|p| is_ready(p)).count() as i32;
        let finished = condition_true(&job, "Complete") || condition_true(&job, "Failed");
        let suspended = spec.suspend == Some(true);
        let at: Timestamp = now();
        let started = job.status.as_ref().and_then(|s| s.start_time.clone());
        let start = started.as_ref().map(|t| t.0).unwrap_or(at);
        let mut outcome: Option<(&str, &str, String)> = None;
        let completions = spec.completions;
        if !finished {
            let done = match completions {
                Some(n) => succeeded >= n,
                None => succeeded > 0 && active.is_empty(),
            };
            let deadline = spec.active_deadline_seconds.filter(|_| !suspended);
            if done {
                outcome = Some(("Complete", "", String::new()));
            } else if failed > spec.backoff_limit.unwrap_or(6) {
                outcome = Some((
                    "Failed",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit".into(),
                ));
            } else if deadline.is_some_and(|d| at.as_second() - start.as_second() >= d) {
                outcome = Some((
                    "Failed",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline".into(),
                ));
            }
        }
        let mut recheck = None;
        let mut active_count = active.len() as i32;
        if finished || outcome.is_some() || suspended {
            // Nothing more runs: the rest of the active pods go.
            for pod in &active {
                self.client
                    .delete::<Pod>(ns.as_deref(), name(&pod.metadata), None)
                    .await?;
                self.expect.deleted(key, name(&pod.metadata));
            }
            active_count = 0;
        } else {
            let parallelism = spec.parallelism.unwrap_or(1).max(0);
            let left = completions.map_or(parallelism, |n| (n - succeeded).max(0));
            let want = parallelism.min(left);
            while active_count < want {
                let created = self.create_pod(&job).await?;
                self.expect.created(key, &created);
                active_count += 1;
            }
            if let Some(d) = spec.active_deadline_seconds {
                let remaining = d - (at.as_second() - start.as_second());
                recheck = Some(Duration::from_secs(remaining.max(0) as u64) + Duration::from_millis(50));
            }
        }
        self.update_status(&job, active_count, ready, succeeded, failed, start, outcome, suspended)
            .await?;
        Ok(recheck)
    }

    /// Creates one pod from the template; returns its name.
    async fn create_pod(&self, job: &Job) -> Result<String, ClientError> {
        let template = job.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
        let mut meta = template.metadata.unwrap_or_default();
        meta.name = None;
        meta.generate_name = Some(format!("{}-", name(&job.metadata)));
        meta.namespace = job.metadata.namespace.clone();
        meta.owner_references = Some(vec![controller_ref(job)]);
        let pod = Pod {
            metadata: meta,
            spec: template.spec,
            status: None,
        };
        match self.client.create(job.metadata.namespace.as_deref(), &pod).await {
            Ok(created) => {
                let pod_name = name(&created.metadata).to_string();
                self.recorder.emit(
                    reference(job),
                    EventType::Normal,
                    "SuccessfulCreate",
                    format!("Created pod: {pod_name}"),
                );
                Ok(pod_name)
            }
            Err(err) => {
                self.recorder.emit(
                    reference(job),
                    EventType::Warning,
                    "FailedCreate",
                    format!("Error creating: {err}"),
                );
                Err(err)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn update_status(
        &self,
        job: &Job,
        active: i32,
        ready: i32,
        succeeded: i32,
        failed: i32,
        start: Timestamp,
        outcome: Option<(&str, &str, String)>,
        suspended: bool,
    ) -> Result<(), ClientError> {
        let old = job.status.clone().unwrap_or_default();
        let mut conditions: Vec<Value> = old
            .conditions
            .clone()
            .unwrap_or_default()
            .iter()
            .filter_map(|c| serde_json::to_value(c).ok())
            .collect();
        let stamp = json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        let mut completion_time = old.completion_time.as_ref().and_then(|t| serde_json::to_value(t).ok());
        if let Some((type_, reason, message)) = &outcome {
            if *type_ == "Complete" {
                // As Kubernetes 1.31+: SuccessCriteriaMet first, then Complete.
                conditions.push(
                    json!({"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                                       "message": "Reached expected number of succeeded pods",
                                       "lastProbeTime": stamp, "lastTransitionTime": stamp}),
                );
                conditions.push(
                    json!({"type": "Complete", "status": "True", "reason": "CompletionsReached",
                                       "message": "Reached expected number of succeeded pods",
                                       "lastProbeTime": stamp, "lastTransitionTime": stamp}),
                );
                completion_time = Some(stamp.clone());
                self.recorder
                    .emit(reference(job), EventType::Normal, "Completed", "Job completed");
            } else {
                conditions.push(
                    json!({"type": "FailureTarget", "status": "True", "reason": reason, "message": message,
                                       "lastProbeTime": stamp, "lastTransitionTime": stamp}),
                );
                conditions.push(
                    json!({"type": type_, "status": "True", "reason": reason, "message": message,
                                       "lastProbeTime": stamp, "lastTransitionTime": stamp}),
                );
                self.recorder
                    .emit(reference(job), EventType::Warning, reason, message.clone());
            }
        }
        let was_suspended = conditions
            .iter()
            .any(|c| c["type"] == "Suspended" && c["status"] == "True");
        if suspended != was_suspended && outcome.is_none() {
            conditions.retain(|c| c["type"] != "Suspended");
            if suspended {
                conditions.push(json!({"type": "Suspended", "status": "True", "reason": "JobSuspended",
                                       "message": "Job suspended", "lastProbeTime": stamp, "lastTransitionTime": stamp}));
            }
        }
        let start_time = match (&old.start_time, suspended) {
            (Some(t), _) => serde_json::to_value(t).ok(),
            (None, false) => Some(json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(start))),
            (None, true) => None,
        };
        let status = json!({
            "active": active,
            "ready": ready,
            "succeeded": succeeded,
            "failed": failed,
            "terminating": 0,
            "startTime": start_time,
            "completionTime": completion_time,
            "conditions": conditions,
        });
        let current = json!({
            "active": old.active.unwrap_or(0),
            "ready": old.ready.unwrap_or(0),
            "succeeded": old.succeeded.unwrap_or(0),
            "failed": old.failed.unwrap_or(0),
            "terminating": old.terminating.unwrap_or(0),
            "startTime": old.start_time.as_ref().and_then(|t| serde_json::to_value(t).ok()),
            "completionTime": old.completion_time.as_ref().and_then(|t| serde_json::to_value(t).ok()),
            "conditions": old.conditions.as_ref().map_or(json!([]), |c| serde_json::to_value(c).unwrap_or_default()),
        });
        if status != current {
            self.client
                .merge_patch::<Job>(
                    job.metadata.namespace.as_deref(),
                    name(&job.metadata),
                    Some("status"),
                    &json!({"status": status}),
                )
                .await?;
        }
        Ok(())
    }
}
