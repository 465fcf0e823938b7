//! Tasks that did not end `ok`, for the scientist: their stderr in `results.json` and a
//! brief mention in `coordinator status JOB`.
//!
//! A task's stderr is untrusted text from a worker (capped by the coordinator): it is never
//! printed raw, control characters (escape sequences included) are removed first.

use std::collections::HashMap;

use tasks::wire::{TaskFailure, TaskState};
use tasks::{JobId, Status};

use crate::client::Client;

/// Tasks shown by `coordinator status JOB`.
const BRIEF: u32 = 5;
/// Characters of stderr shown per task by `coordinator status JOB`.
const BRIEF_CHARS: usize = 160;

/// Every failure of the job with its stderr; on an error (e.g. a coordinator too old to
/// know the request) a warning and nothing, since results are complete without them.
pub async fn fetch(client: &Client, job: JobId) -> Vec<TaskFailure> {
    match client.failures(job).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("warning: cannot get the stderr of failed tasks ({e}); results.json has no \"stderr\" keys");
            Vec::new()
        }
    }
}

/// `text` without control characters other than newline and tab (no terminal escapes, no
/// carriage returns that overwrite lines); invalid UTF-8 becomes U+FFFD.
pub fn clean(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

/// Add `stderr` (and `exit_code` for an `exit`, `trap` for a trap) to the tasks of a
/// `results.json` value that did not end `ok`.
pub fn annotate(results: &mut serde_json::Value, failures: &[TaskFailure]) {
    let by_index: HashMap<u32, &TaskFailure> = failures.iter().map(|f| (f.index, f)).collect();
    let Some(list) = results.get_mut("tasks").and_then(|t| t.as_array_mut()) else {
        return;
    };
    for t in list {
        let Some(f) = t
            .get("index")
            .and_then(|i| i.as_u64())
            .and_then(|i| by_index.get(&(i as u32)))
        else {
            continue;
        };
        annotate_task(t, f);
    }
}

/// Add `stderr` (and `exit_code` or `trap`) to one task object of `results.json`.
pub fn annotate_task(t: &mut serde_json::Value, f: &TaskFailure) {
    let Some(obj) = t.as_object_mut() else {
        return;
    };
    match f.outcome {
        Some(Status::Exit) => {
            obj.insert("exit_code".into(), f.exit_code.into());
        }
        Some(Status::Trap) => {
            obj.insert("trap".into(), clean(f.trap.as_bytes()).into());
        }
        _ => {}
    }
    if let Some(e) = &f.stderr {
        obj.insert("stderr".into(), clean(e).into());
    }
}

/// What became of a task, in a few words: `exit 2`, `trap (unreachable)`, `no quorum: ...`.
fn outcome(f: &TaskFailure) -> String {
    match (f.status, f.outcome) {
        (TaskState::Accepted, Some(Status::Exit)) => format!("exit {}", f.exit_code),
        (TaskState::Accepted, Some(Status::Trap)) if !f.trap.is_empty() => {
            format!("trap ({})", clean(f.trap.as_bytes()))
        }
        (TaskState::Accepted, Some(s)) => s.as_str().to_string(),
        _ => format!(
            "failed: {}",
            clean(f.reason.as_deref().unwrap_or("no quorum").as_bytes())
        ),
    }
}

/// The last non-empty line of a stderr, cleaned and shortened to [`BRIEF_CHARS`].
fn last_line(stderr: &[u8]) -> Option<String> {
    let text = clean(stderr);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    let mut short: String = line.chars().take(BRIEF_CHARS).collect();
    if short.len() < line.len() {
        short.push('…');
    }
    Some(short)
}

/// The lines `coordinator status JOB` prints about tasks that did not end `ok` (none when
/// all did, or the coordinator cannot tell).
pub async fn brief(client: &Client, job: JobId) -> Vec<String> {
    let Ok(page) = client.failures_page(job, None, BRIEF).await else {
        return Vec::new();
    };
    if page.total == 0 {
        return Vec::new();
    }
    let mut lines = vec![format!(
        "job {job}: {} tasks did not end ok{}:",
        page.total,
        if page.total > BRIEF {
            format!(" (the first {BRIEF})")
        } else {
            String::new()
        }
    )];
    for f in &page.failures {
        let mut line = format!("  task {}: {}", f.index, outcome(f));
        if let Some(l) = f.stderr.as_deref().and_then(last_line) {
            line += &format!(" — stderr: {l}");
        }
        lines.push(line);
    }
    lines.push(format!(
        "  (`coordinator results {job} --out DIR` writes each task's stderr to DIR/results.json)"
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(index: u32, outcome: Status, stderr: &[u8]) -> TaskFailure {
        TaskFailure {
            index,
            status: TaskState::Accepted,
            outcome: Some(outcome),
            exit_code: if outcome == Status::Exit { 2 } else { 0 },
            trap: if outcome == Status::Trap {
                "unreachable".into()
            } else {
                String::new()
            },
            reason: None,
            stderr: Some(stderr.to_vec()),
        }
    }

    #[test]
    fn control_characters_are_removed_but_lines_kept() {
        assert_eq!(
            clean(b"red \x1b[31mtext\x1b[0m\r\nnext\tline\x07\x00"),
            "red [31mtext[0m\nnext\tline"
        );
        assert_eq!(clean(&[0x66, 0xff, 0x6f]), "f\u{fffd}o");
    }

    #[test]
    fn results_json_gets_stderr_only_on_failed_tasks() {
        let mut v = serde_json::json!({"job": 1, "tasks": [
            {"index": 0, "status": "accepted", "outcome": "ok"},
            {"index": 1, "status": "accepted", "outcome": "exit"},
            {"index": 2, "status": "accepted", "outcome": "trap"},
        ]});
        annotate(
            &mut v,
            &[
                failure(1, Status::Exit, b"bad input\n"),
                failure(2, Status::Trap, b"\x1b[2Jpanicked"),
            ],
        );
        assert!(v["tasks"][0].get("stderr").is_none());
        assert_eq!(v["tasks"][1]["stderr"], "bad input\n");
        assert_eq!(v["tasks"][1]["exit_code"], 2);
        assert_eq!(v["tasks"][2]["stderr"], "[2Jpanicked");
        assert_eq!(v["tasks"][2]["trap"], "unreachable");
    }

    #[test]
    fn brief_lines_show_the_outcome_and_the_last_stderr_line() {
        let f = failure(1, Status::Exit, b"reading\nerror: bad input\n\n");
        assert_eq!(outcome(&f), "exit 2");
        assert_eq!(
            last_line(f.stderr.as_deref().unwrap()).unwrap(),
            "error: bad input"
        );
        let long = vec![b'x'; 500];
        assert_eq!(last_line(&long).unwrap().chars().count(), BRIEF_CHARS + 1);
        assert_eq!(last_line(b"\n \n"), None);
    }
}
