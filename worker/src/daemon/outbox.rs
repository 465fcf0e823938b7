//! Results waiting to be acknowledged by the coordinator, persisted so that no finished work
//! is lost to a disconnect, a restart or `kill -9`.
//!
//! Results are written in batches (group commit): every result that finished while the
//! previous batch was being written goes into one segment file,
//! `<data-dir>/outbox/<first-replica>-<seq>.reports` (postcard `Vec<Report>`), written to a temporary
//! name, fsynced and renamed, before any of its reports is sent. A segment is deleted once
//! the coordinator has acknowledged (or refused) every report in it. The disk work runs on a
//! blocking thread ([`Outbox::persist`] is a plain function over [`Segment`]), so the
//! daemon's loop never waits on fsync.
//!
//! Acknowledgements of a segment that still holds unacknowledged reports are appended to its
//! tombstone `<segment>.acked` (replica ids, u64 little-endian), without fsync: a tombstone
//! lost to a crash only means those reports are sent once more after the restart, which the
//! coordinator treats as the duplicates they are. A tombstone never hides an unacknowledged
//! report, so nothing finished is lost either way.
//!
//! Segments from older versions (`<replica>.report`, one report each) are still read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tasks::wire::{self, ReplicaId, Report};

/// A batch of reports bound for one segment file.
#[derive(Debug, Clone)]
pub struct Segment {
    pub path: PathBuf,
    pub reports: Vec<Report>,
}

impl Segment {
    /// Write the segment durably (tmp file, fsync, rename). Runs on a blocking thread.
    pub fn persist(&self) -> std::io::Result<()> {
        tasks::identity::write_private(&self.path, &wire::encode(&self.reports))
    }
}

pub struct Outbox {
    dir: PathBuf,
    /// Durable, unacknowledged reports.
    pending: BTreeMap<ReplicaId, Report>,
    /// Which segment file holds a replica's report, and how many live reports each holds.
    segment_of: HashMap<ReplicaId, PathBuf>,
    live: HashMap<PathBuf, usize>,
    /// Makes segment names unique across batches and restarts.
    next_seq: u64,
}

impl Outbox {
    /// Open the outbox, loading every report a previous run left unacknowledged. A file that
    /// does not decode (torn by a crash before its rename, or corrupted) is moved aside.
    pub fn open(dir: &Path) -> anyhow::Result<Outbox> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ob = Outbox {
            dir: dir.to_path_buf(),
            pending: BTreeMap::new(),
            segment_of: HashMap::new(),
            live: HashMap::new(),
            next_seq: 0,
        };
        ob.next_seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let reports = match path.extension().and_then(|e| e.to_str()) {
                Some("reports") => {
                    wire::decode::<Vec<Report>>(&std::fs::read(&path)?).map(|mut reports| {
                        let acked = read_tombstone(&tombstone(&path));
                        reports.retain(|r| !acked.contains(&r.replica));
                        reports
                    })
                }
                Some("acked") => {
                    // A tombstone whose segment was deleted (the crash fell between the two).
                    if !path.with_extension("reports").exists() {
                        let _ = std::fs::remove_file(&path);
                    }
                    continue;
                }
                Some("report") => wire::decode::<Report>(&std::fs::read(&path)?).map(|r| vec![r]),
                Some("tmp") => {
                    // A batch torn by a crash before its rename was never sent: its tasks
                    // are reissued by the coordinator after their deadline.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                _ => continue,
            };
            match reports {
                Ok(reports) => ob.adopt(Segment { path, reports }),
                Err(e) => {
                    tracing::warn!(file = %path.display(), "unreadable saved results ({e}); moving them aside");
                    let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                }
            }
        }
        Ok(ob)
    }

    /// A segment for these reports (not yet written: call [`Segment::persist`], then
    /// [`Outbox::adopt`]).
    pub fn segment(&mut self, reports: Vec<Report>) -> Segment {
        let first = reports.first().map(|r| r.replica).unwrap_or_default();
        self.next_seq += 1;
        Segment {
            path: self
                .dir
                .join(format!("{first}-{:x}.reports", self.next_seq)),
            reports,
        }
    }

    /// Take a durably written segment into the outbox.
    pub fn adopt(&mut self, seg: Segment) {
        let mut n = 0;
        for r in seg.reports {
            match self.segment_of.insert(r.replica, seg.path.clone()) {
                // The same replica twice in one segment: counted once.
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
        if n == 0 {
            let _ = std::fs::remove_file(&seg.path);
            let _ = std::fs::remove_file(tombstone(&seg.path));
        } else {
            *self.live.entry(seg.path).or_default() += n;
        }
    }

    /// Persist one report synchronously (tests and small callers).
    pub fn add(&mut self, report: Report) -> std::io::Result<()> {
        let seg = self.segment(vec![report]);
        seg.persist()?;
        self.adopt(seg);
        Ok(())
    }

    /// One report of the segment at `path` is no longer live; returns whether the segment
    /// still holds live reports (it is deleted, with its tombstone, when none is left).
    fn release(&mut self, path: &PathBuf) -> bool {
        let Some(n) = self.live.get_mut(path) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return true;
        }
        self.live.remove(path);
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(tombstone(path));
        false
    }

    /// The coordinator has committed (or refused) this report: forget it; a segment whose
    /// reports are all forgotten is deleted.
    pub fn remove(&mut self, replica: ReplicaId) {
        self.remove_all(&[replica]);
    }

    /// [`Outbox::remove`] for a batch of acknowledgements: one tombstone append per segment.
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
            if self.live.contains_key(&path) {
                append_tombstone(&tombstone(&path), &ids);
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

/// The tombstone of a segment: the acknowledged replicas among its reports.
fn tombstone(segment: &Path) -> PathBuf {
    segment.with_extension("acked")
}

fn read_tombstone(path: &Path) -> Vec<ReplicaId> {
    std::fs::read(path)
        .map(|b| {
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        })
        .unwrap_or_default()
}

/// Best effort, no fsync (see the module doc): a failure only means a resend after a restart.
fn append_tombstone(path: &Path, ids: &[ReplicaId]) {
    use std::io::Write;
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(&bytes));
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

    #[test]
    fn a_batch_is_one_file_deleted_when_its_last_report_is_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        let seg = ob.segment(vec![report(5), report(6), report(7)]);
        seg.persist().unwrap();
        ob.adopt(seg);
        assert_eq!(files(dir.path()).len(), 1, "one file per batch");
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

    #[test]
    fn a_lost_tombstone_only_resends_acked_reports_and_never_hides_unacked_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        let seg = ob.segment(vec![report(5), report(6), report(7)]);
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
    fn old_single_report_files_are_still_read_and_torn_batches_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("3.report"), wire::encode(&report(3))).unwrap();
        std::fs::write(dir.path().join("4.tmp"), b"torn").unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(ob.pending().map(|r| r.replica).collect::<Vec<_>>(), vec![3]);
        ob.remove(3);
        assert!(files(dir.path()).is_empty());
    }
}
