//! Results waiting to be acknowledged by the coordinator, persisted so that no finished work
//! is lost to a disconnect, a restart or `kill -9`.
//!
//! One file per replica (`<data-dir>/outbox/<replica>.report`, postcard), written atomically
//! and fsynced before the report is sent; removed when the coordinator acks it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tasks::wire::{self, Report, ReplicaId};

pub struct Outbox {
    dir: PathBuf,
    pending: BTreeMap<ReplicaId, Report>,
}

impl Outbox {
    /// Open the outbox, loading every report a previous run left unacknowledged. A file that
    /// does not decode (torn by a crash before its rename, or corrupted) is moved aside.
    pub fn open(dir: &Path) -> anyhow::Result<Outbox> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut pending = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("report") {
                continue;
            }
            let bytes = std::fs::read(&path)?;
            match wire::decode::<Report>(&bytes) {
                Ok(r) => {
                    pending.insert(r.replica, r);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), "unreadable saved report ({e}); moving it aside");
                    let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                }
            }
        }
        Ok(Outbox { dir: dir.to_path_buf(), pending })
    }

    fn path(&self, replica: ReplicaId) -> PathBuf {
        self.dir.join(format!("{replica}.report"))
    }

    /// Persist a report (durably) before it is sent.
    pub fn add(&mut self, report: Report) -> std::io::Result<()> {
        tasks::identity::write_private(&self.path(report.replica), &wire::encode(&report))?;
        self.pending.insert(report.replica, report);
        Ok(())
    }

    /// The coordinator has committed (or refused) this report: forget it.
    pub fn remove(&mut self, replica: ReplicaId) {
        if self.pending.remove(&replica).is_some() {
            let _ = std::fs::remove_file(self.path(replica));
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

    #[test]
    fn reports_survive_reopen_until_acked_and_corrupt_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        ob.add(report(1)).unwrap();
        ob.add(report(2)).unwrap();
        ob.remove(1);
        std::fs::write(dir.path().join("9.report"), b"\xff\xff garbage").unwrap();
        drop(ob);
        let ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(ob.pending().map(|r| r.replica).collect::<Vec<_>>(), vec![2]);
        assert!(dir.path().join("9.corrupt").exists());
    }
}
