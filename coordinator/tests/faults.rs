//! Crash faults with real processes (issue 10, part 2): `kill -9` of workers throughout a job,
//! and of the coordinator five times during a job. The job must finish with the right answer;
//! no accepted result may be lost or credited twice; no task may stay stuck.
//!
//! Default sizes keep the file to a few minutes in a debug build on 2 cores;
//! `PEERGRID_FAULTS_FULL=1` runs the bigger job (`bash faults.sh`). Each test prints one
//! `FAULT|suite|scenario|figures|target|met` line for the table in FAULTS.md.

mod common;

use std::time::{Duration, Instant};

use common::{credit_figures, job_of, Cluster};
use coordinator::store::postgres::throwaway::ThrowawayPostgres;
use rand::{Rng, SeedableRng};

fn full() -> bool {
    std::env::var("PEERGRID_FAULTS_FULL").is_ok_and(|v| v == "1")
}

/// A primes job over [0, tasks × block): π(tasks × block) is known.
struct JobSize {
    workers: usize,
    tasks: u32,
    block: u64,
    /// π(tasks × block).
    primes: u64,
    label: &'static str,
}

/// π(5·10⁹) = 234 954 223, π(10¹⁰) = 455 052 511.
fn size(workers_default: usize, workers_full: usize) -> JobSize {
    if full() {
        JobSize {
            workers: workers_full,
            tasks: 100,
            block: 100_000_000,
            primes: 455_052_511,
            label: "pi(1e10)",
        }
    } else {
        JobSize {
            workers: workers_default,
            tasks: 40,
            block: 125_000_000,
            primes: 234_954_223,
            label: "pi(5e9)",
        }
    }
}

/// The hang guard, paced by the job rather than the clock: a job counts as stuck when neither
/// a task was decided nor a replica reported for [`STALL`]. A loaded 2-core machine makes
/// slow progress (one replica every 10-20 s), never none; a lost task makes none.
const STALL: Duration = Duration::from_secs(300);

struct Progress {
    seen: (u64, u64),
    since: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            seen: (0, 0),
            since: Instant::now(),
        }
    }

    /// Note the job's counters from a status; true once it has made no progress for [`STALL`].
    fn stuck(&mut self, status: &serde_json::Value, id: u64) -> bool {
        let j = job_of(status, id);
        let now = (
            j["tasks_done"].as_u64().unwrap_or(0) + j["tasks_failed"].as_u64().unwrap_or(0),
            j["replicas_reported"].as_u64().unwrap_or(0),
        );
        if now != self.seen {
            (self.seen, self.since) = (now, Instant::now());
        }
        self.since.elapsed() > STALL
    }
}

/// Wait until `done` holds for the job or it stops making progress (then panic).
fn wait_progressing(
    c: &Cluster,
    id: u64,
    what: &str,
    progress: &mut Progress,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    loop {
        let st = c.status();
        if done(&st) {
            return st;
        }
        assert!(
            !progress.stuck(&st, id),
            "waiting for {what}: the job made no progress for {STALL:?}; last status: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn seeded_rng(test: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("PEERGRID_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: seed {seed} (rerun with PEERGRID_FAULTS_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn secs(rng: &mut impl Rng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.gen_range(lo..hi))
}

/// What a finished job came to, gathered without panicking so the FAULT line is printed
/// before any assertion fails.
#[derive(Debug)]
struct Verdict {
    state: String,
    accepted: u64,
    sum: u64,
    /// Tasks accepted with fewer than 2 distinct agreeing workers, or a worker listed twice.
    bad_quorum: u64,
    valid: u64,
    agreeing: u64,
    credit: f64,
    expected_credit: f64,
    /// From the coordinator's store: (worker, task) pairs with more than one valid verdict.
    twice: u64,
    /// Valid verdicts in the store, and Σ over tasks of fuel × valid replicas / 1e9.
    store_valid: u64,
    store_credit: f64,
}

impl Verdict {
    fn of(c: &Cluster, id: u64) -> Verdict {
        let status = c.status();
        let state = job_of(&status, id)["state"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        let (sum, results) = c.results(id);
        let tasks = results["tasks"].as_array().unwrap();
        let accepted = tasks.iter().filter(|t| t["status"] == "accepted").count() as u64;
        let mut bad_quorum = 0;
        let mut agreeing = 0;
        for t in tasks {
            let w: Vec<&str> = t["agreeing_workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|x| x.as_str())
                .collect();
            let mut d = w.clone();
            d.sort();
            d.dedup();
            if d.len() < 2 || d.len() != w.len() {
                bad_quorum += 1;
            }
            agreeing += w.len() as u64;
        }
        let (valid, credit, expected_credit) = credit_figures(&status, &results);
        let (twice, per_task) = store_verdicts(c, id);
        let store_valid = per_task.values().sum();
        let store_credit = tasks
            .iter()
            .map(|t| {
                t["fuel_used"].as_f64().unwrap_or(0.0)
                    * *per_task.get(&t["index"].as_u64().unwrap()).unwrap_or(&0) as f64
                    / 1e9
            })
            .sum();
        Verdict {
            state,
            accepted,
            sum,
            bad_quorum,
            valid,
            agreeing,
            credit,
            expected_credit,
            twice,
            store_valid,
            store_credit,
        }
    }

    /// Agreeing replicas reported after their task was decided (a reissued replica and the
    /// original both finished): judged valid and credited once each, but not listed among the
    /// task's `agreeing_workers`.
    fn late_valid(&self) -> i64 {
        self.valid as i64 - self.agreeing as i64
    }

    /// Credit as `status` reports it = fuel of every valid replica, each counted once; and
    /// `status`'s valid counts = the store's valid verdicts.
    fn credit_ok(&self) -> bool {
        (self.credit - self.store_credit).abs() < 1e-6
            && self.valid == self.store_valid
            && self.credit + 1e-6 >= self.expected_credit
    }

    fn ok(&self, s: &JobSize) -> bool {
        self.state == "done"
            && self.accepted == s.tasks as u64
            && self.sum == s.primes
            && self.bad_quorum == 0
            && self.twice == 0
            && self.late_valid() >= 0
            && self.credit_ok()
    }

    fn assert_ok(&self, s: &JobSize, c: &Cluster) {
        if !self.ok(s) {
            // Keep the evidence (store, logs, results) for a post-mortem.
            let keep = std::env::temp_dir().join(format!("peergrid-faults-{}", std::process::id()));
            let _ = std::process::Command::new("cp")
                .arg("-a")
                .arg(c.dir.path())
                .arg(&keep)
                .status();
            eprintln!(
                "kept the cluster's data dirs and logs in {}",
                keep.display()
            );
            per_worker_credit(c);
        }
        assert_eq!(self.state, "done", "{self:?}");
        assert_eq!(
            self.accepted, s.tasks as u64,
            "every task accepted: {self:?}"
        );
        assert_eq!(
            self.sum, s.primes,
            "the right answer, {}: {self:?}",
            s.label
        );
        assert_eq!(
            self.bad_quorum, 0,
            "every accepted task agreed by >= 2 distinct workers: {self:?}"
        );
        assert_eq!(
            self.twice, 0,
            "a worker was credited twice for one task: {self:?}"
        );
        assert!(
            self.valid >= self.agreeing,
            "an agreeing replica was not credited: {self:?}"
        );
        assert!(
            self.credit_ok(),
            "credit = fuel of the valid replicas / 1e9, status = store: {self:?}"
        );
    }
}

#[test]
fn job_survives_kill9_of_30_percent_of_workers_throughout_without_losing_or_double_crediting() {
    let s = size(6, 10);
    let per_round = ((s.workers as f64 * 0.3).ceil() as usize).max(1);
    let mut rng = seeded_rng("workers");
    let mut c = Cluster::start(s.workers);
    // A short deadline: a killed worker's replicas are reissued after it (max_replicas is
    // generous so repeated losses cannot fail a task).
    let job = c.primes_job_with(s.tasks, s.block, 8, 16);
    let started = Instant::now();
    let id = c.submit(&job);
    let (mut kills, mut rounds, mut done_max, mut went_back) = (0u32, 0u32, 0u64, 0u32);
    // Rounds are paced by the job's progress, not by the clock, so a fast machine gets as many
    // mid-job rounds as a slow one: round r lands once r/8 of the tasks are accepted (then
    // after a random 1-3 s), so at least three rounds land while 6/8 of the job is still to do.
    let total = s.tasks as u64;
    let mut progress = Progress::new();
    let mut stuck;
    loop {
        let milestone = total * u64::from(rounds) / 8;
        let mut st;
        loop {
            st = c.status();
            let j = job_of(&st, id);
            stuck = progress.stuck(&st, id);
            if j["tasks_done"].as_u64().unwrap() >= milestone || j["state"] != "running" || stuck {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if job_of(&st, id)["state"] == "running" && rounds >= 3 {
            std::thread::sleep(secs(&mut rng, 1.0, 3.0));
            st = c.status();
        }
        let j = job_of(&st, id);
        let done = j["tasks_done"].as_u64().unwrap();
        if done < done_max {
            went_back += 1;
        }
        done_max = done_max.max(done);
        if j["state"] != "running" || stuck {
            break;
        }
        // 30% of the workers, chosen at random, die at a random moment of their task.
        let mut slots: Vec<usize> = (0..s.workers).collect();
        let victims: Vec<usize> = (0..per_round)
            .map(|_| slots.swap_remove(rng.gen_range(0..slots.len())))
            .collect();
        for &v in &victims {
            c.workers[v].kill9();
            kills += 1;
        }
        rounds += 1;
        std::thread::sleep(secs(&mut rng, 0.2, 1.5));
        for &v in &victims {
            c.restart_worker(v);
        }
    }
    let elapsed = started.elapsed();
    let v = Verdict::of(&c, id);
    let met = v.ok(&s) && !stuck && went_back == 0 && rounds >= 3;
    println!(
        "FAULT|crash|kill -9 of {per_round} of {} workers (30%) at 0, 1/8 and 2/8 of the job accepted, then every 1-3 s, restarted; {} primes tasks, quorum 2|{}, {}/{} accepted, sum {} {} {}, {} kills in {rounds} rounds, accepted count never went back: {}, {} (worker, task) pairs credited twice, {} late agreeing replicas credited once each, credit = valid fuel: {}, {:.0} s|job completes, right answer, nothing lost, none credited twice, none stuck|{}",
        s.workers, s.tasks, v.state, v.accepted, s.tasks, v.sum, if v.sum == s.primes { "=" } else { "!=" }, s.label, kills,
        if went_back == 0 { "yes" } else { "NO" }, v.twice, v.late_valid(), v.credit_ok(), elapsed.as_secs_f64(), if met { "yes" } else { "no" }
    );
    assert!(
        !stuck,
        "job still running after {elapsed:?} and no progress for {STALL:?}: a task is stuck"
    );
    assert_eq!(
        went_back, 0,
        "the accepted count went back: an accepted result was lost"
    );
    assert!(
        rounds >= 3,
        "only {rounds} kill rounds landed mid-job; make the job longer"
    );
    v.assert_ok(&s, &c);
}

#[test]
fn job_survives_five_coordinator_kill9_and_restarts_without_losing_or_double_crediting() {
    five_coordinator_kills(None);
}

/// The same with the coordinator's state in PostgreSQL (`serve --store postgres://...`, a
/// throwaway server of this test's own): the server keeps running while the coordinator dies.
#[test]
fn job_survives_five_coordinator_kill9_with_the_postgres_store() {
    let Some(pg) = ThrowawayPostgres::for_tests() else {
        return;
    };
    let url = pg.fresh_database().expect("creating the test database");
    five_coordinator_kills(Some(url));
}

/// Kill the coordinator (`kill -9`) five times during a job and restart it on the same data
/// dir and store (`store`: `serve --store`, or SQLite in the data dir).
fn five_coordinator_kills(store: Option<String>) {
    let s = size(4, 6);
    let mut rng = seeded_rng("coordinator");
    let backend = if store.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let mut c = Cluster::start_with_store(s.workers, store);
    let job = c.primes_job_with(s.tasks, s.block, 30, 16);
    let started = Instant::now();
    let id = c.submit(&job);
    let total = s.tasks as u64;
    let (mut lost, mut kills, mut down) = (0u64, 0u32, Duration::ZERO);
    let mut kill_points = Vec::new();
    let mut progress = Progress::new();
    for k in 1..=5u64 {
        // Kill k lands once k/8 of the tasks are accepted: spread over the job and paced by
        // its progress, so the fifth kill lands with 3/8 of the job still to do whatever the
        // machine's speed.
        let threshold = total * k / 8;
        let before = wait_progressing(
            &c,
            id,
            &format!("{threshold} accepted tasks before kill {k}"),
            &mut progress,
            |st| {
                let j = job_of(st, id);
                j["tasks_done"].as_u64().unwrap() >= threshold || j["state"] != "running"
            },
        );
        let j = job_of(&before, id);
        if j["state"] != "running" {
            break;
        }
        let done_before = j["tasks_done"].as_u64().unwrap();
        let credit_before: Vec<(String, u64)> = before["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["node_id"].as_str().unwrap().to_string(),
                    w["valid"].as_u64().unwrap(),
                )
            })
            .collect();
        // Sometimes mid-commit, sometimes idle: a random extra moment before the kill.
        std::thread::sleep(secs(&mut rng, 0.0, 0.5));
        c.coord.as_mut().unwrap().kill9();
        kills += 1;
        kill_points.push(done_before);
        let pause = secs(&mut rng, 0.2, 2.0);
        down += pause;
        std::thread::sleep(pause);
        c.start_coordinator();
        // A hang guard only: the restarted coordinator answers once it has loaded its store.
        let t0 = Instant::now();
        let after = loop {
            if let Some(st) = c.try_status() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the restarted coordinator never answered status"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let done_after = job_of(&after, id)["tasks_done"].as_u64().unwrap();
        lost += done_before.saturating_sub(done_after);
        // Nobody's valid count went back either.
        for (node, valid) in &credit_before {
            let now = after["workers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["node_id"].as_str() == Some(node));
            let now = now.map_or(0, |w| w["valid"].as_u64().unwrap());
            lost += valid.saturating_sub(now);
        }
    }
    wait_progressing(&c, id, "the job to end", &mut progress, |st| {
        job_of(st, id)["state"] != "running"
    });
    let elapsed = started.elapsed();
    let v = Verdict::of(&c, id);
    let met = v.ok(&s) && lost == 0 && kills == 5;
    println!(
        "FAULT|crash|kill -9 of the coordinator 5 times during a job (restart after 0.2-2 s), {} workers, {} primes tasks, {backend} store|{}, {}/{} accepted, sum {} {} {}, {kills} kills at {:?} accepted, accepted results lost across restarts: {lost}, {} (worker, task) pairs credited twice, {} late agreeing replicas credited once each, credit = valid fuel: {}, {:.0} s ({:.1} s down)|job completes, right answer, nothing lost, none credited twice, none stuck|{}",
        s.workers, s.tasks, v.state, v.accepted, s.tasks, v.sum, if v.sum == s.primes { "=" } else { "!=" }, s.label,
        kill_points, v.twice, v.late_valid(), v.credit_ok(), elapsed.as_secs_f64(), down.as_secs_f64(), if met { "yes" } else { "no" }
    );
    assert_eq!(
        kills, 5,
        "the job ended before the fifth kill; make it longer"
    );
    assert_eq!(
        lost, 0,
        "accepted results or credit lost across a coordinator restart"
    );
    v.assert_ok(&s, &c);
}

/// Each worker's `valid` count beside the tasks whose agreeing workers name it.
fn per_worker_credit(c: &Cluster) {
    let status = c.status();
    let Some(id) = status["jobs"][0]["id"].as_u64() else {
        return;
    };
    let (_, results) = c.results(id);
    for w in status["workers"].as_array().unwrap() {
        let node = w["node_id"].as_str().unwrap_or_default();
        let named: Vec<u64> = results["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| {
                t["agreeing_workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x.as_str() == Some(node))
            })
            .map(|t| t["index"].as_u64().unwrap())
            .collect();
        eprintln!(
            "worker {node}: valid {} credit {}, named in {} accepted tasks",
            w["valid"],
            w["credit"],
            named.len()
        );
    }
}

/// Read the coordinator's store (white box; both SQLite and PostgreSQL allow a reader beside
/// the running coordinator): (worker, task) pairs with more than one valid verdict, and valid
/// verdicts per task index of job `job`.
fn store_verdicts(c: &Cluster, job: u64) -> (u64, std::collections::HashMap<u64, u64>) {
    const TWICE: &str = "SELECT COUNT(*) FROM (SELECT worker, idx FROM replicas WHERE job = $1 AND verdict = 1 GROUP BY worker, idx HAVING COUNT(*) > 1) AS t";
    const PER_TASK: &str =
        "SELECT idx, COUNT(*) FROM replicas WHERE job = $1 AND verdict = 1 GROUP BY idx";
    if let Some(url) = &c.store {
        let mut pg = postgres::Client::connect(url, postgres::NoTls)
            .expect("connecting to the coordinator's PostgreSQL store");
        let twice: i64 = pg
            .query_one(TWICE, &[&(job as i64)])
            .expect("reading replicas")
            .get(0);
        let per_task = pg
            .query(PER_TASK, &[&(job as i64)])
            .expect("reading replicas")
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
            .collect();
        return (twice as u64, per_task);
    }
    let db = c.data().join("coordinator.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("opening the coordinator's store");
    let twice: i64 = conn
        .query_row(&TWICE.replace('$', "?"), [job as i64], |r| r.get(0))
        .expect("reading replicas");
    let mut st = conn.prepare(&PER_TASK.replace('$', "?")).unwrap();
    let per_task = st
        .query_map([job as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    (twice as u64, per_task)
}
