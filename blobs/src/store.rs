//! Content-addressed blob store.
//!
//! # Layout on disk
//! - `DIR/<hex id>`: a complete blob, written atomically (temp file + rename) and only after
//!   every byte was verified against its id;
//! - `DIR/<hex id>.obao`: its outboard (chunk chaining values, 32 bytes each; absent for blobs
//!   of one chunk);
//! - `DIR/packs/<seq>.pack`: small blobs (one chunk at most, so no outboard) put together by
//!   [`BlobStore::put_small_batch`], appended as self-verifying records (length, id, bytes)
//!   with one `fdatasync` per batch (none for [`BlobStore::put_small_batch_unsynced`]), a
//!   new pack past 64 MiB (with a cap, past an eighth of it). Thousands of tiny outputs a
//!   second cost one append each, not a file each (creating files was half of
//!   a worker's time on tiny tasks). Opening the store reads every pack, re-verifies every
//!   record, skips damaged ones and cuts a torn tail off (a crash mid-append); appends go on
//!   in the last pack. The index in memory says where each blob is: its own file, or a pack
//!   and an offset. Blobs of the older layout (files only) are found as before;
//! - `DIR/partial/<hex id>` + `.obao`: a download in progress. The data file has the blob's
//!   full size and holds verified chunks at their offsets. Nothing records which chunks are
//!   there: on resume every chunk is checked against the (re-verified) outboard, so a chunk
//!   counts as held exactly when its bytes verify. A crash mid-write costs that chunk, never
//!   correctness.
//!
//! # Cap and eviction
//! With a cap, [`BlobStore::put`], [`BlobStore::put_small_batch`] and completed downloads
//! evict least recently used complete blobs until the total fits. The total counts what is
//! on disk: each blob file's size, and each pack file's whole size (its dead records too). A
//! packed blob is evicted from the index only, which frees nothing yet; the pack file is
//! deleted once no record in it lives, so eviction goes on down the LRU order until whole
//! packs free enough. Packs are written in time order, so the oldest pack usually empties
//! first; a pack kept for a few recently used records holds its whole size until they go
//! too. Packs are never rewritten. The pack being appended to counts too but is never
//! deleted and its records are not evicted (freeing nothing, they were just written); with a
//! cap a pack takes at most an eighth of it, so the rest of the store can always make room.
//! A blob with a live [`PinGuard`] is never evicted (blobs of tasks in progress). If pinned
//! blobs alone exceed the cap, the store goes over it rather than lose them. Partial
//! downloads do not count towards the cap.
//!
//! The index has one entry per blob held (and one per pack file). The cap bounds it in
//! bytes, which for tiny blobs is no bound (a 4 GiB cap holds tens of millions of 10-byte
//! outputs, and their index would take gigabytes of memory), so the packed blobs are also
//! bounded in number: past [`MAX_PACKED_BLOBS`] (and an eighth, so the scan that picks them
//! is rare) the least recently used packed blobs leave the index, whatever the bytes.
//! Without a cap blob files, and their index, grow with every blob kept.

/// At most this many small blobs are kept in packs (see the module doc).
pub const MAX_PACKED_BLOBS: usize = 1 << 16;

mod pack;
mod partial;

use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// A pack takes no more records past this size.
    pack_limit: u64,
    state: Mutex<State>,
    /// The pack being appended to (`None` until the first small batch, or after a failed
    /// write). Taken before `state` when both are held.
    writer: Mutex<Option<PackWriter>>,
}

#[derive(Default)]
struct State {
    blobs: HashMap<BlobId, Entry>,
    /// Bytes counted against the cap: blob files, and pack files whole.
    total: u64,
    /// Logical clock for LRU.
    tick: u64,
    pins: HashMap<BlobId, usize>,
    /// Downloads in progress, shared with the server so it serves the chunks they hold.
    partials: HashMap<BlobId, Arc<PartialBlob>>,
    /// Pack files on disk, by sequence number.
    packs: BTreeMap<u64, Pack>,
    /// The pack being appended to: never deleted, its records never evicted.
    current: Option<u64>,
    /// Sequence number of the next new pack.
    next_seq: u64,
}

struct Entry {
    size: u64,
    last_used: u64,
    at: Location,
}

/// Where a complete blob's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Location {
    /// `DIR/<hex id>`.
    File,
    /// In pack `seq`, its bytes starting at `offset`.
    Pack { seq: u64, offset: u64 },
}

/// A pack file on disk.
struct Pack {
    /// File length (all counted against the cap).
    len: u64,
    /// Records of it in the index; at 0 the file goes (unless it is the current pack).
    live: u64,
}

/// What eviction leaves to delete on disk.
enum Garbage {
    File(BlobId),
    Pack(u64),
}

struct PackWriter {
    seq: u64,
    file: File,
    /// Bytes written and synced.
    len: u64,
}

impl State {
    /// Index a blob held at `at` as the most recently used. One already indexed is only
    /// touched (a second copy adds nothing), except that a blob file found beside a packed
    /// copy (opening a store that holds both) takes over: files count on their own.
    fn add(&mut self, id: BlobId, size: u64, at: Location) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.blobs.get_mut(&id) {
            e.last_used = tick;
            if let (Location::File, Location::Pack { seq, .. }) = (at, e.at) {
                e.at = Location::File;
                self.total += size;
                if let Some(p) = self.packs.get_mut(&seq) {
                    p.live -= 1;
                }
            }
            return;
        }
        match at {
            Location::File => self.total += size,
            Location::Pack { seq, .. } => {
                self.packs
                    .get_mut(&seq)
                    .expect("a pack is registered before its records")
                    .live += 1
            }
        }
        self.blobs.insert(
            id,
            Entry {
                size,
                last_used: tick,
                at,
            },
        );
    }

    /// Drop `id` from the index; what to delete on disk: its file, or its pack once no
    /// record in it lives (never the current pack).
    fn remove(&mut self, id: &BlobId) -> Option<Garbage> {
        let e = self.blobs.remove(id)?;
        match e.at {
            Location::File => {
                self.total -= e.size;
                Some(Garbage::File(*id))
            }
            Location::Pack { seq, .. } => {
                self.packs.get_mut(&seq)?.live -= 1;
                self.drop_pack_if_dead(seq)
            }
        }
    }

    /// Forget pack `seq` if no record in it lives and it is not the current one.
    fn drop_pack_if_dead(&mut self, seq: u64) -> Option<Garbage> {
        let pack = self.packs.get(&seq)?;
        if pack.live > 0 || self.current == Some(seq) {
            return None;
        }
        self.total -= pack.len;
        self.packs.remove(&seq);
        Some(Garbage::Pack(seq))
    }
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
    /// Open (creating) the store in `dir`, with an optional size cap in bytes. Reads and
    /// re-hashes every pack (see the module doc), in time proportional to their size.
    pub fn open(dir: &Path, cap_bytes: Option<u64>) -> Result<BlobStore, StoreError> {
        std::fs::create_dir_all(dir.join("partial")).map_err(io_err(dir))?;
        let packs_dir = dir.join("packs");
        std::fs::create_dir_all(&packs_dir).map_err(io_err(&packs_dir))?;
        // Sorted by (last used, pack seq, offset): files first among equals, packs in write
        // order.
        type Found = ((std::time::SystemTime, u64, u64), BlobId, u64, Location);
        let mut found: Vec<Found> = Vec::new();
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
            found.push(((used, 0, 0), id, meta.len(), Location::File));
        }
        let mut st = State::default();
        for entry in std::fs::read_dir(&packs_dir).map_err(io_err(&packs_dir))? {
            let entry = entry.map_err(io_err(&packs_dir))?;
            let Some(seq) = entry.file_name().to_str().and_then(pack::parse_name) else {
                continue;
            };
            let path = entry.path();
            let used = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            let scanned = pack::scan(&path)?;
            st.total += scanned.len;
            st.next_seq = st.next_seq.max(seq + 1);
            st.packs.insert(
                seq,
                Pack {
                    len: scanned.len,
                    live: 0,
                },
            );
            for r in scanned.records {
                let at = Location::Pack {
                    seq,
                    offset: r.offset,
                };
                found.push(((used, seq, r.offset), r.id, r.size, at));
            }
        }
        // Oldest first, so their ticks are smallest.
        found.sort_by_key(|f| f.0);
        for (_, id, size, at) in found {
            st.add(id, size, at);
        }
        let pack_limit = cap_bytes.map_or(pack::PACK_MAX, |cap| (cap / 8).min(pack::PACK_MAX));
        // Appends go on in the last pack while it has room.
        let mut writer = None;
        if let Some((&seq, p)) = st.packs.last_key_value() {
            if p.len < pack_limit {
                let path = pack::path(&packs_dir, seq);
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                writer = Some(PackWriter {
                    seq,
                    file,
                    len: p.len,
                });
                st.current = Some(seq);
            }
        }
        // Packs with nothing left in them (every record damaged, or a copy of a blob file).
        let seqs: Vec<u64> = st.packs.keys().copied().collect();
        let dead: Vec<Garbage> = seqs
            .into_iter()
            .filter_map(|seq| st.drop_pack_if_dead(seq))
            .collect();
        let store = BlobStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                cap: cap_bytes,
                pack_limit,
                state: Mutex::new(st),
                writer: Mutex::new(writer),
            }),
        };
        store.delete(dead);
        store.evict(None);
        store.trim_packed(MAX_PACKED_BLOBS);
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

    fn pack_path(&self, seq: u64) -> PathBuf {
        pack::path(&self.inner.dir.join("packs"), seq)
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

    /// At most `max` held blobs, the ones worth announcing first: blob files (modules,
    /// inputs, large outputs: what peers fetch) before small blobs in packs (copies of small
    /// outputs, which only the coordinator asks for, from the worker that reported them),
    /// each most recently used first. A worker that ran a million tiny tasks holds a million
    /// packed copies: listing them all made a message too large to send.
    pub fn list_to_announce(&self, max: usize) -> Vec<BlobId> {
        let st = self.inner.state.lock().unwrap();
        let mut v: Vec<(bool, std::cmp::Reverse<u64>, BlobId)> = st
            .blobs
            .iter()
            .map(|(id, e)| {
                let packed = matches!(e.at, Location::Pack { .. });
                (packed, std::cmp::Reverse(e.last_used), *id)
            })
            .collect();
        drop(st);
        if v.len() > max {
            v.select_nth_unstable(max);
            v.truncate(max);
        }
        v.sort_unstable();
        v.into_iter().map(|(_, _, id)| id).collect()
    }

    /// Bytes counted against the cap: complete blob files, and pack files whole (see the
    /// module doc).
    pub fn total_bytes(&self) -> u64 {
        self.inner.state.lock().unwrap().total
    }

    /// Mark `id` used now; its size and where it is.
    fn touch(&self, id: &BlobId) -> Option<(u64, Location)> {
        let mut st = self.inner.state.lock().unwrap();
        st.tick += 1;
        let tick = st.tick;
        st.blobs.get_mut(id).map(|e| {
            e.last_used = tick;
            (e.size, e.at)
        })
    }

    /// The whole blob (its bytes were verified when they were written).
    pub fn read(&self, id: &BlobId) -> Result<Vec<u8>, StoreError> {
        match self.touch(id) {
            None => Err(StoreError::NotFound(*id)),
            Some((_, Location::File)) => {
                let path = self.path(id);
                std::fs::read(&path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => StoreError::NotFound(*id),
                    _ => StoreError::Io { path, source: e },
                })
            }
            Some((size, at)) => {
                let mut buf = vec![0u8; size as usize];
                self.read_at(id, at, 0, &mut buf)?;
                Ok(buf)
            }
        }
    }

    /// Bytes of a complete blob from byte `from` on, into `buf`. A blob evicted meanwhile (its
    /// file or pack deleted) is not found.
    fn read_at(
        &self,
        id: &BlobId,
        at: Location,
        from: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let (path, offset) = match at {
            Location::File => (self.path(id), from),
            Location::Pack { seq, offset } => (self.pack_path(seq), offset + from),
        };
        let f = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound(*id),
            _ => StoreError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        f.read_exact_at(buf, offset).map_err(io_err(&path))
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

    /// Hash and store many small blobs at once, in the current pack: one append and one
    /// `fdatasync` for the batch, no file per blob (see the module doc). Blobs already held
    /// are only touched. A blob over one chunk ([`CHUNK_SIZE`]) is stored by [`Self::put`]
    /// instead (packs hold no outboards). Blocking: call it off the async threads.
    pub fn put_small_batch<B: AsRef<[u8]>>(&self, items: &[B]) -> Result<Vec<BlobRef>, StoreError> {
        self.put_small(items, true)
    }

    /// [`Self::put_small_batch`] without the `fdatasync`: the batch is written (a killed
    /// process loses nothing) but a crash of the machine can lose it, or tear the pack's last
    /// records, which opening the store drops. For copies that are not the only one (a
    /// worker's copies of outputs it already reported inline).
    pub fn put_small_batch_unsynced<B: AsRef<[u8]>>(
        &self,
        items: &[B],
    ) -> Result<Vec<BlobRef>, StoreError> {
        self.put_small(items, false)
    }

    fn put_small<B: AsRef<[u8]>>(
        &self,
        items: &[B],
        sync: bool,
    ) -> Result<Vec<BlobRef>, StoreError> {
        let refs: Vec<BlobRef> = items.iter().map(|b| BlobRef::of(b.as_ref())).collect();
        let mut fresh: Vec<(BlobId, &[u8])> = Vec::new();
        let mut big = Vec::new();
        {
            let mut st = self.inner.state.lock().unwrap();
            let mut seen = HashSet::new();
            for (blob, item) in refs.iter().zip(items) {
                if item.as_ref().len() > CHUNK_SIZE {
                    big.push(item.as_ref());
                    continue;
                }
                st.tick += 1;
                let tick = st.tick;
                match st.blobs.get_mut(&blob.id) {
                    Some(e) => e.last_used = tick,
                    None if seen.insert(blob.id) => fresh.push((blob.id, item.as_ref())),
                    None => {}
                }
            }
        }
        for data in big {
            self.put(data)?;
        }
        if !fresh.is_empty() {
            self.append(&fresh, sync)?;
            self.evict(None);
            self.trim_packed(MAX_PACKED_BLOBS);
        }
        Ok(refs)
    }

    /// Append records to the current pack (starting a new pack past the limit), sync (if
    /// `sync`), then index them.
    fn append(&self, blobs: &[(BlobId, &[u8])], sync: bool) -> Result<(), StoreError> {
        let mut writer = self.inner.writer.lock().unwrap();
        let mut buf = Vec::new();
        let mut placed = Vec::new();
        for (id, data) in blobs {
            let len = pack::HEADER + data.len() as u64;
            let full = writer.as_ref().is_none_or(|w| {
                let used = w.len + buf.len() as u64;
                used > 0 && used + len > self.inner.pack_limit
            });
            if full {
                self.flush(&mut writer, &mut buf, &mut placed, sync)?;
                *writer = Some(self.start_pack()?);
            }
            let w = writer.as_ref().expect("a pack was just started");
            placed.push((
                *id,
                data.len() as u64,
                w.len + buf.len() as u64 + pack::HEADER,
            ));
            pack::encode(&mut buf, id, data);
        }
        self.flush(&mut writer, &mut buf, &mut placed, sync)
    }

    /// Write and sync (if `sync`) `buf` (the records `placed`) to the current pack, then
    /// index them. On a write error the pack is cut back to its last good length and left:
    /// the next batch starts a new one.
    fn flush(
        &self,
        writer: &mut Option<PackWriter>,
        buf: &mut Vec<u8>,
        placed: &mut Vec<(BlobId, u64, u64)>,
        sync: bool,
    ) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let Some(w) = writer.as_mut() else {
            return Ok(());
        };
        if buf.is_empty() {
            return Ok(());
        }
        let res = w.file.write_all_at(buf, w.len).and_then(|_| {
            if sync {
                w.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = res {
            let _ = w.file.set_len(w.len);
            let seq = w.seq;
            *writer = None;
            buf.clear();
            placed.clear();
            let mut st = self.inner.state.lock().unwrap();
            st.current = None;
            let dead = st.drop_pack_if_dead(seq);
            drop(st);
            self.delete(dead.into_iter().collect());
            return Err(StoreError::Io {
                path: self.pack_path(seq),
                source: e,
            });
        }
        w.len += buf.len() as u64;
        let mut st = self.inner.state.lock().unwrap();
        st.total += buf.len() as u64;
        st.packs
            .get_mut(&w.seq)
            .expect("the current pack is registered")
            .len = w.len;
        for (id, size, offset) in placed.drain(..) {
            st.add(id, size, Location::Pack { seq: w.seq, offset });
        }
        buf.clear();
        Ok(())
    }

    /// Create the next pack and make it the current one; the previous one goes if nothing in
    /// it lives.
    fn start_pack(&self) -> Result<PackWriter, StoreError> {
        let seq = self.inner.state.lock().unwrap().next_seq;
        let path = self.pack_path(seq);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut st = self.inner.state.lock().unwrap();
        st.next_seq = seq + 1;
        st.packs.insert(seq, Pack { len: 0, live: 0 });
        let previous = st.current.replace(seq);
        let dead = previous.and_then(|p| st.drop_pack_if_dead(p));
        drop(st);
        self.delete(dead.into_iter().collect());
        Ok(PackWriter { seq, file, len: 0 })
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
        self.inner
            .state
            .lock()
            .unwrap()
            .add(id, size, Location::File);
        self.evict(Some(id));
    }

    /// Evict least recently used unpinned blobs (never `keep`, nor records of the current
    /// pack) until under the cap.
    fn evict(&self, keep: Option<BlobId>) {
        let Some(cap) = self.inner.cap else { return };
        let garbage = {
            let mut st = self.inner.state.lock().unwrap();
            if st.total <= cap {
                return;
            }
            let current = st.current;
            let mut order: Vec<(u64, BlobId)> = st
                .blobs
                .iter()
                .filter(|(id, e)| {
                    Some(**id) != keep
                        && !st.pins.contains_key(id)
                        && !matches!(e.at, Location::Pack { seq, .. } if Some(seq) == current)
                })
                .map(|(id, e)| (e.last_used, *id))
                .collect();
            order.sort();
            let mut garbage = Vec::new();
            for (_, id) in order {
                if st.total <= cap {
                    break;
                }
                tracing::debug!(blob = %id.short(), "evicting blob");
                garbage.extend(st.remove(&id));
            }
            if st.total > cap {
                tracing::warn!(
                    total = st.total,
                    cap,
                    "blob store over its cap: the rest is pinned or just written"
                );
            }
            garbage
        };
        self.delete(garbage);
    }

    /// Past `max` packed blobs and an eighth, drop the least recently used of them from the
    /// index until `max` are left (pinned ones stay); their packs go once nothing in them
    /// lives, as with eviction.
    fn trim_packed(&self, max: usize) {
        let garbage = {
            let mut st = self.inner.state.lock().unwrap();
            let packed: u64 = st.packs.values().map(|p| p.live).sum();
            if packed as usize <= max + max / 8 {
                return;
            }
            let mut order: Vec<(u64, BlobId)> = st
                .blobs
                .iter()
                .filter(|(id, e)| {
                    matches!(e.at, Location::Pack { .. }) && !st.pins.contains_key(id)
                })
                .map(|(id, e)| (e.last_used, *id))
                .collect();
            let excess = (packed as usize - max).min(order.len());
            if excess < order.len() {
                order.select_nth_unstable(excess);
            }
            tracing::debug!(
                packed,
                dropped = excess,
                "keeping at most {max} small blobs: the least recently used go"
            );
            let mut garbage = Vec::new();
            for (_, id) in &order[..excess] {
                garbage.extend(st.remove(id));
            }
            garbage
        };
        self.delete(garbage);
    }

    fn delete(&self, garbage: Vec<Garbage>) {
        for g in garbage {
            match g {
                Garbage::File(id) => {
                    let _ = std::fs::remove_file(self.path(&id));
                    let _ = std::fs::remove_file(self.outboard_path(&id));
                }
                Garbage::Pack(seq) => {
                    tracing::debug!(pack = seq, "deleting a pack whose records are all evicted");
                    let _ = std::fs::remove_file(self.pack_path(seq));
                }
            }
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
        enum Source {
            Complete(Location),
            Partial(Arc<PartialBlob>),
        }
        let (size, source) = match self.touch(id) {
            Some((size, at)) => (size, Source::Complete(at)),
            None => match self.partial_of(id) {
                Some(p) => (p.blob().size, Source::Partial(p)),
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
        match source {
            Source::Complete(at) => self.read_at(id, at, from, &mut buf)?,
            Source::Partial(p) => p.read_at(start, end, from, &mut buf)?,
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
