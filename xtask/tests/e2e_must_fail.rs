//! The end-to-end check can fail: `cargo xtask e2e` on the deliberately undersized
//! scenario (planner sizing off, QEMU's default windows) must reproduce the guest's
//! "no space" for the 128 GiB BAR, report the row as failed in the table and the JSON
//! file, and exit non-zero. Boots one x86_64 guest (provisioned by `cargo xtask test`).

use std::process::Command;

#[test]
fn undersized_reservation_is_reported_as_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let scenario = xtask::scenario::default_dir().join("must-fail").join("undersized-root-port.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["e2e", "--scenario"])
        .arg(&scenario)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must exit non-zero\n{stdout}\n{stderr}");
    assert!(stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("can't assign; no space"), "the guest's own message\n{stdout}\n{stderr}");
    assert!(stderr.contains("1 of 1 scenarios failed"), "{stderr}");

    let reports: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // Rows for checks (the port windows at boot) come before the devices' rows.
    let rows = reports[0]["rows"].as_array().unwrap();
    let row = rows.iter().find(|r| r["device"] == "gpu0").unwrap_or_else(|| panic!("no gpu0 row: {rows:?}"));
    assert_eq!(row["ok"], false);
    assert_eq!(row["bars_ok"], false);
    // The device did reach the guest at its planned place: the failure is the BAR.
    assert_eq!(row["guest"], "0000:01:00.0");
    assert!(row["result"].as_str().unwrap().contains("BAR 2"), "{row}");
}
