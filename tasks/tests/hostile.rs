//! Hostile input (issue 10, part 4): a long property test for every decoder a peer or a
//! submitter can reach — the six wire message types (frame bodies and whole frames with their
//! length prefix), the saved-report format, tickets and ids, the blob outboard/chunk
//! verification — and for the job file parser. Arbitrary bytes and mutated valid encodings
//! must never panic and always come back as a clean error (or a message that re-encodes).
//!
//! A few thousand cases per property by default; `PEERGRID_FAULTS_FULL=1` runs 200 000
//! (`bash faults.sh`). Prints one `FAULT|` line per decoder family for FAULTS.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde::{de::DeserializeOwned, Serialize};
use tasks::blob::{Outboard, CHUNK_SIZE};
use tasks::job::{JobFile, JobLimits, TaskEntry};
use tasks::wire::{
    self, Assignment, BlobRequest, BlobResponse, CloseCode, CoordMsg, DecodeError, ErrorCode,
    JobResults, JobState, JobStatus, PeerAddr, Report, StatusReport, SubmitBody, SubmitRequest,
    SubmitResponse, TaskResult, TaskState, WorkerMsg, WorkerStatus, MAX_FRAME,
};
use tasks::{
    BlobId, BlobRef, EngineFingerprint, JobId, JobManifest, JobSpec, NodeId, RunResult, Status,
    TaskId, TaskManifest, Ticket,
};

fn full() -> bool {
    std::env::var("PEERGRID_FAULTS_FULL").is_ok_and(|v| v == "1")
}

fn cases() -> u32 {
    if full() {
        200_000
    } else {
        5_000
    }
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

// ---- one valid sample of every message variant ----

fn result() -> RunResult {
    RunResult {
        status: Status::Ok,
        exit_code: 0,
        trap: String::new(),
        fuel_used: 12_345,
        output_hash: BlobId::of(b"42\n"),
        output_len: 3,
    }
}

fn blob(n: u8) -> BlobRef {
    BlobRef {
        id: BlobId([n; 32]),
        size: 300_000 + n as u64,
    }
}

fn manifest() -> JobManifest {
    JobManifest {
        name: "primes".into(),
        module: blob(1),
        limits: JobLimits::default(),
        tasks: vec![
            TaskEntry {
                args: vec!["block".into(), "0".into()],
                input: None,
            },
            TaskEntry {
                args: vec![],
                input: Some(blob(2)),
            },
        ],
    }
}

fn report() -> Report {
    Report {
        replica: 77,
        result: result(),
        output: Some(b"42\n".to_vec()),
        wall_ms: 5,
    }
}

fn worker_msgs() -> Vec<WorkerMsg> {
    vec![
        WorkerMsg::Hello {
            agent: "peergrid-worker/0.1".into(),
            fingerprint: EngineFingerprint {
                engine: "wasmtime 38".into(),
                arch: "x86_64-linux".into(),
                settings: "det".into(),
            },
            slots: 4,
            peer_addr: Some("127.0.0.1:4000".parse().unwrap()),
            blobs: vec![BlobId([9; 32])],
        },
        WorkerMsg::RequestWork { max: 8 },
        WorkerMsg::Report(report()),
        WorkerMsg::HaveBlobs {
            blobs: vec![BlobId([3; 32]), BlobId([4; 32])],
        },
        WorkerMsg::Abandon {
            replicas: vec![1, 2, 300],
        },
        WorkerMsg::BadPeer {
            peer: NodeId([5; 32]),
            blob: BlobId([6; 32]),
        },
        WorkerMsg::Reports(vec![
            report(),
            Report {
                output: None,
                ..report()
            },
        ]),
        WorkerMsg::Punch {
            peer: NodeId([8; 32]),
        },
        WorkerMsg::Holding {
            replicas: vec![4, 5, 1 << 40],
        },
        WorkerMsg::Progress {
            updates: vec![tasks::wire::ProgressUpdate {
                replica: 7,
                fraction: 0.25,
                paused: false,
            }],
        },
        WorkerMsg::Engines {
            native: tasks::EngineFingerprint {
                engine: "wasmtime 48.0.8".into(),
                arch: "x86_64-linux isa=x86-64-v2".into(),
                settings: tasks::release::settings(false),
            },
        },
    ]
}

fn coord_msgs() -> Vec<CoordMsg> {
    let task = TaskManifest {
        id: TaskId {
            job: JobId(3),
            index: 9,
        },
        name: "primes".into(),
        module: blob(1),
        input: Some(blob(2)),
        args: vec!["block".into(), "9".into(), "1000".into()],
        fuel: 1_000_000,
        memory_mb: 32,
        max_output: 64,
    };
    let classed = tasks::wire::ClassedAssignment {
        assignment: Assignment {
            replica: 6,
            task: task.clone(),
            deadline_secs: 60,
            peers: vec![],
        },
        determinism: tasks::Determinism::Native,
    };
    vec![
        CoordMsg::AssignClass {
            assignments: vec![classed],
            retry_after_ms: 100,
        },
        CoordMsg::Welcome {
            agent: "c".into(),
            observed_addr: "[::1]:7100".parse().unwrap(),
        },
        CoordMsg::Assign {
            assignments: vec![Assignment {
                replica: 5,
                task,
                deadline_secs: 600,
                peers: vec![PeerAddr {
                    node_id: NodeId([7; 32]),
                    addr: "10.1.2.3:9".parse().unwrap(),
                }],
            }],
            retry_after_ms: 0,
        },
        CoordMsg::Ack {
            replicas: vec![5, 6],
        },
        CoordMsg::Rejected {
            replica: Some(5),
            reason: "replica 5 is not assigned to this worker".into(),
        },
        CoordMsg::Cancel { replicas: vec![8] },
        CoordMsg::Reachability {
            observed_addr: "198.51.100.7:4433".parse().unwrap(),
            reachable: false,
        },
        CoordMsg::Punch {
            peer: NodeId([7; 32]),
            addr: "203.0.113.9:5000".parse().unwrap(),
        },
        CoordMsg::Room,
    ]
}

fn submit_requests() -> Vec<SubmitRequest> {
    let r = |body| SubmitRequest {
        token: "0123456789abcdef".into(),
        body,
    };
    vec![
        r(SubmitBody::MissingBlobs {
            blobs: vec![blob(1), blob(2)],
        }),
        r(SubmitBody::PutBlob { blob: blob(1) }),
        r(SubmitBody::CreateJob {
            manifest: manifest(),
        }),
        r(SubmitBody::Status {
            job: Some(JobId(1)),
        }),
        r(SubmitBody::Results { job: JobId(1) }),
        r(SubmitBody::Cancel { job: JobId(1) }),
        r(SubmitBody::Progress { job: JobId(1) }),
        r(SubmitBody::CreateJobIn {
            manifest: manifest(),
            determinism: tasks::Determinism::Native,
        }),
        r(SubmitBody::Classes { job: None }),
        r(SubmitBody::CreateJobFromBlob {
            manifest: blob(3),
            determinism: tasks::Determinism::Portable,
        }),
    ]
}

fn submit_responses() -> Vec<SubmitResponse> {
    vec![
        SubmitResponse::Ok,
        SubmitResponse::Missing {
            blobs: vec![blob(1)],
        },
        SubmitResponse::JobCreated {
            job: JobId(1),
            tasks: 100,
        },
        SubmitResponse::Status(StatusReport {
            jobs: vec![JobStatus {
                id: JobId(1),
                name: "p".into(),
                state: JobState::Running,
                tasks_total: 10,
                tasks_done: 3,
                tasks_failed: 0,
                replicas_in_flight: 4,
                replicas_reported: 7,
                outputs_collecting: 0,
            }],
            workers: vec![WorkerStatus {
                node_id: NodeId([1; 32]),
                connected: true,
                credit: 0.5,
                valid: 3,
                invalid: 1,
            }],
            coordinator_bytes_sent: 1 << 20,
        }),
        SubmitResponse::Results(JobResults {
            job: JobId(1),
            name: "p".into(),
            state: JobState::Done,
            tasks: vec![TaskResult {
                index: 0,
                status: TaskState::Accepted,
                outcome: Some(Status::Ok),
                output_hash: Some(BlobId([2; 32])),
                output_len: Some(3),
                fuel_used: Some(99),
                agreeing_workers: vec![NodeId([1; 32]), NodeId([2; 32])],
                reason: None,
                output: Some(b"42\n".to_vec()),
            }],
        }),
        SubmitResponse::Error {
            code: ErrorCode::Unauthorized,
            message: "wrong token".into(),
        },
        SubmitResponse::Progress(tasks::wire::JobProgress {
            job: JobId(1),
            tasks: vec![tasks::wire::TaskProgress {
                index: 3,
                fraction: 0.5,
            }],
            reporting: 1,
        }),
        SubmitResponse::Classes(vec![
            (JobId(1), tasks::Determinism::Native),
            (JobId(2), tasks::Determinism::Portable),
        ]),
    ]
}

fn blob_requests() -> Vec<BlobRequest> {
    vec![
        BlobRequest::Outboard {
            id: BlobId([1; 32]),
        },
        BlobRequest::Chunks {
            id: BlobId([1; 32]),
            start: 3,
            count: 16,
        },
        BlobRequest::Have {
            id: BlobId([1; 32]),
        },
    ]
}

fn blob_responses() -> Vec<BlobResponse> {
    vec![
        BlobResponse::Outboard {
            size: 600_000,
            cvs: vec![[1; 32], [2; 32], [3; 32]],
        },
        BlobResponse::Chunks {
            start: 0,
            count: 2,
            len: 2 * CHUNK_SIZE as u64,
        },
        BlobResponse::Have {
            size: 600_000,
            chunks: vec![true, false, true],
        },
        BlobResponse::NotFound,
        BlobResponse::Busy { retry_after_ms: 50 },
        BlobResponse::BadRequest {
            reason: "out of range".into(),
        },
    ]
}

/// Every sample, encoded as a frame, tagged with the decoder that owns it.
fn valid_frames() -> &'static Vec<(usize, Vec<u8>)> {
    static FRAMES: OnceLock<Vec<(usize, Vec<u8>)>> = OnceLock::new();
    FRAMES.get_or_init(|| {
        fn frames<T: Serialize>(kind: usize, msgs: Vec<T>) -> Vec<(usize, Vec<u8>)> {
            msgs.iter()
                .map(|m| (kind, wire::encode_frame(m).unwrap()))
                .collect()
        }
        let mut v = frames(0, worker_msgs());
        v.extend(frames(1, coord_msgs()));
        v.extend(frames(2, submit_requests()));
        v.extend(frames(3, submit_responses()));
        v.extend(frames(4, blob_requests()));
        v.extend(frames(5, blob_responses()));
        v
    })
}

// ---- what a decoder may do with hostile bytes ----

static DECODED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Body decoder: a message that re-encodes to a body that decodes to the same message, or a
/// clean error with the protocol's close code.
fn body<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    match wire::decode::<T>(bytes) {
        Ok(m) => {
            DECODED.fetch_add(1, Ordering::Relaxed);
            let again = wire::encode(&m);
            // Compared as bytes: a decoded f64 may be NaN, which is not equal to itself.
            let back = wire::decode::<T>(&again).expect("a re-encoded message decodes");
            assert_eq!(
                wire::encode(&back),
                again,
                "decoded message does not round-trip"
            );
        }
        Err(e) => {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            check_error(&e, bytes.len());
        }
    }
}

/// Frame decoder (length prefix + body).
fn frame<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    match wire::decode_frame::<T>(bytes) {
        Ok((m, used)) => {
            DECODED.fetch_add(1, Ordering::Relaxed);
            assert!(used >= 4 && used <= bytes.len());
            assert_eq!(
                u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
                used - 4
            );
            let again = wire::encode_frame(&m).expect("a decoded message fits in a frame again");
            // Compared as bytes: a decoded f64 may be NaN, which is not equal to itself.
            let back = wire::decode_frame::<T>(&again)
                .expect("a re-encoded message decodes")
                .0;
            assert_eq!(
                wire::encode_frame(&back).unwrap(),
                again,
                "decoded message does not round-trip"
            );
        }
        Err(e) => {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            check_error(&e, bytes.len());
            if bytes.len() >= 4 {
                let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
                if len > MAX_FRAME {
                    assert_eq!(
                        e,
                        DecodeError::FrameTooLarge {
                            len,
                            max: MAX_FRAME
                        },
                        "an oversized prefix is refused before the body"
                    );
                }
            }
        }
    }
}

/// Count one decode outcome that has no richer check.
fn count(decoded: bool) {
    if decoded {
        DECODED.fetch_add(1, Ordering::Relaxed);
    } else {
        REFUSED.fetch_add(1, Ordering::Relaxed);
    }
}

fn check_error(e: &DecodeError, _len: usize) {
    let text = e.to_string();
    assert!(
        !text.is_empty() && !text.contains('\n'),
        "error is one line: {text:?}"
    );
    assert!(matches!(
        e.close_code(),
        CloseCode::Protocol | CloseCode::FrameTooLarge
    ));
}

fn all_bodies(bytes: &[u8]) {
    body::<WorkerMsg>(bytes);
    body::<CoordMsg>(bytes);
    body::<SubmitRequest>(bytes);
    body::<SubmitResponse>(bytes);
    body::<BlobRequest>(bytes);
    body::<BlobResponse>(bytes);
    // The worker's outbox files hold one postcard `Report` each.
    body::<Report>(bytes);
}

fn all_frames(bytes: &[u8]) {
    frame::<WorkerMsg>(bytes);
    frame::<CoordMsg>(bytes);
    frame::<SubmitRequest>(bytes);
    frame::<SubmitResponse>(bytes);
    frame::<BlobRequest>(bytes);
    frame::<BlobResponse>(bytes);
}

/// One way to damage a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: prop::sample::Index,
        xor: u8,
    },
    Set {
        at: prop::sample::Index,
        to: u8,
    },
    Insert {
        at: prop::sample::Index,
        bytes: Vec<u8>,
    },
    Remove {
        at: prop::sample::Index,
        n: usize,
    },
    Truncate {
        at: prop::sample::Index,
    },
    /// A varint length or count blown up: 0xff bytes spliced in.
    HugeVarint {
        at: prop::sample::Index,
    },
    /// A new length prefix.
    Prefix {
        len: u32,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        2 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, to)| Mutation::Set { at, to }),
        1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<prop::sample::Index>(), 1..16usize).prop_map(|(at, n)| Mutation::Remove { at, n }),
        1 => any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
        1 => any::<prop::sample::Index>().prop_map(|at| Mutation::HugeVarint { at }),
        1 => prop_oneof![any::<u32>(), (MAX_FRAME as u32 - 2)..=(MAX_FRAME as u32 + 2), 0..64u32].prop_map(|len| Mutation::Prefix { len }),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    if frame.is_empty() {
        return;
    }
    match m {
        Mutation::Flip { at, xor } => {
            let i = at.index(frame.len());
            frame[i] ^= xor;
        }
        Mutation::Set { at, to } => {
            let i = at.index(frame.len());
            frame[i] = *to;
        }
        Mutation::Insert { at, bytes } => {
            let i = at.index(frame.len() + 1);
            frame.splice(i..i, bytes.iter().copied());
        }
        Mutation::Remove { at, n } => {
            let i = at.index(frame.len());
            let end = (i + n).min(frame.len());
            frame.drain(i..end);
        }
        Mutation::Truncate { at } => frame.truncate(at.index(frame.len())),
        Mutation::HugeVarint { at } => {
            let i = at.index(frame.len() + 1);
            frame.splice(i..i, [0xff, 0xff, 0xff, 0xff, 0x0f]);
        }
        Mutation::Prefix { len } => {
            if frame.len() >= 4 {
                frame[..4].copy_from_slice(&len.to_be_bytes());
            }
        }
    }
}

/// Keep the prefix consistent with the body most of the time, so mutations reach the body
/// decoder instead of stopping at "truncated".
fn fix_prefix(frame: &mut [u8]) {
    if frame.len() >= 4 {
        let n = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&n.to_be_bytes());
    }
}

fn fault_line(what: &str, figures: String, met: bool) {
    println!(
        "FAULT|hostile|{what}|{figures}|never panics, clean one-line error|{}",
        if met { "yes" } else { "no" }
    );
}

fn run<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) + Send + Sync,
) -> (bool, String)
where
    S::Value: std::fmt::Debug,
{
    let (d0, r0) = (
        DECODED.load(Ordering::Relaxed),
        REFUSED.load(Ordering::Relaxed),
    );
    let started = std::time::Instant::now();
    let outcome = runner().run(&strategy, |v| {
        test(v);
        Ok(())
    });
    let (d, r) = (
        DECODED.load(Ordering::Relaxed) - d0,
        REFUSED.load(Ordering::Relaxed) - r0,
    );
    let figures = format!(
        "{} cases, {} decode calls: {d} decoded (and re-encoded), {r} refused cleanly, {}, {:.1} s",
        cases(),
        d + r,
        match &outcome {
            Ok(()) => "0 panics".to_string(),
            Err(e) => format!("FAILED: {e}").replace(['\n', '|'], " "),
        },
        started.elapsed().as_secs_f64()
    );
    eprintln!("{name}: {figures}");
    (outcome.is_ok(), figures)
}

#[test]
fn every_wire_decoder_survives_arbitrary_and_mutated_bytes() {
    // Arbitrary bytes, as bodies and as whole frames.
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..12),
        prop::collection::vec(any::<u8>(), 0..2048)
    ];
    let (ok1, f1) = run("arbitrary bytes", bytes, |bytes| {
        all_bodies(&bytes);
        all_frames(&bytes);
    });
    // Valid frames of every variant, damaged 1-4 times; the prefix fixed up (or not).
    let (ok2, f2) = run(
        "mutated valid frames",
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(mutation(), 1..5),
            any::<bool>(),
        ),
        |(pick, muts, fix)| {
            let frames = valid_frames();
            let (_, original) = &frames[pick.index(frames.len())];
            let mut f = original.clone();
            for m in &muts {
                apply(&mut f, m);
            }
            if fix && !muts.iter().any(|m| matches!(m, Mutation::Prefix { .. })) {
                fix_prefix(&mut f);
            }
            all_frames(&f);
            if f.len() >= 4 {
                all_bodies(&f[4..]);
            }
        },
    );
    // Length prefixes of every size with short bodies: oversized ones refused up front.
    let (ok3, f3) = run(
        "length prefixes",
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..64)),
        |(len, rest)| {
            let mut f = len.to_be_bytes().to_vec();
            f.extend_from_slice(&rest);
            all_frames(&f);
            let checked = wire::check_frame_len(len.to_be_bytes());
            assert_eq!(checked.is_err(), len as usize > MAX_FRAME);
        },
    );
    // Every sample still round-trips through its own decoder (the mutations above start from
    // real encodings), and the variants cover 47 of them as the FAULT line says.
    fn own<T: Serialize + DeserializeOwned>(f: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let (m, used) = wire::decode_frame::<T>(f)?;
        assert_eq!(used, f.len(), "a sample frame is consumed whole");
        Ok(wire::encode_frame(&m).unwrap())
    }
    assert_eq!(valid_frames().len(), 47);
    for (kind, f) in valid_frames() {
        let again = match kind {
            0 => own::<WorkerMsg>(f),
            1 => own::<CoordMsg>(f),
            2 => own::<SubmitRequest>(f),
            3 => own::<SubmitResponse>(f),
            4 => own::<BlobRequest>(f),
            _ => own::<BlobResponse>(f),
        };
        assert_eq!(
            again.as_ref(),
            Ok(f),
            "sample of decoder {kind} does not round-trip"
        );
        all_frames(f);
    }
    fault_line("wire decoders (6 message types + outbox Report): arbitrary bytes (0-2 KiB) as bodies and frames", f1, ok1);
    fault_line("wire decoders: valid frames of all 47 variants, 1-4 mutations each (flip, insert, cut, huge varint, bad prefix)", f2, ok2);
    fault_line("frame length prefix: any u32 with a short body", f3, ok3);
    assert!(
        ok1 && ok2 && ok3,
        "a decoder panicked or misbehaved (see above)"
    );
}

#[test]
fn tickets_ids_and_blob_verification_survive_hostile_input() {
    let key = "a1".repeat(32);
    let valid = format!("peergrid1:{key}@127.0.0.1:7100");
    let mutated =
        (any::<prop::sample::Index>(), "\\PC{0,3}", 0..3usize).prop_map(move |(at, ins, del)| {
            let mut chars: Vec<char> = valid.chars().collect();
            let i = at.index(chars.len());
            chars.drain(i..(i + del).min(chars.len()));
            chars.splice(i..i, ins.chars());
            chars.into_iter().collect::<String>()
        });
    let strings = prop_oneof![
        "\\PC{0,120}",
        "peergrid1:[0-9a-f]{0,70}@[0-9a-z.:\\[\\]]{0,30}",
        mutated
    ];
    let (ok1, f1) = run("tickets and ids", strings, |s: String| {
        count(s.parse::<Ticket>().is_ok());
        count(s.parse::<NodeId>().is_ok());
        count(s.parse::<BlobId>().is_ok());
        count(s.parse::<JobId>().is_ok());
    });
    // A hostile peer's outboard and chunks: verification refuses without panicking.
    let data: Vec<u8> = (0..(3 * CHUNK_SIZE + 1000))
        .map(|i| (i % 251) as u8)
        .collect();
    let good = Outboard::compute(&data);
    let blob = good.blob();
    let (ok2, f2) = run(
        "outboards and chunks",
        (
            prop::collection::vec(any::<[u8; 32]>(), 0..6),
            any::<u64>(),
            0..6u64,
            prop::collection::vec(any::<u8>(), 0..64),
            any::<bool>(),
        ),
        |(cvs, size, index, junk, real_cvs)| {
            let claimed = BlobRef {
                id: blob.id,
                size: if real_cvs { blob.size } else { size },
            };
            let cvs = if real_cvs { good.cvs().to_vec() } else { cvs };
            count(Outboard::verify(claimed, cvs).is_ok());
            // A chunk with a few bytes changed never verifies.
            if index < blob.chunk_count() {
                let r = blob.chunk_range(index);
                let mut chunk = data[r.start as usize..r.end as usize].to_vec();
                assert!(good.verify_chunk(index, &chunk).is_ok());
                if !junk.is_empty() {
                    let at = junk[0] as usize * 997 % chunk.len();
                    chunk[at] ^= junk[junk.len() - 1] | 1;
                    assert!(
                        good.verify_chunk(index, &chunk).is_err(),
                        "a corrupt chunk verified"
                    );
                }
                assert!(good.verify_chunk(index, &junk).is_err() || junk.len() == chunk.len());
            }
            count(good.verify_chunk(index, &junk).is_ok());
        },
    );
    fault_line(
        "tickets, node ids, blob ids, job ids: arbitrary strings",
        f1,
        ok1,
    );
    fault_line("blob outboard and chunk verification: random outboards, corrupted chunks (every corrupted chunk refused)", f2, ok2);
    assert!(ok1 && ok2);
}

const VALID_JOB: &str = r#"name = "primes"
module = "m.wasm"
quorum = 2
max_replicas = 6
fuel = 20_000_000_000
memory_mb = 256
max_output = 1048576
deadline_secs = 600

[tasks]
count = 3
args = ["block", "{i}", "100"]

[[task]]
args = ["x"]
input = "inputs/x.bin"
"#;

/// Mutated job files may ask for millions of tasks (legal up to the limit, but slow to
/// expand in a property test): skip those.
fn too_big(text: &str) -> bool {
    match toml::from_str::<toml::Value>(text) {
        Ok(v) => v
            .get("tasks")
            .and_then(|t| t.get("count"))
            .and_then(|c| c.as_integer())
            .is_some_and(|c| c > 100_000),
        Err(_) => false,
    }
}

#[test]
fn job_file_parser_survives_arbitrary_and_mutated_text() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::create_dir_all(dir.path().join("inputs")).unwrap();
    std::fs::write(dir.path().join("inputs/x.bin"), b"x").unwrap();
    let base = dir.path().to_path_buf();
    let path = base.join("job.toml");
    assert!(
        JobSpec::parse(VALID_JOB, &base, &path).is_ok(),
        "the sample job parses"
    );
    let parse = |text: &str| {
        if too_big(text) {
            return;
        }
        match JobSpec::parse(text, &base, &path) {
            Ok(spec) => {
                count(true);
                assert!(
                    !spec.tasks.is_empty()
                        && spec.limits.quorum >= 1
                        && spec.limits.max_replicas >= spec.limits.quorum
                );
            }
            Err(e) => {
                count(false);
                let text = e.to_string();
                assert!(
                    text.starts_with("job file ") && !text.contains('\n'),
                    "one-line error naming the file: {text:?}"
                );
            }
        }
        let _ = toml::from_str::<JobFile>(text);
    };
    let (ok1, f1) = run("job files: arbitrary text", "\\PC{0,400}", |s: String| {
        parse(&s)
    });
    let (ok2, f2) = run(
        "job files: mutated",
        (
            prop::collection::vec(mutation(), 1..5),
            prop::collection::vec((any::<prop::sample::Index>(), "[\\PC\\n]{0,24}"), 0..3),
        ),
        |(muts, inserts)| {
            let mut bytes = VALID_JOB.as_bytes().to_vec();
            for m in &muts {
                if !matches!(m, Mutation::Prefix { .. }) {
                    apply(&mut bytes, m);
                }
            }
            // Invalid UTF-8 cannot be a &str: the file reader refuses it before the parser.
            let mut text = String::from_utf8_lossy(&bytes).into_owned();
            for (at, s) in inserts {
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                text.insert_str(i, &s);
            }
            parse(&text);
        },
    );
    // Structured: real keys, hostile values.
    let value = prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e400".to_string()),
        Just("\"\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\"../../etc/passwd\"".to_string()),
        (0..100_000u64).prop_map(|n| n.to_string()),
        "\"\\PC{0,20}\"",
    ];
    let key = prop::sample::select(vec![
        "name",
        "module",
        "quorum",
        "max_replicas",
        "fuel",
        "memory_mb",
        "max_output",
        "deadline_secs",
        "bogus",
    ]);
    let (ok3, f3) = run(
        "job files: hostile values",
        (
            prop::collection::vec((key, value.clone()), 0..6),
            prop::option::of(value.clone()),
            prop::collection::vec(value, 0..3),
        ),
        |(fields, count, args)| {
            // A valid job whose fields are overridden (or joined by an unknown key).
            let mut keys: std::collections::BTreeMap<&str, String> = [
                ("name", "\"p\"".to_string()),
                ("module", "\"m.wasm\"".to_string()),
            ]
            .into_iter()
            .collect();
            for (k, v) in fields {
                keys.insert(k, v);
            }
            let mut text: String = keys.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
            text += &format!(
                "[tasks]\ncount = {}\nargs = [{}]\n",
                count.unwrap_or_else(|| "2".into()),
                args.join(", ")
            );
            parse(&text);
        },
    );
    fault_line("job file parser: arbitrary text", f1, ok1);
    fault_line(
        "job file parser: the sample job with 1-4 mutations and inserted text",
        f2,
        ok2,
    );
    fault_line(
        "job file parser: real keys with hostile values (negative, huge, wrong type, paths)",
        f3,
        ok3,
    );
    assert!(ok1 && ok2 && ok3);
}
