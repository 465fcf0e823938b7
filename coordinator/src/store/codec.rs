//! How both backends ([`super::SqliteStore`], [`super::PostgresStore`]) turn records into
//! columns and back: one table layout, one encoding, so the two stores cannot drift apart.

use tasks::wire::{JobState, TaskFailure, TaskResult, TaskState};
use tasks::{BlobId, ResultDigest, RunResult};

use super::{Decision, Output, ReplicaPhase, StoreError};

pub(super) fn state_str(s: JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Done => "done",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

pub(super) fn parse_state(s: &str) -> Result<JobState, StoreError> {
    Ok(match s {
        "running" => JobState::Running,
        "done" => JobState::Done,
        "failed" => JobState::Failed,
        "cancelled" => JobState::Cancelled,
        _ => return Err(StoreError::Corrupt(format!("job state {s:?}"))),
    })
}

pub(super) fn phase_code(p: ReplicaPhase) -> i64 {
    match p {
        ReplicaPhase::InFlight => 0,
        ReplicaPhase::Reported => 1,
        ReplicaPhase::Lost => 2,
        ReplicaPhase::Cancelled => 3,
    }
}

pub(super) fn parse_phase(c: i64) -> Result<ReplicaPhase, StoreError> {
    Ok(match c {
        0 => ReplicaPhase::InFlight,
        1 => ReplicaPhase::Reported,
        2 => ReplicaPhase::Lost,
        3 => ReplicaPhase::Cancelled,
        _ => return Err(StoreError::Corrupt(format!("replica phase {c}"))),
    })
}

pub(super) fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("store records serialize")
}

pub(super) fn dec<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(super) fn id32(b: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
    b.try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is not 32 bytes")))
}

/// A task row's decision from its `state, digest, result, fingerprint, agreeing, reason`
/// columns (`None`: pending).
pub(super) fn read_decision(
    state: &str,
    digest: Option<Vec<u8>>,
    result: Option<Vec<u8>>,
    fingerprint: Option<String>,
    agreeing: Option<Vec<u8>>,
    reason: Option<String>,
) -> Result<Option<Decision>, StoreError> {
    Ok(match state {
        "accepted" => Some(Decision::Accepted {
            digest: ResultDigest(id32(digest.unwrap_or_default(), "digest")?),
            result: dec(&result.unwrap_or_default(), "task result")?,
            fingerprint: fingerprint.unwrap_or_default(),
            agreeing: dec(&agreeing.unwrap_or_default(), "agreeing workers")?,
        }),
        "failed" => Some(Decision::Failed {
            reason: reason.unwrap_or_default(),
        }),
        "pending" => None,
        other => return Err(StoreError::Corrupt(format!("task state {other:?}"))),
    })
}

/// A task row's output from its `output` (inline bytes) and `output_blob` (blob id) columns.
pub(super) fn read_output(
    inline: Option<Vec<u8>>,
    blob: Option<Vec<u8>>,
) -> Result<Option<Output>, StoreError> {
    Ok(match (inline, blob) {
        (Some(b), _) => Some(Output::Inline(b)),
        (None, Some(id)) => Some(Output::Blob(BlobId(id32(id, "output blob")?))),
        _ => None,
    })
}

/// The submitter's view of decided task `index` (`None` for a pending one).
pub(super) fn task_result(index: u32, decision: Option<Decision>) -> Option<TaskResult> {
    Some(match decision? {
        Decision::Accepted {
            result, agreeing, ..
        } => TaskResult {
            index,
            status: TaskState::Accepted,
            outcome: Some(result.status),
            output_hash: Some(result.output_hash),
            output_len: Some(result.output_len),
            fuel_used: Some(result.fuel_used),
            agreeing_workers: agreeing,
            reason: None,
            output: None,
        },
        Decision::Failed { reason } => TaskResult {
            index,
            status: TaskState::Failed,
            outcome: None,
            output_hash: None,
            output_len: None,
            fuel_used: None,
            agreeing_workers: Vec::new(),
            reason: Some(reason),
            output: None,
        },
    })
}

/// A decided task's row (`state, result, reason` columns) as an entry of a failures page,
/// with the accepted result's encoding (the stderr shown is one of its replicas'); `None`
/// for a task accepted with an `ok` outcome.
pub(super) fn task_failure(
    index: u32,
    state: &str,
    result: Option<Vec<u8>>,
    reason: Option<String>,
) -> Result<Option<(TaskFailure, Option<Vec<u8>>)>, StoreError> {
    if state != "accepted" {
        let failure = TaskFailure {
            index,
            status: TaskState::Failed,
            outcome: None,
            exit_code: 0,
            trap: String::new(),
            reason,
            stderr: None,
        };
        return Ok(Some((failure, None)));
    }
    let encoded = result.unwrap_or_default();
    let result: RunResult = dec(&encoded, "task result")?;
    if result.status == tasks::Status::Ok {
        return Ok(None);
    }
    let failure = TaskFailure {
        index,
        status: TaskState::Accepted,
        outcome: Some(result.status),
        exit_code: result.exit_code,
        trap: result.trap,
        reason: None,
        stderr: None,
    };
    Ok(Some((failure, Some(encoded))))
}
