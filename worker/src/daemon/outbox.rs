//! Results waiting to be acknowledged by the coordinator, persisted so that no finished work
//! is lost to a disconnect, a restart or `kill -9`.
//!
//! Results are written in batches (group commit): every result that finished while the
//! previous batch was being written is one record appended to the current log file,
//! `<data-dir>/outbox/<first-replica>-<seq>.log`, and the log is fsynced (`fdatasync`) before
//! any of the batch's reports is sent (unless the batch is cheap to redo, below). A record is `u32` little-endian payload length, the
//! payload's blake3 (32 bytes), then the payload (postcard `Vec<Report>`), so a record torn
//! by a crash (which was never sent) ends the log when it is read back. The disk work runs on
//! a blocking thread ([`Segment::persist`] is a plain function), so the daemon's loop never
//! waits on fsync. Batches of cheap results are written without the fsync ([`SyncBudget`]):
//! they survive `kill -9` all the same, and only a crash of the machine can cost them, which
//! the coordinator recovers from by reissuing them.
//!
//! One file per batch, as before, made the file system the bottleneck of tiny tasks: ext4
//! spent most of the worker's CPU time looking for a free inode among recently deleted ones
//! (`recently_deleted`) for each new batch file. Appending to one log creates a file only
//! every [`ROTATE_BYTES`]: the log then stops taking records, and is deleted (with its
//! tombstone) once the coordinator has acknowledged (or refused) every report in it. A
//! batch that fails to write stops its log too (a torn record must stay the last one).
//!
//! The current log stays open from its first record until it rotates (no `openat` per group
//! commit), and so does its tombstone once an acknowledgement was noted in it: tiny tasks
//! commit hundreds of batches a second, and opening the two files for each was 5% of the
//! worker's time.
//!
//! Acknowledgements of reports in a log are appended to its tombstone `<log>.acked` (replica
//! ids, u64 little-endian), without fsync: a tombstone lost to a crash only means those
//! reports are sent once more after the restart, which the coordinator treats as the
//! duplicates they are. A tombstone never hides an unacknowledged report, so nothing finished
//! is lost either way.
//!
//! Files of older versions are still read: one batch per file (`*.reports`, postcard
//! `Vec<Report>`, with the same tombstones) and one report per file (`*.report`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tasks::wire::{self, ReplicaId, Report};

/// A log stops taking records once it holds this many bytes (then a new one is started, and
/// the old one is deleted when its last report is acknowledged).
pub const ROTATE_BYTES: u64 = 4 << 20;

/// Bytes before a record's payload: its length (u32) and blake3 (32 bytes).
const RECORD_HEADER: usize = 4 + 32;

/// The open append handle of a log, shared by its batches: opened by the first
/// [`Segment::persist`] to the log, closed when the log rotates and its last batch is done.
type LogFile = Arc<Mutex<Option<File>>>;

/// A batch of reports bound for one record of the log at `path`.
#[derive(Debug, Clone)]
pub struct Segment {
    pub path: PathBuf,
    pub reports: Vec<Report>,
    /// Bytes appended by [`Segment::persist`]; `None` until it succeeded.
    written: Option<u64>,
    /// Whether [`Segment::persist`] ends with `fdatasync` (the default); see [`SyncBudget`].
    pub sync: bool,
    /// The log's handle, opened by the first `persist` (files read back at open never are).
    file: LogFile,
}

impl Segment {
    /// Append the batch to its log (one write, then `fdatasync` unless [`Segment::sync`] was
    /// cleared). Runs on a blocking thread.
    pub fn persist(&mut self) -> std::io::Result<()> {
        let payload = wire::encode(&self.reports);
        let len = u32::try_from(payload.len())
            .map_err(|_| std::io::Error::other("an outbox batch over 4 GiB"))?;
        let mut record = Vec::with_capacity(RECORD_HEADER + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(blake3::hash(&payload).as_bytes());
        record.extend_from_slice(&payload);
        let open = || {
            let mut opts = std::fs::OpenOptions::new();
            opts.append(true).create(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            opts.open(&self.path)
        };
        // One batch writes at a time (the lock), each record whole and in order.
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(open()?);
        }
        let f = guard.as_mut().expect("opened above");
        f.write_all(&record)?;
        if self.sync {
            f.sync_data()?;
        }
        self.written = Some(record.len() as u64);
        Ok(())
    }
}

/// Which batches are worth an `fdatasync`: the outbox is synced once the results written
/// since its last sync took [`SYNC_COMPUTE`] of guest time to compute; batches of cheaper
/// results are only written. A written result survives a killed worker (the kernel holds
/// it); only a crash of the whole machine can lose it (or tear the log's last records, which
/// reading drops), and then the coordinator takes those replicas back when the worker
/// reconnects (its `Holding` does not name them) and reissues them: at most about
/// `SYNC_COMPUTE` of computing is redone. A batch holding the result of a task that made
/// checkpoints is always synced (its checkpoints are deleted once the result is in the
/// outbox). Tiny tasks finish hundreds of batches a second, and one `fdatasync` per batch
/// was what they waited on.
#[derive(Debug, Default)]
pub struct SyncBudget {
    unsynced: Duration,
}

/// See [`SyncBudget`].
pub const SYNC_COMPUTE: Duration = Duration::from_secs(1);

impl SyncBudget {
    /// Count a batch's results (their `wall_ms`: this worker's own measure) and say whether
    /// its write must be synced. `checkpointed`: the batch holds the result of a task that
    /// made checkpoints. Always synced: its `wall_ms` counts only the run since the last
    /// resume, and its checkpoint is deleted once the result is in the outbox.
    pub fn sync_batch(&mut self, reports: &[Report], checkpointed: bool) -> bool {
        self.unsynced += reports
            .iter()
            .map(|r| Duration::from_millis(r.wall_ms))
            .sum::<Duration>();
        let sync = checkpointed || self.unsynced >= SYNC_COMPUTE;
        if sync {
            self.unsynced = Duration::ZERO;
        }
        sync
    }
}

/// The records of a log that are intact, in order: reading stops at the first torn or
/// corrupted one (a crash mid-append; nothing is ever appended after a failed write).
fn read_log(bytes: &[u8]) -> Vec<Report> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= RECORD_HEADER {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let Some(payload) = rest.get(RECORD_HEADER..RECORD_HEADER.saturating_add(len)) else {
            break;
        };
        if blake3::hash(payload).as_bytes()[..] != rest[4..RECORD_HEADER] {
            break;
        }
        match wire::decode::<Vec<Report>>(payload) {
            Ok(reports) => out.extend(reports),
            Err(_) => break,
        }
        rest = &rest[RECORD_HEADER + len..];
    }
    out
}

/// The reports of one outbox file not yet acknowledged (its tombstone applied), or `None`
/// for a file that is not an outbox file. `Err` for an unreadable segment of an older version.
fn read_file(path: &Path) -> Option<Result<Vec<Report>, String>> {
    let acked = || read_tombstone(&tombstone(path));
    let reports = match path.extension().and_then(|e| e.to_str())? {
        "log" => Ok(read_log(&std::fs::read(path).ok()?)),
        "reports" => {
            wire::decode::<Vec<Report>>(&std::fs::read(path).ok()?).map_err(|e| e.to_string())
        }
        "report" => wire::decode::<Report>(&std::fs::read(path).ok()?)
            .map(|r| vec![r])
            .map_err(|e| e.to_string()),
        _ => return None,
    };
    Some(reports.map(|mut reports| {
        let acked = acked();
        if !acked.is_empty() {
            reports.retain(|r| !acked.contains(&r.replica));
        }
        reports
    }))
}

/// Every unacknowledged report an outbox directory holds, as a restarted worker would read
/// them (for tests and tools looking at a worker's data dir).
pub fn saved_reports(dir: &Path) -> Vec<Report> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Some(Ok(reports)) = read_file(&entry.path()) {
            out.extend(reports);
        }
    }
    out
}

/// The log records are appended to.
struct Current {
    path: PathBuf,
    /// Bytes in it.
    bytes: u64,
    /// Its append handle, kept open while it takes records.
    file: LogFile,
    /// Its tombstone's append handle, once an acknowledgement was noted in it.
    acked: Option<File>,
}

pub struct Outbox {
    dir: PathBuf,
    /// Durable, unacknowledged reports.
    pending: BTreeMap<ReplicaId, Report>,
    /// Which file holds a replica's report, and how many live reports each holds.
    segment_of: HashMap<ReplicaId, PathBuf>,
    live: HashMap<PathBuf, usize>,
    /// The log taking new records (`None`: the next batch starts one).
    current: Option<Current>,
    /// Batches handed out by [`Outbox::segment`] and not yet adopted, per log: such a log is
    /// never deleted under a write.
    writing: HashMap<PathBuf, usize>,
    rotate_bytes: u64,
    /// Makes file names unique across logs and restarts.
    next_seq: u64,
}

impl Outbox {
    /// Open the outbox, loading every report a previous run left unacknowledged. A file of
    /// an older version that does not decode (corrupted) is moved aside; a log is read up to
    /// its first torn record. New batches go to a new log.
    pub fn open(dir: &Path) -> anyhow::Result<Outbox> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ob = Outbox {
            dir: dir.to_path_buf(),
            pending: BTreeMap::new(),
            segment_of: HashMap::new(),
            live: HashMap::new(),
            current: None,
            writing: HashMap::new(),
            rotate_bytes: ROTATE_BYTES,
            next_seq: 0,
        };
        ob.next_seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("acked") => {
                    // A tombstone whose file was deleted (the crash fell between the two).
                    let owner = ["log", "reports"]
                        .iter()
                        .any(|ext| path.with_extension(ext).exists());
                    if !owner {
                        let _ = std::fs::remove_file(&path);
                    }
                    continue;
                }
                Some("tmp") => {
                    // A batch of an older version torn by a crash before its rename was never
                    // sent: its tasks are reissued by the coordinator after their deadline.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                _ => {}
            }
            match read_file(&path) {
                None => {}
                Some(Ok(reports)) => ob.adopt(Segment {
                    path,
                    reports,
                    written: None,
                    sync: true,
                    file: LogFile::default(),
                }),
                Some(Err(e)) => {
                    tracing::warn!(file = %path.display(), "unreadable saved results ({e}); moving them aside");
                    let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                }
            }
        }
        Ok(ob)
    }

    /// A batch for these reports, bound for the current log (not yet written: call
    /// [`Segment::persist`], then [`Outbox::adopt`]).
    pub fn segment(&mut self, reports: Vec<Report>) -> Segment {
        let (path, file) = match &self.current {
            Some(c) => (c.path.clone(), c.file.clone()),
            None => {
                let first = reports.first().map(|r| r.replica).unwrap_or_default();
                self.next_seq += 1;
                let path = self.dir.join(format!("{first}-{:x}.log", self.next_seq));
                let file = LogFile::default();
                self.current = Some(Current {
                    path: path.clone(),
                    bytes: 0,
                    file: file.clone(),
                    acked: None,
                });
                (path, file)
            }
        };
        *self.writing.entry(path.clone()).or_default() += 1;
        Segment {
            path,
            reports,
            written: None,
            sync: true,
            file,
        }
    }

    /// Take a batch into the outbox: one [`Segment::persist`] wrote (its reports are durable),
    /// or failed to write (they are kept in memory all the same, and its log takes no more
    /// records), or one read back at [`Outbox::open`].
    pub fn adopt(&mut self, seg: Segment) {
        if let Some(w) = self.writing.get_mut(&seg.path) {
            *w -= 1;
            if *w == 0 {
                self.writing.remove(&seg.path);
            }
        }
        if let Some(c) = self.current.as_mut().filter(|c| c.path == seg.path) {
            match seg.written {
                Some(n) => c.bytes += n,
                // Whatever part of the record reached the disk must stay the log's last.
                None => c.bytes = u64::MAX,
            }
            if c.bytes >= self.rotate_bytes {
                self.current = None;
            }
        }
        let mut n = 0;
        for r in seg.reports {
            match self.segment_of.insert(r.replica, seg.path.clone()) {
                // The same replica twice in one file: counted once.
                Some(old) if old == seg.path => {}
                // A newer report of a replica saved before: the old copy is released.
                Some(old) => {
                    self.release(&old);
                    n += 1;
                }
                None => n += 1,
            }
            self.pending.insert(r.replica, r);
        }
        if n > 0 {
            *self.live.entry(seg.path.clone()).or_default() += n;
        }
        self.delete_if_done(&seg.path);
    }

    /// Persist one report synchronously (tests and small callers).
    pub fn add(&mut self, report: Report) -> std::io::Result<()> {
        let mut seg = self.segment(vec![report]);
        let res = seg.persist();
        self.adopt(seg);
        res
    }

    /// Delete the file at `path` (and its tombstone) if it holds no live report, takes no
    /// more records and no batch is being written to it.
    fn delete_if_done(&mut self, path: &PathBuf) -> bool {
        let current = self.current.as_ref().is_some_and(|c| &c.path == path);
        if self.live.contains_key(path) || current || self.writing.contains_key(path) {
            return false;
        }
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(tombstone(path));
        true
    }

    /// One report of the file at `path` is no longer live; returns whether the file is still
    /// there (it is deleted, with its tombstone, when it is done: see `delete_if_done`).
    fn release(&mut self, path: &PathBuf) -> bool {
        let Some(n) = self.live.get_mut(path) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return true;
        }
        self.live.remove(path);
        !self.delete_if_done(path)
    }

    /// The coordinator has committed (or refused) this report: forget it; a file whose
    /// reports are all forgotten is deleted once no more records go to it.
    pub fn remove(&mut self, replica: ReplicaId) {
        self.remove_all(&[replica]);
    }

    /// [`Outbox::remove`] for a batch of acknowledgements: one tombstone append per file.
    pub fn remove_all(&mut self, replicas: &[ReplicaId]) {
        let mut marks: HashMap<PathBuf, Vec<ReplicaId>> = HashMap::new();
        for &replica in replicas {
            if self.pending.remove(&replica).is_none() {
                continue;
            }
            if let Some(path) = self.segment_of.remove(&replica) {
                if self.release(&path) {
                    marks.entry(path).or_default().push(replica);
                }
            }
        }
        for (path, ids) in marks {
            let is_current = self.current.as_ref().is_some_and(|c| c.path == path);
            if !is_current && !self.live.contains_key(&path) && !self.writing.contains_key(&path) {
                // Deleted by a later acknowledgement of this batch: appending would only
                // leave an orphan tombstone behind.
                continue;
            }
            match self.current.as_mut().filter(|c| c.path == path) {
                // The current log's tombstone stays open while the log takes records.
                Some(c) => {
                    let bytes = tombstone_bytes(&ids);
                    let res = match &mut c.acked {
                        Some(f) => f.write_all(&bytes),
                        None => open_tombstone(&tombstone(&path)).and_then(|mut f| {
                            f.write_all(&bytes)?;
                            c.acked = Some(f);
                            Ok(())
                        }),
                    };
                    if let Err(e) = res {
                        // Not kept open after a failure: the next acknowledgement tries anew.
                        c.acked = None;
                        tracing::debug!(file = %path.display(), "cannot note acknowledgements ({e}); they are resent after a restart");
                    }
                }
                None => append_tombstone(&tombstone(&path), &ids),
            }
        }
    }

    pub fn pending(&self) -> impl Iterator<Item = &Report> {
        self.pending.values()
    }

    pub fn contains(&self, replica: ReplicaId) -> bool {
        self.pending.contains_key(&replica)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The tombstone of an outbox file: the acknowledged replicas among its reports.
fn tombstone(segment: &Path) -> PathBuf {
    segment.with_extension("acked")
}

fn read_tombstone(path: &Path) -> HashSet<ReplicaId> {
    std::fs::read(path)
        .map(|b| {
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        })
        .unwrap_or_default()
}

fn tombstone_bytes(ids: &[ReplicaId]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

fn open_tombstone(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Best effort, no fsync (see the module doc): a failure only means a resend after a restart.
fn append_tombstone(path: &Path, ids: &[ReplicaId]) {
    let bytes = tombstone_bytes(ids);
    let res = open_tombstone(path).and_then(|mut f| f.write_all(&bytes));
    if let Err(e) = res {
        tracing::debug!(file = %path.display(), "cannot note acknowledgements ({e}); they are resent after a restart");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasks::{BlobId, RunResult, Status};

    fn report(replica: ReplicaId) -> Report {
        Report {
            replica,
            result: RunResult {
                status: Status::Ok,
                exit_code: 0,
                trap: String::new(),
                fuel_used: 10,
                output_hash: BlobId::of(b"x"),
                output_len: 1,
            },
            output: Some(b"x".to_vec()),
            wall_ms: 1,
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn reports_survive_reopen_until_acked_and_corrupt_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        ob.add(report(1)).unwrap();
        ob.add(report(2)).unwrap();
        ob.remove(1);
        std::fs::write(dir.path().join("9.reports"), b"\xff\xff garbage").unwrap();
        drop(ob);
        let ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(ob.pending().map(|r| r.replica).collect::<Vec<_>>(), vec![2]);
        assert!(dir.path().join("9.corrupt").exists());
    }

    fn log_files(dir: &Path) -> Vec<String> {
        files(dir)
            .into_iter()
            .filter(|f| f.ends_with(".log"))
            .collect()
    }

    /// Cheap results are written without `fdatasync` until a second of guest time is at
    /// stake; the batch that reaches it is synced and the count starts over. The result of a
    /// task that made checkpoints is always synced.
    #[test]
    fn batches_are_synced_once_a_second_of_compute_is_at_stake() {
        let timed = |ms: u64| Report {
            wall_ms: ms,
            ..report(1)
        };
        let mut budget = SyncBudget::default();
        // Tiny tasks (0 ms each): never synced for their own sake.
        assert!(!budget.sync_batch(&vec![timed(0); 500], false));
        assert!(!budget.sync_batch(&[timed(400), timed(500)], false));
        assert!(
            budget.sync_batch(&[timed(100)], false),
            "900 + 100 ms reaches SYNC_COMPUTE"
        );
        assert!(
            !budget.sync_batch(&[timed(999)], false),
            "the count started over"
        );
        // One long result is synced on its own, and so is a cheap one of a task that made
        // checkpoints (they are deleted once it is in the outbox).
        let long = timed(SYNC_COMPUTE.as_millis() as u64);
        assert!(SyncBudget::default().sync_batch(&[long], false));
        assert!(SyncBudget::default().sync_batch(&[timed(0)], true));
    }

    /// A batch written without `fdatasync` is in the log all the same: a worker killed (not
    /// its machine) finds it at the next start.
    #[test]
    fn an_unsynced_batch_is_read_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        let mut seg = ob.segment(vec![report(1), report(2)]);
        seg.sync = false;
        seg.persist().unwrap();
        ob.adopt(seg);
        drop(ob);
        let ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            ob.pending().map(|r| r.replica).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    /// Batches are records appended to one log (no file per batch); a log that reached the
    /// rotation size takes no more, and is deleted with its tombstone once its last report is
    /// acknowledged; the reports survive a restart until then.
    #[test]
    fn batches_append_to_one_log_rotated_by_size_and_deleted_when_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        for batch in [[1, 2], [3, 4], [5, 6]] {
            let mut seg = ob.segment(batch.iter().map(|&r| report(r)).collect());
            seg.persist().unwrap();
            ob.adopt(seg);
        }
        assert_eq!(log_files(dir.path()).len(), 1, "{:?}", files(dir.path()));
        // Drained, the current log stays (it takes the next batches), its tombstone hiding
        // what was acknowledged.
        ob.remove_all(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(log_files(dir.path()).len(), 1);
        assert!(saved_reports(dir.path()).is_empty());
        // Past the rotation size the next batch starts a new log and the drained one goes.
        ob.rotate_bytes = 1;
        let first = log_files(dir.path());
        let mut seg = ob.segment(vec![report(7)]);
        seg.persist().unwrap();
        ob.adopt(seg);
        let mut seg = ob.segment(vec![report(8)]);
        assert_ne!(seg.path, dir.path().join(&first[0]), "a new log");
        seg.persist().unwrap();
        ob.adopt(seg);
        // The old log still holds 7 (unacknowledged): kept, and read back after a restart.
        assert_eq!(log_files(dir.path()).len(), 2);
        drop(ob);
        let mut ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            ob.pending().map(|r| r.replica).collect::<Vec<_>>(),
            vec![7, 8]
        );
        ob.remove_all(&[7, 8]);
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    }

    /// A record torn by a crash mid-append ends the log: the records before it are read,
    /// and a batch that failed to write makes the next batch start a new log.
    #[test]
    fn a_torn_record_ends_the_log_and_a_failed_write_starts_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        let mut seg = ob.segment(vec![report(1), report(2)]);
        seg.persist().unwrap();
        let path = seg.path.clone();
        ob.adopt(seg);
        let mut seg = ob.segment(vec![report(3)]);
        seg.persist().unwrap();
        ob.adopt(seg);
        // Cut the second record in half, as a crash during its write would.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 10).unwrap();
        drop(f);
        assert_eq!(
            saved_reports(dir.path())
                .iter()
                .map(|r| r.replica)
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        // A write that fails (the log's path is now a directory) leaves the reports pending
        // in memory, and the log is not appended to again.
        let mut ob = Outbox::open(dir.path()).unwrap();
        let mut seg = ob.segment(vec![report(4)]);
        let failed = seg.path.clone();
        std::fs::create_dir(&failed).unwrap();
        assert!(seg.persist().is_err());
        ob.adopt(seg);
        assert!(ob.contains(4));
        let seg = ob.segment(vec![report(5)]);
        assert_ne!(seg.path, failed);
    }

    #[test]
    fn a_batch_is_one_record_and_its_log_deleted_when_its_last_report_is_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        let mut seg = ob.segment(vec![report(5), report(6), report(7)]);
        seg.persist().unwrap();
        ob.adopt(seg);
        assert_eq!(files(dir.path()).len(), 1, "one log");
        ob.remove(5);
        ob.remove(7);
        drop(ob);
        let mut ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            ob.pending().map(|r| r.replica).collect::<Vec<_>>(),
            vec![6],
            "acked reports are not resent after a restart"
        );
        ob.remove(6);
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    }

    /// The current log and its tombstone stay open between batches, yet every record and
    /// every acknowledgement is in the files as soon as the call returns: a worker killed
    /// with no destructor run (`kill -9`) is read back as it was. A rotated log's handles
    /// are closed and the log deleted once drained.
    #[test]
    fn the_open_log_and_tombstone_are_written_through_and_closed_at_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        for batch in [[1, 2], [3, 4]] {
            let mut seg = ob.segment(batch.iter().map(|&r| report(r)).collect());
            seg.persist().unwrap();
            ob.adopt(seg);
        }
        ob.remove_all(&[1]);
        ob.remove_all(&[3]);
        let first = log_files(dir.path());
        assert_eq!(first.len(), 1);
        // As after kill -9: nothing dropped, nothing flushed by a destructor.
        let again = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            again.pending().map(|r| r.replica).collect::<Vec<_>>(),
            vec![2, 4]
        );
        drop(again);
        // Rotate: the log takes one more batch and then no more; the next goes to a new log,
        // and the old one, drained, is deleted with its tombstone.
        ob.rotate_bytes = 1;
        let mut seg = ob.segment(vec![report(5)]);
        seg.persist().unwrap();
        ob.adopt(seg);
        assert_eq!(log_files(dir.path()), first);
        let mut seg = ob.segment(vec![report(6)]);
        seg.persist().unwrap();
        ob.adopt(seg);
        assert_eq!(log_files(dir.path()).len(), 2, "{:?}", files(dir.path()));
        ob.remove_all(&[2, 4, 5]);
        assert!(
            !dir.path().join(&first[0]).exists(),
            "{:?}",
            files(dir.path())
        );
        assert!(!dir.path().join(&first[0]).with_extension("acked").exists());
        std::mem::forget(ob);
        let ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(ob.pending().map(|r| r.replica).collect::<Vec<_>>(), vec![6]);
    }

    #[test]
    fn a_lost_tombstone_only_resends_acked_reports_and_never_hides_unacked_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        let mut seg = ob.segment(vec![report(5), report(6), report(7)]);
        seg.persist().unwrap();
        ob.adopt(seg);
        ob.remove_all(&[5, 7]);
        drop(ob);
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "acked") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        let ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            ob.pending().map(|r| r.replica).collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
    }

    #[test]
    fn files_of_older_versions_are_still_read_and_torn_batches_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("3.report"), wire::encode(&report(3))).unwrap();
        std::fs::write(dir.path().join("4.tmp"), b"torn").unwrap();
        // A batch file of the version before logs, with its tombstone.
        std::fs::write(
            dir.path().join("8-1.reports"),
            wire::encode(&vec![report(8), report(9)]),
        )
        .unwrap();
        std::fs::write(dir.path().join("8-1.acked"), 9u64.to_le_bytes()).unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            ob.pending().map(|r| r.replica).collect::<Vec<_>>(),
            vec![3, 8]
        );
        ob.remove_all(&[3, 8]);
        assert!(files(dir.path()).is_empty());
    }
}
