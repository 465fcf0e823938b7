//! Content ids and verified chunks.
//!
//! A blob (module, input, output) is named by its plain blake3 hash, so `b3sum file` names
//! it too. Blobs move in chunks of [`CHUNK_SIZE`] bytes. Because `CHUNK_SIZE` is a power of
//! two multiple of blake3's 1 KiB chunk, each transfer chunk is a complete subtree of
//! blake3's tree, and its chaining value (CV) can be computed on its own with blake3's
//! `hazmat` API. The [`Outboard`] of a blob is the list of its chunk CVs (32 bytes per
//! 256 KiB, about 0.01% of the blob).
//!
//! A receiver that knows only the root and the size:
//! 1. fetches the outboard and checks with [`Outboard::verify`] that the CVs fold up to the
//!    root (a lying peer is caught here, before any data);
//! 2. checks each chunk on its own with [`Outboard::verify_chunk`] before storing, executing
//!    or serving it onward, so chunks can come from many peers in any order.
//!
//! A blob of at most one chunk has an empty outboard; its single chunk is checked against the
//! root directly.

use std::fmt;
use std::str::FromStr;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes per verified transfer chunk (a power of two, at least 1 KiB).
pub const CHUNK_SIZE: usize = 256 * 1024;

/// A blob's id: its plain blake3 hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// The id of these bytes.
    pub fn of(data: &[u8]) -> BlobId {
        BlobId(*blake3::hash(data).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl From<blake3::Hash> for BlobId {
    fn from(h: blake3::Hash) -> Self {
        BlobId(*h.as_bytes())
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", self.short())
    }
}

/// Why a text is not a blob id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a blob id: expected 64 hex digits (a blake3 hash), got {got:?}")]
pub struct ParseBlobIdError {
    pub got: String,
}

impl FromStr for BlobId {
    type Err = ParseBlobIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(ParseBlobIdError {
                got: s.chars().take(80).collect(),
            });
        }
        Ok(BlobId(out))
    }
}

// Hex in human-readable formats (JSON), raw bytes in postcard.
impl Serialize for BlobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(BlobId(<[u8; 32]>::deserialize(d)?))
        }
    }
}

/// A blob id with its size: what a receiver needs to verify it chunk by chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    pub id: BlobId,
    pub size: u64,
}

impl BlobRef {
    pub fn of(data: &[u8]) -> BlobRef {
        BlobRef {
            id: BlobId::of(data),
            size: data.len() as u64,
        }
    }

    /// Number of transfer chunks (at least 1, even for the empty blob).
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size)
    }

    /// Byte range of chunk `index`.
    pub fn chunk_range(&self, index: u64) -> std::ops::Range<u64> {
        let start = index * CHUNK_SIZE as u64;
        start..(start + CHUNK_SIZE as u64).min(self.size)
    }
}

/// Number of transfer chunks of a blob of `size` bytes (at least 1).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE as u64).max(1)
}

/// Why a blob, outboard or chunk failed verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("outboard has {got} chaining values, a {size}-byte blob needs {want}")]
    OutboardLength { got: usize, want: usize, size: u64 },
    #[error("outboard does not hash to root {root}")]
    OutboardMismatch { root: BlobId },
    #[error("chunk {index} is out of range: the blob has {count} chunks")]
    ChunkOutOfRange { index: u64, count: u64 },
    #[error("chunk {index} is {got} bytes, expected {want}")]
    ChunkLength { index: u64, got: usize, want: usize },
    #[error("chunk {index} does not match blob {root}")]
    ChunkMismatch { index: u64, root: BlobId },
}

/// The chunk chaining values of one blob, verified against its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outboard {
    blob: BlobRef,
    /// One CV per chunk; empty when the blob is a single chunk.
    cvs: Vec<[u8; 32]>,
}

fn chunk_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * CHUNK_SIZE as u64);
    h.update(data);
    h.finalize_non_root()
}

/// Fold CVs of a left-complete run of chunks into the CV of their subtree.
fn fold(cvs: &[[u8; 32]], root: bool) -> Fold {
    debug_assert!(cvs.len() >= 2 || !root);
    if cvs.len() == 1 {
        return Fold::Cv(cvs[0]);
    }
    // blake3's tree: the left subtree holds the largest power of two of chunks that leaves
    // at least one for the right. Our chunks are power-of-two groups of blake3 chunks, so
    // the same split applies to them.
    let split = (cvs.len() - 1).next_power_of_two().max(1);
    let split = if split >= cvs.len() { split / 2 } else { split };
    let left = fold(&cvs[..split], false).cv();
    let right = fold(&cvs[split..], false).cv();
    if root {
        Fold::Root(merge_subtrees_root(&left, &right, Mode::Hash))
    } else {
        Fold::Cv(merge_subtrees_non_root(&left, &right, Mode::Hash))
    }
}

enum Fold {
    Cv([u8; 32]),
    Root(blake3::Hash),
}

impl Fold {
    fn cv(self) -> [u8; 32] {
        match self {
            Fold::Cv(cv) => cv,
            Fold::Root(_) => unreachable!("root is only produced at the top"),
        }
    }
}

impl Outboard {
    /// Hash a whole blob: its id and outboard.
    pub fn compute(data: &[u8]) -> Outboard {
        let blob = BlobRef::of(data);
        let cvs = if blob.chunk_count() <= 1 {
            Vec::new()
        } else {
            data.chunks(CHUNK_SIZE)
                .enumerate()
                .map(|(i, c)| chunk_cv(i as u64, c))
                .collect()
        };
        Outboard { blob, cvs }
    }

    /// Check CVs received from a peer against the blob's root and size.
    pub fn verify(blob: BlobRef, cvs: Vec<[u8; 32]>) -> Result<Outboard, VerifyError> {
        let count = blob.chunk_count();
        let want = if count <= 1 { 0 } else { count as usize };
        if cvs.len() != want {
            return Err(VerifyError::OutboardLength {
                got: cvs.len(),
                want,
                size: blob.size,
            });
        }
        if want > 0 {
            match fold(&cvs, true) {
                Fold::Root(h) if BlobId::from(h) == blob.id => {}
                _ => return Err(VerifyError::OutboardMismatch { root: blob.id }),
            }
        }
        Ok(Outboard { blob, cvs })
    }

    pub fn blob(&self) -> BlobRef {
        self.blob
    }

    pub fn cvs(&self) -> &[[u8; 32]] {
        &self.cvs
    }

    /// Check one chunk on its own.
    pub fn verify_chunk(&self, index: u64, data: &[u8]) -> Result<(), VerifyError> {
        let count = self.blob.chunk_count();
        if index >= count {
            return Err(VerifyError::ChunkOutOfRange { index, count });
        }
        let range = self.blob.chunk_range(index);
        let want = (range.end - range.start) as usize;
        if data.len() != want {
            return Err(VerifyError::ChunkLength {
                index,
                got: data.len(),
                want,
            });
        }
        let ok = if self.cvs.is_empty() {
            BlobId::of(data) == self.blob.id
        } else {
            chunk_cv(index, data) == self.cvs[index as usize]
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::ChunkMismatch {
                index,
                root: self.blob.id,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64).wrapping_mul(2654435761).to_le_bytes()[1])
            .collect()
    }

    #[test]
    fn outboard_folds_to_plain_blake3_root_for_many_sizes() {
        for len in [
            0,
            1,
            1024,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            2 * CHUNK_SIZE,
            3 * CHUNK_SIZE - 7,
            5 * CHUNK_SIZE,
            8 * CHUNK_SIZE + 3,
        ] {
            let d = data(len);
            let ob = Outboard::compute(&d);
            assert_eq!(ob.blob().id, BlobId(*blake3::hash(&d).as_bytes()));
            let again = Outboard::verify(ob.blob(), ob.cvs().to_vec()).expect("verifies");
            for i in 0..ob.blob().chunk_count() {
                let r = ob.blob().chunk_range(i);
                again
                    .verify_chunk(i, &d[r.start as usize..r.end as usize])
                    .unwrap();
            }
        }
    }
}

/// The verified transfer scheme against a lying or broken peer: every way of serving wrong
/// bytes or a wrong outboard is caught before the data is used.
#[cfg(test)]
mod transfer_tests {
    use super::*;

    /// Six chunks, the last one partial; no two chunks alike.
    fn blob() -> Vec<u8> {
        (0..5 * CHUNK_SIZE + 1234)
            .map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes()[0])
            .collect()
    }

    fn chunk(data: &[u8], r: &BlobRef, i: u64) -> Vec<u8> {
        let range = r.chunk_range(i);
        data[range.start as usize..range.end as usize].to_vec()
    }

    /// What a receiver does: verify the outboard against the trusted ref, then each chunk.
    fn receive(
        trusted: BlobRef,
        cvs: Vec<[u8; 32]>,
        chunks: &[(u64, Vec<u8>)],
    ) -> Result<(), VerifyError> {
        let ob = Outboard::verify(trusted, cvs)?;
        chunks.iter().try_for_each(|(i, c)| ob.verify_chunk(*i, c))
    }

    fn all_chunks(data: &[u8], r: &BlobRef) -> Vec<(u64, Vec<u8>)> {
        (0..r.chunk_count())
            .map(|i| (i, chunk(data, r, i)))
            .collect()
    }

    #[test]
    fn honest_transfer_verifies_in_any_order() {
        let data = blob();
        let ob = Outboard::compute(&data);
        let r = ob.blob();
        assert_eq!(r.chunk_count(), 6);
        let mut chunks = all_chunks(&data, &r);
        chunks.reverse();
        receive(r, ob.cvs().to_vec(), &chunks).unwrap();
    }

    #[test]
    fn corrupting_any_byte_fails_its_chunk() {
        let data = blob();
        let ob = Outboard::compute(&data);
        let r = ob.blob();
        let mut positions: Vec<usize> = vec![
            0,
            1,
            data.len() - 1,
            data.len() - 1234,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
        ];
        let mut x: u64 = 7;
        for _ in 0..64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            positions.push((x >> 33) as usize % data.len());
        }
        for pos in positions {
            let index = (pos / CHUNK_SIZE) as u64;
            let mut bad = chunk(&data, &r, index);
            bad[pos % CHUNK_SIZE] ^= 1 << (pos % 8);
            assert_eq!(
                ob.verify_chunk(index, &bad),
                Err(VerifyError::ChunkMismatch { index, root: r.id }),
                "byte {pos}"
            );
        }
    }

    #[test]
    fn corrupting_a_single_chunk_blob_fails_against_the_root() {
        let data = &blob()[..1000];
        let ob = Outboard::compute(data);
        assert!(ob.cvs().is_empty());
        for pos in [0, 500, 999] {
            let mut bad = data.to_vec();
            bad[pos] ^= 0x80;
            assert!(matches!(
                ob.verify_chunk(0, &bad),
                Err(VerifyError::ChunkMismatch { .. })
            ));
        }
        assert!(matches!(
            ob.verify_chunk(0, &data[..999]),
            Err(VerifyError::ChunkLength { .. })
        ));
    }

    #[test]
    fn truncated_or_extended_chunks_are_refused() {
        let data = blob();
        let ob = Outboard::compute(&data);
        let r = ob.blob();
        for i in 0..r.chunk_count() {
            let good = chunk(&data, &r, i);
            let want = good.len();
            for got in [0, 1, want - 1] {
                assert_eq!(
                    ob.verify_chunk(i, &good[..got]),
                    Err(VerifyError::ChunkLength {
                        index: i,
                        got,
                        want
                    })
                );
            }
            let mut longer = good.clone();
            longer.push(0);
            assert_eq!(
                ob.verify_chunk(i, &longer),
                Err(VerifyError::ChunkLength {
                    index: i,
                    got: want + 1,
                    want
                })
            );
        }
        assert_eq!(
            ob.verify_chunk(6, &[]),
            Err(VerifyError::ChunkOutOfRange { index: 6, count: 6 })
        );
    }

    #[test]
    fn chunk_presented_at_another_index_is_refused() {
        let data = blob();
        let ob = Outboard::compute(&data);
        let r = ob.blob();
        // Full chunks have equal lengths, so only the chaining value (which covers the chunk's
        // position in the blob) can tell them apart.
        for i in 0..5 {
            for j in 0..5 {
                if i != j {
                    let c = chunk(&data, &r, i);
                    assert_eq!(
                        ob.verify_chunk(j, &c),
                        Err(VerifyError::ChunkMismatch {
                            index: j,
                            root: r.id
                        }),
                        "{i} as {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn outboard_for_a_wrong_root_or_size_is_refused() {
        let data = blob();
        let ob = Outboard::compute(&data);
        let r = ob.blob();
        let cvs = ob.cvs().to_vec();
        let other_root = BlobRef {
            id: BlobId::of(b"something else"),
            size: r.size,
        };
        assert_eq!(
            Outboard::verify(other_root, cvs.clone()),
            Err(VerifyError::OutboardMismatch {
                root: other_root.id
            })
        );
        // A size with another chunk count: the outboard has the wrong number of CVs.
        for size in [
            r.size + CHUNK_SIZE as u64,
            r.size - 1234,
            CHUNK_SIZE as u64,
            0,
        ] {
            let wrong = BlobRef { id: r.id, size };
            assert!(
                matches!(
                    Outboard::verify(wrong, cvs.clone()),
                    Err(VerifyError::OutboardLength { .. })
                ),
                "size {size}"
            );
        }
        // A size with the same chunk count passes the outboard check (the CVs fold to the
        // root), but then no last chunk can verify: neither the real bytes nor bytes cut or
        // padded to the claimed length.
        for size in [r.size - 1, r.size + 1] {
            let wrong = Outboard::verify(BlobRef { id: r.id, size }, cvs.clone()).unwrap();
            let last = chunk(&data, &r, 5);
            assert!(matches!(
                wrong.verify_chunk(5, &last),
                Err(VerifyError::ChunkLength { .. })
            ));
            let mut resized = last.clone();
            resized.resize((last.len() as u64 + size - r.size) as usize, 0);
            assert!(wrong.verify_chunk(5, &resized).is_err());
        }
        // A single-chunk blob's only check is the root.
        let small = &data[..100];
        let wrong = Outboard::verify(
            BlobRef {
                id: BlobId::of(small),
                size: 99,
            },
            vec![],
        )
        .unwrap();
        assert!(wrong.verify_chunk(0, &small[..99]).is_err());
    }

    #[test]
    fn tampered_outboard_is_refused_before_any_data() {
        let data = blob();
        let ob = Outboard::compute(&data);
        let r = ob.blob();
        for k in 0..ob.cvs().len() {
            for byte in [0, 17, 31] {
                let mut cvs = ob.cvs().to_vec();
                cvs[k][byte] ^= 0x01;
                assert_eq!(
                    Outboard::verify(r, cvs),
                    Err(VerifyError::OutboardMismatch { root: r.id }),
                    "cv {k} byte {byte}"
                );
            }
        }
        let mut swapped = ob.cvs().to_vec();
        swapped.swap(1, 2);
        assert_eq!(
            Outboard::verify(r, swapped),
            Err(VerifyError::OutboardMismatch { root: r.id })
        );
        let mut short = ob.cvs().to_vec();
        short.pop();
        assert!(matches!(
            Outboard::verify(r, short),
            Err(VerifyError::OutboardLength { .. })
        ));
        let mut long = ob.cvs().to_vec();
        long.push([0; 32]);
        assert!(matches!(
            Outboard::verify(r, long),
            Err(VerifyError::OutboardLength { .. })
        ));
        // A CV list for a different blob of the same size does not fold to this root.
        let mut other = data.clone();
        other[0] ^= 1;
        assert!(Outboard::verify(r, Outboard::compute(&other).cvs().to_vec()).is_err());
    }
}
