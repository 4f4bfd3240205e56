//! `migrator doctor` as a user runs it: the real binary, the real kernel,
//! the CRIU that `cargo xtask setup` installed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{os::unix::fs::PermissionsExt as _, process::Command};

use migrator_tests::{TempDir, migrator_bin, require_root};

fn doctor(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(migrator_bin())
        .arg("doctor")
        .args(args)
        .env_remove("MIGRATOR_CRIU")
        .envs(env.iter().copied())
        .output()
        .expect("run migrator doctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn passes_on_this_host_with_the_installed_criu() {
    require_root();
    let (code, stdout) = doctor(&["--json"], &[]);
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("doctor --json is JSON");
    assert_eq!(code, 0, "doctor failed here:\n{stdout}");
    assert_eq!(report["ok"], true);
    let checks = report["checks"].as_array().expect("checks array");
    let status_of = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["status"].as_str().unwrap_or_default().to_owned())
    };
    for name in [
        "privileges",
        "kernel",
        "btf",
        "bpffs",
        "ebpf programs",
        "criu",
        "criu version",
        "criu check",
        // This kernel has BTF: counted without tracefs.
        "local retransmits",
    ] {
        assert_eq!(
            status_of(name).as_deref(),
            Some("ok"),
            "check {name}:\n{stdout}"
        );
    }
    // WARN exactly when this process lacks CAP_SYS_RESOURCE.
    let expected = if migrator_tests::has_sys_resource() {
        "ok"
    } else {
        "warn"
    };
    assert_eq!(
        status_of("capabilities").as_deref(),
        Some(expected),
        "{stdout}"
    );
}

#[test]
fn nonexistent_criu_path_is_named_in_the_failure() {
    require_root();
    let (code, stdout) = doctor(&["--criu", "/nonexistent"], &[]);
    assert_ne!(code, 0);
    assert!(
        stdout.contains("FAIL") && stdout.contains("--criu /nonexistent: the path does not exist"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cargo xtask setup"),
        "no fix offered:\n{stdout}"
    );
}

#[test]
fn nonexistent_criu_from_the_environment_is_named_too() {
    require_root();
    let (code, stdout) = doctor(&[], &[("MIGRATOR_CRIU", "/nonexistent/criu")]);
    assert_ne!(code, 0);
    assert!(
        stdout.contains("MIGRATOR_CRIU=/nonexistent/criu: the path does not exist"),
        "{stdout}"
    );
}

#[test]
fn criu_older_than_4_2_is_reported_with_its_version() {
    require_root();
    let dir = TempDir::new("old-criu");
    // Stands in for Debian 12's criu: only `--version` matters here, and
    // the check must stop at the version without running anything else.
    let old = dir.0.join("criu");
    std::fs::write(&old, "#!/bin/sh\necho 'Version: 3.17.1'\n").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, stdout) = doctor(&["--criu", old.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(
        stdout.contains("criu 3.17.1") && stdout.contains("too old") && stdout.contains(">= 4.2"),
        "{stdout}"
    );
    assert!(stdout.contains("fix: run `cargo xtask setup`"), "{stdout}");
}
