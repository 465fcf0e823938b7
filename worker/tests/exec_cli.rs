//! `worker exec` as a user runs it: the real binary, real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_worker"))
}

/// Assemble fixture `name` into `<dir>/<name>.wasm`.
fn wasm_fixture(dir: &Path, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.wat"));
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wat::parse_file(src).unwrap()).unwrap();
    path
}

fn json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

#[test]
fn exec_json_prints_the_documented_keys_and_the_same_digest_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let module = wasm_fixture(dir.path(), "echo");
    let input = dir.path().join("in.bin");
    std::fs::write(&input, b"hello peergrid").unwrap();
    let run = || {
        worker()
            .arg("exec")
            .arg(&module)
            .arg("--input")
            .arg(&input)
            .args(["--arg", "x", "--json"])
            .output()
            .unwrap()
    };
    let a = run();
    assert_eq!(
        a.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&a.stderr)
    );
    let v = json(&a);
    for key in [
        "status",
        "exit_code",
        "fuel_used",
        "output_hash",
        "output_len",
        "error",
        "digest",
        "trap",
        "wall_ms",
        "fingerprint",
    ] {
        assert!(v.get(key).is_some(), "missing key {key}: {v}");
    }
    assert_eq!(v["status"], "ok");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["output_len"], 14);
    assert_eq!(
        v["output_hash"],
        tasks::BlobId::of(b"hello peergrid").to_string()
    );
    assert!(v["error"].is_null());
    assert!(v["fuel_used"].as_u64().unwrap() > 0);
    assert_eq!(json(&run())["digest"], v["digest"]);
}

#[test]
fn exec_without_json_writes_task_stdout_and_a_summary_line() {
    let dir = tempfile::tempdir().unwrap();
    let module = wasm_fixture(dir.path(), "exit_code");
    let out = worker().arg("exec").arg(&module).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "non-ok status must not exit 0");
    assert_eq!(out.stdout, b"bye\n");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let summary = stderr.lines().last().unwrap();
    assert!(summary.starts_with("exit (exit code 7)"), "{stderr}");
    assert!(summary.contains("digest="), "{summary}");
}

#[test]
fn exec_reports_limits_as_statuses_with_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let looping = wasm_fixture(dir.path(), "infinite_loop");
    let out = worker()
        .arg("exec")
        .arg(&looping)
        .args(["--fuel", "100000", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["status"], "out_of_fuel");
    assert_eq!(v["fuel_used"], 100000);

    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm\x01\0\0\0\x05junk").unwrap();
    let out = worker()
        .arg("exec")
        .arg(&garbage)
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["status"], "invalid_module");
    assert!(v["error"].as_str().unwrap().len() > 5);
}

#[test]
fn exec_of_a_missing_file_is_a_one_line_error() {
    let out = worker()
        .args(["exec", "/no/such/module.wasm"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/no/such/module.wasm"), "{stderr}");
}

#[test]
fn help_explains_both_subcommands() {
    let out = worker().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("join") && help.contains("exec"), "{help}");
    let out = worker().args(["exec", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--input",
        "--arg",
        "--fuel",
        "--memory-mb",
        "--max-output",
        "--json",
    ] {
        assert!(help.contains(flag), "exec --help lacks {flag}");
    }
}
