//! Container log rotation, as kubelet does it: a running container's log that
//! has grown past the size limit is renamed to `<log>.<UTC timestamp>` and the
//! runtime is told to reopen it (CRI ReopenContainerLog); only the newest
//! rotated files are kept, so that the current log plus them stay within the
//! file count limit.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Context;
use super::labels;
use crate::cri::proto::runtime as api;

#[derive(Clone, Debug, PartialEq)]
pub struct LogRotation {
    /// A log larger than this is rotated (kubelet's containerLogMaxSize, 10Mi).
    pub max_size: u64,
    /// Files kept per container, the current one included (containerLogMaxFiles, 5; at least 2).
    pub max_files: usize,
    /// How often sizes are checked (containerLogMonitorInterval, 10s).
    pub interval: Duration,
}

impl Default for LogRotation {
    fn default() -> Self {
        LogRotation {
            max_size: 10 << 20,
            max_files: 5,
            interval: Duration::from_secs(10),
        }
    }
}

/// A size as Kubernetes writes quantities: `10Mi`, `512Ki`, `1G`, plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    match super::quantity::parse(text) {
        Some(n) if n >= 1.0 => Ok(n as u64),
        _ => Err(format!("{text:?} is not a size like 10Mi")),
    }
}

pub(crate) async fn run(ctx: std::sync::Arc<Context>) {
    let rotation = ctx.options.log_rotation.clone();
    let mut tick = tokio::time::interval(rotation.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let filter = api::ContainerFilter {
            state: Some(api::ContainerStateValue {
                state: api::ContainerState::ContainerRunning as i32,
            }),
            label_selector: [(labels::NODE.to_string(), ctx.options.node_name.clone())].into(),
            ..Default::default()
        };
        let Ok(containers) = ctx.cri.list_containers(filter).await else {
            continue;
        };
        for container in containers {
            let Ok(status) = ctx.cri.container_status(&container.id).await else {
                continue;
            };
            if status.log_path.is_empty() {
                continue;
            }
            if let Err(e) = rotate_if_needed(&ctx, &container.id, Path::new(&status.log_path), &rotation).await {
                tracing::warn!(container = %container.id, log = %status.log_path, error = %e, "rotating a container log");
            }
        }
    }
}

async fn rotate_if_needed(ctx: &Context, id: &str, log: &Path, rotation: &LogRotation) -> Result<(), String> {
    let size = match std::fs::metadata(log) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    if size <= rotation.max_size {
        return Ok(());
    }
    // Old rotated files go first, leaving room for the one about to be made.
    remove_oldest(log, rotation.max_files.max(2) - 2).map_err(|e| e.to_string())?;
    let rotated = rotated_name(log, SystemTime::now());
    std::fs::rename(log, &rotated).map_err(|e| format!("renaming to {}: {e}", rotated.display()))?;
    if let Err(e) = ctx.cri.reopen_container_log(id).await {
        // The container keeps writing to the renamed file: put it back.
        let _ = std::fs::rename(&rotated, log);
        return Err(e.to_string());
    }
    tracing::debug!(container = id, log = %log.display(), size, "rotated a container log");
    Ok(())
}

/// `<log>.<YYYYMMDD-hhmmss>`, UTC, like kubelet's rotated files.
fn rotated_name(log: &Path, now: SystemTime) -> PathBuf {
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let stamp = format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
    let mut name = log.as_os_str().to_owned();
    name.push(".");
    name.push(stamp);
    let mut path = PathBuf::from(name);
    // Two rotations within a second: keep both.
    let mut n = 1;
    while path.exists() {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        path = PathBuf::from(name);
        n += 1;
    }
    path
}

/// Year, month, day of a count of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The rotated files of `log`, oldest first (their names sort by time).
fn rotated_files(log: &Path) -> std::io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(base)) = (log.parent(), log.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{base}.");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .is_some_and(|stamp| stamp.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// Removes rotated files of `log` until at most `keep` are left.
fn remove_oldest(log: &Path, keep: usize) -> std::io::Result<()> {
    let files = rotated_files(log)?;
    for old in &files[..files.len().saturating_sub(keep)] {
        std::fs::remove_file(old)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_carry_the_utc_time() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        assert_eq!(rotated_name(&log, at), dir.path().join("0.log.20231114-221320"));
        std::fs::write(dir.path().join("0.log.20231114-221320"), "").unwrap();
        assert_eq!(rotated_name(&log, at), dir.path().join("0.log.20231114-221320.1"));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn only_the_newest_rotated_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        for name in [
            "0.log",
            "1.log.20240101-000000",
            "0.log.20240101-000003",
            "0.log.20240101-000001",
        ] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        std::fs::write(dir.path().join("0.log.20240101-000002"), "x").unwrap();
        remove_oldest(&log, 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "0.log",
                "0.log.20240101-000002",
                "0.log.20240101-000003",
                "1.log.20240101-000000"
            ]
        );
    }
}
