//! The boot check (`cargo xtask boot-check`) on aarch64 and s390x: one small guest per
//! architecture, one device plugged and unplugged through QMP, on the stack `cargo xtask
//! test` names (`$XTASK_STACK`, else the default).

use guest_harness::arch::Arch;

#[test]
fn aarch64_and_s390x_pass_the_boot_check() {
    let rows = xtask::bootcheck::run(&[Arch::Aarch64, Arch::S390x], &guest_harness::default_stack().unwrap());
    for row in &rows {
        assert!(row.ok(), "{}: {}", row.arch, row.result);
        assert!(!row.hotplugs.is_empty());
    }
    assert_eq!(rows[1].hotplugs.len(), 2, "s390x plugs a ccw device and a zPCI function");
}
