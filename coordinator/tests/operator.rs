//! What scientists and operators expect on day one, with the real binaries: `worker status |
//! pause | resume` over the worker's control socket, the stderr of failed tasks in
//! `results.json`, logs without escape codes in files and as JSON, shell completions, and
//! the systemd units checked by `systemd-analyze verify`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    coordinator_bin, free_udp_port, job_of, log_file, worker_bin, Cluster, Proc, FAILING_WAT,
};
use serde_json::Value;

/// Hang guard for every wait below (none of them measures speed).
const PATIENCE: Duration = Duration::from_secs(180);

/// `worker SUBCOMMAND --data-dir DIR --json`.
fn worker_ctl(cmd: &str, dir: &Path) -> Output {
    Command::new(worker_bin())
        .args([cmd, "--json", "--data-dir"])
        .arg(dir)
        .output()
        .expect("running worker")
}

fn worker_state(dir: &Path) -> Option<Value> {
    let out = worker_ctl("status", dir);
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("worker status --json prints JSON"))
}

fn wait_state(dir: &Path, what: &str, mut f: impl FnMut(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    let mut last = None;
    loop {
        if let Some(s) = worker_state(dir) {
            if f(&s) {
                return s;
            }
            last = Some(s);
        }
        assert!(
            t0.elapsed() < PATIENCE,
            "timed out waiting for {what}; last worker status: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A job of one `module` (compiled from WebAssembly text) with the given `[[task]]` args.
fn job(c: &Cluster, name: &str, wat: &str, fuel: u64, tasks: &[&[&str]]) -> PathBuf {
    let dir = c.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("m.wasm"),
        wat::parse_str(wat).expect("test module assembles"),
    )
    .unwrap();
    let mut toml = format!(
        "name = \"{name}\"\nmodule = \"m.wasm\"\nquorum = 1\nmax_replicas = 2\nfuel = {fuel}\nmemory_mb = 16\nmax_output = 64\ndeadline_secs = 600\n"
    );
    for args in tasks {
        let list: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
        toml += &format!("[[task]]\nargs = [{}]\n", list.join(", "));
    }
    let path = dir.join("job.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Counts to 2^31 then prints "done": long enough that a test polling every few
/// milliseconds sees it running (and then held by a pause) on any machine.
const SPIN_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 300) "done\n")
  (func (export "_start") (local $i i64)
    (loop $l
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if $l (i64.lt_u (local.get $i) (i64.const 2147483648))))
    (i32.store (i32.const 8) (i32.const 300))
    (i32.store (i32.const 12) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16)))))"#;

#[test]
fn worker_status_pause_and_resume_control_the_running_worker() {
    let mut c = Cluster::start_trusting(0);
    c.start_worker(0);
    let dir = c.worker_dir(0);
    let s = wait_state(&dir, "the worker to connect", |s| s["connected"] == true);
    assert_eq!(s["paused"], false);
    assert_eq!(s["slots"], 1);
    assert_eq!(s["node_id"].as_str().unwrap().len(), 64, "{s}");
    let status = c.status();
    assert_eq!(
        status["workers"][0]["node_id"], s["node_id"],
        "status names the node the coordinator knows"
    );
    let socket = dir.join("control.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600,
        "the control socket is the owner's only"
    );

    let job_file = job(&c, "spin", SPIN_WAT, 100_000_000_000, &[&[]]);
    let id = c.submit(&job_file);
    let s = wait_state(&dir, "the task to run", |s| {
        s["tasks"].as_array().is_some_and(|t| {
            t.len() == 1 && t[0]["state"] == "running" && t[0]["ticks"].as_u64() > Some(0)
        })
    });
    assert_eq!(s["tasks"][0]["task"], format!("{id}/0"));

    let out = worker_ctl("pause", &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["paused"], true, "pause answers with the paused state");
    assert_eq!(after["pause_reasons"], serde_json::json!(["command"]));
    // The guest stops at its next fuel yield: held, and its tick count frozen.
    let held = wait_state(&dir, "the running task to be held", |s| {
        s["tasks"][0]["held"] == true
    });
    let ticks = held["tasks"][0]["ticks"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let still = worker_state(&dir).expect("status while paused");
    assert_eq!(still["paused"], true);
    assert_eq!(
        still["tasks"][0]["ticks"].as_u64().unwrap(),
        ticks,
        "a paused guest makes no progress"
    );
    assert_eq!(job_of(&c.status(), id)["tasks_done"], 0);
    let text = Command::new(worker_bin())
        .args(["status", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("paused by `worker pause`") && text.contains(&format!("task {id}/0")),
        "{text}"
    );

    let out = worker_ctl("resume", &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["paused"], false);
    c.wait_until("the job to finish after resume", PATIENCE, |s| {
        job_of(s, id)["state"] == "done"
    });
    let s = wait_state(&dir, "the result to be acknowledged", |s| {
        s["acknowledged"] == 1
    });
    assert_eq!(s["completed"], 1);
    assert_eq!(s["tasks"].as_array().unwrap().len(), 0);

    // A second `worker join` on the same data dir is refused while the first runs.
    let second = Command::new(worker_bin())
        .args(["join", &c.ticket, "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already running with data dir"), "{err}");
    assert!(
        worker_state(&dir).is_some(),
        "the first worker still answers"
    );
}

#[test]
fn control_commands_without_a_worker_say_so_in_one_line() {
    let d = tempfile::tempdir().unwrap();
    for cmd in ["status", "pause", "resume"] {
        let out = Command::new(worker_bin())
            .args([cmd, "--data-dir"])
            .arg(d.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "no worker running with data dir {} (socket {}/control.sock absent)",
                d.path().display(),
                d.path().display()
            )),
            "{err}"
        );
    }
}

#[test]
fn a_failed_tasks_stderr_reaches_results_json_and_status() {
    let c = Cluster::start_trusting(1);
    let job_file = job(
        &c,
        "failing",
        FAILING_WAT,
        10_000_000,
        &[&[], &["a"], &["a", "b"]],
    );
    let id = c.submit(&job_file);
    c.wait_until("the job to end", PATIENCE, |s| {
        job_of(s, id)["state"] != "running"
    });
    let out_dir = c.dir.path().join("results");
    let out = c.cli(&[
        "results",
        &id.to_string(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap())
            .unwrap();
    let tasks = json["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3, "{json}");
    assert_eq!(tasks[0]["outcome"], "ok");
    assert!(
        tasks[0].get("stderr").is_none(),
        "an ok task has no stderr key: {json}"
    );
    assert_eq!(tasks[1]["outcome"], "exit");
    assert_eq!(tasks[1]["exit_code"], 2);
    assert_eq!(
        tasks[1]["stderr"], "reading input\nerror: bad input, giving up\n",
        "{json}"
    );
    assert_eq!(tasks[2]["outcome"], "trap");
    assert_eq!(tasks[2]["trap"], "unreachable", "{json}");
    assert_eq!(
        tasks[2]["stderr"], "about to trap [31mred\n",
        "the escape character is removed: {json}"
    );

    let out = c.cli(&["status", &id.to_string()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("2 tasks did not end ok"), "{text}");
    assert!(
        text.contains("task 1: exit 2 — stderr: error: bad input, giving up"),
        "{text}"
    );
    assert!(text.contains("task 2: trap (unreachable)"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "no escape codes reach the terminal: {text}"
    );
}

#[test]
fn logs_in_files_have_no_colour_and_json_logs_parse() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("coord");
    let port = free_udp_port();
    let spawn = |args: &[&str], name: &str, extra: Option<(&str, &str)>| {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..])
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(log_file(d.path(), name));
        if let Some((k, v)) = extra {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().expect("spawn"),
            name: name.into(),
        }
    };
    let coord_bin = coordinator_bin();
    let listen = format!("127.0.0.1:{port}");
    let _coord = spawn(
        &[
            coord_bin.to_str().unwrap(),
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
            "--log-format",
            "json",
        ],
        "coordinator",
        None,
    );
    let t0 = Instant::now();
    let ticket = loop {
        if let Ok(t) = std::fs::read_to_string(data.join("ticket")) {
            if !t.trim().is_empty() {
                break t.trim().to_string();
            }
        }
        assert!(t0.elapsed() < PATIENCE, "no ticket");
        std::thread::sleep(Duration::from_millis(50));
    };
    let wbin = worker_bin();
    let text_dir = d.path().join("w-text");
    let json_dir = d.path().join("w-json");
    let _text = spawn(
        &[
            wbin.to_str().unwrap(),
            "join",
            &ticket,
            "--data-dir",
            text_dir.to_str().unwrap(),
            "--slots",
            "1",
        ],
        "worker-text",
        None,
    );
    let _json = spawn(
        &[
            wbin.to_str().unwrap(),
            "--log-format",
            "json",
            "join",
            &ticket,
            "--data-dir",
            json_dir.to_str().unwrap(),
            "--slots",
            "1",
        ],
        "worker-json",
        None,
    );
    let read = |name: &str| {
        std::fs::read_to_string(d.path().join(format!("{name}.log"))).unwrap_or_default()
    };
    let t0 = Instant::now();
    while !(read("worker-text").contains("connected to coordinator")
        && read("worker-json").contains("connected to coordinator"))
    {
        assert!(
            t0.elapsed() < PATIENCE,
            "workers did not connect: {}\n{}",
            read("worker-text"),
            read("worker-json")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = read("worker-text");
    assert!(text.contains("INFO"), "{text}");
    assert!(
        !text.contains("\x1b["),
        "no ANSI escapes in a log file: {text:?}"
    );
    for name in ["coordinator", "worker-json"] {
        let log = read(name);
        assert!(!log.contains("\x1b["), "{log:?}");
        let mut lines = 0;
        for line in log.lines() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {line}"));
            assert!(v["level"].is_string(), "{line}");
            assert!(v["fields"]["message"].is_string(), "{line}");
            lines += 1;
        }
        assert!(lines > 0, "{name} logged nothing");
    }
    assert!(read("worker-json").contains("\"message\":\"connected to coordinator\""));
}

#[test]
fn shell_completions_name_the_subcommands() {
    for (bin, subcommands) in [
        (
            coordinator_bin(),
            &["serve", "submit", "status", "results", "completions"][..],
        ),
        (
            worker_bin(),
            &["join", "exec", "status", "pause", "resume", "completions"][..],
        ),
    ] {
        for shell in ["bash", "zsh", "fish"] {
            let out = Command::new(&bin)
                .args(["completions", shell])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let script = String::from_utf8(out.stdout).unwrap();
            if shell == "bash" {
                for s in subcommands {
                    assert!(script.contains(s), "{bin:?} bash completion lacks {s}");
                }
                assert!(script.contains("--log-format"));
            }
            assert!(!script.is_empty());
        }
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("skipped: /usr/bin/systemd-analyze is absent (apt-get install systemd)");
        return;
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    let d = tempfile::tempdir().unwrap();
    for (unit, installed, bin) in [
        (
            "peergrid-worker.service",
            "/usr/local/bin/worker",
            worker_bin(),
        ),
        (
            "peergrid-coordinator.service",
            "/usr/local/bin/coordinator",
            coordinator_bin(),
        ),
    ] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        assert!(text.contains(&format!("ExecStart={installed} ")), "{unit}");
        // verify checks that ExecStart is executable: point it at the binary just built.
        let copy = d.path().join(unit);
        std::fs::write(&copy, text.replace(installed, bin.to_str().unwrap())).unwrap();
        let out = Command::new(analyze)
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{unit}: {err}");
        // Unknown or misspelt directives are only warnings: none may name our unit.
        assert!(!err.contains(unit), "{unit}: {err}");

        let settings: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect();
        for want in [
            "Restart=on-failure",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "NoNewPrivileges=yes",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
            "SystemCallFilter=@system-service",
            "DynamicUser=yes",
        ] {
            assert!(settings.contains(&want), "{unit} lacks {want}");
        }
        if unit == "peergrid-worker.service" {
            for want in [
                "Nice=19",
                "CPUSchedulingPolicy=idle",
                "IOSchedulingClass=idle",
            ] {
                assert!(settings.contains(&want), "{unit} lacks {want}");
            }
            assert!(
                !settings
                    .iter()
                    .any(|l| l.starts_with("MemoryDenyWriteExecute")),
                "wasmtime's JIT needs writable-then-executable memory"
            );
        }
    }
}

/// A replica held far past its deadline is handed back by the worker itself, which says so:
/// a task that never reports progress, running for ever under a 2 s deadline, is abandoned
/// after twice that (the coordinator has reissued it by then), and its slot is free again.
#[test]
fn a_replica_far_past_its_deadline_is_abandoned_by_the_worker_which_says_so() {
    const FOREVER_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (br $l))))"#;
    let c = Cluster::start_trusting(1);
    let dir = c.worker_dir(0);
    let file = job(&c, "forever", FOREVER_WAT, 1_000_000_000_000, &[&[]]);
    let toml = std::fs::read_to_string(&file)
        .unwrap()
        .replace("deadline_secs = 600", "deadline_secs = 2");
    std::fs::write(&file, toml).unwrap();
    c.submit(&file);
    let first = wait_state(&dir, "the task to run", |s| {
        s["tasks"].as_array().is_some_and(|t| t.len() == 1)
    })["tasks"][0]["replica"]
        .as_u64()
        .unwrap();
    let said = format!("replica={first}");
    let t0 = Instant::now();
    let line = loop {
        let logs: String = std::fs::read_dir(c.dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("worker-0-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        if let Some(l) = logs
            .lines()
            .find(|l| l.contains("abandoning replica") && l.contains(&said))
        {
            break l.to_string();
        }
        assert!(
            t0.elapsed() < PATIENCE,
            "the worker never abandoned replica {first}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        line.contains("held 2x its 2 s deadline without reporting progress"),
        "{line}"
    );
    // It no longer holds that replica (the task may come back to it as a new replica: it is
    // the only worker).
    wait_state(&dir, "the replica to be gone", |s| {
        s["tasks"]
            .as_array()
            .is_some_and(|t| t.iter().all(|t| t["replica"].as_u64() != Some(first)))
    });
}

/// `worker pause` outlives the process: a worker killed (kill -9, as when a laptop's
/// battery dies) and started again on the same data dir comes back paused, until
/// `worker resume`; after that a restart is not paused.
#[test]
fn a_pause_survives_a_restart_until_resume() {
    let mut c = Cluster::start_trusting(1);
    let dir = c.worker_dir(0);
    wait_state(&dir, "the worker to answer", |_| true);
    let out = worker_ctl("pause", &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.restart_worker(0);
    let s = wait_state(&dir, "the restarted worker to answer", |s| {
        s["uptime_secs"].as_f64() < Some(60.0)
    });
    assert_eq!(s["paused"], true, "{s}");
    assert_eq!(s["pause_reasons"], serde_json::json!(["command"]));
    let out = worker_ctl("resume", &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.restart_worker(0);
    let s = wait_state(&dir, "the worker to answer again", |_| true);
    assert_eq!(s["paused"], false, "resumed for good: {s}");
}
