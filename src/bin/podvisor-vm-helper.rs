//! A VM's helper (DHCP for the guest, console relay and log) as a binary of
//! its own: the main binary links libvirt and its dependencies, which this
//! one, started once per VM and alive as long as the VM, does not need.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() != 2 {
        eprintln!("usage: podvisor-vm-helper CONFIG");
        std::process::exit(2);
    }
    podvisor::backend::vm::helper::main(std::path::Path::new(&args[1]))
}
