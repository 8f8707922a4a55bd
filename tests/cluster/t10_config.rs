//! `herd daemon --config` refuses bad configs with one line naming the problem.

use std::process::Command;

use crate::harness::HERD;

fn daemon_with(text: Option<&str>) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("herd.toml");
    if let Some(t) = text {
        std::fs::write(&path, t.replace("DIR", &dir.path().display().to_string())).expect("write");
    }
    let out = Command::new(HERD).args(["daemon", "--config"]).arg(&path).output().expect("run");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

const GOOD: &str = "name = \"c1\"\nrole = \"coordinator\"\ndata_dir = \"DIR/data\"\nadmin_socket = \"DIR/a.sock\"\n[cluster]\nlisten = \"127.0.3.1:7400\"\n";

fn assert_one_line_error(text: Option<&str>, needle: &str) {
    let (ok, stderr) = daemon_with(text);
    assert!(!ok, "accepted: {text:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.contains(needle), "{stderr:?} does not name {needle:?}");
}

#[test]
fn unknown_key_is_refused_by_name() {
    let _share = crate::harness::share();
    assert_one_line_error(Some(&format!("{GOOD}colour = \"blue\"\n")), "colour");
    assert_one_line_error(Some(&GOOD.replace("listen =", "lisen = \"x\"\nlisten =")), "lisen");
}

#[test]
fn bad_address_is_refused_by_key() {
    let _share = crate::harness::share();
    assert_one_line_error(Some(&GOOD.replace("127.0.3.1:7400", "nowhere")), "cluster.listen");
}

#[test]
fn missing_file_is_refused() {
    let _share = crate::harness::share();
    assert_one_line_error(None, "cannot read config");
}

#[test]
fn bad_value_type_is_refused_by_key() {
    let _share = crate::harness::share();
    assert_one_line_error(Some(&format!("{GOOD}[raft]\nheartbeat_ms = \"fast\"\n")), "heartbeat_ms");
}

/// A node name must start with a letter or a digit: hooks get node names as arguments.
#[test]
fn names_that_read_as_options_or_paths_are_refused() {
    let _share = crate::harness::share();
    for bad in [".", "..", "-rf", "--help", "-", "_x"] {
        assert_one_line_error(Some(&GOOD.replace("name = \"c1\"", &format!("name = {bad:?}"))), "name");
    }
}
