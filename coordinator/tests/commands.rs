//! The submitter commands an operator uses on day one, run as real processes against a real
//! `coordinator serve`: where the token comes from (`--token`, `--token-file`,
//! `PEERGRID_TOKEN`), `jobs`, `cancel`, `retry` of failed tasks (surviving a coordinator
//! restart), and `results` streamed page by page (checked against the one-frame answer old
//! clients still get).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::Context;
use common::simworker::{self, Options, SimWorker};
use common::{coordinator_bin, job_of, Cluster, PRIMES_WASM};
use coordinator::client::Client;
use serde_json::Value;
use tasks::wire::{self, Assignment, CoordMsg};
use tasks::{JobId, Ticket};

/// Hang guard for waits on the coordinator (not a speed claim).
const PATIENCE: Duration = Duration::from_secs(240);

/// `coordinator ARGS...` with `--to` the cluster's ticket and nothing else: the test says
/// where the token comes from. `env` is set on top of an environment without
/// `PEERGRID_TOKEN` and `PEERGRID_RESULTS_PAGE`.
fn run(c: &Cluster, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(coordinator_bin());
    cmd.arg(args[0])
        .args(["--to", &c.ticket])
        .args(&args[1..])
        .env("RUST_LOG", "warn")
        .env_remove("PEERGRID_TOKEN")
        .env_remove("PEERGRID_RESULTS_PAGE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running the coordinator CLI")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn token_file(c: &Cluster) -> String {
    c.data().join("submit-token").to_str().unwrap().to_string()
}

fn jobs_json(c: &Cluster) -> Value {
    let out = run(c, &["jobs", "--token-file", &token_file(c), "--json"], &[]);
    assert!(out.status.success(), "jobs --json: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("jobs --json prints JSON")
}

/// A primes job of `count` tasks over blocks of `block`, quorum 2 of at most
/// `max_replicas`.
fn primes_job(c: &Cluster, name: &str, count: u32, block: u64, max_replicas: u32) -> PathBuf {
    let jd = c.dir.path().join(name);
    std::fs::create_dir_all(&jd).unwrap();
    std::fs::copy(PRIMES_WASM, jd.join("primes.wasm")).unwrap();
    let toml = format!(
        "name = \"{name}\"\nmodule = \"primes.wasm\"\nquorum = 2\nmax_replicas = {max_replicas}\nfuel = 20_000_000_000\nmemory_mb = 32\nmax_output = 1_000_000\ndeadline_secs = 600\n[tasks]\ncount = {count}\nargs = [\"block\", \"{{i}}\", \"{block}\"]\n"
    );
    let path = jd.join("job.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Primes below `n`, by sieve: what the primes module's outputs must add up to.
fn primes_below(n: usize) -> u64 {
    let mut sieve = vec![true; n.max(2)];
    sieve[0] = false;
    sieve[1] = false;
    let mut i = 2;
    while i * i < n {
        if sieve[i] {
            let mut j = i * i;
            while j < n {
                sieve[j] = false;
                j += i;
            }
        }
        i += 1;
    }
    sieve.iter().filter(|&&p| p).count() as u64
}

#[test]
fn the_token_comes_from_the_flag_the_file_or_the_environment_and_its_absence_is_one_clear_line() {
    let c = Cluster::start_trusting(0);
    let file = token_file(&c);
    assert!(
        std::fs::read_to_string(&file).unwrap().ends_with('\n'),
        "the coordinator writes the token with a newline, which must be trimmed"
    );

    let ok = run(&c, &["status", "--json", "--token-file", &file], &[]);
    assert!(ok.status.success(), "--token-file: {}", stderr(&ok));
    let ok = run(&c, &["jobs"], &[("PEERGRID_TOKEN", &c.token)]);
    assert!(ok.status.success(), "PEERGRID_TOKEN: {}", stderr(&ok));
    assert_eq!(stdout(&ok).trim(), "no jobs");
    let ok = run(&c, &["status", "--token", &c.token], &[]);
    assert!(ok.status.success(), "--token: {}", stderr(&ok));

    // Precedence: --token, then --token-file, then the environment.
    let wrong = c.dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let out = run(
        &c,
        &["jobs", "--token", "not-the-token", "--token-file", &file],
        &[("PEERGRID_TOKEN", &c.token)],
    );
    assert!(!out.status.success(), "--token must win over the others");
    assert!(stderr(&out).contains("token"), "{}", stderr(&out));
    let out = run(
        &c,
        &["jobs", "--token-file", &file],
        &[("PEERGRID_TOKEN", "not-the-token")],
    );
    assert!(
        out.status.success(),
        "--token-file must win over PEERGRID_TOKEN: {}",
        stderr(&out)
    );
    let out = run(
        &c,
        &["jobs", "--token-file", wrong.to_str().unwrap()],
        &[("PEERGRID_TOKEN", &c.token)],
    );
    assert!(
        !out.status.success(),
        "the file's wrong token must be used over the variable"
    );

    // None at all: one line naming all three ways, for every submitter command.
    let job = primes_job(&c, "tok", 1, 1000, 2);
    for args in [
        vec!["submit", job.to_str().unwrap()],
        vec!["status"],
        vec!["results", "1", "--out", "x"],
        vec!["jobs"],
        vec!["cancel", "1"],
        vec!["retry", "1"],
    ] {
        let out = run(&c, &args, &[]);
        assert!(!out.status.success(), "{args:?} without a token");
        let err = stderr(&out);
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err}"
        );
        for want in ["--token", "--token-file", "PEERGRID_TOKEN"] {
            assert!(err.contains(want), "{args:?}: {err:?} should name {want}");
        }
    }
    // A token file that does not exist is named.
    let out = run(
        &c,
        &["jobs", "--token-file", "/nonexistent/submit-token"],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/submit-token"),
        "{}",
        stderr(&out)
    );
}

/// A job file of a million tasks is valid, and its manifest (some 9 MB) is over what one
/// request may carry: `submit` uploads it as a blob and the coordinator creates the job
/// from it, all million tasks; `status` answers for it, and it can be cancelled.
#[test]
fn a_million_task_job_too_large_for_one_request_is_created_from_an_uploaded_manifest() {
    let c = Cluster::start_trusting(0);
    let tf = token_file(&c);
    let job = primes_job(&c, "huge", 1_000_000, 1000, 2);
    let out = run(
        &c,
        &[
            "submit",
            "--token-file",
            &tf,
            job.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "submit: {}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"], 1_000_000, "{v}");
    let id = v["id"].as_u64().unwrap();
    let j = job_of(&c.status(), id);
    assert_eq!(j["tasks_total"], 1_000_000, "{j}");
    assert_eq!(j["state"], "running", "{j}");
    assert!(
        c.coordinator_logs()
            .contains("job manifest uploaded as a blob"),
        "the manifest went up as a blob"
    );
    let out = run(&c, &["cancel", "--token-file", &tf, &id.to_string()], &[]);
    assert!(out.status.success(), "cancel: {}", stderr(&out));
    assert_eq!(job_of(&c.status(), id)["state"], "cancelled");
}

#[test]
fn jobs_lists_jobs_and_cancel_stops_a_running_one_with_clear_errors_otherwise() {
    // No workers: the job stays running until cancelled.
    let c = Cluster::start_trusting(0);
    let tf = token_file(&c);
    let job = primes_job(&c, "tocancel", 3, 1000, 2);
    let out = run(
        &c,
        &[
            "submit",
            "--token-file",
            &tf,
            job.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "submit: {}", stderr(&out));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"]
        .as_u64()
        .unwrap();

    let j = jobs_json(&c);
    let list = j["jobs"].as_array().expect("{\"jobs\": [...]}");
    assert_eq!(list.len(), 1, "{j}");
    // The same keys `status --json` uses for a job.
    let from_status = job_of(&c.status(), id);
    assert_eq!(
        list[0].as_object().unwrap().keys().collect::<Vec<_>>(),
        from_status.as_object().unwrap().keys().collect::<Vec<_>>()
    );
    assert_eq!(list[0]["id"], id);
    assert_eq!(list[0]["name"], "tocancel");
    assert_eq!(list[0]["state"], "running");
    assert_eq!(list[0]["tasks_total"], 3);
    assert_eq!(list[0]["tasks_done"], 0);
    assert_eq!(list[0]["tasks_failed"], 0);
    let table = run(&c, &["jobs", "--token-file", &tf], &[]);
    assert!(table.status.success());
    let text = stdout(&table);
    assert!(
        text.contains("tocancel") && text.contains("running") && text.contains("FAILED"),
        "{text}"
    );

    let out = run(&c, &["cancel", "--token-file", &tf, &id.to_string()], &[]);
    assert!(out.status.success(), "cancel: {}", stderr(&out));
    assert_eq!(jobs_json(&c)["jobs"][0]["state"], "cancelled");

    let again = run(&c, &["cancel", "--token-file", &tf, &id.to_string()], &[]);
    assert!(
        !again.status.success(),
        "cancelling an ended job is an error"
    );
    assert!(
        stderr(&again).contains("already ended") && stderr(&again).contains("cancelled"),
        "{}",
        stderr(&again)
    );
    let unknown = run(&c, &["cancel", "--token-file", &tf, "999"], &[]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("no job 999"),
        "{}",
        stderr(&unknown)
    );
    let retry = run(&c, &["retry", "--token-file", &tf, &id.to_string()], &[]);
    assert!(!retry.status.success(), "a cancelled job is not retried");
    assert!(stderr(&retry).contains("cancelled"), "{}", stderr(&retry));
    let retry = run(&c, &["retry", "--token-file", &tf, "999"], &[]);
    assert!(!retry.status.success());
    assert!(stderr(&retry).contains("no job 999"), "{}", stderr(&retry));
}

/// Simulated workers on this release's engine, so `serve` admits them.
async fn sim(ticket: &Ticket) -> anyhow::Result<SimWorker> {
    SimWorker::join_with(
        ticket,
        Options {
            fingerprint: simworker::release_fingerprint(),
            ..Options::default()
        },
    )
    .await
}

/// Report `a` with its honest output, or a wrong one.
async fn answer(w: &mut SimWorker, a: &Assignment, lie: bool) -> anyhow::Result<()> {
    let mut out = simworker::output_for(a);
    if lie {
        out = b"a lie\n".to_vec();
    }
    let ack = w
        .report_output(a.replica, out, simworker::fuel_for(a))
        .await?;
    anyhow::ensure!(
        matches!(ack, CoordMsg::Ack { .. }),
        "expected Ack, got {ack:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reissues_only_failed_tasks_and_survives_a_coordinator_restart() -> anyhow::Result<()>
{
    let mut c = Cluster::start_trusting(0);
    let tf = token_file(&c);
    // Quorum 2 of at most 2 replicas: one disagreement fails a task.
    let job = primes_job(&c, "retried", 3, 1000, 2);
    let id = c.submit(&job);
    let ticket: Ticket = c.ticket.parse()?;

    // Two simulated workers: one honest, one lying on tasks 0 and 1. Those fail; task 2 is
    // accepted with the simulated (honest) output.
    let mut honest = sim(&ticket).await?;
    let mut liar = sim(&ticket).await?;
    let t0 = std::time::Instant::now();
    loop {
        let mut any = false;
        for a in honest.request(4).await? {
            any = true;
            answer(&mut honest, &a, false).await?;
        }
        for a in liar.request(4).await? {
            any = true;
            let lie = a.task.id.index != 2;
            answer(&mut liar, &a, lie).await?;
        }
        let s = c.status();
        if job_of(&s, id)["state"] != "running" {
            break;
        }
        anyhow::ensure!(t0.elapsed() < PATIENCE, "the job never ended: {s}");
        if !any {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let j = job_of(&c.status(), id);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(
        (j["tasks_done"].as_u64(), j["tasks_failed"].as_u64()),
        (Some(1), Some(2))
    );
    let sim_output_of_2 = String::from_utf8(simworker::output_for(&fake_assignment(
        id,
        2,
        &["block", "2", "1000"],
    )))?;
    drop((honest, liar));

    let out = run(
        &c,
        &["retry", "--token-file", &tf, &id.to_string(), "--failed"],
        &[],
    );
    assert!(out.status.success(), "retry: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "2", "two failed tasks reissued");
    let j = job_of(&c.status(), id);
    assert_eq!(j["state"], "running", "{j}");
    assert_eq!(
        (j["tasks_done"].as_u64(), j["tasks_failed"].as_u64()),
        (Some(1), Some(0))
    );

    // The retry is durable: a coordinator killed with SIGKILL comes back with it.
    c.coord.as_mut().unwrap().kill9();
    c.start_coordinator();
    let j = job_of(&c.status(), id);
    assert_eq!(j["state"], "running", "after the restart: {j}");
    assert_eq!(
        (j["tasks_done"].as_u64(), j["tasks_failed"].as_u64()),
        (Some(1), Some(0))
    );

    // Two real workers finish the retried tasks with real primes counts.
    c.start_worker(0);
    c.start_worker(1);
    let s = c.wait_until("the retried job to end", PATIENCE, |s| {
        job_of(s, id)["state"] != "running"
    });
    let j = job_of(&s, id);
    assert_eq!(j["state"], "done", "{s}");
    assert_eq!(
        (j["tasks_done"].as_u64(), j["tasks_failed"].as_u64()),
        (Some(3), Some(0))
    );

    let dir = c.dir.path().join("retried-out");
    let out = run(
        &c,
        &[
            "results",
            "--token-file",
            &tf,
            &id.to_string(),
            "--out",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "results: {}", stderr(&out));
    let read = |i: u32| std::fs::read_to_string(dir.join(format!("{i}.out"))).unwrap();
    assert_eq!(read(0).trim(), primes_below(1000).to_string());
    assert_eq!(
        read(1).trim(),
        (primes_below(2000) - primes_below(1000)).to_string()
    );
    assert_eq!(
        read(2),
        sim_output_of_2,
        "the accepted task was never touched"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("results.json"))?)?;
    for t in json["tasks"].as_array().unwrap() {
        assert_eq!(t["status"], "accepted", "{t}");
    }

    // Nothing failed any more: nothing to retry.
    let out = run(&c, &["retry", "--token-file", &tf, &id.to_string()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "0");
    assert!(
        stderr(&out).contains("nothing to retry"),
        "{}",
        stderr(&out)
    );
    assert_eq!(job_of(&c.status(), id)["state"], "done");
    Ok(())
}

/// An assignment of task `index` with these arguments (for a simulated worker's output).
fn fake_assignment(job: u64, index: u32, args: &[&str]) -> Assignment {
    Assignment {
        replica: 0,
        task: tasks::TaskManifest {
            id: tasks::TaskId {
                job: JobId(job),
                index,
            },
            name: String::new(),
            module: tasks::BlobRef::of(b"m"),
            input: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            fuel: 0,
            memory_mb: 0,
            max_output: 0,
        },
        deadline_secs: 0,
        peers: vec![],
    }
}

/// Every `.out` file of `dir`, by name.
fn out_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".out"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The old one-frame download (`Results`, as clients before paging ask) written with the
/// same writer as before.
async fn one_frame(ticket: &str, token: &str, job: u64, dir: &Path) -> anyhow::Result<()> {
    let client = Client::connect(&ticket.parse()?, token).await?;
    let res = client.collect(JobId(job), Duration::from_secs(60)).await?;
    let class = client.classes(Some(JobId(job))).await?.map(|v| v[0].1);
    client.close().await;
    coordinator::cli::write_results_with(&res, &[], class, dir)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_spanning_many_pages_stream_to_disk_and_match_the_one_frame_answer(
) -> anyhow::Result<()> {
    let c = Cluster::start_trusting(2);
    let tf = token_file(&c);
    let tasks = 25u32;
    let job = primes_job(&c, "paged", tasks, 1000, 2);
    let out = run(
        &c,
        &[
            "submit",
            "--token-file",
            &tf,
            job.to_str().unwrap(),
            "--wait",
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "submit --wait: {}", stderr(&out));
    let last: Value = serde_json::from_str(stdout(&out).lines().last().context("no output")?)?;
    assert_eq!(last["state"], "done", "{last}");
    let id = last["id"].as_u64().unwrap();

    // 4 tasks a page: 7 pages.
    let paged = c.dir.path().join("paged-out");
    let out = run(
        &c,
        &["results", &id.to_string(), "--out", paged.to_str().unwrap()],
        &[("PEERGRID_TOKEN", &c.token), ("PEERGRID_RESULTS_PAGE", "4")],
    );
    assert!(out.status.success(), "results: {}", stderr(&out));
    assert!(
        stderr(&out).contains("wrote 25 verified outputs"),
        "{}",
        stderr(&out)
    );
    assert!(!paged.join("results.json.part").exists());
    let files = out_files(&paged);
    assert_eq!(files.len(), tasks as usize);
    let mut sum = 0;
    for i in 0..tasks {
        let text = String::from_utf8(files[&format!("{i}.out")].clone())?;
        let n: u64 = text.trim().parse()?;
        let lo = i as usize * 1000;
        assert_eq!(n, primes_below(lo + 1000) - primes_below(lo), "task {i}");
        sum += n;
    }
    assert_eq!(sum, primes_below(tasks as usize * 1000));
    let json: Value = serde_json::from_str(&std::fs::read_to_string(paged.join("results.json"))?)?;
    assert_eq!(json["job"], id);
    assert_eq!(json["name"], "paged");
    assert_eq!(json["state"], "done");
    let list = json["tasks"].as_array().unwrap();
    assert_eq!(list.len(), tasks as usize);
    for (i, t) in list.iter().enumerate() {
        assert_eq!(t["index"], i as u64);
        assert_eq!(t["status"], "accepted");
        assert_eq!(t["agreeing_workers"].as_array().unwrap().len(), 2);
        assert!(t.get("output").is_none(), "outputs live in the .out files");
    }

    // The one-frame request still answers (old clients), with the very same files.
    let whole = c.dir.path().join("one-frame-out");
    one_frame(&c.ticket, &c.token, id, &whole).await?;
    assert_eq!(
        std::fs::read_to_string(whole.join("results.json"))?,
        std::fs::read_to_string(paged.join("results.json"))?,
        "streamed results.json is byte for byte the one-frame one"
    );
    assert_eq!(out_files(&whole), files);

    // One task a page and the default page give the same again.
    for page in ["1", "100000"] {
        let d = c.dir.path().join(format!("page-{page}"));
        let out = run(
            &c,
            &[
                "results",
                "--token-file",
                &tf,
                &id.to_string(),
                "--out",
                d.to_str().unwrap(),
            ],
            &[("PEERGRID_RESULTS_PAGE", page)],
        );
        assert!(out.status.success(), "results: {}", stderr(&out));
        assert_eq!(
            std::fs::read(d.join("results.json"))?,
            std::fs::read(paged.join("results.json"))?
        );
        assert_eq!(out_files(&d), files);
    }
    Ok(())
}

/// Outputs too large to travel inline (fetched by hash after each page) come through pages
/// too, and a job still running is downloaded as it stands (pending tasks listed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_outputs_and_pending_tasks_come_through_the_pages() -> anyhow::Result<()> {
    let c = Cluster::start_trusting(0);
    let tf = token_file(&c);
    let jd = c.dir.path().join("big");
    std::fs::create_dir_all(&jd)?;
    std::fs::copy(PRIMES_WASM, jd.join("primes.wasm"))?;
    std::fs::write(
        jd.join("job.toml"),
        "name = \"big\"\nmodule = \"primes.wasm\"\nquorum = 2\nmax_replicas = 2\nmax_output = 1_000_000\ndeadline_secs = 600\n[tasks]\ncount = 6\nargs = [\"big\", \"{i}\"]\n",
    )?;
    let id = c.submit(&jd.join("job.toml"));
    let ticket: Ticket = c.ticket.parse()?;
    let mut a = sim(&ticket).await?;
    let mut b = sim(&ticket).await?;
    // Tasks 0..4 accepted by both; tasks 4 and 5 stay pending (never reported by b).
    let t0 = std::time::Instant::now();
    loop {
        for x in a.request(8).await? {
            answer(&mut a, &x, false).await?;
        }
        for x in b.request(8).await? {
            if x.task.id.index < 4 {
                answer(&mut b, &x, false).await?;
            }
        }
        let j = job_of(&c.status(), id);
        if j["tasks_done"] == 4 && j["outputs_collecting"] == 0 {
            break;
        }
        anyhow::ensure!(t0.elapsed() < PATIENCE, "4 tasks never accepted: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dir = c.dir.path().join("big-out");
    let out = run(
        &c,
        &[
            "results",
            "--token-file",
            &tf,
            &id.to_string(),
            "--out",
            dir.to_str().unwrap(),
        ],
        &[("PEERGRID_RESULTS_PAGE", "2")],
    );
    assert!(out.status.success(), "results: {}", stderr(&out));
    let files = out_files(&dir);
    assert_eq!(files.len(), 4, "{:?}", files.keys());
    let big = simworker::output_for(&fake_assignment(id, 0, &["big", "0"]));
    assert!(big.len() as u64 > wire::INLINE_OUTPUT_MAX);
    for i in 0..4 {
        assert_eq!(files[&format!("{i}.out")], big, "task {i}");
    }
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("results.json"))?)?;
    assert_eq!(json["state"], "running");
    let states: Vec<&str> = json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["accepted", "accepted", "accepted", "accepted", "pending", "pending"]
    );
    let whole = c.dir.path().join("big-one-frame");
    one_frame(&c.ticket, &c.token, id, &whole).await?;
    assert_eq!(
        std::fs::read_to_string(whole.join("results.json"))?,
        std::fs::read_to_string(dir.join("results.json"))?
    );
    assert_eq!(out_files(&whole), files);
    drop((a, b));
    Ok(())
}
