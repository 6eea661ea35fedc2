//! User-facing client commands that talk to the daemon over its socket.

use std::collections::HashMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cri::proto::podvisor::pull_progress_client::PullProgressClient;
use crate::cri::proto::podvisor::{LayerProgress, WatchPullRequest};
use crate::cri::proto::runtime::image_service_client::ImageServiceClient;
use crate::cri::proto::runtime::{AuthConfig, ImageSpec, ListImagesRequest, PullImageRequest};
use crate::cri::socket;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot connect to the podvisor daemon at {endpoint} (is `podvisor daemon` running?)")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{}", .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("{0}")]
    Usage(String),
}

async fn channel(endpoint: &str) -> Result<tonic::transport::Channel, CliError> {
    socket::connect(endpoint).await.map_err(|source| CliError::Connect {
        endpoint: endpoint.to_string(),
        source,
    })
}

/// `podvisor pull`: pulls through the daemon and draws a bar per layer.
pub async fn pull(endpoint: &str, image: &str, creds: Option<&str>) -> Result<(), CliError> {
    let channel = channel(endpoint).await?;
    let auth = match creds {
        None => None,
        Some(creds) => {
            let (username, password) = creds
                .split_once(':')
                .ok_or_else(|| CliError::Usage("--creds takes USER:PASSWORD".into()))?;
            Some(AuthConfig {
                username: username.to_string(),
                password: password.to_string(),
                ..Default::default()
            })
        }
    };
    // Subscribe first so that no event of this pull is missed.
    let mut events = PullProgressClient::new(channel.clone())
        .watch(WatchPullRequest {
            image: image.to_string(),
        })
        .await?
        .into_inner();
    let mut images = ImageServiceClient::new(channel);
    let request = PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        auth,
        sandbox_config: None,
    };
    let pulling = tokio::spawn(async move { images.pull_image(request).await });

    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:.bold} {bar:30.cyan/blue} {bytes:>10}/{total_bytes:<10} {msg}")
        .expect("valid progress template")
        .progress_chars("=> ");
    let mut layer_bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut show = |layer: &LayerProgress, bars: &MultiProgress| {
        let bar = layer_bars.entry(layer.digest.clone()).or_insert_with(|| {
            let bar = bars.add(ProgressBar::new(layer.size));
            bar.set_style(style.clone());
            let short = layer.digest.trim_start_matches("sha256:");
            bar.set_prefix(short[..short.len().min(12)].to_string());
            bar
        });
        bar.set_position(layer.downloaded.min(layer.size));
        bar.set_message(layer.state.clone());
        if matches!(layer.state.as_str(), "done" | "exists") {
            bar.finish();
        }
    };
    let mut pulling = pulling;
    let response = loop {
        tokio::select! {
            result = &mut pulling => break result,
            event = events.message() => match event {
                Ok(Some(event)) => {
                    for layer in &event.layers {
                        show(layer, &bars);
                    }
                    if let Some(layer) = &event.layer {
                        show(layer, &bars);
                    }
                }
                // The progress stream is a nicety; the pull result decides.
                _ => break (&mut pulling).await,
            },
        }
    };
    let response = response
        .map_err(|err| CliError::Usage(format!("pull task failed: {err}")))??
        .into_inner();
    let _ = bars.clear();
    tokio::time::sleep(Duration::from_millis(10)).await;
    println!("Image is up to date for {}", response.image_ref);
    Ok(())
}

/// `podvisor images`: a table like `crictl images`.
pub async fn images(endpoint: &str, quiet: bool) -> Result<(), CliError> {
    let mut client = ImageServiceClient::new(channel(endpoint).await?);
    let images = client
        .list_images(ListImagesRequest { filter: None })
        .await?
        .into_inner()
        .images;
    if quiet {
        for image in images {
            println!("{}", image.id);
        }
        return Ok(());
    }
    let mut rows = vec![["IMAGE".to_string(), "TAG".into(), "IMAGE ID".into(), "SIZE".into()]];
    for image in &images {
        let id = image.id.trim_start_matches("sha256:");
        let short_id = id[..id.len().min(13)].to_string();
        let size = human_size(image.size);
        let names: Vec<(String, String)> = if image.repo_tags.is_empty() {
            image
                .repo_digests
                .iter()
                .map(|d| (d.split('@').next().unwrap_or(d).to_string(), "<none>".to_string()))
                .take(1)
                .collect()
        } else {
            image
                .repo_tags
                .iter()
                .map(|t| {
                    let (name, tag) = t.rsplit_once(':').unwrap_or((t, "<none>"));
                    (name.to_string(), tag.to_string())
                })
                .collect()
        };
        for (name, tag) in names {
            rows.push([name, tag, short_id.clone(), size.clone()]);
        }
    }
    let widths: Vec<usize> = (0..4)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in rows {
        println!(
            "{:<w0$}   {:<w1$}   {:<w2$}   {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    Ok(())
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.3}{}", UNITS[unit]).replace(".000", "")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_like_crictl() {
        assert_eq!(super::human_size(512), "512B");
        assert_eq!(super::human_size(1_234_567), "1.235MB");
    }
}
