//! End-to-end journeys with real processes: `coordinator serve`, several `worker join`, and
//! the submitter commands, talking QUIC over loopback.
//!
//! Faults are real too: `kill -9` of a worker and of the coordinator mid-job.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{check_quorum, coordinator_bin, job_of, Cluster};
use serde_json::Value;

#[test]
fn scientist_runs_primes_to_1e7_on_three_worker_processes_and_gets_664579() {
    let c = Cluster::start(3);
    let job = c.primes_job(10, 1_000_000, 60);
    let out = c.cli(&["submit", job.to_str().unwrap(), "--wait", "--json"]);
    assert!(
        out.status.success(),
        "submit --wait failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "done");
    assert_eq!(last["tasks_done"], 10);
    let id = last["id"].as_u64().unwrap();

    let (sum, results) = c.results(id);
    assert_eq!(sum, 664_579);
    let agreeing = check_quorum(&results, 10);

    let status = c.status();
    let j = job_of(&status, id);
    assert_eq!(j["tasks_total"], 10);
    assert_eq!(j["tasks_done"], 10);
    assert_eq!(j["tasks_failed"], 0);
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{status}");
    let valid: u64 = workers.iter().map(|w| w["valid"].as_u64().unwrap()).sum();
    assert_eq!(valid, agreeing, "valid replicas counted once each");
    let credit: f64 = workers.iter().map(|w| w["credit"].as_f64().unwrap()).sum();
    let expected: f64 = results["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["fuel_used"].as_f64().unwrap()
                * t["agreeing_workers"].as_array().unwrap().len() as f64
                / 1e9
        })
        .sum();
    assert!(
        (credit - expected).abs() < 1e-6,
        "credit {credit} != valid fuel {expected}"
    );

    // Helpful errors: a wrong token and an unknown job.
    let mut bad = Command::new(coordinator_bin());
    bad.args(["status", "--to", &c.ticket, "--token", "wrong"]);
    let out = bad.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.cli(&[
        "results",
        "999",
        "--out",
        c.dir.path().join("nope").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("999"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn job_completes_when_a_worker_is_killed_with_sigkill_mid_job() {
    // Mid-job by construction, whatever the machine's speed: while worker 0 is the only
    // worker, no task can reach its quorum of two distinct workers, so the job is running
    // when the kill lands. Worker 0 is paused (SIGSTOP) first so the figures read below are
    // the ones it dies with.
    let mut c = Cluster::start_trusting(1);
    let job = c.primes_job(20, 5_000_000, 10);
    let id = c.submit(&job);
    c.wait_until(
        "worker 0 to report a replica",
        Duration::from_secs(120),
        |s| job_of(s, id)["replicas_reported"].as_u64().unwrap() >= 1,
    );
    c.workers[0].signal(libc::SIGSTOP);
    let s = c.status();
    let j = job_of(&s, id);
    assert_eq!(j["state"], "running", "the kill must land mid-job: {s}");
    assert_eq!(
        j["tasks_done"], 0,
        "one worker alone cannot reach a quorum: {s}"
    );
    eprintln!(
        "killing worker-0 holding {} replicas, {} reported",
        j["replicas_in_flight"], j["replicas_reported"]
    );
    c.workers[0].kill9();
    c.start_worker(1);
    c.start_worker(2);
    let s = c.wait_until("the job to end", Duration::from_secs(240), |s| {
        job_of(s, id)["state"] != "running"
    });
    assert_eq!(job_of(&s, id)["state"], "done", "{s}");
    let (sum, results) = c.results(id);
    assert_eq!(sum, 5_761_455, "primes below 10^8");
    check_quorum(&results, 20);
}

#[test]
fn job_completes_without_losing_or_double_crediting_results_across_coordinator_kill9_and_restart() {
    // Two jobs, so the crash lands with accepted results on record *and* mid-job, by
    // construction: job A (quorum 2) completes on the two workers; job B needs three agreeing
    // workers, so with two it can only collect votes until a third worker joins after the
    // restart.
    let mut c = Cluster::start_trusting(2);
    let job_a = c.primes_job(6, 1_000_000, 30);
    let id_a = c.submit(&job_a);
    let job_b = with_quorum(&c.primes_job(12, 1_000_000, 30), 3);
    let id_b = c.submit(&job_b);
    let before = c.wait_until(
        "job A done and votes on job B",
        Duration::from_secs(120),
        |s| {
            job_of(s, id_a)["state"] == "done"
                && job_of(s, id_b)["replicas_reported"].as_u64().unwrap() >= 2
        },
    );
    let b = job_of(&before, id_b);
    assert_eq!(
        b["state"], "running",
        "the kill must land mid-job: {before}"
    );
    assert_eq!(b["tasks_done"], 0, "two workers cannot meet a quorum of 3");
    c.coord.as_mut().unwrap().kill9();
    c.start_coordinator();
    // Nothing accepted before the crash is lost.
    let after = c.status();
    assert_eq!(
        job_of(&after, id_a)["tasks_done"],
        6,
        "accepted results lost: {before} vs {after}"
    );
    assert_eq!(job_of(&after, id_a)["state"], "done", "{after}");
    c.start_worker(2);
    let s = c.wait_until(
        "job B to end after the restart",
        Duration::from_secs(240),
        |s| job_of(s, id_b)["state"] != "running",
    );
    assert_eq!(job_of(&s, id_b)["state"], "done", "{s}");
    let (sum_a, results_a) = c.results(id_a);
    assert_eq!(sum_a, 412_849, "primes below 6*10^6");
    let (sum_b, results_b) = c.results(id_b);
    assert_eq!(sum_b, 788_060, "primes below 1.2*10^7");
    let agreeing = check_quorum(&results_a, 6) + check_quorum(&results_b, 12);
    for t in results_b["tasks"].as_array().unwrap() {
        assert!(
            t["agreeing_workers"].as_array().unwrap().len() >= 3,
            "job B accepted without its quorum of 3: {t}"
        );
    }
    let (valid, credit, expected_a) = common::credit_figures(&s, &results_a);
    let (_, _, expected_b) = common::credit_figures(&s, &results_b);
    assert_eq!(
        valid, agreeing,
        "each agreeing replica credited exactly once"
    );
    let expected = expected_a + expected_b;
    assert!(
        (credit - expected).abs() < 1e-6,
        "credit {credit} != valid fuel {expected}: something was credited twice or lost"
    );
}

/// A copy of job file `job` (same directory) with another quorum.
fn with_quorum(job: &std::path::Path, quorum: u32) -> std::path::PathBuf {
    let text = std::fs::read_to_string(job).unwrap();
    assert!(text.contains("quorum = 2\n"), "{text}");
    let out = job.with_file_name(format!("job-quorum-{quorum}.toml"));
    std::fs::write(
        &out,
        text.replace("quorum = 2\n", &format!("quorum = {quorum}\n")),
    )
    .unwrap();
    out
}

#[test]
fn worker_killed_with_sigkill_reports_results_it_finished_while_the_coordinator_was_down() {
    let mut c = Cluster::start_trusting(2);
    let job = c.primes_job(4, 250_000_000, 120);
    let id = c.submit(&job);
    // Worker 0 holds work once it has fetched the module (each task then runs for seconds).
    let w0 = c.dir.path().join("worker-0");
    let module = tasks::BlobId::of(&std::fs::read(common::PRIMES_WASM).unwrap());
    let fetched = w0.join("blobs").join(module.to_string());
    let t0 = Instant::now();
    while !fetched.exists() {
        if t0.elapsed() > Duration::from_secs(120) {
            panic!("worker 0 got no assignment within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The coordinator dies; worker 0 finishes what it has in hand into its outbox.
    c.coord.as_mut().unwrap().kill9();
    let outbox = w0.join("outbox");
    let t0 = Instant::now();
    let saved: Vec<tasks::wire::Report> = loop {
        // Batches are appended whole (a torn tail is not read): a non-empty list is complete.
        let saved = saved_reports(&outbox);
        if !saved.is_empty() {
            break saved;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            panic!("worker 0 saved no result while the coordinator was down");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // ... and is killed before it could send them.
    c.workers[0].kill9();
    c.start_coordinator();
    c.start_worker(0);
    let s = c.wait_until("the job to end", Duration::from_secs(240), |s| {
        job_of(s, id)["state"] != "running"
    });
    assert_eq!(job_of(&s, id)["state"], "done", "{s}");
    let (sum, results) = c.results(id);
    assert_eq!(sum, 50_847_534, "primes below 10^9");
    check_quorum(&results, 4);
    // Everything saved was delivered and acknowledged: the outbox drains.
    let t0 = Instant::now();
    while !saved_reports(&outbox).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "saved reports were never acknowledged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the saved results count: worker 0 agrees on the tasks it finished offline.
    let me = tasks::NodeKey::load_or_create(&w0)
        .unwrap()
        .node_id()
        .to_string();
    let credited = results["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| {
            t["agreeing_workers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w.as_str() == Some(me.as_str()))
        })
        .count();
    assert!(
        credited >= 1,
        "none of worker 0's {} saved results was accepted",
        saved.len()
    );
}

/// The unacknowledged reports a worker's outbox holds, read as a restarted worker would.
fn saved_reports(outbox: &std::path::Path) -> Vec<tasks::wire::Report> {
    worker::daemon::outbox::saved_reports(outbox)
}

/// An open pool (serve's default policy) with fewer workers than it needs before anyone has a
/// record (quorum + 1): the two workers' agreeing reports are in, nothing is accepted (and
/// newcomers' undecided votes fill their allowance, so they idle), and `coordinator status`
/// says why; a third worker joins and the job completes.
///
/// Where the two stall depends on the coordinator's randomized partner draw: each newcomer
/// holds 2 undecided votes, and when their hands cover all 3 tasks between them the liveness
/// rule lets each take one more replica of a task under way (6 reports); when both hold the
/// same two tasks the third is never started (4 reports). Either way no task can be accepted.
#[test]
fn an_open_pool_short_of_workers_says_so_and_finishes_when_a_third_joins() {
    let mut c = Cluster::start(2);
    let job = c.primes_job(3, 1_000_000, 60);
    let id = c.submit(&job);
    let said = format!("job {id}: results are in but nothing is running");
    let mut text = String::new();
    // Between rounds (2 reports in, the next replicas not yet issued) status says the same for
    // a moment: wait for both hands to be full (at least 4 reports) as well.
    let s = c.wait_until(
        "both hands full and status saying more workers are needed",
        Duration::from_secs(240),
        |s| {
            let j = job_of(s, id);
            j["replicas_reported"].as_u64() >= Some(4)
                && j["replicas_in_flight"].as_u64() == Some(0)
                && {
                    text = String::from_utf8_lossy(&c.cli(&["status"]).stdout).into_owned();
                    text.contains(&said)
                }
        },
    );
    assert!(
        text.contains("more workers are needed") && text.contains("2 connected"),
        "{text}"
    );
    let j = job_of(&s, id);
    assert_eq!(j["tasks_done"], 0, "2 workers cannot meet quorum + 1: {s}");
    let reported = j["replicas_reported"].as_u64().unwrap_or(0);
    assert!(
        (4..=6).contains(&reported),
        "each of 2 newcomers holds 2 undecided votes, at most one more each: {s}"
    );
    c.start_worker(2);
    let s = c.wait_until("the job to end", Duration::from_secs(240), |s| {
        job_of(s, id)["state"] != "running"
    });
    assert_eq!(job_of(&s, id)["state"], "done", "{s}");
    let (sum, results) = c.results(id);
    assert_eq!(sum, 216_816, "primes below 3*10^6");
    check_quorum(&results, 3);
}

/// A guest that prints the 8 bytes of `0.0 / 0.0` (an f64 NaN made at run time): on x86_64
/// the hardware makes the negative "default" NaN, NaN canonicalization the positive one.
const NAN_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (f64.store (i32.const 16) (f64.div (f64.load (i32.const 64)) (f64.load (i32.const 64))))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 8))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))))"#;

/// The scientist picks a job's determinism class in the job file, and it decides which
/// engine every replica runs on: the same NaN-making module gives the hardware's NaN bits as
/// a `native` job (the default) and the canonical ones as a `portable` job, each accepted
/// by a quorum of real worker processes; `submit --json`, `status --json` and results.json
/// name the class.
#[test]
fn a_job_runs_in_the_determinism_class_its_job_file_names_and_says_which() {
    let c = Cluster::start_trusting(2);
    let jd = c.dir.path().join("nan");
    std::fs::create_dir_all(&jd).unwrap();
    std::fs::write(jd.join("nan.wasm"), wat::parse_str(NAN_WAT).unwrap()).unwrap();
    let job = |name: &str, class: Option<&str>| {
        let path = jd.join(format!("{name}.toml"));
        let line = class.map_or(String::new(), |c| format!("determinism = \"{c}\"\n"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\nmodule = \"nan.wasm\"\nquorum = 2\n{line}[tasks]\ncount = 3\n"
            ),
        )
        .unwrap();
        path
    };
    let submit = |path: &std::path::Path| -> Value {
        let out = c.cli(&["submit", path.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let native = submit(&job("default", None));
    assert_eq!(native["determinism"], "native", "native is the default");
    let portable = submit(&job("portable", Some("portable")));
    assert_eq!(portable["determinism"], "portable");
    let explicit = submit(&job("native", Some("native")));
    let ids: Vec<u64> = [&native, &portable, &explicit]
        .iter()
        .map(|v| v["id"].as_u64().unwrap())
        .collect();
    c.wait_until("the three jobs done", Duration::from_secs(300), |s| {
        ids.iter().all(|id| job_of(s, *id)["state"] == "done")
    });
    let status = c.status();
    for (id, class) in ids.iter().zip(["native", "portable", "native"]) {
        let j = job_of(&status, *id);
        assert_eq!(j["determinism"], class, "{j}");
        assert_eq!(j["tasks_done"], 3, "{j}");
    }
    let mut outputs = Vec::new();
    for (id, class) in ids.iter().zip(["native", "portable", "native"]) {
        let (dir, results) = c.download(*id);
        assert_eq!(results["determinism"], class, "{results}");
        check_quorum(&results, 3);
        let out = std::fs::read(dir.join("0.out")).unwrap();
        assert_eq!(out.len(), 8);
        assert!(f64::from_le_bytes(out.clone().try_into().unwrap()).is_nan());
        outputs.push(u64::from_le_bytes(out.try_into().unwrap()));
    }
    assert_eq!(
        outputs[1], 0x7ff8_0000_0000_0000,
        "portable: the canonical NaN"
    );
    assert_eq!(outputs[0], outputs[2], "native is one engine");
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        outputs[0], 0xfff8_0000_0000_0000,
        "native on x86_64: the hardware's default NaN, as a native build would print"
    );
    // The status table names the class too.
    let out = c.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CLASS"), "{text}");
    assert!(text.lines().any(|l| l.contains("portable")), "{text}");
}
