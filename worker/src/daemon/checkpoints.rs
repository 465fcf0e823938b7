//! Durable checkpoints and held replicas: what lets a worker that was restarted, killed
//! (`kill -9`) or switched off resume its long tasks instead of losing them.
//!
//! Layout under `<data-dir>/checkpoints/`:
//! - `<replica>.ckpt`: the newest state the replica's guest handed `peergrid.checkpoint`,
//!   with the fuel used when it was saved and the blake3 of the state. Written atomically
//!   (tmp file, fsync, rename, fsync of the directory) inside the guest's call, so when the
//!   call returns the state survives a crash. Loading verifies length and hash; a bad file is
//!   discarded with a warning and the task starts from zero (a wrong state would make a
//!   wrong result, which costs the volunteer trust).
//! - `<replica>.assign`: the replica's `ClassedAssignment` (postcard), written when the worker
//!   takes the replica and removed when it ends, so a restarted worker knows what it holds.
//!
//! Bounds: one checkpoint per replica (a new one replaces the old by rename), each at most
//! [`MAX_CHECKPOINT_BYTES`] (the sandbox refuses larger ones), and all of them together at
//! most [`MAX_CHECKPOINT_TOTAL`]: a save that would exceed it is refused (logged; the task
//! goes on and would restart from its previous checkpoint). Both files of a replica are
//! removed when it ends (reported, abandoned, cancelled).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tasks::limits::MAX_CHECKPOINT_BYTES;
use tasks::wire::{Assignment, ClassedAssignment, ReplicaId};

use crate::sandbox::{Checkpoint, CheckpointStore};

/// All checkpoints of one worker together: 1 GiB (16 replicas at the largest state).
pub const MAX_CHECKPOINT_TOTAL: u64 = 1 << 30;

const MAGIC: &[u8; 8] = b"PGCKPT1\0";
const HEADER: usize = 8 + 8 + 8 + 32;

/// The checkpoint directory of a worker (or of `worker exec --checkpoint-dir`).
#[derive(Clone)]
pub struct CheckpointDir {
    inner: Arc<DirInner>,
}

struct DirInner {
    dir: PathBuf,
    /// Bytes on disk per checkpoint file (for the total bound).
    sizes: Mutex<HashMap<String, u64>>,
    /// Keys that may have a file here (found at open, or written since): releasing any other
    /// key, as nearly every replica of a task that never checkpoints is, costs no syscall.
    /// Added before a file is written, so a release never skips a file that exists.
    files: Mutex<HashSet<String>>,
}

impl CheckpointDir {
    /// Open (create) `dir`; leftover tmp files of a crash are removed.
    pub fn open(dir: &Path) -> std::io::Result<CheckpointDir> {
        std::fs::create_dir_all(dir)?;
        let mut sizes = HashMap::new();
        let mut files = HashSet::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            } else if let Some(key) = name.strip_suffix(".ckpt") {
                sizes.insert(key.to_string(), e.metadata()?.len());
                files.insert(key.to_string());
            } else if let Some(key) = name.strip_suffix(".assign") {
                files.insert(key.to_string());
            }
        }
        Ok(CheckpointDir {
            inner: Arc::new(DirInner {
                dir: dir.to_path_buf(),
                sizes: Mutex::new(sizes),
                files: Mutex::new(files),
            }),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// Where checkpoint `key` is kept.
    pub fn file(&self, key: &str) -> PathBuf {
        self.inner.dir.join(format!("{key}.ckpt"))
    }

    /// The store of one task (`key`: a replica id, or a name for `worker exec`).
    pub fn store(&self, key: &str) -> Arc<FileCheckpoint> {
        Arc::new(FileCheckpoint {
            dir: self.clone(),
            key: key.to_string(),
            progress: Mutex::new(None),
            holding: Mutex::new(None),
        })
    }

    /// The store of a replica: its first checkpoint also records `a` as held (so only tasks
    /// that checkpoint cost a file and an fsync per assignment).
    pub fn replica_store(&self, a: &ClassedAssignment) -> Arc<FileCheckpoint> {
        let s = self.store(&a.assignment.replica.to_string());
        *s.holding.lock().expect("holding lock poisoned") = Some(a.clone());
        s
    }

    /// Read and verify checkpoint `key`; a file that fails verification is removed. A key
    /// with no file (found at open or written since) costs no syscall: every run starts with
    /// a load, and nearly every replica has nothing to resume (an `openat` failing with
    /// `ENOENT` per run was ~5% of a worker's time on tiny tasks).
    pub fn load(&self, key: &str) -> Option<Checkpoint> {
        if !self
            .inner
            .files
            .lock()
            .expect("checkpoint files poisoned")
            .contains(key)
        {
            return None;
        }
        let path = self.file(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(
                    "cannot read checkpoint {}: {e}; starting from zero",
                    path.display()
                );
                return None;
            }
        };
        match decode(&bytes) {
            Ok(c) => Some(c),
            Err(why) => {
                tracing::warn!(
                    "checkpoint {} is damaged ({why}): discarded, the task starts from zero",
                    path.display()
                );
                self.remove(key);
                None
            }
        }
    }

    /// Keep `ckpt` as checkpoint `key`, atomically and durably.
    pub fn save(&self, key: &str, ckpt: &Checkpoint) -> Result<(), String> {
        if ckpt.data.len() > MAX_CHECKPOINT_BYTES {
            return Err(format!(
                "{} bytes is over the limit of {MAX_CHECKPOINT_BYTES}",
                ckpt.data.len()
            ));
        }
        let size = (HEADER + ckpt.data.len()) as u64;
        {
            let sizes = self.inner.sizes.lock().expect("checkpoint sizes poisoned");
            let others: u64 = sizes
                .iter()
                .filter(|(k, _)| k.as_str() != key)
                .map(|(_, s)| *s)
                .sum();
            if others.saturating_add(size) > MAX_CHECKPOINT_TOTAL {
                return Err(format!(
                    "the worker's checkpoints would exceed {MAX_CHECKPOINT_TOTAL} bytes"
                ));
            }
        }
        let path = self.file(key);
        let tmp = self.inner.dir.join(format!("{key}.ckpt.tmp"));
        self.note_file(key);
        write_durably(&tmp, &path, &encode(ckpt))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        self.inner
            .sizes
            .lock()
            .expect("checkpoint sizes poisoned")
            .insert(key.to_string(), size);
        Ok(())
    }

    /// Forget checkpoint `key` (the task ended).
    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.file(key));
        self.inner
            .sizes
            .lock()
            .expect("checkpoint sizes poisoned")
            .remove(key);
    }

    /// Record that this worker holds `a` (so a restart resumes it).
    pub fn hold(&self, a: &ClassedAssignment) -> std::io::Result<()> {
        let replica = a.assignment.replica;
        let path = self.inner.dir.join(format!("{replica}.assign"));
        let tmp = self.inner.dir.join(format!("{replica}.assign.tmp"));
        let bytes = postcard::to_allocvec(a).map_err(std::io::Error::other)?;
        self.note_file(&replica.to_string());
        write_durably(&tmp, &path, &bytes)
    }

    /// `key` may have a file here from now on.
    fn note_file(&self, key: &str) {
        self.inner
            .files
            .lock()
            .expect("checkpoint files poisoned")
            .insert(key.to_string());
    }

    /// Whether any of `replicas` has, or may have, files here (an assignment held, a
    /// checkpoint): the in-memory index, no file system call, and nothing to look up while
    /// no task checkpoints (the tiny-task case: called for every outbox batch).
    pub fn any_has_files(&self, replicas: impl IntoIterator<Item = ReplicaId>) -> bool {
        let files = self.inner.files.lock().expect("checkpoint files poisoned");
        !files.is_empty() && replicas.into_iter().any(|r| files.contains(&r.to_string()))
    }

    /// Whether `replica` is recorded as held (it has made a checkpoint).
    pub fn is_held(&self, replica: ReplicaId) -> bool {
        self.inner.dir.join(format!("{replica}.assign")).exists()
    }

    /// The replica ended: forget its assignment and checkpoint.
    pub fn release(&self, replica: ReplicaId) {
        let key = replica.to_string();
        let had = self
            .inner
            .files
            .lock()
            .expect("checkpoint files poisoned")
            .remove(&key);
        if !had {
            // Never checkpointed nor held (nor found at open): it has no file to remove.
            return;
        }
        let _ = std::fs::remove_file(self.inner.dir.join(format!("{replica}.assign")));
        self.remove(&key);
    }

    /// The assignments recorded by [`hold`](Self::hold) and not released, oldest replica
    /// first. Unreadable ones are removed (with their checkpoints). A file written before
    /// determinism classes (a bare `Assignment`) is a `portable` replica.
    pub fn held(&self) -> Vec<ClassedAssignment> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.inner.dir) else {
            return out;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".assign")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            match std::fs::read(e.path()).ok().and_then(|b| {
                postcard::from_bytes::<ClassedAssignment>(&b)
                    .ok()
                    .or_else(|| {
                        postcard::from_bytes::<Assignment>(&b)
                            .ok()
                            .map(|assignment| ClassedAssignment {
                                assignment,
                                determinism: tasks::Determinism::Portable,
                            })
                    })
            }) {
                Some(a) if a.assignment.replica == id => out.push(a),
                _ => {
                    tracing::warn!("held replica file {} is damaged: discarded", name);
                    self.release(id);
                }
            }
        }
        out.sort_by_key(|a| a.assignment.replica);
        out
    }
}

/// The checkpoints of one task, as the sandbox sees them.
pub struct FileCheckpoint {
    dir: CheckpointDir,
    key: String,
    progress: Mutex<Option<f64>>,
    /// The assignment to record as held at the first save (taken then).
    holding: Mutex<Option<ClassedAssignment>>,
}

impl FileCheckpoint {
    /// The latest progress the guest reported (not persisted).
    pub fn progress(&self) -> Option<f64> {
        *self.progress.lock().expect("progress lock poisoned")
    }
}

impl CheckpointStore for FileCheckpoint {
    fn load(&self) -> Option<Checkpoint> {
        let c = self.dir.load(&self.key);
        if let Some(c) = &c {
            tracing::info!(
                key = %self.key,
                fuel_used = c.fuel_used,
                bytes = c.data.len(),
                "resuming from checkpoint"
            );
        }
        c
    }

    fn save(&self, ckpt: &Checkpoint) -> Result<(), String> {
        let mut holding = self.holding.lock().expect("holding lock poisoned");
        if let Some(a) = holding.as_ref() {
            self.dir.hold(a).map_err(|e| {
                format!(
                    "cannot record replica {} as held: {e}",
                    a.assignment.replica
                )
            })?;
            *holding = None;
        }
        self.dir.save(&self.key, ckpt)
    }

    fn progress(&self, fraction: f64) {
        *self.progress.lock().expect("progress lock poisoned") = Some(fraction);
    }
}

fn encode(c: &Checkpoint) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + c.data.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&c.fuel_used.to_le_bytes());
    v.extend_from_slice(&(c.data.len() as u64).to_le_bytes());
    v.extend_from_slice(blake3::hash(&c.data).as_bytes());
    v.extend_from_slice(&c.data);
    v
}

/// A checkpoint file's contents, verified.
pub fn decode(b: &[u8]) -> Result<Checkpoint, String> {
    if b.len() < HEADER || &b[..8] != MAGIC {
        return Err("not a checkpoint file".into());
    }
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let (fuel_used, len) = (word(8), word(16));
    let data = &b[HEADER..];
    if data.len() as u64 != len {
        return Err(format!("length {} instead of {len}", data.len()));
    }
    if blake3::hash(data).as_bytes() != &b[24..56] {
        return Err("hash mismatch".into());
    }
    Ok(Checkpoint {
        data: data.to_vec(),
        fuel_used,
    })
}

fn write_durably(tmp: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        // The rename itself must survive a power cut.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_replace_and_damaged_ones_are_discarded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::open(tmp.path()).unwrap();
        assert_eq!(dir.load("7"), None);
        let a = Checkpoint {
            data: b"first".to_vec(),
            fuel_used: 10,
        };
        let b = Checkpoint {
            data: b"second state".to_vec(),
            fuel_used: 20,
        };
        dir.save("7", &a).unwrap();
        dir.save("7", &b).unwrap();
        assert_eq!(dir.load("7"), Some(b.clone()), "the newest one is kept");
        let files: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "one file per replica, no tmp left");
        // A flipped byte in the state: discarded (file removed), start from zero.
        let path = dir.file("7");
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(dir.load("7"), None);
        assert!(!path.exists());
        // Truncated: also discarded.
        dir.save("7", &b).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(dir.load("7"), None);
    }

    /// Releasing a replica removes its checkpoint and held-assignment files, whether they
    /// were written by this process or found at open (a restart); a replica that never wrote
    /// one has nothing to remove.
    #[test]
    fn release_removes_the_files_written_now_or_found_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let a = |replica| ClassedAssignment {
            assignment: Assignment {
                replica,
                task: tasks::TaskManifest {
                    id: tasks::TaskId {
                        job: tasks::JobId(1),
                        index: replica as u32,
                    },
                    name: "t".into(),
                    module: tasks::BlobRef::of(b"m"),
                    input: None,
                    args: Vec::new(),
                    fuel: 1,
                    memory_mb: 1,
                    max_output: 1,
                },
                deadline_secs: 60,
                peers: Vec::new(),
            },
            determinism: tasks::Determinism::Portable,
        };
        let c = Checkpoint {
            data: b"state".to_vec(),
            fuel_used: 5,
        };
        let dir = CheckpointDir::open(tmp.path()).unwrap();
        for replica in [1u64, 2] {
            dir.replica_store(&a(replica)).save(&c).unwrap();
            assert!(dir.is_held(replica));
        }
        dir.release(1);
        assert!(!dir.is_held(1) && !dir.file("1").exists());
        dir.release(3);
        // After a restart, what the previous process left is found and released.
        let dir = CheckpointDir::open(tmp.path()).unwrap();
        assert_eq!(dir.held().len(), 1);
        dir.release(2);
        assert!(!dir.is_held(2) && !dir.file("2").exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    /// What decides that an outbox batch is fsynced whatever its compute: a replica with a
    /// checkpoint here, until it is released.
    #[test]
    fn any_has_files_names_replicas_with_checkpoints_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::open(tmp.path()).unwrap();
        assert!(!dir.any_has_files([7, 8]));
        let c = Checkpoint {
            data: b"state".to_vec(),
            fuel_used: 1,
        };
        dir.save("7", &c).unwrap();
        assert!(dir.any_has_files([8, 7]));
        assert!(!dir.any_has_files([8, 9]));
        assert!(!dir.any_has_files([]));
        dir.release(7);
        assert!(!dir.any_has_files([7]));
    }

    #[test]
    fn total_bytes_are_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::open(tmp.path()).unwrap();
        dir.inner
            .sizes
            .lock()
            .unwrap()
            .insert("1".into(), MAX_CHECKPOINT_TOTAL - 10);
        let c = Checkpoint {
            data: vec![0; 100],
            fuel_used: 1,
        };
        assert!(dir.save("2", &c).is_err());
        assert!(!dir.file("2").exists());
        dir.remove("1");
        dir.save("2", &c).unwrap();
    }
}
