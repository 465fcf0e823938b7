//! Smoke runs of the benchmarks in `benches/` (tiny sizes), so they cannot rot: `cargo test`
//! does not build bench targets, so the bench files are compiled here as modules and their
//! `run(smoke = true)` is called. Only functional facts are asserted (jobs complete, every
//! task is accepted with the right output, numbers are finite), never timing.

// e2e runs real workers in this process: it needs the worker crate (feature `demo`).
#[cfg(feature = "demo")]
#[allow(dead_code)]
#[path = "../benches/e2e.rs"]
mod e2e;
#[allow(dead_code)]
#[path = "../benches/scale.rs"]
mod scale;

#[cfg(feature = "demo")]
#[test]
fn e2e_bench_smoke_runs_a_tiny_job_to_completion() {
    let r = e2e::run(true).expect("e2e smoke run");
    assert!(
        r.finished,
        "the tiny job did not finish within the smoke time limit"
    );
    assert_eq!(r.failed, 0, "tasks failed");
    assert_eq!(r.accepted, r.tasks, "every task accepted");
    assert_eq!(
        r.outputs_ok, r.tasks,
        "every accepted output is the task's argv[1]"
    );
    assert!(r.baseline_tasks_per_s.is_finite() && r.baseline_tasks_per_s > 0.0);
    assert!(r.bare_run_us.is_finite() && r.bare_run_us > 0.0);
    let l = r.latency_mean_us.expect("the latency job ran replicas");
    assert!(l.is_finite());
    if let Some(rss) = r.idle_rss_kib {
        assert!(rss > 0);
    }
    for row in &r.rows {
        assert!(row.result.is_finite(), "{row:?}");
        assert!(row.bench_line().starts_with("BENCH|"));
    }
}

#[test]
fn scale_bench_smoke_connects_simulated_workers_and_measures() {
    let r = scale::run(true).expect("scale smoke run");
    assert!(
        r.reached >= 100,
        "only {} simulated workers connected",
        r.reached
    );
    assert_eq!(r.queued_tasks, 10_000);
    assert!(r.bytes_per_task.is_finite() && r.bytes_per_session.is_finite());
    for l in &r.levels {
        assert_eq!(
            l.answered, l.samples,
            "every work request answered at {} workers",
            l.workers
        );
        assert!(
            l.assigned > 0,
            "work was handed out at {} workers",
            l.workers
        );
        assert!(l.p50_ms.is_finite() && l.p99_ms.is_finite());
        assert_eq!(l.alive, l.workers, "sessions stayed connected");
    }
    for row in &r.rows {
        assert!(row.result.is_finite(), "{row:?}");
    }
}
