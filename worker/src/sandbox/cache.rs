//! The on-disk compile cache: modules this worker compiled itself, serialized by wasmtime.
//!
//! Loading precompiled code is trusting it completely (wasmtime does not validate machine
//! code), so the cache only ever holds files this process family wrote: they live under
//! `<cache_dir>/<fingerprint id>/<module blake3>.cwasm`, are written atomically (temp file +
//! rename), and carry a blake3 of their payload that is checked before wasmtime sees them. A
//! file that fails the check (truncated, corrupted, from another engine build) is deleted
//! and the module recompiled. Precompiled code never comes from peers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tasks::{BlobId, EngineFingerprint};
use wasmtime::{Engine, Module};

use super::SandboxError;

const MAGIC: &[u8; 8] = b"PGCWASM1";
const HEADER: usize = MAGIC.len() + 32;

/// A directory of compiled modules for one engine fingerprint.
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// Open (creating) the cache for `fingerprint` under `root`.
    pub fn open(root: &Path, fingerprint: &EngineFingerprint) -> Result<DiskCache, SandboxError> {
        let dir = root.join(fingerprint.short_id());
        std::fs::create_dir_all(&dir).map_err(|source| SandboxError::Cache {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(DiskCache { dir })
    }

    /// Where the compiled form of module `id` is kept.
    pub fn path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(format!("{id}.cwasm"))
    }

    /// The cached compiled module, if present and intact.
    pub fn get(&self, engine: &Engine, id: &BlobId) -> Option<Module> {
        let path = self.path(id);
        let bytes = std::fs::read(&path).ok()?;
        let payload = match verify(&bytes) {
            Some(p) => p,
            None => {
                tracing::warn!(path = %path.display(), "compile cache entry is corrupt; recompiling");
                let _ = std::fs::remove_file(&path);
                return None;
            }
        };
        // SAFETY: the payload is exactly what `Module::serialize` produced in `put` for this
        // engine fingerprint (checked by the blake3 above, in a directory only we write);
        // wasmtime additionally checks the engine version and settings in its header.
        match unsafe { Module::deserialize(engine, payload) } {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), "compile cache entry unusable ({e}); recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Store the compiled form of module `id`, atomically.
    pub fn put(&self, id: &BlobId, module: &Module) -> std::io::Result<()> {
        let payload = module.serialize().map_err(std::io::Error::other)?;
        let path = self.path(id);
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".{id}.{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(blake3::hash(&payload).as_bytes())?;
            f.write_all(&payload)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        let r = write();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }
}

/// The payload of a cache file whose header and checksum are intact.
fn verify(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < HEADER || &bytes[..MAGIC.len()] != MAGIC {
        return None;
    }
    let (sum, payload) = bytes[MAGIC.len()..].split_at(32);
    (blake3::hash(payload).as_bytes() == sum).then_some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_rejects_flipped_bits_and_short_files() {
        let payload = b"compiled code";
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(blake3::hash(payload).as_bytes());
        file.extend_from_slice(payload);
        assert_eq!(verify(&file), Some(&payload[..]));
        let mut bad = file.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(verify(&bad), None);
        assert_eq!(verify(&file[..10]), None);
    }
}
