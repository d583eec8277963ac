//! A QMP monitor of the engine's own, next to the one the VMM keeps.
//!
//! A QMP socket serves one client at a time: while a VMM (Kata's runtime, with its own
//! QMP client on `-qmp unix:fd=…`) holds the connection, a second client that connects
//! to the same socket waits in the listen queue and never gets a greeting. QEMU takes any
//! number of monitors, though, each with its own connection, and sends every event to
//! each of them. So the engine gets a monitor of its own:
//!
//! - [`monitor_args`] gives the `-chardev socket,…,server=on,wait=off` and
//!   `-mon …,mode=control` arguments to add to QEMU's command line (next to the plan's
//!   arguments); the engine connects there with [`crate::QmpClient::connect_unix`] while
//!   the VMM keeps its own monitor. `device_add` / `device_del` from either monitor act
//!   on the same machine, and `DEVICE_DELETED` reaches both.
//! - Or the VMM hands a connection over: [`crate::QmpClient::from_stream`] for a fresh
//!   one (the client reads the greeting), [`crate::QmpClient::from_negotiated_stream`] for
//!   one the VMM already put into command mode. The VMM must stop using it: replies on
//!   one connection cannot be told apart by two clients.

use std::path::Path;

/// QEMU arguments for a QMP monitor `id` listening on the Unix socket `path`
/// (`-chardev socket,id=<id>,path=<path>,server=on,wait=off -mon chardev=<id>,mode=control`).
/// Commas in the path are doubled, as QEMU's option syntax wants.
pub fn monitor_args(id: &str, path: &Path) -> Vec<String> {
    let path = path.display().to_string().replace(',', ",,");
    vec![
        "-chardev".to_string(),
        format!("socket,id={id},path={path},server=on,wait=off"),
        "-mon".to_string(),
        format!("chardev={id},mode=control"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_escape_commas() {
        let a = monitor_args("hotplug", Path::new("/run/vm,1/hotplug.sock"));
        assert_eq!(a[1], "socket,id=hotplug,path=/run/vm,,1/hotplug.sock,server=on,wait=off");
        assert_eq!(a[3], "chardev=hotplug,mode=control");
    }
}
