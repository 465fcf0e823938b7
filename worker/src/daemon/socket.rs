//! The local control socket: how `worker status | pause | resume` talk to the running
//! `worker join` of a data dir.
//!
//! A Unix socket at `DATA_DIR/`[`SOCKET_FILE`], mode 0600, and a connecting process must
//! run as the worker's own user, or as root (who can stop the process anyway: that is how
//! an operator reaches a worker running under systemd's `DynamicUser=`), checked with
//! `SO_PEERCRED`: the socket file's mode keeps other users out on most systems, the
//! credential check on all of them. The protocol is
//! deliberately tiny and bounded: one connection carries one request, a single JSON line of
//! at most [`MAX_REQUEST`] bytes (`{"cmd":"status"}`, `"pause"` or `"resume"`), read within
//! [`IO_TIMEOUT`]; the answer is one JSON line, the worker's [`WorkerState`] after the
//! command (or `{"error": "..."}`), and the connection closes.

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The socket's file name inside the data dir.
pub const SOCKET_FILE: &str = "control.sock";
/// Longest request line accepted, in bytes (a real one is about 20).
pub const MAX_REQUEST: usize = 1024;
/// Longest answer a client reads, in bytes (a status of 256 slots × 64 tasks fits).
pub const MAX_REPLY: u64 = 4 << 20;
/// How long either side waits on the other for one request or one answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections handled at once; more wait in the listen backlog.
const MAX_CONCURRENT: usize = 8;

/// What a client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Report the worker's state.
    Status,
    /// Hold every task where it is and take no new work until `Resume`.
    Pause,
    /// Undo `Pause` (tasks still wait while `--idle-only` finds the machine busy).
    Resume,
}

/// Why tasks are paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    /// `worker pause` (until `worker resume`).
    Command,
    /// `--idle-only` and the machine is busy with other work.
    IdlePolicy,
}

/// A task the worker holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub replica: u64,
    /// `JOB/INDEX`.
    pub task: String,
    /// `preparing` (fetching blobs, compiling), `queued` (waiting for a slot), `running`.
    pub state: String,
    /// Seconds since the assignment arrived.
    pub in_hand_secs: f64,
    /// Seconds since a slot began running it (pauses included).
    pub running_secs: Option<f64>,
    /// Yields the guest reached (one every `sandbox::engine::YIELD_FUEL` fuel): grows only while it executes, so two readings that
    /// agree while `held` show that a pause took hold.
    pub ticks: u64,
    /// The guest is blocked by a pause right now.
    pub held: bool,
}

/// The answer to every request: the worker's state (after the command).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    pub node_id: String,
    pub data_dir: String,
    /// The coordinator's address, from the ticket.
    pub coordinator: String,
    pub connected: bool,
    /// Where the coordinator sees this worker (its NAT's public address, if any).
    pub observed_addr: Option<String>,
    pub slots: usize,
    pub priority: String,
    /// `--cpu-limit`: each slot uses at most this percentage of a core.
    pub cpu_limit: Option<u8>,
    pub paused: bool,
    pub pause_reasons: Vec<PauseReason>,
    pub tasks: Vec<TaskInfo>,
    /// Tasks run to the end since start.
    pub completed: u64,
    /// Results sent to the coordinator since start.
    pub reported: u64,
    /// Results the coordinator acknowledged since start.
    pub acknowledged: u64,
    /// Results waiting in the outbox for an acknowledgement.
    pub unacknowledged: u64,
    /// Credit as the coordinator counts it, when known (workers are not told: `null`; see
    /// `coordinator status`).
    pub credit: Option<f64>,
    pub uptime_secs: f64,
}

/// A request handed to the daemon's loop, with where to answer.
pub type Call = (Request, oneshot::Sender<WorkerState>);

/// Why a control request failed. Every message is one line saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no worker running with data dir {dir} (socket {socket} absent)")]
    Absent { dir: String, socket: String },
    #[error("no worker running with data dir {dir} (socket {socket} refuses connections: left by a worker that stopped uncleanly)")]
    Stale { dir: String, socket: String },
    #[error("a worker is already running with data dir {dir} (its socket {socket} answers); stop it first or use another --data-dir")]
    AlreadyRunning { dir: String, socket: String },
    #[error("control socket {socket}: {source}")]
    Io {
        socket: String,
        source: std::io::Error,
    },
    #[error("the worker refused the request: {0}")]
    Refused(String),
    #[error("unexpected answer from the worker: {0}")]
    Protocol(String),
}

fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// The listening socket of a running worker; removes its file when dropped.
pub struct Listener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Listener {
    /// Bind `DATA_DIR/control.sock` (mode 0600). A socket file that still answers belongs to
    /// a running worker: refused, since two workers must never share a data dir. One that
    /// does not is a leftover and is replaced.
    pub fn bind(data_dir: &Path) -> Result<Listener, ControlError> {
        let path = socket_path(data_dir);
        let io = |source| ControlError::Io {
            socket: path.display().to_string(),
            source,
        };
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(ControlError::AlreadyRunning {
                    dir: data_dir.display().to_string(),
                    socket: path.display().to_string(),
                });
            }
            std::fs::remove_file(&path).map_err(io)?;
        }
        let listener = tokio::net::UnixListener::bind(&path).map_err(io)?;
        // Owner only. (A connection in the instant before this is still checked by uid.)
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        Ok(Listener { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept connections until `cancel`, handing each request to the daemon through
    /// `calls`.
    pub async fn serve(self, calls: mpsc::Sender<Call>, cancel: CancellationToken) {
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                s = self.listener.accept() => match s {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("control socket: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let calls = calls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = handle(stream, calls).await {
                    tracing::debug!("control socket: {e}");
                }
            });
        }
    }
}

/// The effective uid of this process.
fn my_uid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

async fn handle(
    mut stream: tokio::net::UnixStream,
    calls: mpsc::Sender<Call>,
) -> Result<(), String> {
    let uid = stream.peer_cred().map_err(|e| e.to_string())?.uid();
    if uid != my_uid() && uid != 0 {
        tracing::warn!(uid, "control socket: refused a process of another user");
        let _ = write_line(
            &mut stream,
            &serde_json::json!({"error": "only the worker's own user (or root) may control it"}),
        )
        .await;
        return Err(format!("peer uid {uid} refused"));
    }
    let mut line = Vec::new();
    let read = tokio::time::timeout(IO_TIMEOUT, async {
        let mut limited = tokio::io::BufReader::new((&mut stream).take(MAX_REQUEST as u64 + 1));
        limited.read_until(b'\n', &mut line).await
    })
    .await;
    let answer = match read {
        Err(_) => return Err("no request in time".into()),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            serde_json::json!({"error": format!("request longer than {MAX_REQUEST} bytes")})
        }
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => serde_json::json!({"error": format!("bad request: {e}")}),
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                if calls.send((req, tx)).await.is_err() {
                    serde_json::json!({"error": "the worker is shutting down"})
                } else {
                    match tokio::time::timeout(IO_TIMEOUT, rx).await {
                        Ok(Ok(state)) => serde_json::to_value(state).map_err(|e| e.to_string())?,
                        _ => serde_json::json!({"error": "the worker did not answer in time"}),
                    }
                }
            }
        },
    };
    write_line(&mut stream, &answer).await
}

async fn write_line(
    stream: &mut tokio::net::UnixStream,
    v: &serde_json::Value,
) -> Result<(), String> {
    let mut text = v.to_string();
    text.push('\n');
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| "client stopped reading".to_string())?
    .map_err(|e| e.to_string())
}

/// Send `req` to the worker running with `data_dir` and return its state (blocking, bounded
/// by [`IO_TIMEOUT`] per step).
pub fn request(data_dir: &Path, req: Request) -> Result<WorkerState, ControlError> {
    let path = socket_path(data_dir);
    let shown = || path.display().to_string();
    let io = |source| ControlError::Io {
        socket: shown(),
        source,
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ControlError::Absent {
                dir: data_dir.display().to_string(),
                socket: shown(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(ControlError::Stale {
                dir: data_dir.display().to_string(),
                socket: shown(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_string(&req).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = Vec::new();
    std::io::BufReader::new((&mut stream).take(MAX_REPLY))
        .read_until(b'\n', &mut answer)
        .map_err(io)?;
    let v: serde_json::Value = serde_json::from_slice(&answer)
        .map_err(|e| ControlError::Protocol(format!("not JSON ({e})")))?;
    if let Some(e) = v.get("error") {
        return Err(ControlError::Refused(
            e.as_str().unwrap_or_default().to_string(),
        ));
    }
    serde_json::from_value(v).map_err(|e| ControlError::Protocol(e.to_string()))
}
