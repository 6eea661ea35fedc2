//! `podvisor vm-helper CONFIG`: the per-VM process, like a container's
//! monitor. It relays the serial console into the container's CRI log (and
//! serves attach) and runs the pod's DHCP server inside the pod's network
//! namespace. It runs in its own session, so it outlives a daemon restart;
//! it ends when QEMU closes the console (the VM is gone).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::console::{self, RelayConfig, RelayControl};
use super::dhcp::{self, Lease};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelperConfig {
    /// The pod's network namespace, for the DHCP server.
    pub netns: Option<PathBuf>,
    /// The interface the DHCP server listens on.
    pub bridge: String,
    pub lease: Option<Lease>,
    pub console_socket: PathBuf,
    /// The CRI log; empty: no log.
    pub log_path: PathBuf,
    pub attach_socket: PathBuf,
    /// Created once the relay is connected to QEMU's console.
    pub ready_file: PathBuf,
}

static CONTROL: RelayControl = RelayControl {
    stop: AtomicBool::new(false),
    reopen_log: AtomicBool::new(false),
    connected: AtomicBool::new(false),
};

extern "C" fn on_signal(signal: libc::c_int) {
    if signal == libc::SIGUSR1 {
        CONTROL.reopen_log.store(true, Ordering::SeqCst);
    } else {
        CONTROL.stop.store(true, Ordering::SeqCst);
    }
}

pub fn main(config_path: &Path) -> ! {
    let code = match run(config_path) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("vm-helper: {err}");
            1
        }
    };
    std::process::exit(code)
}

fn run(config_path: &Path) -> Result<(), String> {
    let text = std::fs::read(config_path).map_err(|e| format!("reading {}: {e}", config_path.display()))?;
    let config: HelperConfig = serde_json::from_slice(&text).map_err(|e| format!("parsing config: {e}"))?;
    // SAFETY: the handler only stores to atomics.
    unsafe {
        libc::signal(libc::SIGUSR1, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    if let Some(netns) = &config.netns {
        let file = std::fs::File::open(netns).map_err(|e| format!("opening {}: {e}", netns.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("entering netns: {e}"))?;
    }
    if let Some(lease) = config.lease.clone() {
        let bridge = config.bridge.clone();
        std::thread::spawn(move || {
            // The bridge may still be coming up: retry binding for a while.
            for _ in 0..100 {
                match dhcp::serve(&bridge, &lease) {
                    Ok(()) => return,
                    Err(err) => {
                        eprintln!("vm-helper: dhcp: {err}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        });
    }
    let relay = RelayConfig {
        console_socket: config.console_socket.clone(),
        log_path: if config.log_path.as_os_str().is_empty() {
            PathBuf::from("/dev/null")
        } else {
            config.log_path.clone()
        },
        attach_socket: Some(config.attach_socket.clone()),
        connect_timeout: Duration::from_secs(30),
    };
    let relay_thread = std::thread::spawn(move || console::run(&relay, &CONTROL));
    while !CONTROL.connected.load(Ordering::SeqCst) && !relay_thread.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    if CONTROL.connected.load(Ordering::SeqCst) {
        let _ = std::fs::write(&config.ready_file, b"");
    }
    match relay_thread.join() {
        Ok(Ok(end)) => {
            eprintln!("vm-helper: console ended: {end:?}");
            Ok(())
        }
        Ok(Err(err)) => Err(format!("console relay: {err}")),
        Err(_) => Err("console relay panicked".into()),
    }
}
