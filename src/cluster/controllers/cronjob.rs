//! CronJob controller (batch/v1): creates a Job from the template at each
//! scheduled minute (UTC), named `<cronjob>-<minutes since the epoch>` so a
//! restart never runs a slot twice. Only the latest missed slot runs, unless
//! older than `startingDeadlineSeconds`; `concurrencyPolicy` Forbid skips a slot
//! while a Job is active, Replace deletes the active ones first. Finished Jobs
//! beyond the history limits go, oldest first.

use std::time::Duration;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::workload::{WorkQueue, controlled_by, controller_of, controller_ref, is_deleting, name, uid};
use crate::cluster::client::{Client, ClientError, ListParams};
use crate::cluster::cron::Schedule;
use crate::cluster::events::{EventType, Recorder, now, reference};
use crate::cluster::informer::{Change, Informer, object_key};

/// Annotation on each Job: the slot it was created for.
pub const SCHEDULED_ANNOTATION: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// More missed slots than this (say, after a long outage) are not counted one by one.
const MAX_MISSED: usize = 100;

struct Controller {
    client: Client,
    cronjobs: Informer<CronJob>,
    jobs: Informer<Job>,
    recorder: Recorder,
    queue: WorkQueue,
}

pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let cronjobs: Informer<CronJob> = Informer::spawn(client.clone(), None, ListParams::default());
        let jobs: Informer<Job> = Informer::spawn(client.clone(), None, ListParams::default());
        let mut cron_changes = cronjobs.subscribe();
        let mut job_changes = jobs.subscribe();
        cronjobs.wait_synced().await;
        jobs.wait_synced().await;
        let recorder = Recorder::new(client.clone(), "cronjob-controller", None);
        let mut c = Controller {
            client,
            cronjobs,
            jobs,
            recorder,
            queue: WorkQueue::default(),
        };
        c.enqueue_all();
        loop {
            tokio::select! {
                change = cron_changes.recv() => if !c.on_cronjob(change) { return },
                change = job_changes.recv() => if !c.on_job(change) { return },
                _ = tokio::time::sleep_until(c.queue.next_due()) => {}
            }
            while let Ok(change) = cron_changes.try_recv() {
                c.on_cronjob(Ok(change));
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
                        tracing::debug!(cronjob = key, error = %err, "reconciling; will retry");
                        c.queue.retry(&key);
                    }
                }
            }
        }
    })
}

fn finished(job: &Job) -> Option<&'static str> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    ["Complete", "Failed"]
        .into_iter()
        .find(|t| conditions.iter().any(|c| c.type_ == *t && c.status == "True"))
}

fn created(job: &Job) -> Option<Timestamp> {
    job.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

impl Controller {
    fn enqueue_all(&mut self) {
        for cj in self.cronjobs.list() {
            self.queue.add(object_key(&cj.metadata));
        }
    }

    fn on_cronjob(&mut self, change: Result<Change<CronJob>, RecvError>) -> bool {
        match change {
            Ok(Change::Applied(cj) | Change::Deleted(cj)) => self.queue.add(object_key(&cj.metadata)),
            Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => self.enqueue_all(),
            Err(RecvError::Closed) => return false,
        }
        true
    }

    fn on_job(&mut self, change: Result<Change<Job>, RecvError>) -> bool {
        match change {
            Ok(Change::Applied(job) | Change::Deleted(job)) => {
                if let Some(owner) = controller_of(&job.metadata).filter(|r| r.kind == "CronJob") {
                    let ns = job.metadata.namespace.clone().unwrap_or_default();
                    self.queue.add(format!("{ns}/{}", owner.name));
                }
            }
            Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => self.enqueue_all(),
            Err(RecvError::Closed) => return false,
        }
        true
    }

    async fn sync(&mut self, key: &str) -> Result<Option<Duration>, ClientError> {
        let Some(cj) = self.cronjobs.get(key) else {
            return Ok(None);
        };
        if is_deleting(&cj.metadata) {
            return Ok(None);
        }
        let ns = cj.metadata.namespace.clone();
        let cj_uid = uid(&cj.metadata).to_string();
        let spec = cj.spec.clone().unwrap_or_default();
        let mut jobs: Vec<Job> = self
            .jobs
            .list()
            .into_iter()
            .filter(|j| j.metadata.namespace == ns && controlled_by(&j.metadata, &cj_uid) && !is_deleting(&j.metadata))
            .collect();
        jobs.sort_by_key(created);
        let at = now();
        let Ok(schedule) = Schedule::parse(&spec.schedule) else {
            return Ok(None);
        };
        let status = cj.status.clone().unwrap_or_default();
        let mut last_schedule = status.last_schedule_time.as_ref().map(|t| t.0);
        if spec.suspend != Some(true) {
            // The latest slot due since the last one (or since creation).
            let mut from = last_schedule
                .or(cj.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .unwrap_or(at);
            let mut due = None;
            for _ in 0..MAX_MISSED {
                match schedule.next_after(from) {
                    Some(t) if t <= at => {
                        due = Some(t);
                        from = t;
                    }
                    _ => break,
                }
            }
            if let Some(slot) = due {
                let late = at.as_second() - slot.as_second();
                let active: Vec<&Job> = jobs.iter().filter(|j| finished(j).is_none()).collect();
                if spec.starting_deadline_seconds.is_some_and(|d| late > d) {
                    self.recorder.emit(
                        reference(&cj),
                        EventType::Warning,
                        "MissSchedule",
                        format!("Missed scheduled time to start a job: {slot}"),
                    );
                    last_schedule = Some(slot);
                } else if spec.concurrency_policy.as_deref() == Some("Forbid") && !active.is_empty() {
                    // Skipped: the slot is not taken, so it runs if the active Job ends before the next one.
                    tracing::debug!(cronjob = key, "a Job is still active; slot skipped");
                } else {
                    if spec.concurrency_policy.as_deref() == Some("Replace") {
                        for job in &active {
                            self.client
                                .delete::<Job>(ns.as_deref(), name(&job.metadata), None)
                                .await?;
                            self.recorder.emit(
                                reference(&cj),
                                EventType::Normal,
                                "SuccessfulDelete",
                                format!("Deleted job {}", name(&job.metadata)),
                            );
                        }
                    }
                    self.create_job(&cj, slot).await?;
                    last_schedule = Some(slot);
                }
            }
        }
        self.remove_history(&cj, &jobs).await?;
        self.update_status(&cj, &jobs, last_schedule).await?;
        if spec.suspend == Some(true) {
            return Ok(None);
        }
        Ok(schedule.next_after(at).map(|next| {
            Duration::from_secs((next.as_second() - at.as_second()).max(0) as u64) + Duration::from_millis(100)
        }))
    }

    async fn create_job(&self, cj: &CronJob, slot: Timestamp) -> Result<(), ClientError> {
        let template = cj.spec.as_ref().map(|s| s.job_template.clone()).unwrap_or_default();
        let mut meta = template.metadata.unwrap_or_default();
        let job_name = format!("{}-{}", name(&cj.metadata), slot.as_second() / 60);
        meta.name = Some(job_name.clone());
        meta.generate_name = None;
        meta.namespace = cj.metadata.namespace.clone();
        meta.owner_references = Some(vec![controller_ref(cj)]);
        meta.annotations
            .get_or_insert_with(Default::default)
            .insert(SCHEDULED_ANNOTATION.into(), slot.to_string());
        let job = Job {
            metadata: meta,
            spec: template.spec,
            status: None,
        };
        match self.client.create(cj.metadata.namespace.as_deref(), &job).await {
            Ok(_) => {
                self.recorder.emit(
                    reference(cj),
                    EventType::Normal,
                    "SuccessfulCreate",
                    format!("Created job {job_name}"),
                );
                Ok(())
            }
            // Made before a restart: the slot is taken.
            Err(err) if err.to_string().contains("already exists") => Ok(()),
            Err(err) => {
                self.recorder.emit(
                    reference(cj),
                    EventType::Warning,
                    "FailedCreate",
                    format!("Error creating job: {err}"),
                );
                Err(err)
            }
        }
    }

    /// Deletes the oldest finished Jobs beyond the history limits.
    async fn remove_history(&self, cj: &CronJob, jobs: &[Job]) -> Result<(), ClientError> {
        let spec = cj.spec.clone().unwrap_or_default();
        for (kind, limit) in [
            ("Complete", spec.successful_jobs_history_limit.unwrap_or(3)),
            ("Failed", spec.failed_jobs_history_limit.unwrap_or(1)),
        ] {
            let done: Vec<&Job> = jobs.iter().filter(|j| finished(j) == Some(kind)).collect();
            let extra = done.len().saturating_sub(limit.max(0) as usize);
            for job in &done[..extra] {
                self.client
                    .delete::<Job>(job.metadata.namespace.as_deref(), name(&job.metadata), None)
                    .await?;
            }
        }
        Ok(())
    }

    async fn update_status(
        &self,
        cj: &CronJob,
        jobs: &[Job],
        last_schedule: Option<Timestamp>,
    ) -> Result<(), ClientError> {
        let time = |t: Timestamp| json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t));
        let active: Vec<Value> = jobs
            .iter()
            .filter(|j| finished(j).is_none())
            .map(|j| {
                json!({"apiVersion": "batch/v1", "kind": "Job", "name": name(&j.metadata),
                       "namespace": j.metadata.namespace, "uid": uid(&j.metadata),
                       "resourceVersion": j.metadata.resource_version})
            })
            .collect();
        let last_success = jobs
            .iter()
            .filter(|j| finished(j) == Some("Complete"))
            .filter_map(|j| j.status.as_ref()?.completion_time.as_ref().map(|t| t.0))
            .max();
        let old = cj.status.clone().unwrap_or_default();
        let last_success = last_success.or(old.last_successful_time.as_ref().map(|t| t.0));
        let status = json!({
            "active": active,
            "lastScheduleTime": last_schedule.map(time),
            "lastSuccessfulTime": last_success.map(time),
        });
        let current = json!({
            "active": old.active.as_ref().map_or(json!([]), |a| serde_json::to_value(a).unwrap_or_default()),
            "lastScheduleTime": old.last_schedule_time.as_ref().map(|t| time(t.0)),
            "lastSuccessfulTime": old.last_successful_time.as_ref().map(|t| time(t.0)),
        });
        if status != current {
            self.client
                .merge_patch::<CronJob>(
                    cj.metadata.namespace.as_deref(),
                    name(&cj.metadata),
                    Some("status"),
                    &json!({"status": status}),
                )
                .await?;
        }
        Ok(())
    }
}
