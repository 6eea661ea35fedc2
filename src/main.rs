use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use podvisor::config::DEFAULT_CONFIG_PATH;
use podvisor::daemon::{self, DEFAULT_ENDPOINT, DEFAULT_ROOT, DEFAULT_STATE, DaemonOptions};
use podvisor::logging::{self, LogFormat};

/// podvisor: one CRI runtime for pods as Linux containers or as VMs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PODVISOR_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log level (overridden by RUST_LOG).
    #[arg(long, global = true, default_value = "info", env = "PODVISOR_LOG_LEVEL")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CRI (RuntimeService and ImageService) on a unix socket.
    Daemon {
        /// Socket to listen on.
        #[arg(long, default_value = DEFAULT_ENDPOINT, env = "PODVISOR_LISTEN")]
        listen: String,
        /// Directory for durable state (images, records).
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Directory for runtime state that does not survive a reboot.
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Config file (TOML); the daemon runs without one.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Pull an image through the daemon, with progress.
    Pull {
        /// Image reference, e.g. busybox or registry.k8s.io/pause:3.10.
        image: String,
        /// Registry credentials as USER:PASSWORD.
        #[arg(long)]
        creds: Option<String>,
        #[arg(long, default_value = DEFAULT_ENDPOINT, env = "PODVISOR_ENDPOINT")]
        endpoint: String,
    },
    /// Internal: the per-container monitor the daemon starts.
    #[command(hide = true)]
    Monitor { bundle: PathBuf },
    /// Internal: runs a process inside a running container.
    #[command(hide = true)]
    ExecHelper { config: PathBuf },
    /// Internal: the init of a pod-wide PID namespace.
    #[command(hide = true)]
    PodInit,
    /// Internal: a VM's console relay and DHCP server.
    #[command(hide = true)]
    VmHelper { config: PathBuf },
    /// Internal: makes a pod's user namespace and the namespaces it owns.
    #[command(hide = true)]
    UsernsHolder { kinds: String },
    /// List the images the daemon stores.
    Images {
        /// Only print image ids.
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, default_value = DEFAULT_ENDPOINT, env = "PODVISOR_ENDPOINT")]
        endpoint: String,
    },
}

fn main() -> std::process::ExitCode {
    // The helpers run single-threaded and never start an async runtime. The
    // monitor lives as long as its container: it skips the argument parser, whose
    // code would otherwise stay resident in every monitor.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 3 && args[1] == "monitor" {
        podvisor::backend::linux::monitor::run(std::path::Path::new(&args[2]))
    }
    if args.len() == 3 && args[1] == "vm-helper" {
        podvisor::backend::vm::helper::main(std::path::Path::new(&args[2]))
    }
    if args.len() == 2 && args[1] == "pod-init" {
        podvisor::backend::linux::sandbox::pod_init_main()
    }
    let cli = Cli::parse();
    match &cli.command {
        Command::Monitor { bundle } => podvisor::backend::linux::monitor::run(bundle),
        Command::ExecHelper { config } => podvisor::backend::linux::exec::run(config),
        Command::PodInit => podvisor::backend::linux::sandbox::pod_init_main(),
        Command::VmHelper { config } => podvisor::backend::vm::helper::main(config),
        Command::UsernsHolder { kinds } => podvisor::backend::linux::sandbox::userns_holder_main(kinds),
        _ => {}
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    logging::init(cli.log_format, &cli.log_level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Daemon {
                listen,
                root,
                state,
                config,
            } => {
                let options = DaemonOptions {
                    listen,
                    root,
                    state,
                    config_explicit: config.is_some(),
                    config_path: config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
                };
                daemon::run(options, shutdown_signal())
                    .await
                    .map_err(|err| anyhow::anyhow!(podvisor::error_chain(&err)))
            }
            Command::Pull { image, creds, endpoint } => podvisor::cli::pull(&endpoint, &image, creds.as_deref())
                .await
                .map_err(|err| anyhow::anyhow!(podvisor::error_chain(&err))),
            Command::Images { quiet, endpoint } => podvisor::cli::images(&endpoint, quiet)
                .await
                .map_err(|err| anyhow::anyhow!(podvisor::error_chain(&err))),
            Command::Monitor { .. }
            | Command::ExecHelper { .. }
            | Command::PodInit
            | Command::UsernsHolder { .. }
            | Command::VmHelper { .. } => {
                unreachable!("handled before the runtime starts")
            }
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}
