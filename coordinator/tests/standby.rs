//! Standby coordinators (`coordinator serve --store postgres://...` twice on one database):
//! the leader is killed with SIGKILL again and again during a job; the standby takes over,
//! workers and the scientist's `submit --wait` follow the ticket that lists both, and the
//! job completes with the right answer, **no accepted result lost and no replica credited
//! twice**.
//!
//! Every process on its own host of a [`netsim`] lab (network namespaces): PostgreSQL on a
//! database host (TCP), coordinators A and B on two more, three workers, the scientist. The
//! killed coordinator is restarted (same host, same data dir) once the other leads, and
//! stands by for the next kill. The last "kill" (of two or more) is a SIGSTOP instead: the
//! standby takes over from the stalled leader, which, resumed, must find its lease taken and
//! exit by itself with a clear error (its commits are fenced meanwhile).
//!
//! Failover time, per kill: from the SIGKILL to the new leader's log line "first work request
//! served since this coordinator started" (seen by polling its log every 20 ms). Printed,
//! not asserted (tests never depend on the machine's speed): the ≤ 10 s target is reported by
//! `PEERGRID_HA_KILLS=10 cargo test -p coordinator --test standby -- --nocapture` (the
//! benchmark run; default 3 kills), as `FAILOVER|...` and `FAULT|...` lines.
//!
//! Needs root (network namespaces) and Debian's postgresql; prints `skipped: <reason>`
//! otherwise (with `CI=true` a missing PostgreSQL fails instead).

mod common;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::netgrid;
use common::{coordinator_bin, worker_bin};
use coordinator::store::postgres::throwaway::ThrowawayPostgres;
use netsim::{Host, Lab, Proc};
use serde_json::Value;

const CLI_GUARD: Duration = Duration::from_secs(90);
const START_GUARD: Duration = Duration::from_secs(90);
/// How long a take-over may take before the test gives up (a hang guard, not a target).
const FAILOVER_GUARD: Duration = Duration::from_secs(120);
/// The job must move within this (a hang guard paced by progress).
const STALL: Duration = Duration::from_secs(300);

/// The job: `tasks` primes tasks of `block` numbers each over [0, n), and π(n).
struct Job {
    tasks: u64,
    block: u64,
    primes: u64,
    label: &'static str,
}

/// 100 tasks over [0, 10¹⁰) (π = 455 052 511), whatever the number of kills, so every kill
/// lands while it runs. (The 40-task job over [0, 5·10⁹) this used for up to 3 kills ended
/// before the third once the sandbox got faster.)
fn job_for(_kills: usize) -> Job {
    Job {
        tasks: 100,
        block: 100_000_000,
        primes: 455_052_511,
        label: "pi(1e10)",
    }
}

fn say(line: &str) {
    let line = format!("{line}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// One coordinator of the deployment: its host, data dir and current process.
struct Coord {
    name: &'static str,
    host: Host,
    dir: PathBuf,
    proc: Option<Proc>,
    starts: usize,
    log: PathBuf,
}

impl Coord {
    fn start(&mut self, url: &str) -> Result<String> {
        self.starts += 1;
        let log = format!("{}-{}", self.name, self.starts);
        self.log = self.dir.join(format!("{log}.log"));
        let (proc, ticket, _token) = netgrid::start_coordinator_as(
            &coordinator_bin(),
            &self.host,
            &self.dir,
            "info",
            &self.host.ip.to_string(),
            &log,
            &["--store", url, "--http", "127.0.0.1:8080"],
            START_GUARD,
        )?;
        self.proc = Some(proc);
        Ok(ticket)
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("coord/submit-token"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn log_has(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|t| t.contains(needle))
    }
}

const TOOK_LEAD: &str = "took the leader lease";
const FIRST_WORK: &str = "first work request served since this coordinator started";

fn wait_for(what: &str, guard: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > guard {
            bail!("{what}: not within {guard:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(t0.elapsed())
}

/// `GET http://127.0.0.1:8080PATH` on `host` (a coordinator's `--http`): status and body.
fn http_get(host: &Host, path: &str) -> Result<(u16, String)> {
    let script = format!(
        "import urllib.request, urllib.error\ntry:\n    r = urllib.request.urlopen('http://127.0.0.1:8080{path}', timeout=10)\n    print(r.status); print(r.read().decode())\nexcept urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n"
    );
    let mut c = host.command("python3");
    c.arg("-c").arg(script);
    let out = netsim::run_with_timeout(&mut c, CLI_GUARD)?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (code, body) = text.split_once('\n').unwrap_or((&text, ""));
    Ok((
        code.trim()
            .parse()
            .with_context(|| format!("HTTP GET {path}: {text}"))?,
        body.trim().to_string(),
    ))
}

fn cli_json(host: &Host, ticket: &str, token: &str, args: &[&str]) -> Result<Value> {
    let mut c = netgrid::cli(&coordinator_bin(), host, ticket, token, args[0]);
    c.args(&args[1..]).arg("--json");
    let out = netsim::run_with_timeout(&mut c, CLI_GUARD)?;
    if !out.status.success() {
        bail!(
            "coordinator {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("status --json printed no JSON")
}

fn job_of(status: &Value) -> Value {
    status["jobs"][0].clone()
}

fn valid_counts(status: &Value) -> Vec<(String, u64)> {
    status["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    (
                        w["node_id"].as_str().unwrap_or_default().to_string(),
                        w["valid"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_standby_takes_over_from_a_killed_leader_and_the_job_loses_nothing() {
    let Some(mut lab) = netsim::lab_or_skip() else {
        return;
    };
    let kills: usize = std::env::var("PEERGRID_HA_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::Builder::new()
        .prefix("standby-")
        .tempdir()
        .unwrap();
    if let Err(e) = run(&mut lab, dir.path(), kills) {
        if let Some(keep) = std::env::var_os("PEERGRID_KEEP_LOGS") {
            netgrid::keep_logs(dir.path(), Path::new(&keep));
            for sub in ["a", "b"] {
                netgrid::keep_logs(&dir.path().join(sub), Path::new(&keep));
            }
        }
        panic!("{e:#}");
    }
}

fn run(lab: &mut Lab, dir: &Path, kills: usize) -> Result<()> {
    let Job {
        tasks: n_tasks,
        block,
        primes,
        label,
    } = job_for(kills);
    let db = lab.public_host("db", 1)?;
    let pg = match ThrowawayPostgres::start_in_netns(&db.ns, db.ip.into()) {
        Ok(Some(pg)) => pg,
        Ok(None) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            bail!("no PostgreSQL server can be started in CI: install Debian's postgresql")
        }
        Ok(None) => {
            say(coordinator::store::postgres::throwaway::SKIPPED);
            return Ok(());
        }
        Err(e) => bail!("cannot start PostgreSQL on the database host: {e}"),
    };
    let (url, local_url) = pg.fresh_tcp_database().map_err(anyhow::Error::msg)?;
    let mut coords = [
        Coord {
            name: "a",
            host: lab.public_host("coord-a", 0)?,
            dir: dir.join("a"),
            proc: None,
            starts: 0,
            log: PathBuf::new(),
        },
        Coord {
            name: "b",
            host: lab.public_host("coord-b", 2)?,
            dir: dir.join("b"),
            proc: None,
            starts: 0,
            log: PathBuf::new(),
        },
    ];
    for c in &coords {
        std::fs::create_dir_all(&c.dir)?;
    }
    coords[0].start(&url)?;
    wait_for("A takes the lead", START_GUARD, || {
        coords[0].log_has(TOOK_LEAD)
    })?;
    let ticket = coords[1].start(&url)?;
    // B's ticket lists both coordinators, each with its own key; both share A's token.
    let parsed: tasks::Ticket = ticket.parse()?;
    anyhow::ensure!(
        parsed.entries().count() == 2,
        "the standby's ticket lists both coordinators: {ticket}"
    );
    let token = coords[0].token();
    anyhow::ensure!(
        !token.is_empty() && coords[1].token() == token,
        "the standby uses the deployment's submit token"
    );
    wait_for("B stands by", START_GUARD, || {
        coords[1].log_has("standing by")
    })?;
    anyhow::ensure!(
        !coords[1].log_has(TOOK_LEAD),
        "B took the lead while A was alive"
    );
    say(&format!("standby: ticket {ticket}"));
    // Health checks tell the leader from the standby, which names the leader.
    let (code, body) = http_get(&coords[0].host, "/health")?;
    anyhow::ensure!(
        code == 200 && body == "ok",
        "leader's /health: {code} {body}"
    );
    let (code, body) = http_get(&coords[1].host, "/health")?;
    let v: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
    // B's ticket lists B, then A (the leader).
    let a_entry = format!("{}@{}", parsed.more[0].0, parsed.more[0].1);
    anyhow::ensure!(
        code == 503 && v["state"] == "standby" && v["leader"].as_str() == Some(&a_entry[..]),
        "standby's /health: {code} {body}"
    );

    // Three workers and the scientist, all with the two-coordinator ticket.
    let mut workers = Vec::new();
    for i in 0..3 {
        let host = lab.public_host(&format!("w{i}"), i % 3)?;
        let wdir = dir.join(format!("w{i}"));
        let log = File::create(dir.join(format!("w{i}.log")))?;
        workers.push(netgrid::spawn_worker(
            &worker_bin(),
            &host,
            &ticket,
            &wdir,
            "info",
            log,
            &format!("w{i}"),
        )?);
    }
    let sci = lab.public_host("sci", 1)?;
    let jd = dir.join("job");
    std::fs::create_dir_all(&jd)?;
    std::fs::copy(common::PRIMES_WASM, jd.join("primes.wasm"))?;
    std::fs::write(
        jd.join("job.toml"),
        format!("name = \"primes\"\nmodule = \"primes.wasm\"\nquorum = 2\nmax_replicas = 16\nfuel = 20_000_000_000\nmemory_mb = 32\nmax_output = 64\ndeadline_secs = 60\n[tasks]\ncount = {n_tasks}\nargs = [\"block\", \"{{i}}\", \"{block}\"]\n"),
    )?;
    let mut submit = netgrid::spawn_submit(
        &coordinator_bin(),
        &sci,
        &ticket,
        &token,
        &jd.join("job.toml"),
        &dir.join("submit.out.log"),
        &dir.join("submit.log"),
    )?;

    let status = |what: &str| -> Result<Value> {
        let t0 = Instant::now();
        loop {
            match cli_json(&sci, &ticket, &token, &["status"]) {
                Ok(v) if v["jobs"][0].is_object() => return Ok(v),
                Ok(_) | Err(_) if t0.elapsed() < CLI_GUARD => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Ok(v) => bail!("{what}: no job in status: {v}"),
                Err(e) => return Err(e.context(what.to_string())),
            }
        }
    };

    let started = Instant::now();
    let mut leader = 0usize;
    let mut lost = 0u64;
    let mut failovers = Vec::new();
    for k in 1..=kills as u64 {
        // Kill k once k/(kills+2) of the tasks are accepted.
        let threshold = n_tasks * k / (kills as u64 + 2);
        let (mut seen, mut since) = (0u64, Instant::now());
        let before = loop {
            let st = status("status before a kill")?;
            let done = job_of(&st)["tasks_done"].as_u64().unwrap_or(0);
            if done >= threshold || job_of(&st)["state"] != "running" {
                break st;
            }
            if done > seen {
                (seen, since) = (done, Instant::now());
            }
            anyhow::ensure!(since.elapsed() < STALL, "the job stalled at {done} tasks");
            std::thread::sleep(Duration::from_millis(300));
        };
        if job_of(&before)["state"] != "running" {
            bail!("the job ended before kill {k}; make it longer");
        }
        let done_before = job_of(&before)["tasks_done"].as_u64().unwrap_or(0);
        let valid_before = valid_counts(&before);
        // Kill the leader; the other must take over by itself. The last time (of two or
        // more) the leader is stopped (SIGSTOP) instead: a stalled leader, alive but silent.
        let standby = 1 - leader;
        let stall = kills >= 2 && k == kills as u64;
        let pid = coords[leader].proc.as_ref().context("leader process")?.id() as i32;
        if stall {
            // SAFETY: kill(2) on our own child's pid.
            anyhow::ensure!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0, "SIGSTOP");
        } else {
            coords[leader].proc.take().context("leader process")?.kill();
        }
        let killed = Instant::now();
        wait_for("the standby takes the lead", FAILOVER_GUARD, || {
            coords[standby].log_has(TOOK_LEAD)
        })?;
        let took = killed.elapsed();
        wait_for(
            "the new leader serves a work request",
            FAILOVER_GUARD,
            || coords[standby].log_has(FIRST_WORK),
        )?;
        let failover = killed.elapsed();
        failovers.push(failover.as_secs_f64());
        let (code, _) = http_get(&coords[standby].host, "/health")?;
        anyhow::ensure!(code == 200, "the new leader's /health answers {code}");
        if stall {
            // Woken up, the old leader finds its lease taken: it must end by itself with a
            // clear error (its commits are fenced), not linger half-alive.
            // SAFETY: kill(2) on our own child's pid.
            anyhow::ensure!(unsafe { libc::kill(pid, libc::SIGCONT) } == 0, "SIGCONT");
            let mut old = coords[leader].proc.take().context("stalled leader")?;
            wait_for("the stalled leader exits once resumed", START_GUARD, || {
                old.exited().is_some()
            })?;
            let code = old.exited().and_then(|s| s.code());
            let fenced = |l: &str| {
                l.contains("another coordinator took the leader lease")
                    || l.contains("another coordinator leads now")
            };
            let log = std::fs::read_to_string(&coords[leader].log).unwrap_or_default();
            anyhow::ensure!(
                code == Some(1) && log.lines().any(fenced),
                "the resumed old leader exits with a clear error (exit {code:?})"
            );
            say(&format!(
                "standby: the stalled leader, resumed, exited by itself (exit {code:?}): {}",
                log.lines().find(|l| fenced(l)).unwrap_or_default()
            ));
        }
        // Restart the killed one: it stands by now.
        coords[leader].start(&url)?;
        wait_for("the restarted coordinator stands by", START_GUARD, || {
            coords[leader].log_has("standing by")
        })?;
        leader = standby;
        let after = status("status after the take-over")?;
        let done_after = job_of(&after)["tasks_done"].as_u64().unwrap_or(0);
        lost += done_before.saturating_sub(done_after);
        let valid_after = valid_counts(&after);
        for (node, valid) in &valid_before {
            let now = valid_after
                .iter()
                .find(|(n, _)| n == node)
                .map_or(0, |(_, v)| *v);
            lost += valid.saturating_sub(now);
        }
        say(&format!(
            "FAILOVER|kill {k}: lease taken {:.2} s, first work request served {:.2} s after the SIGKILL; {done_before} tasks accepted before, {done_after} after",
            took.as_secs_f64(),
            failover.as_secs_f64()
        ));
    }

    // The scientist's `submit --wait` followed the leader through every kill.
    let t0 = Instant::now();
    let end = loop {
        if let Some(s) = submit.exited() {
            break s;
        }
        let st = status("status while finishing")?;
        anyhow::ensure!(
            t0.elapsed() < STALL * 2,
            "the job did not end: {}",
            job_of(&st)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let printed = std::fs::read_to_string(dir.join("submit.out.log")).unwrap_or_default();
    anyhow::ensure!(
        end.success(),
        "submit --wait failed ({end}): {}",
        std::fs::read_to_string(dir.join("submit.log")).unwrap_or_default()
    );
    let last = netgrid::last_json(&printed).context("submit --wait printed no JSON")?;
    anyhow::ensure!(last["state"] == "done", "the job ended {last}");
    let elapsed = started.elapsed();

    // Results through the ticket, from whichever coordinator leads.
    let id = last["id"]
        .as_u64()
        .or(last["job"].as_u64())
        .context("job id")?;
    let out = dir.join("results");
    let mut c = netgrid::cli(&coordinator_bin(), &sci, &ticket, &token, "results");
    c.arg(id.to_string()).arg("--out").arg(&out);
    let r = netsim::run_with_timeout(&mut c, CLI_GUARD)?;
    anyhow::ensure!(
        r.status.success(),
        "results: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let results: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json"))?)?;
    let tasks = results["tasks"].as_array().context("tasks")?;
    let (mut sum, mut bad_quorum, mut accepted) = (0u64, 0u64, 0u64);
    for t in tasks {
        if t["status"] == "accepted" {
            accepted += 1;
        }
        let idx = t["index"].as_u64().unwrap_or(0);
        sum += std::fs::read_to_string(out.join(format!("{idx}.out")))
            .unwrap_or_default()
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
        let mut w: Vec<&str> = t["agreeing_workers"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let n = w.len();
        w.sort();
        w.dedup();
        if w.len() < 2 || w.len() != n {
            bad_quorum += 1;
        }
    }
    // White box: no (worker, task) pair has two valid verdicts, and status's credit is the
    // fuel of the valid replicas, each counted once.
    let mut db = postgres::Client::connect(&local_url, postgres::NoTls)?;
    let twice: i64 = db.query_one("SELECT COUNT(*) FROM (SELECT worker, idx FROM replicas WHERE job = $1 AND verdict = 1 GROUP BY worker, idx HAVING COUNT(*) > 1) AS t", &[&(id as i64)])?.get(0);
    let final_status = status("final status")?;
    let status_valid: u64 = valid_counts(&final_status).iter().map(|(_, v)| v).sum();
    let store_valid: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM replicas WHERE job = $1 AND verdict = 1",
            &[&(id as i64)],
        )?
        .get(0);
    let mut sorted = failovers.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let max = sorted.last().copied().unwrap_or(0.0);
    let ok = accepted == n_tasks
        && sum == primes
        && bad_quorum == 0
        && twice == 0
        && lost == 0
        && status_valid == store_valid as u64;
    say(&format!(
        "FAULT|failover|kill -9 of the leading coordinator {} times and SIGSTOP once during a job, a standby on another host taking over each time (PostgreSQL store on a third; 3 workers, {n_tasks} primes tasks, every process on its own network-namespace host)|{accepted}/{n_tasks} accepted, sum {sum} {} {label}, accepted results or valid counts lost across failovers: {lost}, (worker, task) pairs credited twice: {twice}, status valid = store valid: {}, failover (SIGKILL to first work request served) median {median:.1} s, max {max:.1} s, {:.0} s in all|job completes, nothing lost, none credited twice; failover <= 10 s median|{}",
        kills - 1,
        if sum == primes { "=" } else { "!=" },
        status_valid == store_valid as u64,
        elapsed.as_secs_f64(),
        if ok && median <= 10.0 { "yes" } else { "no" }
    ));
    anyhow::ensure!(
        accepted == n_tasks,
        "every task accepted ({accepted}/{n_tasks})"
    );
    anyhow::ensure!(sum == primes, "the right answer: {sum} != {primes}");
    anyhow::ensure!(
        bad_quorum == 0,
        "{bad_quorum} tasks without a quorum of distinct workers"
    );
    anyhow::ensure!(
        lost == 0,
        "accepted results or credit lost across a failover"
    );
    anyhow::ensure!(twice == 0, "{twice} (worker, task) pairs credited twice");
    anyhow::ensure!(
        status_valid == store_valid as u64,
        "status's valid counts ({status_valid}) = the store's valid verdicts ({store_valid})"
    );
    drop(workers);
    Ok(())
}
