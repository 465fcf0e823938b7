//! Content-addressed blob store.
//!
//! # Layout on disk
//! - `DIR/<hex id>`: a complete blob, written atomically (temp file + rename) and only after
//!   every byte was verified against its id;
//! - `DIR/<hex id>.obao`: its outboard (chunk chaining values, 32 bytes each; absent for blobs
//!   of one chunk);
//! - `DIR/partial/<hex id>` + `.obao`: a download in progress. The data file has the blob's
//!   full size and holds verified chunks at their offsets. Nothing records which chunks are
//!   there: on resume every chunk is checked against the (re-verified) outboard, so a chunk
//!   counts as held exactly when its bytes verify. A crash mid-write costs that chunk, never
//!   correctness.
//!
//! # Cap and eviction
//! With a cap, [`BlobStore::put`] and completed downloads evict least recently used complete
//! blobs until the total fits. A blob with a live [`PinGuard`] is never evicted (blobs of
//! tasks in progress). If pinned blobs alone exceed the cap, the store goes over it rather
//! than lose them. Partial downloads do not count towards the cap.

mod partial;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tasks::blob::{chunk_count, Outboard, VerifyError, CHUNK_SIZE};
use tasks::{BlobId, BlobRef};

pub use partial::PartialBlob;

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("blob {0} is not in the store")]
    NotFound(BlobId),
    #[error("refusing bytes for blob {id}: they hash to {got} ({len} bytes, expected {size})")]
    Mismatch {
        id: BlobId,
        got: BlobId,
        len: u64,
        size: u64,
    },
    #[error("chunks {start}..{end} are outside blob {id} ({count} chunks)")]
    OutOfRange {
        id: BlobId,
        start: u64,
        end: u64,
        count: u64,
    },
    #[error("chunk of blob {0} failed verification: {1}")]
    Verify(BlobId, VerifyError),
    #[error("blob {id} is only partly downloaded: chunk {index} is missing")]
    ChunkMissing { id: BlobId, index: u64 },
    #[error("blob {id}: stored outboard is corrupt ({reason}); it will be recomputed")]
    CorruptOutboard { id: BlobId, reason: String },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The blob store: cheap to clone, shared by the fetcher, the server and the sandbox.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    cap: Option<u64>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    blobs: HashMap<BlobId, Entry>,
    total: u64,
    /// Logical clock for LRU.
    tick: u64,
    pins: HashMap<BlobId, usize>,
    /// Downloads in progress, shared with the server so it serves the chunks they hold.
    partials: HashMap<BlobId, Arc<PartialBlob>>,
}

struct Entry {
    size: u64,
    last_used: u64,
}

/// Keeps a blob from eviction while it lives.
pub struct PinGuard {
    store: BlobStore,
    id: BlobId,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut st = self.store.inner.state.lock().unwrap();
        if let Some(n) = st.pins.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                st.pins.remove(&self.id);
            }
        }
    }
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobStore({})", self.inner.dir.display())
    }
}

impl BlobStore {
    /// Open (creating) the store in `dir`, with an optional size cap in bytes.
    pub fn open(dir: &Path, cap_bytes: Option<u64>) -> Result<BlobStore, StoreError> {
        std::fs::create_dir_all(dir.join("partial")).map_err(io_err(dir))?;
        let mut found: Vec<(std::time::SystemTime, BlobId, u64)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(".tmp-") {
                // A write that never got renamed into place: garbage.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Ok(id) = name.parse::<BlobId>() else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let used = meta
                .accessed()
                .or_else(|_| meta.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            found.push((used, id, meta.len()));
        }
        // Oldest first, so their ticks are smallest.
        found.sort();
        let mut st = State::default();
        for (_, id, size) in found {
            st.tick += 1;
            st.total += size;
            st.blobs.insert(
                id,
                Entry {
                    size,
                    last_used: st.tick,
                },
            );
        }
        let store = BlobStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                cap: cap_bytes,
                state: Mutex::new(st),
            }),
        };
        store.evict(None);
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn path(&self, id: &BlobId) -> PathBuf {
        self.inner.dir.join(id.to_string())
    }

    fn outboard_path(&self, id: &BlobId) -> PathBuf {
        self.inner.dir.join(format!("{id}.obao"))
    }

    fn partial_path(&self, id: &BlobId) -> PathBuf {
        self.inner.dir.join("partial").join(id.to_string())
    }

    /// Whether the complete blob is here.
    pub fn has(&self, id: &BlobId) -> bool {
        self.inner.state.lock().unwrap().blobs.contains_key(id)
    }

    /// Size of a complete blob.
    pub fn size(&self, id: &BlobId) -> Option<u64> {
        self.inner
            .state
            .lock()
            .unwrap()
            .blobs
            .get(id)
            .map(|e| e.size)
    }

    /// Complete blobs held.
    pub fn list(&self) -> Vec<BlobId> {
        let mut v: Vec<BlobId> = self
            .inner
            .state
            .lock()
            .unwrap()
            .blobs
            .keys()
            .copied()
            .collect();
        v.sort();
        v
    }

    /// Bytes of complete blobs held.
    pub fn total_bytes(&self) -> u64 {
        self.inner.state.lock().unwrap().total
    }

    fn touch(&self, id: &BlobId) -> Option<u64> {
        let mut st = self.inner.state.lock().unwrap();
        st.tick += 1;
        let tick = st.tick;
        st.blobs.get_mut(id).map(|e| {
            e.last_used = tick;
            e.size
        })
    }

    /// The whole blob (its bytes were verified when they were written).
    pub fn read(&self, id: &BlobId) -> Result<Vec<u8>, StoreError> {
        if self.touch(id).is_none() {
            return Err(StoreError::NotFound(*id));
        }
        let path = self.path(id);
        std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound(*id),
            _ => StoreError::Io { path, source: e },
        })
    }

    /// Hash and store `data`; idempotent.
    pub fn put(&self, data: &[u8]) -> Result<BlobRef, StoreError> {
        let outboard = Outboard::compute(data);
        let blob = outboard.blob();
        self.put_inner(&outboard, data)?;
        Ok(blob)
    }

    /// Store `data` as `blob`, refusing bytes that do not hash to `blob.id`.
    pub fn put_verified(&self, blob: BlobRef, data: &[u8]) -> Result<(), StoreError> {
        let outboard = Outboard::compute(data);
        if outboard.blob() != blob {
            return Err(StoreError::Mismatch {
                id: blob.id,
                got: outboard.blob().id,
                len: data.len() as u64,
                size: blob.size,
            });
        }
        self.put_inner(&outboard, data)
    }

    fn put_inner(&self, outboard: &Outboard, data: &[u8]) -> Result<(), StoreError> {
        let id = outboard.blob().id;
        if self.touch(&id).is_some() {
            return Ok(());
        }
        self.write_outboard(&self.outboard_path(&id), outboard)?;
        let tmp = self.temp_path();
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_data()?;
            std::fs::rename(&tmp, self.path(&id))
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::Io {
                path: self.path(&id),
                source: e,
            });
        }
        self.insert(id, data.len() as u64);
        Ok(())
    }

    fn temp_path(&self) -> PathBuf {
        self.inner
            .dir
            .join(format!(".tmp-{:016x}", rand::random::<u64>()))
    }

    fn write_outboard(&self, path: &Path, outboard: &Outboard) -> Result<(), StoreError> {
        if outboard.cvs().is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> = outboard.cvs().iter().flatten().copied().collect();
        let tmp = self.temp_path();
        let res = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
        Ok(())
    }

    /// Read and re-verify an outboard file (cheap: 32 bytes per chunk).
    fn read_outboard(&self, path: &Path, blob: BlobRef) -> Option<Outboard> {
        if chunk_count(blob.size) <= 1 {
            return Outboard::verify(blob, Vec::new()).ok();
        }
        let bytes = std::fs::read(path).ok()?;
        if bytes.len() % 32 != 0 {
            return None;
        }
        let cvs = bytes
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        Outboard::verify(blob, cvs).ok()
    }

    fn insert(&self, id: BlobId, size: u64) {
        {
            let mut st = self.inner.state.lock().unwrap();
            st.tick += 1;
            let tick = st.tick;
            if st
                .blobs
                .insert(
                    id,
                    Entry {
                        size,
                        last_used: tick,
                    },
                )
                .is_none()
            {
                st.total += size;
            }
        }
        self.evict(Some(id));
    }

    /// Evict least recently used unpinned blobs (never `keep`) until under the cap.
    fn evict(&self, keep: Option<BlobId>) {
        let Some(cap) = self.inner.cap else { return };
        let victims = {
            let mut st = self.inner.state.lock().unwrap();
            if st.total <= cap {
                return;
            }
            let mut order: Vec<(u64, BlobId, u64)> = st
                .blobs
                .iter()
                .filter(|(id, _)| Some(**id) != keep && !st.pins.contains_key(id))
                .map(|(id, e)| (e.last_used, *id, e.size))
                .collect();
            order.sort();
            let mut victims = Vec::new();
            for (_, id, size) in order {
                if st.total <= cap {
                    break;
                }
                st.blobs.remove(&id);
                st.total -= size;
                victims.push(id);
            }
            if st.total > cap {
                tracing::warn!(
                    total = st.total,
                    cap,
                    "blob store over its cap: the rest is pinned or just written"
                );
            }
            victims
        };
        for id in victims {
            tracing::debug!(blob = %id.short(), "evicting blob");
            let _ = std::fs::remove_file(self.path(&id));
            let _ = std::fs::remove_file(self.outboard_path(&id));
        }
    }

    /// Keep `id` from eviction while the guard lives (pinning a blob not yet held is allowed:
    /// it protects it once downloaded).
    pub fn pin(&self, id: &BlobId) -> PinGuard {
        *self
            .inner
            .state
            .lock()
            .unwrap()
            .pins
            .entry(*id)
            .or_insert(0) += 1;
        PinGuard {
            store: self.clone(),
            id: *id,
        }
    }

    /// The outboard of a complete blob or of a download in progress.
    pub fn outboard(&self, id: &BlobId) -> Result<Outboard, StoreError> {
        if let Some(p) = self.partial_of(id) {
            return Ok(p.outboard().clone());
        }
        let size = self.size(id).ok_or(StoreError::NotFound(*id))?;
        let blob = BlobRef { id: *id, size };
        if let Some(ob) = self.read_outboard(&self.outboard_path(id), blob) {
            return Ok(ob);
        }
        // Missing or damaged outboard file: recompute from the data.
        let data = self.read(id)?;
        let ob = Outboard::compute(&data);
        if ob.blob() != blob {
            return Err(StoreError::Mismatch {
                id: *id,
                got: ob.blob().id,
                len: data.len() as u64,
                size,
            });
        }
        self.write_outboard(&self.outboard_path(id), &ob)?;
        Ok(ob)
    }

    /// Bytes of chunks `start .. start + count` of a complete blob, or of a partial download
    /// that holds all of them.
    pub fn read_chunks(&self, id: &BlobId, start: u64, count: u32) -> Result<Vec<u8>, StoreError> {
        let (size, partial) = match self.touch(id) {
            Some(size) => (size, None),
            None => match self.partial_of(id) {
                Some(p) => (p.blob().size, Some(p)),
                None => return Err(StoreError::NotFound(*id)),
            },
        };
        let chunks = chunk_count(size);
        let end = start.saturating_add(count as u64);
        if count == 0 || end > chunks {
            return Err(StoreError::OutOfRange {
                id: *id,
                start,
                end,
                count: chunks,
            });
        }
        let from = start * CHUNK_SIZE as u64;
        let to = (end * CHUNK_SIZE as u64).min(size);
        let mut buf = vec![0u8; (to - from) as usize];
        match partial {
            Some(p) => p.read_at(start, end, from, &mut buf)?,
            None => {
                use std::os::unix::fs::FileExt;
                let path = self.path(id);
                let f = File::open(&path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => StoreError::NotFound(*id),
                    _ => StoreError::Io {
                        path: path.clone(),
                        source: e,
                    },
                })?;
                f.read_exact_at(&mut buf, from).map_err(io_err(&path))?;
            }
        }
        Ok(buf)
    }

    /// Which chunks of `id` are here: all of a complete blob, or what a download holds so far.
    /// Returns the blob's size and one bool per chunk.
    pub fn have(&self, id: &BlobId) -> Option<(u64, Vec<bool>)> {
        if let Some(size) = self.size(id) {
            return Some((size, vec![true; chunk_count(size) as usize]));
        }
        self.partial_of(id).map(|p| (p.blob().size, p.have()))
    }

    /// A download in progress (registered by [`BlobStore::partial`]).
    pub fn partial_of(&self, id: &BlobId) -> Option<Arc<PartialBlob>> {
        self.inner.state.lock().unwrap().partials.get(id).cloned()
    }

    /// The persisted, verified outboard of an interrupted download, if any.
    pub fn partial_outboard(&self, blob: BlobRef) -> Option<Outboard> {
        if let Some(p) = self.partial_of(&blob.id) {
            return Some(p.outboard().clone());
        }
        let path = self.partial_path(&blob.id).with_extension("obao");
        self.read_outboard(&path, blob)
    }

    /// Start or resume the download of `outboard.blob()`: chunks already in
    /// `DIR/partial/` that verify count as held. While it lives, the partial download is
    /// visible to [`BlobStore::have`], [`BlobStore::outboard`] and [`BlobStore::read_chunks`],
    /// so a server on this store serves the chunks it holds. Hashes what is on disk: call it
    /// off the async threads for big blobs.
    pub fn partial(&self, outboard: Outboard) -> Result<Arc<PartialBlob>, StoreError> {
        let id = outboard.blob().id;
        if let Some(p) = self.partial_of(&id) {
            return Ok(p);
        }
        let path = self.partial_path(&id);
        self.write_outboard(&path.with_extension("obao"), &outboard)?;
        let p = Arc::new(PartialBlob::open(path, outboard)?);
        let mut st = self.inner.state.lock().unwrap();
        Ok(st.partials.entry(id).or_insert(p).clone())
    }

    /// Move a download whose every chunk is verified into the store.
    pub fn finish(&self, partial: &PartialBlob) -> Result<(), StoreError> {
        let blob = partial.blob();
        if let Some(index) = partial.first_missing() {
            return Err(StoreError::ChunkMissing { id: blob.id, index });
        }
        if self.has(&blob.id) {
            self.forget_partial(&blob.id);
            return Ok(());
        }
        partial.sync()?;
        self.write_outboard(&self.outboard_path(&blob.id), partial.outboard())?;
        let dest = self.path(&blob.id);
        std::fs::rename(partial.path(), &dest).map_err(io_err(&dest))?;
        self.insert(blob.id, blob.size);
        self.forget_partial(&blob.id);
        Ok(())
    }

    fn forget_partial(&self, id: &BlobId) {
        self.inner.state.lock().unwrap().partials.remove(id);
        let path = self.partial_path(id);
        let _ = std::fs::remove_file(path.with_extension("obao"));
        let _ = std::fs::remove_file(&path);
    }

    /// Stop sharing a download that will not go on now (its chunks stay on disk for resume).
    pub fn release_partial(&self, id: &BlobId) {
        self.inner.state.lock().unwrap().partials.remove(id);
    }
}

#[cfg(test)]
mod tests;
