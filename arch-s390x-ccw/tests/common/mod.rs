//! Starts a real `qemu-system-s390x` with a plan's arguments and speaks QMP to it over
//! its stdio with `qmp-hotplug`'s client (a deadline on every reply).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qmp_hotplug::client::Result;
use qmp_hotplug::{ClientOptions, QmpClient};
use serde_json::{json, Value};

const QEMU: &str = "qemu-system-s390x";

/// A running `qemu-system-s390x`, killed on drop.
pub struct Qemu {
    child: Child,
    qmp: QmpClient,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// Starts QEMU with `args` plus QMP on stdio, no display, no default devices; fails
    /// with what to install when QEMU is missing. QEMU must greet within 20 s and answer
    /// every command within 10 s.
    pub fn start(args: &[String]) -> Qemu {
        let installed = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(QEMU).exists()));
        assert!(
            installed,
            "{QEMU} is missing: run the tests with `cargo xtask test`, which provisions QEMU into target/e2e/cache \
             and puts it first on PATH; or put a {QEMU} on PATH (Debian's qemu-system-misc)"
        );
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(QEMU)
            .args(["-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none", "-qmp", "stdio"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {QEMU}: {e}"));
        let (to_qemu, from_qemu) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        let mut options = ClientOptions::default();
        options.handshake_timeout = Duration::from_secs(20);
        options.command_timeout = Duration::from_secs(10);
        match QmpClient::from_pipes(from_qemu, to_qemu, options) {
            Ok(qmp) => Qemu { child, qmp },
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                let log = std::fs::read_to_string(stderr.path()).unwrap_or_default();
                panic!("{QEMU}: no QMP session ({e}), exit {status:?}: {log}\nargs: {}", args.join(" "));
            }
        }
    }

    /// Runs a command with raw JSON arguments; QEMU's error reply is an `Err`.
    pub fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.qmp.execute_raw(command, Some(arguments), self.qmp.options().command_timeout)
    }

    /// Runs a command that must succeed.
    pub fn ok(&self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments.clone()).unwrap_or_else(|e| panic!("{command} {arguments}: {e}"))
    }

    /// Ids of `/machine/peripheral` children.
    pub fn peripherals(&self) -> Vec<String> {
        let list = self.ok("qom-list", json!({"path": "/machine/peripheral"}));
        list.as_array().unwrap().iter().filter_map(|p| p["name"].as_str().map(String::from)).collect()
    }

    /// Property `property` of the device with QEMU id `id`.
    pub fn qom_get(&self, id: &str, property: &str) -> Value {
        self.ok("qom-get", json!({"path": format!("/machine/peripheral/{id}"), "property": property}))
    }
}
