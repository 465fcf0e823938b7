//! Peergrid's processes on the hosts of a [`netsim`] lab, shared by `tests/multihost.rs` (as
//! `common::netgrid`) and `benches/netswarm.rs` (which includes this file alone with
//! `#[path]`, so it uses nothing else of `common`): `coordinator serve` started as the README
//! says, `worker join`, the submitter CLI, and the ~8 MiB padded primes module both send
//! around. The network side (hosts, NAT sites, counters, binaries) is netsim's.
#![allow(dead_code)]

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netsim::{Host, Proc};
use serde_json::Value;

const PRIMES_WASM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/primes/primes.wasm"
);

/// Random bytes appended to the primes module as a custom section.
pub const PADDING: usize = 8 << 20;

/// The primes module with [`PADDING`] random bytes appended as a custom section: still
/// valid, same behaviour (engines ignore custom sections), 33 chunks of fresh data.
pub fn padded_primes() -> Result<Vec<u8>> {
    let mut wasm = std::fs::read(PRIMES_WASM).context("examples/primes/primes.wasm")?;
    let name = b"peergrid-padding";
    let mut payload = vec![0u8; PADDING];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut payload);
    let mut section = Vec::with_capacity(PADDING + 32);
    leb(&mut section, name.len() as u64);
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    wasm.push(0); // custom section id
    leb(&mut wasm, section.len() as u64);
    wasm.extend_from_slice(&section);
    Ok(wasm)
}

fn leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// `coordinator serve --data-dir DIR/coord --listen 0.0.0.0:7100 --advertise <host's address>`
/// and then `extra`, on `host` (`bin`: the coordinator binary), with `RUST_LOG=rust_log` and
/// stdout and stderr to `coordinator.out.log` and `coordinator.log` in `dir`. Returns it with
/// its ticket and submit token once it has written both; fails if it exits first or has not
/// written them within `guard`.
pub fn start_coordinator(
    bin: &Path,
    host: &Host,
    dir: &Path,
    rust_log: &str,
    extra: &[&str],
    guard: Duration,
) -> Result<(Proc, String, String)> {
    let advertise = host.ip.to_string();
    start_coordinator_as(
        bin,
        host,
        dir,
        rust_log,
        &advertise,
        "coordinator",
        extra,
        guard,
    )
}

/// [`start_coordinator`] advertising `advertise` (an address or a name the hosts resolve),
/// with its logs in `<log>.log` and `<log>.out.log`. The data dir is `DIR/coord` whatever
/// the host: a coordinator restarted on another host keeps its key, store and blobs.
#[allow(clippy::too_many_arguments)]
pub fn start_coordinator_as(
    bin: &Path,
    host: &Host,
    dir: &Path,
    rust_log: &str,
    advertise: &str,
    log: &str,
    extra: &[&str],
    guard: Duration,
) -> Result<(Proc, String, String)> {
    let data = dir.join("coord");
    let file =
        |name: String| File::create(dir.join(&name)).with_context(|| format!("log file {name}"));
    let mut cmd = host.command(bin);
    cmd.args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--listen", "0.0.0.0:7100", "--advertise", advertise])
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(file(format!("{log}.out.log"))?)
        .stderr(file(format!("{log}.log"))?)
        .args(extra);
    // A restarted coordinator writes its ticket again: wait for the new one.
    let _ = std::fs::remove_file(data.join("ticket"));
    let mut coord = Proc::spawn("coordinator", &mut cmd)?;
    let t0 = Instant::now();
    loop {
        let read = |f: &str| std::fs::read_to_string(data.join(f)).unwrap_or_default();
        let (t, k) = (read("ticket"), read("submit-token"));
        if !t.trim().is_empty() && !k.trim().is_empty() {
            return Ok((coord, t.trim().to_string(), k.trim().to_string()));
        }
        if let Some(s) = coord.exited() {
            bail!("coordinator serve exited ({s}) before writing its ticket");
        }
        if t0.elapsed() > guard {
            bail!("coordinator wrote no ticket within {guard:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `worker join TICKET --data-dir DIR` on `host` (`bin`: the worker binary), with
/// `RUST_LOG=rust_log`, stdout discarded and stderr to `log`; `name` names the process.
pub fn spawn_worker(
    bin: &Path,
    host: &Host,
    ticket: &str,
    dir: &Path,
    rust_log: &str,
    log: File,
    name: &str,
) -> Result<Proc> {
    Proc::spawn(
        name,
        &mut worker_command(bin, host, ticket, dir, rust_log, log),
    )
}

/// The command [`spawn_worker`] runs, for callers that add arguments.
fn worker_command(
    bin: &Path,
    host: &Host,
    ticket: &str,
    dir: &Path,
    rust_log: &str,
    log: File,
) -> Command {
    let mut cmd = host.command(bin);
    cmd.args(["join", ticket, "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    cmd
}

/// `worker join TICKET` with `args` (say `--slots 2`) and `--data-dir DIR/worker-<i>` on
/// each of `hosts`, `RUST_LOG=info`, stderr to `DIR/worker-<i>.log`; then wait (through the
/// submitter CLI on `sci`, `status --json`) until all are connected, at most `guard`.
#[allow(clippy::too_many_arguments)]
pub fn start_workers(
    bin: &Path,
    worker_bin: &Path,
    sci: &Host,
    hosts: &[Host],
    ticket: &str,
    token: &str,
    args: &[&str],
    dir: &Path,
    guard: Duration,
) -> Result<Vec<Proc>> {
    let mut workers = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let log = File::create(dir.join(format!("worker-{i}.log")))?;
        let data = dir.join(format!("worker-{i}"));
        let mut cmd = worker_command(worker_bin, h, ticket, &data, "info", log);
        cmd.args(args);
        workers.push(Proc::spawn(&format!("worker-{i}"), &mut cmd)?);
    }
    let t = Instant::now();
    loop {
        let mut c = cli(bin, sci, ticket, token, "status");
        c.arg("--json");
        let on = netsim::run_with_timeout(&mut c, Duration::from_secs(60))
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .and_then(|s| s["workers"].as_array().cloned())
            .map(|w| w.iter().filter(|w| w["connected"] == true).count())
            .unwrap_or(0);
        if on >= hosts.len() {
            return Ok(workers);
        }
        if t.elapsed() > guard {
            bail!("only {on} of {} workers connected", hosts.len());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The submitter CLI on `host`: `coordinator CMD --to TICKET --token TOKEN` (`bin`: the
/// coordinator binary) with `RUST_LOG=warn`, for the caller to add arguments and run.
pub fn cli(bin: &Path, host: &Host, ticket: &str, token: &str, cmd: &str) -> Command {
    let mut c = host.command(bin);
    c.arg(cmd)
        .args(["--to", ticket, "--token", token])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1");
    c
}

/// `coordinator submit --to TICKET --token TOKEN JOB --wait --json` on `host`, running, with
/// stdout to `out` and stderr to `err`; its last JSON line ([`last_json`]) is the job's end.
pub fn spawn_submit(
    bin: &Path,
    host: &Host,
    ticket: &str,
    token: &str,
    job: &Path,
    out: &Path,
    err: &Path,
) -> Result<Proc> {
    let mut c = cli(bin, host, ticket, token, "submit");
    c.arg(job)
        .args(["--wait", "--json"])
        .stdin(Stdio::null())
        .stdout(File::create(out).with_context(|| format!("{}", out.display()))?)
        .stderr(File::create(err).with_context(|| format!("{}", err.display()))?);
    Proc::spawn("submit", &mut c)
}

/// The last line of `text` that parses as JSON (what a `--json` command printed last).
pub fn last_json(text: &str) -> Option<Value> {
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
}

/// Copy every `*.log` file of `dir` into `keep` (created if need be), for a closer look.
pub fn keep_logs(dir: &Path, keep: &Path) {
    let _ = std::fs::create_dir_all(keep);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
        }
    }
}
