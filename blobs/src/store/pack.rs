//! Packs: append-only files of small blobs, `DIR/packs/<seq>.pack`.
//!
//! A pack is a run of records, each `len` (u32, little endian) `| id` (32 bytes, the blake3
//! hash of the bytes) `| bytes` (`len` of them, at most [`CHUNK_SIZE`]). A record verifies on
//! its own: its bytes must hash to its id, so a scan needs no other index and a damaged
//! record costs that record only. A crash mid-append leaves a torn last record, which the scan
//! cuts off. A damaged length field cannot be told from a torn write; the scan stops there and
//! cuts the pack (a length over [`CHUNK_SIZE`] or past the end of the file leaves no way to
//! find the next record).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use tasks::blob::CHUNK_SIZE;
use tasks::BlobId;

use super::{io_err, StoreError};

/// Bytes before a record's data: its length and its id.
pub(super) const HEADER: u64 = 4 + 32;

/// A pack takes new records until it is this big, then the next one starts. Big enough that
/// creating a file is rare (one per ~1,000 outputs of 64 KiB, more of smaller ones); small
/// enough that a pack kept whole for one live record (see "Cap and eviction" in the store's
/// doc) is a small part of a cap of gigabytes. With a cap, at most an eighth of it.
pub(super) const PACK_MAX: u64 = 64 << 20;

/// The file of pack `seq` (zero-padded, so a directory listing is in write order).
pub(super) fn path(packs: &Path, seq: u64) -> PathBuf {
    packs.join(format!("{seq:016}.pack"))
}

/// The sequence number in a pack's file name.
pub(super) fn parse_name(name: &str) -> Option<u64> {
    let seq = name.strip_suffix(".pack")?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seq.parse().ok()
}

/// Append the record of `data` (whose id is `id`) to `buf`.
pub(super) fn encode(buf: &mut Vec<u8>, id: &BlobId, data: &[u8]) {
    debug_assert!(data.len() <= CHUNK_SIZE);
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(id.as_bytes());
    buf.extend_from_slice(data);
}

/// A record found by [`scan`].
pub(super) struct Record {
    pub id: BlobId,
    /// Where its bytes start in the pack.
    pub offset: u64,
    pub size: u64,
}

/// What [`scan`] found in a pack.
pub(super) struct Scanned {
    /// Records whose bytes hash to their id, in file order.
    pub records: Vec<Record>,
    /// The pack's length once a torn tail is cut off.
    pub len: u64,
}

/// Read a pack, verify every record, skip the corrupt ones (logged once per pack) and cut a
/// torn tail off the file, so appends go on after the last whole record.
pub(super) fn scan(path: &Path) -> Result<Scanned, StoreError> {
    let file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut records = Vec::new();
    let mut corrupt = 0u64;
    let mut pos = 0u64;
    let mut data = Vec::with_capacity(CHUNK_SIZE);
    let mut cut = None;
    while pos < file_len {
        if file_len - pos < HEADER {
            cut = Some("a torn record header");
            break;
        }
        let mut header = [0u8; HEADER as usize];
        reader.read_exact(&mut header).map_err(io_err(path))?;
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as u64;
        let id = BlobId(header[4..].try_into().unwrap());
        if len > CHUNK_SIZE as u64 {
            cut = Some("a record length over one chunk (damaged)");
            break;
        }
        if file_len - pos - HEADER < len {
            cut = Some("a torn record");
            break;
        }
        data.resize(len as usize, 0);
        reader.read_exact(&mut data).map_err(io_err(path))?;
        if BlobId::of(&data) == id {
            records.push(Record {
                id,
                offset: pos + HEADER,
                size: len,
            });
        } else {
            corrupt += 1;
        }
        pos += HEADER + len;
    }
    if corrupt > 0 {
        tracing::warn!(
            pack = %path.display(),
            corrupt,
            "skipping pack records whose bytes do not match their id (damaged on disk)"
        );
    }
    if let Some(why) = cut {
        tracing::warn!(
            pack = %path.display(),
            at = pos,
            dropped = file_len - pos,
            "cutting the pack after its last whole record: {why} (a crash mid-write leaves one)"
        );
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(pos))
            .map_err(io_err(path))?;
    }
    Ok(Scanned { records, len: pos })
}
