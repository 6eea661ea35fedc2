//! ImageService end to end: the real daemon binary, a real registry
//! (`docker-registry`), images built here from /bin/busybox.

mod common;

use std::time::Duration;

use common::daemon::{Daemon, spec};
use common::oci::{
    Compression, Entry, Flavour, ImageConfig, TestImage, busybox_layer, filler_layer, layer_from_entries,
};
use common::proxy::{Proxy, ProxyAuth, ProxyOptions};
use common::push::{RegistryClient, push_image, push_index};
use common::registry::Registry;
use podvisor::cri::proto::runtime::{
    AuthConfig, ImageFilter, ImageFsInfoRequest, ImageStatusRequest, ListImagesRequest, PullImageRequest,
    RemoveImageRequest,
};
use tonic::Code;

async fn status(daemon: &Daemon, image: &str) -> Option<podvisor::cri::proto::runtime::Image> {
    let request = ImageStatusRequest {
        image: Some(spec(image)),
        verbose: false,
    };
    daemon
        .images()
        .await
        .image_status(request)
        .await
        .unwrap()
        .into_inner()
        .image
}

async fn list(daemon: &Daemon) -> Vec<podvisor::cri::proto::runtime::Image> {
    daemon
        .images()
        .await
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .images
}

async fn remove(daemon: &Daemon, image: &str) {
    let request = RemoveImageRequest {
        image: Some(spec(image)),
    };
    daemon.images().await.remove_image(request).await.unwrap();
}

async fn fs_used_bytes(daemon: &Daemon) -> u64 {
    let info = daemon
        .images()
        .await
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    info.image_filesystems[0].used_bytes.as_ref().unwrap().value
}

async fn pull_with(daemon: &Daemon, image: &str, auth: AuthConfig) -> Result<String, tonic::Status> {
    let request = PullImageRequest {
        image: Some(spec(image)),
        auth: Some(auth),
        sandbox_config: None,
    };
    Ok(daemon.images().await.pull_image(request).await?.into_inner().image_ref)
}

fn snapshot_dirs(daemon: &Daemon) -> Vec<String> {
    daemon.entries("snapshots")
}

#[tokio::test]
async fn pull_list_status_remove_round_trip() {
    let registry = Registry::start().await;
    let image = TestImage::busybox();
    let digest = push_image(&registry.url(), "test/busybox", "1.0", &image, Flavour::Oci).await;
    let daemon = Daemon::start().await;
    let name = format!("{}/test/busybox:1.0", registry.host());

    let id = daemon.pull(&name).await.unwrap();
    assert_eq!(id, image.config_digest(), "the image id is the config digest");

    let found = status(&daemon, &name).await.expect("status by tag");
    assert_eq!(found.repo_tags, vec![name.clone()]);
    assert_eq!(
        found.repo_digests,
        [format!("{}/test/busybox@{digest}", registry.host())]
    );
    let expected_size: u64 = image.config_json().len() as u64 + image.layers.iter().map(|l| l.size()).sum::<u64>();
    assert_eq!(found.size, expected_size);
    let hex = id.trim_start_matches("sha256:");
    for alias in [
        id.clone(),
        hex.to_string(),
        hex[..12].to_string(),
        format!("{}/test/busybox@{digest}", registry.host()),
    ] {
        assert_eq!(
            status(&daemon, &alias).await.map(|i| i.id),
            Some(id.clone()),
            "lookup by {alias}"
        );
    }
    assert!(status(&daemon, "nothere:latest").await.is_none());

    // The unpacked busybox really is there.
    let snapshot = daemon
        .root()
        .join("snapshots")
        .join(image.layers[0].diff_id.trim_start_matches("sha256:"));
    let busybox = std::fs::read(snapshot.join("fs/bin/busybox")).unwrap();
    assert_eq!(busybox, std::fs::read("/bin/busybox").unwrap());
    assert_eq!(
        std::fs::read_link(snapshot.join("fs/bin/sh")).unwrap().to_str(),
        Some("busybox")
    );

    let verbose = daemon
        .images()
        .await
        .image_status(ImageStatusRequest {
            image: Some(spec(&name)),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&verbose.info["info"]).unwrap();
    assert_eq!(info["manifestDigest"], digest);
    assert_eq!(info["config"]["config"]["Cmd"][0], "sh");
    assert_eq!(info["layers"][0]["diff_id"], image.layers[0].diff_id);

    let listed = list(&daemon).await;
    assert_eq!(listed.len(), 1);
    let filtered = daemon
        .images()
        .await
        .list_images(ListImagesRequest {
            filter: Some(ImageFilter {
                image: Some(spec(&hex[..8])),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);

    let used_before = fs_used_bytes(&daemon).await;
    assert!(used_before > 1_000_000, "busybox counts in ImageFsInfo: {used_before}");
    remove(&daemon, &name).await;
    assert!(status(&daemon, &id).await.is_none());
    assert!(list(&daemon).await.is_empty());
    remove(&daemon, &name).await; // unknown image: still OK
    common::wait_for(Duration::from_secs(5), "snapshots to be freed", || {
        snapshot_dirs(&daemon).is_empty()
    })
    .await;
    let used_after = fs_used_bytes(&daemon).await;
    assert!(
        used_after < used_before / 10,
        "{used_after} should be far below {used_before}"
    );
}

#[tokio::test]
async fn docker_flavour_and_uncompressed_layers() {
    let registry = Registry::start().await;
    let image = TestImage::new(
        ImageConfig {
            user: "1000:1000".into(),
            ..Default::default()
        },
        vec![busybox_layer(Compression::None)],
    );
    push_image(&registry.url(), "docker/plain", "v1", &image, Flavour::Docker).await;
    let daemon = Daemon::start().await;
    let id = daemon
        .pull(&format!("{}/docker/plain:v1", registry.host()))
        .await
        .unwrap();
    let found = status(&daemon, &id).await.unwrap();
    assert_eq!(found.uid.map(|u| u.value), Some(1000));
}

#[tokio::test]
async fn zstd_layers_unpack() {
    let registry = Registry::start().await;
    let layer = layer_from_entries(
        &[
            Entry::dir("data"),
            Entry::file("data/hello.txt", "compressed with zstd\n"),
        ],
        Compression::Zstd,
    );
    let image = TestImage::new(
        ImageConfig::default(),
        vec![busybox_layer(Compression::Gzip), layer.clone()],
    );
    push_image(&registry.url(), "test/zstd", "latest", &image, Flavour::Oci).await;
    let daemon = Daemon::start().await;
    daemon.pull(&format!("{}/test/zstd", registry.host())).await.unwrap();
    let file = daemon
        .root()
        .join("snapshots")
        .join(layer.diff_id.trim_start_matches("sha256:"))
        .join("fs/data/hello.txt");
    assert_eq!(std::fs::read_to_string(file).unwrap(), "compressed with zstd\n");
}

#[tokio::test]
async fn reference_forms_and_mirrors_keep_original_names() {
    let registry = Registry::start().await;
    let image = TestImage::busybox();
    let digest = push_image(&registry.url(), "library/busybox", "latest", &image, Flavour::Oci).await;
    push_image(&registry.url(), "library/busybox", "1.36", &image, Flavour::Oci).await;
    let config = format!(
        "[registry.mirrors]\n\"docker.io\" = [\"http://127.0.0.1:1\", \"{}\"]\n",
        registry.url()
    );
    let daemon = Daemon::start_with_config(Some(&config)).await;

    // The first mirror is unreachable: the second one serves.
    let id = daemon.pull("busybox").await.unwrap();
    let found = status(&daemon, "docker.io/library/busybox:latest").await.unwrap();
    assert_eq!(found.id, id);
    assert_eq!(found.repo_tags, ["docker.io/library/busybox:latest"]);
    assert_eq!(found.repo_digests, [format!("docker.io/library/busybox@{digest}")]);

    daemon.pull("library/busybox:1.36").await.unwrap();
    daemon.pull(&format!("busybox@{digest}")).await.unwrap();
    daemon
        .pull(&format!("docker.io/library/busybox:1.36@{digest}"))
        .await
        .unwrap();
    let found = status(&daemon, "busybox:1.36").await.unwrap();
    let mut tags = found.repo_tags.clone();
    tags.sort();
    assert_eq!(
        tags,
        ["docker.io/library/busybox:1.36", "docker.io/library/busybox:latest"]
    );
    assert_eq!(list(&daemon).await.len(), 1, "one image, several names");

    let err = daemon.pull("Busybox").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn multi_platform_index_picks_the_node_platform() {
    let registry = Registry::start().await;
    let amd64 = TestImage::busybox();
    let arm64 = TestImage::new(
        ImageConfig {
            architecture: "arm64".into(),
            ..Default::default()
        },
        vec![layer_from_entries(&[Entry::file("arch", "arm64")], Compression::Gzip)],
    );
    let riscv = TestImage::new(
        ImageConfig {
            architecture: "riscv64".into(),
            ..Default::default()
        },
        vec![layer_from_entries(&[Entry::file("arch", "riscv64")], Compression::Gzip)],
    );
    let host = common::oci::host_arch();
    let (native, other) = if host == "amd64" {
        (&amd64, &arm64)
    } else {
        (&arm64, &amd64)
    };
    let index_digest = push_index(
        &registry.url(),
        "multi/app",
        "latest",
        &[
            ("linux", if host == "amd64" { "arm64" } else { "amd64" }, None, other),
            ("linux", "riscv64", None, &riscv),
            ("linux", host, None, native),
        ],
        Flavour::Oci,
    )
    .await;
    let daemon = Daemon::start().await;
    let name = format!("{}/multi/app:latest", registry.host());
    let id = daemon.pull(&name).await.unwrap();
    assert_eq!(id, native.config_digest());
    let found = status(&daemon, &name).await.unwrap();
    assert_eq!(
        found.repo_digests,
        [format!("{}/multi/app@{index_digest}", registry.host())]
    );

    // An index without this node's platform is a clear NotFound.
    push_index(
        &registry.url(),
        "multi/foreign",
        "latest",
        &[("linux", "riscv64", None, &riscv)],
        Flavour::Docker,
    )
    .await;
    let err = daemon
        .pull(&format!("{}/multi/foreign", registry.host()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("linux/"), "{}", err.message());
}

#[tokio::test]
async fn whiteouts_and_opaque_directories_shape_the_merged_tree() {
    let registry = Registry::start().await;
    let base = layer_from_entries(
        &[
            Entry::dir("a"),
            Entry::file("a/keep", "kept"),
            Entry::file("a/gone", "deleted later"),
            Entry::dir("b"),
            Entry::file("b/old", "hidden by opaque"),
            Entry::file("top", "top"),
        ],
        Compression::Gzip,
    );
    let upper = layer_from_entries(
        &[
            Entry::Whiteout("a/gone".into()),
            Entry::Opaque("b".into()),
            Entry::file("b/new", "new"),
            Entry::Whiteout("top".into()),
        ],
        Compression::Gzip,
    );
    let image = TestImage::new(ImageConfig::default(), vec![base.clone(), upper.clone()]);
    push_image(&registry.url(), "test/whiteout", "latest", &image, Flavour::Oci).await;
    let daemon = Daemon::start().await;
    daemon
        .pull(&format!("{}/test/whiteout", registry.host()))
        .await
        .unwrap();

    let layer_dir = |layer: &common::oci::Layer| {
        daemon
            .root()
            .join("snapshots")
            .join(layer.diff_id.trim_start_matches("sha256:"))
            .join("fs")
    };
    // The upper layer holds overlayfs whiteouts (0:0 char devices) and the opaque xattr.
    use std::os::unix::fs::FileTypeExt;
    let whiteout = std::fs::symlink_metadata(layer_dir(&upper).join("a/gone")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(
        xattr::get(layer_dir(&upper).join("b"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );

    // Mounted as a container would see it.
    let merged = tempfile::tempdir().unwrap();
    let options = format!(
        "lowerdir={}:{}",
        layer_dir(&upper).display(),
        layer_dir(&base).display()
    );
    nix::mount::mount(
        Some("overlay"),
        merged.path(),
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .expect("mount overlay");
    let seen = (
        std::fs::read_to_string(merged.path().join("a/keep")).ok(),
        merged.path().join("a/gone").exists(),
        merged.path().join("b/old").exists(),
        std::fs::read_to_string(merged.path().join("b/new")).ok(),
        merged.path().join("top").exists(),
    );
    nix::mount::umount(merged.path()).expect("umount overlay");
    assert_eq!(seen, (Some("kept".into()), false, false, Some("new".into()), false));
}

#[tokio::test]
async fn malicious_layers_are_refused_and_write_nothing_outside() {
    use tar::EntryType;
    let registry = Registry::start().await;
    let daemon = Daemon::start().await;
    let cases: Vec<(&str, Vec<Entry>)> = vec![
        (
            "dotdot",
            vec![Entry::Raw {
                name: b"../../../../../../tmp/podvisor-escape-dotdot".to_vec(),
                kind: EntryType::Regular,
                link: Vec::new(),
                data: b"escaped".to_vec(),
            }],
        ),
        (
            "symlink",
            vec![
                Entry::symlink("evil", "/tmp"),
                Entry::file("evil/podvisor-escape-symlink", "escaped"),
            ],
        ),
        (
            "hardlink",
            vec![Entry::Raw {
                name: b"passwd-copy".to_vec(),
                kind: EntryType::Link,
                link: b"../../../../../../etc/passwd".to_vec(),
                data: Vec::new(),
            }],
        ),
        (
            "absolute",
            vec![Entry::Raw {
                name: b"/tmp/podvisor-escape-absolute".to_vec(),
                kind: EntryType::Regular,
                link: Vec::new(),
                data: b"escaped".to_vec(),
            }],
        ),
    ];
    for (name, entries) in cases {
        let image = TestImage::new(
            ImageConfig::default(),
            vec![layer_from_entries(&entries, Compression::Gzip)],
        );
        push_image(&registry.url(), &format!("evil/{name}"), "latest", &image, Flavour::Oci).await;
        let err = daemon
            .pull(&format!("{}/evil/{name}", registry.host()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(
            !std::path::Path::new(&format!("/tmp/podvisor-escape-{name}")).exists(),
            "{name} escaped"
        );
    }
    let passwd = std::fs::metadata("/etc/passwd").unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&passwd),
        1,
        "no hard link to /etc/passwd was made"
    );
    assert!(list(&daemon).await.is_empty());
    assert!(snapshot_dirs(&daemon).is_empty(), "{:?}", snapshot_dirs(&daemon));
    common::wait_for(Duration::from_secs(5), "tmp to be empty", || {
        daemon.entries("tmp").is_empty()
    })
    .await;
}

#[tokio::test]
async fn basic_auth_registry() {
    let registry = Registry::start_with_htpasswd("alice", "wonderland").await;
    RegistryClient::new(&registry.url())
        .with_basic_auth("alice", "wonderland")
        .push_image("private/app", "v1", &TestImage::busybox(), Flavour::Oci)
        .await;
    let daemon = Daemon::start().await;
    let name = format!("{}/private/app:v1", registry.host());

    let err = daemon.pull(&name).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = pull_with(
        &daemon,
        &name,
        AuthConfig {
            username: "alice".into(),
            password: "wrong".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("UNAUTHORIZED"),
        "the registry's words reach the caller: {}",
        err.message()
    );

    pull_with(
        &daemon,
        &name,
        AuthConfig {
            username: "alice".into(),
            password: "wonderland".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    remove(&daemon, &name).await;
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:wonderland");
    pull_with(
        &daemon,
        &name,
        AuthConfig {
            auth,
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn credentials_file_is_used_for_its_registry() {
    let registry = Registry::start_with_htpasswd("bob", "builder").await;
    RegistryClient::new(&registry.url())
        .with_basic_auth("bob", "builder")
        .push_image("private/app", "v1", &TestImage::busybox(), Flavour::Oci)
        .await;
    let auth_dir = tempfile::tempdir().unwrap();
    let auth_file = auth_dir.path().join("auth.json");
    std::fs::write(
        &auth_file,
        format!(
            r#"{{"auths": {{"{}": {{"username": "bob", "password": "builder"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let config = format!("[registry]\nauth_file = \"{}\"\n", auth_file.display());
    let daemon = Daemon::start_with_config(Some(&config)).await;
    daemon
        .pull(&format!("{}/private/app:v1", registry.host()))
        .await
        .unwrap();
}

#[tokio::test]
async fn bearer_token_flow() {
    let registry = Registry::start().await;
    push_image(&registry.url(), "secure/app", "v1", &TestImage::busybox(), Flavour::Oci).await;
    let proxy = Proxy::start_with(
        &registry.url(),
        ProxyOptions {
            auth: ProxyAuth::Bearer {
                user: "carol".into(),
                pass: "t0ken".into(),
            },
            registry_token: Some("static-registry-token".into()),
            identity_token: Some("refresh-me".into()),
            ..Default::default()
        },
    )
    .await;
    let daemon = Daemon::start().await;
    let name = format!("{}/secure/app:v1", proxy.host());

    let err = pull_with(
        &daemon,
        &name,
        AuthConfig {
            username: "carol".into(),
            password: "nope".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    for auth in [
        AuthConfig {
            username: "carol".into(),
            password: "t0ken".into(),
            ..Default::default()
        },
        AuthConfig {
            identity_token: "refresh-me".into(),
            ..Default::default()
        },
        AuthConfig {
            registry_token: "static-registry-token".into(),
            ..Default::default()
        },
    ] {
        pull_with(&daemon, &name, auth).await.unwrap();
        remove(&daemon, &name).await;
    }
    let token_requests = proxy
        .requests()
        .iter()
        .filter(|r| r.line.contains("/token") && r.status == 200)
        .count();
    assert!(
        token_requests >= 2,
        "tokens were fetched from the token server: {token_requests}"
    );
}

#[tokio::test]
async fn registry_errors_are_clear() {
    let registry = Registry::start().await;
    let daemon = Daemon::start().await;
    let err = daemon
        .pull(&format!("{}/no/such:image", registry.host()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("NAME_UNKNOWN") || err.message().contains("MANIFEST_UNKNOWN"),
        "{}",
        err.message()
    );

    let port = common::free_port();
    let err = daemon
        .pull(&format!("127.0.0.1:{port}/no/registry:here"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("unreachable"), "{}", err.message());
}

#[tokio::test]
async fn transient_errors_are_retried() {
    let registry = Registry::start().await;
    push_image(&registry.url(), "flaky/app", "v1", &TestImage::busybox(), Flavour::Oci).await;
    let proxy = Proxy::start(&registry.url()).await;
    proxy.fail_next(2, 503);
    let daemon = Daemon::start().await;
    daemon.pull(&format!("{}/flaky/app:v1", proxy.host())).await.unwrap();
    proxy.fail_next_matching("/blobs/", 1, 502);
    daemon.pull(&format!("{}/flaky/app:v1", proxy.host())).await.unwrap();
}

#[tokio::test]
async fn concurrent_pulls_download_each_blob_once() {
    let registry = Registry::start().await;
    let image = TestImage::new(
        ImageConfig::default(),
        vec![
            busybox_layer(Compression::Gzip),
            filler_layer(512 * 1024, 1, Compression::Gzip),
            filler_layer(256 * 1024, 2, Compression::Zstd),
        ],
    );
    push_image(&registry.url(), "busy/app", "v1", &image, Flavour::Oci).await;
    let proxy = Proxy::start(&registry.url()).await;
    let daemon = Daemon::start().await;
    let name = format!("{}/busy/app:v1", proxy.host());
    let pulls: Vec<_> = (0..10)
        .map(|_| {
            let endpoint = daemon.endpoint();
            let name = name.clone();
            tokio::spawn(async move {
                let channel = podvisor::cri::socket::connect(&endpoint).await.unwrap();
                let mut client = podvisor::cri::proto::runtime::image_service_client::ImageServiceClient::new(channel);
                client
                    .pull_image(PullImageRequest {
                        image: Some(spec(&name)),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().image_ref)
            })
        })
        .collect();
    for pull in pulls {
        assert_eq!(pull.await.unwrap().unwrap(), image.config_digest());
    }
    assert_eq!(proxy.count(&format!("/blobs/{}", image.config_digest())), 1);
    for layer in &image.layers {
        assert_eq!(
            proxy.count(&format!("/blobs/{}", layer.digest)),
            1,
            "layer {}",
            layer.digest
        );
    }
    assert_eq!(list(&daemon).await.len(), 1);
}

#[tokio::test]
async fn pull_killed_midway_leaves_nothing_and_repull_works() {
    let registry = Registry::start().await;
    let image = TestImage::new(
        ImageConfig::default(),
        vec![
            busybox_layer(Compression::Gzip),
            filler_layer(3 << 20, 7, Compression::Gzip),
        ],
    );
    push_image(&registry.url(), "slow/app", "v1", &image, Flavour::Oci).await;
    let proxy = Proxy::start_with(
        &registry.url(),
        ProxyOptions {
            bytes_per_sec: Some(1 << 20),
            ..Default::default()
        },
    )
    .await;
    let mut daemon = Daemon::start().await;
    let name = format!("{}/slow/app:v1", proxy.host());
    let endpoint = daemon.endpoint();
    let pulling = tokio::spawn({
        let name = name.clone();
        async move {
            let channel = podvisor::cri::socket::connect(&endpoint).await.unwrap();
            podvisor::cri::proto::runtime::image_service_client::ImageServiceClient::new(channel)
                .pull_image(PullImageRequest {
                    image: Some(spec(&name)),
                    ..Default::default()
                })
                .await
        }
    });
    let big = image.layers[1].digest.clone();
    common::wait_for(Duration::from_secs(10), "the big layer download to start", || {
        proxy.count(&format!("/blobs/{big}")) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    daemon.kill();
    assert!(pulling.await.unwrap().is_err(), "the pull was cut off");
    assert!(
        !daemon.entries("tmp").is_empty(),
        "the kill left work in progress behind"
    );

    daemon.restart().await;
    assert!(list(&daemon).await.is_empty(), "no partial image after a crash");
    assert!(daemon.entries("tmp").is_empty(), "unfinished work is dropped at start");
    assert!(daemon.entries("images").is_empty());
    proxy.set_bytes_per_sec(None);
    assert_eq!(daemon.pull(&name).await.unwrap(), image.config_digest());
}

#[tokio::test]
async fn images_survive_restarts() {
    let registry = Registry::start().await;
    push_image(&registry.url(), "keep/app", "v1", &TestImage::busybox(), Flavour::Oci).await;
    let mut daemon = Daemon::start().await;
    let name = format!("{}/keep/app:v1", registry.host());
    let id = daemon.pull(&name).await.unwrap();

    daemon.stop();
    daemon.restart().await;
    assert_eq!(status(&daemon, &name).await.map(|i| i.id), Some(id.clone()));
    daemon.restart().await; // a kill -9 this time
    assert_eq!(list(&daemon).await.len(), 1);
    assert_eq!(status(&daemon, &id[7..19]).await.map(|i| i.repo_tags), Some(vec![name]));
}

#[tokio::test]
async fn shared_layers_are_stored_once_and_freed_last() {
    let registry = Registry::start().await;
    let shared = busybox_layer(Compression::Gzip);
    let only_a = layer_from_entries(&[Entry::file("a", "a")], Compression::Gzip);
    let only_b = layer_from_entries(&[Entry::file("b", "b")], Compression::Gzip);
    let a = TestImage::new(ImageConfig::default(), vec![shared.clone(), only_a.clone()]);
    let b = TestImage::new(
        ImageConfig {
            env: vec!["WHICH=b".into()],
            ..Default::default()
        },
        vec![shared.clone(), only_b.clone()],
    );
    push_image(&registry.url(), "gc/a", "v1", &a, Flavour::Oci).await;
    push_image(&registry.url(), "gc/b", "v1", &b, Flavour::Oci).await;
    let proxy = Proxy::start(&registry.url()).await;
    let daemon = Daemon::start().await;
    daemon.pull(&format!("{}/gc/a:v1", proxy.host())).await.unwrap();
    daemon.pull(&format!("{}/gc/b:v1", proxy.host())).await.unwrap();
    assert_eq!(
        proxy.count(&format!("/blobs/{}", shared.digest)),
        1,
        "the shared layer is fetched once"
    );
    let hex = |l: &common::oci::Layer| l.diff_id.trim_start_matches("sha256:").to_string();
    let mut expected = vec![hex(&shared), hex(&only_a), hex(&only_b)];
    expected.sort();
    assert_eq!(snapshot_dirs(&daemon), expected);

    remove(&daemon, &format!("{}/gc/a:v1", proxy.host())).await;
    let mut expected = vec![hex(&shared), hex(&only_b)];
    expected.sort();
    common::wait_for(Duration::from_secs(5), "a's own layer to be freed", || {
        snapshot_dirs(&daemon) == expected
    })
    .await;
    assert!(
        daemon
            .root()
            .join("snapshots")
            .join(hex(&shared))
            .join("fs/bin/busybox")
            .exists()
    );

    remove(&daemon, &b.config_digest()).await;
    common::wait_for(Duration::from_secs(5), "everything to be freed", || {
        snapshot_dirs(&daemon).is_empty() && daemon.entries("blobs/sha256").is_empty()
    })
    .await;
}

#[tokio::test]
async fn corrupted_blobs_fail_verification() {
    let registry = Registry::start().await;
    let image = TestImage::busybox();
    push_image(&registry.url(), "bad/app", "v1", &image, Flavour::Oci).await;
    let blob = registry.blob_path(&image.layers[0].digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let daemon = Daemon::start().await;
    let err = daemon
        .pull(&format!("{}/bad/app:v1", registry.host()))
        .await
        .unwrap_err();
    assert!(matches!(err.code(), Code::DataLoss), "{err:?}");
    assert!(list(&daemon).await.is_empty());
    assert!(snapshot_dirs(&daemon).is_empty());
}

#[tokio::test]
async fn a_pull_whose_caller_gives_up_still_completes_and_leaves_no_work_behind() {
    let registry = Registry::start().await;
    let image = TestImage::new(
        ImageConfig::default(),
        vec![
            busybox_layer(Compression::Gzip),
            filler_layer(2 << 20, 3, Compression::Gzip),
        ],
    );
    push_image(&registry.url(), "cancel/app", "v1", &image, Flavour::Oci).await;
    let proxy = Proxy::start_with(
        &registry.url(),
        ProxyOptions {
            bytes_per_sec: Some(2 << 20),
            ..Default::default()
        },
    )
    .await;
    let daemon = Daemon::start().await;
    let name = format!("{}/cancel/app:v1", proxy.host());
    let endpoint = daemon.endpoint();
    let request_name = name.clone();
    let pulling = tokio::spawn(async move {
        let channel = podvisor::cri::socket::connect(&endpoint).await.unwrap();
        podvisor::cri::proto::runtime::image_service_client::ImageServiceClient::new(channel)
            .pull_image(PullImageRequest {
                image: Some(spec(&request_name)),
                ..Default::default()
            })
            .await
    });
    let big = image.layers[1].digest.clone();
    common::wait_for(Duration::from_secs(10), "the big layer download to start", || {
        proxy.count(&format!("/blobs/{big}")) > 0
    })
    .await;
    pulling.abort(); // the client goes away, as kubelet does on a deadline
    common::wait_for(Duration::from_secs(20), "the abandoned pull to finish", || {
        !daemon.entries("images").is_empty()
    })
    .await;
    common::wait_for(Duration::from_secs(5), "tmp to be empty", || {
        daemon.entries("tmp").is_empty()
    })
    .await;
    // The image's files land before its record: wait for the record, not just the files.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while status(&daemon, &name).await.is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&daemon, &name).await.map(|i| i.id), Some(image.config_digest()));
}

#[tokio::test]
async fn list_filter_by_repository_name() {
    let registry = Registry::start().await;
    push_image(&registry.url(), "repo/app", "v1", &TestImage::busybox(), Flavour::Oci).await;
    let daemon = Daemon::start().await;
    daemon.pull(&format!("{}/repo/app:v1", registry.host())).await.unwrap();
    let filter = |image: String| ListImagesRequest {
        filter: Some(ImageFilter {
            image: Some(spec(&image)),
        }),
    };
    let mut client = daemon.images().await;
    let by_repo = client
        .list_images(filter(format!("{}/repo/app", registry.host())))
        .await
        .unwrap();
    assert_eq!(by_repo.into_inner().images.len(), 1);
    let other_tag = client
        .list_images(filter(format!("{}/repo/app:v2", registry.host())))
        .await
        .unwrap();
    assert!(other_tag.into_inner().images.is_empty());
}

#[tokio::test]
async fn a_mirror_that_says_not_found_wins_over_an_unreachable_origin() {
    let registry = Registry::start().await;
    let config = format!("[registry.mirrors]\n\"registry.invalid\" = [\"{}\"]\n", registry.url());
    let daemon = Daemon::start_with_config(Some(&config)).await;
    let err = daemon.pull("registry.invalid/missing/app:v1").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}
