//! Runs inside the outer guest of a `nested-vfio` scenario: binds the passed-through
//! functions to `vfio-pci`, reads them through sysfs and VFIO, plans and boots the inner
//! VM and hotplugs them into it. See `xtask::e2e::nested`.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    xtask::e2e::nested::program::main(&args)
}
