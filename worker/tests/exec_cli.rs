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

/// `worker exec --checkpoint-dir`: a run killed (SIGKILL) after a checkpoint resumes from it
/// when the same command runs again, prints what an uninterrupted run prints, and leaves no
/// checkpoint behind.
#[test]
fn exec_resumes_a_killed_task_from_its_checkpoint_dir() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/longrun/longrun.wasm");
    let args = ["--arg", "6000", "--arg", "50", "--arg", "40000"];
    let cmd = |with_dir: bool| {
        let mut c = worker();
        c.arg("exec")
            .arg(&module)
            .args(args)
            .args(["--fuel", "100000000000", "--json"]);
        if with_dir {
            c.arg("--checkpoint-dir").arg(&ck);
        }
        c
    };
    let mut child = cmd(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let ckpt = loop {
        let found = std::fs::read_dir(&ck).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "ckpt"))
        });
        if let Some(p) = found {
            break p;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint within 300 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ckpt.exists(), "the checkpoint outlives the killed run");

    let resumed = cmd(true).output().unwrap();
    assert_eq!(resumed.status.code(), Some(0));
    let r = json(&resumed);
    assert!(
        r["stderr"]
            .as_str()
            .unwrap()
            .contains("longrun: resumed at step"),
        "{r}"
    );
    assert_eq!(r["progress"], 1.0);
    let plain = json(&cmd(false).output().unwrap());
    assert!(plain["stderr"].as_str().unwrap().contains("fresh start"));
    assert_eq!(
        r["output_hash"], plain["output_hash"],
        "same output as uninterrupted"
    );
    assert_eq!(r["status"], "ok");
    let left: Vec<_> = std::fs::read_dir(&ck).unwrap().flatten().collect();
    assert!(
        left.is_empty(),
        "checkpoint removed when the task ended: {left:?}"
    );
}
