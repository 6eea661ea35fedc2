//! `podvisor-test-agent PORT`: a minimal QEMU guest agent on a virtio-serial
//! port (e.g. /dev/vport0p1). `--stdio` serves stdin/stdout instead (for tests).

use std::io;
use std::process::ExitCode;

use vmimage::guest_agent::{self, Agent, ShutdownMode};

fn shutdown(mode: ShutdownMode) {
    eprintln!("podvisor-test-agent: guest-shutdown {mode:?}");
    let cmd = match mode {
        ShutdownMode::Powerdown => libc::RB_POWER_OFF,
        ShutdownMode::Halt => libc::RB_HALT_SYSTEM,
        ShutdownMode::Reboot => libc::RB_AUTOBOOT,
    };
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) takes a plain command constant; on success it does not return.
    if unsafe { libc::reboot(cmd) } != 0 {
        eprintln!("podvisor-test-agent: reboot(2): {}", io::Error::last_os_error());
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag] if flag == "--stdio" => match guest_agent::serve(&Agent::new(), io::stdin(), io::stdout()) {
            Ok(Some(mode)) => {
                eprintln!("podvisor-test-agent: guest-shutdown {mode:?} (ignored with --stdio)");
                ExitCode::SUCCESS
            }
            Ok(None) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("podvisor-test-agent: {e}");
                ExitCode::FAILURE
            }
        },
        [port] if !port.starts_with('-') => match guest_agent::serve_port(port, shutdown) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("podvisor-test-agent: {port}: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: podvisor-test-agent /dev/vportNpM | --stdio");
            ExitCode::from(2)
        }
    }
}
