//! Long tasks survive their worker: a checkpointing task (examples/longrun, which uses the
//! `peergrid` checkpoint API) run by a real `worker join` under a real `coordinator serve`
//! is killed with SIGKILL five times at random points, restarted each time on the same data
//! dir, and still completes with the result of an uninterrupted run (`worker exec`).
//!
//! "Lost compute per kill is at most one checkpoint interval" is checked the way it is
//! guaranteed: a checkpoint is durable before the guest's call returns, so after a kill the
//! newest file on disk is the last checkpoint the guest made; the restarted worker must
//! resume from exactly that one (its log names the fuel it resumes at), and consecutive
//! checkpoints are one interval (`EVERY` steps) apart, measured in fuel from the files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use tasks::{BlobId, RunResult, Status};

use common::*;

const LONGRUN_WASM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/longrun/longrun.wasm"
);
const STEPS: u64 = 12_000;
const EVERY: u64 = 100;
/// Long enough that five kill cycles (each: one new checkpoint, then up to 400 ms of run)
/// stay well inside the task on an idle machine too (in the `native` class, 40,000 took
/// some 1.6 s in all, and the task once ended before the fifth kill).
const WORK: u64 = 200_000;
const KILLS: usize = 5;

/// (step, fuel_used) of a checkpoint file of examples/longrun, if one is there and whole.
fn read_checkpoint(path: &Path) -> Option<(u64, u64)> {
    // The worker's format (worker/src/daemon/checkpoints.rs): magic, fuel used, length,
    // blake3 of the state, the state.
    let b = std::fs::read(path).ok()?;
    assert!(
        b.len() >= 56 && &b[..8] == b"PGCKPT1\0",
        "a checkpoint file"
    );
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let data = &b[56..];
    assert_eq!(
        data.len() as u64,
        word(16),
        "a checkpoint file is never torn"
    );
    assert_eq!(blake3::hash(data).as_bytes(), &b[24..56], "nor corrupt");
    Some((u64::from_le_bytes(data[..8].try_into().ok()?), word(8)))
}

/// The `.ckpt` file in a worker's checkpoint dir (one replica in hand at most).
fn checkpoint_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "ckpt"))
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fuel values the worker's logs say it resumed at, in order.
fn resumed_at(c: &Cluster) -> Vec<u64> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(c.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("worker-0-"))
        })
        .collect();
    logs.sort_by_key(|p| {
        let n = p.file_stem().unwrap().to_string_lossy().into_owned();
        n.rsplit('-').next().unwrap().parse::<u64>().unwrap()
    });
    let mut out = Vec::new();
    for p in logs {
        for line in std::fs::read_to_string(p).unwrap_or_default().lines() {
            if line.contains("resuming from checkpoint") {
                let f = line
                    .split("fuel_used=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .expect("the resume line names its fuel");
                out.push(f);
            }
        }
    }
    out
}

#[test]
fn a_checkpointing_task_killed_five_times_completes_with_the_uninterrupted_result() {
    let mut c = Cluster::start_trusting(1);
    let jd = c.dir.path().join("job");
    std::fs::create_dir_all(&jd).unwrap();
    std::fs::copy(LONGRUN_WASM, jd.join("longrun.wasm")).unwrap();
    let toml = format!(
        "name = \"longrun\"\nmodule = \"longrun.wasm\"\nquorum = 1\nmax_replicas = 2\nfuel = 1_000_000_000_000\nmemory_mb = 32\nmax_output = 256\ndeadline_secs = 3600\n[[task]]\nargs = [\"{STEPS}\", \"{EVERY}\", \"{WORK}\"]\n"
    );
    std::fs::write(jd.join("job.toml"), toml).unwrap();
    let job = c.submit(&jd.join("job.toml"));
    let ckdir = c.worker_dir(0).join("checkpoints");
    let mut rng = rand::thread_rng();
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let mut restored_from: Vec<u64> = Vec::new();
    let mut last_step = 0;
    for kill in 0..KILLS {
        // Wait until this run has made a checkpoint beyond the last one (it progresses)...
        let (step, _) = wait_for(
            &format!("a new checkpoint before kill {kill}"),
            Duration::from_secs(300),
            || {
                let ck = read_checkpoint(&checkpoint_file(&ckdir)?)?;
                (ck.0 > last_step).then_some(ck)
            },
        );
        assert!(
            step < STEPS,
            "the task finished before kill {kill}: make it longer"
        );
        // ...then kill it at a random point of its work.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
        if let Some(ck) = checkpoint_file(&ckdir).and_then(|p| read_checkpoint(&p)) {
            seen.push(ck);
        }
        c.workers[0].kill9();
        // The newest checkpoint on disk is what the guest last handed over: the restart
        // must resume exactly there.
        let at_kill = read_checkpoint(&checkpoint_file(&ckdir).expect("a checkpoint survives"))
            .expect("readable");
        assert!(at_kill.0 >= step, "checkpoints only move forward");
        seen.push(at_kill);
        restored_from.push(at_kill.1);
        last_step = at_kill.0;
        c.restart_worker(0);
        wait_for(
            &format!("the worker to resume after kill {kill}"),
            Duration::from_secs(120),
            || (resumed_at(&c).len() > kill).then_some(()),
        );
    }
    let s = c.wait_until("the job to finish", Duration::from_secs(900), |s| {
        job_of(s, job)["state"] == "done"
    });
    assert_eq!(job_of(&s, job)["tasks_done"], 1);
    assert_eq!(
        resumed_at(&c),
        restored_from,
        "each restart resumed from the newest checkpoint on disk at the kill (lost work < one interval)"
    );
    // One checkpoint interval, in fuel, measured from consecutive checkpoints we saw.
    seen.sort_unstable();
    seen.dedup();
    let per_step = seen
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| (w[1].1 - w[0].1) / (w[1].0 - w[0].0))
        .max()
        .expect("several checkpoints were seen");
    let interval_fuel = per_step * EVERY;
    assert!(interval_fuel > 0);
    for w in seen.windows(2) {
        assert_eq!(w[0].0 % EVERY, 0, "checkpoints fall every {EVERY} steps");
        assert!(w[1].1 >= w[0].1, "fuel counts over all runs");
    }

    // The accepted result equals an uninterrupted run's (digest without fuel), output bytes too.
    let (_, results) = c.download(job);
    let t = &results["tasks"][0];
    assert_eq!(t["status"], "accepted");
    let exec = Command::new(worker_bin())
        .arg("exec")
        .arg(LONGRUN_WASM)
        .args([
            "--name",
            "longrun",
            "--fuel",
            "1000000000000",
            "--memory-mb",
            "32",
        ])
        .args(["--arg", &STEPS.to_string(), "--arg", &EVERY.to_string()])
        .args(["--arg", &WORK.to_string(), "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        exec.status.success(),
        "{}",
        String::from_utf8_lossy(&exec.stderr)
    );
    let e: Value = serde_json::from_slice(&exec.stdout).unwrap();
    let result = |hash: &str, len: u64, fuel: u64| RunResult {
        status: Status::Ok,
        exit_code: 0,
        trap: String::new(),
        fuel_used: fuel,
        output_hash: hash.parse::<BlobId>().unwrap(),
        output_len: len,
    };
    let uninterrupted = result(
        e["output_hash"].as_str().unwrap(),
        e["output_len"].as_u64().unwrap(),
        e["fuel_used"].as_u64().unwrap(),
    );
    let resumed = result(
        t["output_hash"].as_str().unwrap(),
        uninterrupted.output_len,
        t["fuel_used"].as_u64().unwrap(),
    );
    assert_eq!(
        resumed.digest_without_fuel(),
        uninterrupted.digest_without_fuel(),
        "the resumed run's digest equals the uninterrupted run's"
    );
    assert!(
        resumed.fuel_used <= uninterrupted.fuel_used + KILLS as u64 * interval_fuel,
        "fuel counted over the runs ({}) stays within one interval per kill of an uninterrupted run ({})",
        resumed.fuel_used,
        uninterrupted.fuel_used
    );

    // No checkpoint (or held-replica) file remains once the replica ended.
    wait_for(
        "the checkpoint dir to empty",
        Duration::from_secs(60),
        || {
            let left: Vec<_> = std::fs::read_dir(&ckdir).ok()?.flatten().collect();
            left.is_empty().then_some(())
        },
    );
}

/// `worker CMD --json --data-dir DIR` (status, pause, resume) as JSON.
fn worker_ctl(cmd: &str, dir: &Path) -> Option<Value> {
    let out = Command::new(worker_bin())
        .args([cmd, "--json", "--data-dir"])
        .arg(dir)
        .output()
        .expect("running worker");
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("worker --json prints JSON"))
}

/// The replica ids a worker holds, from `worker status --json`.
fn held(dir: &Path) -> Vec<u64> {
    worker_ctl("status", dir)
        .map(|s| {
            s["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|t| t["replica"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// A worker paused for longer than its replica's deadline keeps the replica: its guest
/// reports progress, the worker tells the coordinator it holds the replica paused, and the
/// coordinator pushes the deadline back instead of reissuing the task to the idle second
/// worker. After `worker resume` the task completes on the first worker alone. (The
/// simulator's `progress_pushes_the_deadline_back_but_a_stall_or_the_stretch_limit_does_not`
/// shows the other side: a replica whose progress stalls is reissued at its deadline.)
#[test]
fn a_worker_paused_longer_than_the_deadline_keeps_its_replica_while_it_reports_progress() {
    const DEADLINE: u64 = 10;
    let c = Cluster::start_trusting(2);
    let jd = c.dir.path().join("job");
    std::fs::create_dir_all(&jd).unwrap();
    std::fs::copy(LONGRUN_WASM, jd.join("longrun.wasm")).unwrap();
    let toml = format!(
        "name = \"paused\"\nmodule = \"longrun.wasm\"\nquorum = 1\nmax_replicas = 2\nfuel = 1_000_000_000_000\nmemory_mb = 32\nmax_output = 256\ndeadline_secs = {DEADLINE}\n[[task]]\nargs = [\"{STEPS}\", \"{EVERY}\", \"{WORK}\"]\n"
    );
    std::fs::write(jd.join("job.toml"), toml).unwrap();
    let job = c.submit(&jd.join("job.toml"));
    let dirs = [c.worker_dir(0), c.worker_dir(1)];
    // Whoever got it has made a checkpoint (and so reported progress).
    let (holder, replica) = wait_for("the task to checkpoint", Duration::from_secs(300), || {
        (0..2).find_map(|i| {
            checkpoint_file(&dirs[i].join("checkpoints"))?;
            Some((i, *held(&dirs[i]).first()?))
        })
    });
    let other = 1 - holder;
    let paused = worker_ctl("pause", &dirs[holder]).expect("worker pause");
    assert_eq!(paused["paused"], true);
    // Three deadlines long.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3 * DEADLINE) {
        assert!(
            held(&dirs[other]).is_empty(),
            "the paused replica was reissued to the other worker after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        held(&dirs[holder]),
        vec![replica],
        "still held, same replica"
    );
    // The scientist sees how far it is: `status JOB` in text and JSON.
    let out = c.cli(&["status", &job.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("job {job}: 1 running tasks report progress")),
        "{text}"
    );
    let out = c.cli(&["status", &job.to_string(), "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    let p = &v["jobs"][0]["progress"];
    assert_eq!(p["reporting"], 1, "{v}");
    let f = p["tasks"][0]["fraction"].as_f64().expect("a fraction");
    assert!(f > 0.0 && f < 1.0, "{v}");
    assert_eq!(
        job_of(&c.status(), job)["state"],
        "running",
        "the job waits for the paused replica"
    );
    worker_ctl("resume", &dirs[holder]).expect("worker resume");
    let s = c.wait_until("the job to finish", Duration::from_secs(900), |s| {
        job_of(s, job)["state"] == "done"
    });
    assert_eq!(job_of(&s, job)["tasks_done"], 1);
    assert!(
        held(&dirs[other]).is_empty()
            && checkpoint_file(&dirs[other].join("checkpoints")).is_none(),
        "the other worker never ran it"
    );
}
