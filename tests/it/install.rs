//! `escale install` / `escale uninstall` into a throwaway root (this machine's PID 1 is not
//! systemd, so nothing is started): the binary, the config (the sample, with the data dir),
//! the hardened unit naming the binary, the boot link and the 0700 data dir; `systemd-analyze
//! verify` accepts the unit and `systemd-analyze security` rates it; a second install keeps an
//! edited config; uninstall keeps config and data, `--purge` removes them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::server::ESCALE;

fn escale(args: &[&str]) -> std::process::Output {
    Command::new(ESCALE)
        .args(args)
        .output()
        .expect("escale runs")
}

fn ok(args: &[&str]) -> String {
    let out = escale(args);
    assert!(
        out.status.success(),
        "escale {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn install_and_uninstall_into_a_throwaway_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let r = root.to_str().unwrap();
    let said = ok(&["install", "--root", r]);
    assert!(said.contains("not started"), "{said}");

    let bin = root.join("usr/local/bin/escale");
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(ESCALE).unwrap(),
        "the binary is this build"
    );
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let config = root.join("etc/escale/escale.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("\ndata_dir = \"/var/lib/escale\"\n"),
        "data dir set"
    );
    assert!(text.contains("[backup]"), "the documented sample");
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/escale.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/escale serve --config /etc/escale/escale.toml"),
        "{unit}"
    );
    let link = root.join("etc/systemd/system/multi-user.target.wants/escale.service");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("/etc/systemd/system/escale.service")
    );
    let data = root.join("var/lib/escale");
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(
        !Path::new("/etc/systemd/system/escale.service").exists(),
        "nothing written outside the root"
    );

    // The generated unit, pointed at this build's binary, passes systemd's own checks.
    let check = tmp.path().join("check");
    std::fs::create_dir_all(&check).unwrap();
    std::fs::write(
        check.join("escale.service"),
        unit.replace("/usr/local/bin/escale", ESCALE),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(check.join("escale.service"))
        .output()
        .expect("systemd-analyze runs");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(check.join("escale.service"))
        .output()
        .expect("systemd-analyze runs");
    let report = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for escale.service: ")
                .nth(1)
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {report}"));
    assert!(
        exposure <= 3.0,
        "the unit is not hardened enough: {exposure}\n{report}"
    );

    // Again: an edited config is kept.
    std::fs::write(&config, format!("{text}\n# edited by the operator\n")).unwrap();
    let said = ok(&["install", "--root", r]);
    assert!(said.contains("kept the existing config"), "{said}");
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .contains("edited by the operator"));

    // Uninstall keeps config and data.
    std::fs::write(data.join("escale.db"), b"registry").unwrap();
    let said = ok(&["uninstall", "--root", r]);
    assert!(said.contains("kept the config"), "{said}");
    assert!(!root.join("etc/systemd/system/escale.service").exists());
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "the boot link is gone"
    );
    assert!(config.exists() && data.join("escale.db").exists());
    // --purge removes them.
    ok(&["uninstall", "--root", r, "--purge"]);
    assert!(!config.exists() && !data.exists());
}
