use super::*;
use std::io::Write;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761) >> 7) as u8 ^ seed)
        .collect()
}

#[test]
fn put_is_idempotent_and_reads_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), None).unwrap();
    let d = data(3 * CHUNK_SIZE + 5, 1);
    let a = store.put(&d).unwrap();
    let b = store.put(&d).unwrap();
    assert_eq!(a, b);
    assert_eq!(store.total_bytes(), d.len() as u64);
    let store = BlobStore::open(dir.path(), None).unwrap();
    assert!(store.has(&a.id));
    assert_eq!(store.read(&a.id).unwrap(), d);
    assert_eq!(store.outboard(&a.id).unwrap(), Outboard::compute(&d));
    let c = store.read_chunks(&a.id, 1, 3).unwrap();
    assert_eq!(c, &d[CHUNK_SIZE..]);
    assert!(matches!(
        store.read_chunks(&a.id, 3, 2),
        Err(StoreError::OutOfRange { .. })
    ));
    let empty = store.put(&[]).unwrap();
    assert_eq!(store.read(&empty.id).unwrap(), Vec::<u8>::new());
    assert_eq!(
        store.read_chunks(&empty.id, 0, 1).unwrap(),
        Vec::<u8>::new()
    );
}

#[test]
fn put_verified_refuses_bytes_that_do_not_hash_to_the_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), None).unwrap();
    let d = data(1000, 2);
    let blob = BlobRef::of(&d);
    let mut bad = d.clone();
    bad[10] ^= 1;
    assert!(matches!(
        store.put_verified(blob, &bad),
        Err(StoreError::Mismatch { .. })
    ));
    assert!(!store.has(&blob.id));
    assert_eq!(store.list(), vec![]);
    store.put_verified(blob, &d).unwrap();
    assert_eq!(store.list(), vec![blob.id]);
}

#[test]
fn lru_eviction_spares_pinned_and_recently_used_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), Some(3000)).unwrap();
    let a = store.put(&data(1000, 1)).unwrap();
    let b = store.put(&data(1000, 2)).unwrap();
    let c = store.put(&data(1000, 3)).unwrap();
    let _pin = store.pin(&a.id); // a is the oldest, but pinned
    store.read(&b.id).unwrap(); // b is now more recent than c
    let d = store.put(&data(1000, 4)).unwrap();
    assert!(store.has(&a.id) && store.has(&b.id) && store.has(&d.id));
    assert!(
        !store.has(&c.id),
        "least recently used unpinned blob goes first"
    );
    assert!(!dir.path().join(c.id.to_string()).exists());
    assert_eq!(store.total_bytes(), 3000);
}

#[test]
fn partial_download_resumes_with_verified_chunks_and_never_writes_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(5 * CHUNK_SIZE + 17, 9);
    let ob = Outboard::compute(&d);
    let blob = ob.blob();
    let chunk = |i: u64| {
        let r = blob.chunk_range(i);
        &d[r.start as usize..r.end as usize]
    };
    {
        let store = BlobStore::open(dir.path(), None).unwrap();
        let p = store.partial(ob.clone()).unwrap();
        assert!(p.write_chunk(0, chunk(0)).unwrap());
        assert!(p.write_chunk(5, chunk(5)).unwrap());
        let mut bad = chunk(2).to_vec();
        bad[0] ^= 0xff;
        assert!(matches!(
            p.write_chunk(2, &bad),
            Err(StoreError::Verify(..))
        ));
        // Served while downloading.
        assert_eq!(
            store.have(&blob.id).unwrap().1,
            vec![true, false, false, false, false, true]
        );
        assert_eq!(store.read_chunks(&blob.id, 5, 1).unwrap(), chunk(5));
        assert!(matches!(
            store.read_chunks(&blob.id, 0, 2),
            Err(StoreError::ChunkMissing { .. })
        ));
        assert!(!store.has(&blob.id));
        assert!(store.finish(&p).is_err());
    }
    // "Restart": a new store finds the verified chunks again.
    let store = BlobStore::open(dir.path(), None).unwrap();
    let ob2 = store.partial_outboard(blob).expect("outboard persisted");
    let p = store.partial(ob2).unwrap();
    assert_eq!(p.have(), vec![true, false, false, false, false, true]);
    for i in 1..5 {
        p.write_chunk(i, chunk(i)).unwrap();
    }
    store.finish(&p).unwrap();
    assert_eq!(store.read(&blob.id).unwrap(), d);
    assert!(store.partial_of(&blob.id).is_none());
    assert!(!dir
        .path()
        .join("partial")
        .join(blob.id.to_string())
        .exists());
}

/// The pack files in the store, in write order, with their lengths.
fn packs(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_str().unwrap().to_string(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    v.sort();
    v
}

fn record_len(data: &[u8]) -> u64 {
    pack::HEADER + data.len() as u64
}

/// Every read path on `blob`, as for a file blob.
fn assert_serves(store: &BlobStore, d: &[u8]) {
    let id = BlobId::of(d);
    assert!(store.has(&id));
    assert_eq!(store.size(&id), Some(d.len() as u64));
    assert!(store.list().contains(&id));
    assert_eq!(store.read(&id).unwrap(), d);
    assert_eq!(store.read_chunks(&id, 0, 1).unwrap(), d);
    assert!(matches!(
        store.read_chunks(&id, 0, 2),
        Err(StoreError::OutOfRange { .. })
    ));
    assert_eq!(store.outboard(&id).unwrap(), Outboard::compute(d));
    assert_eq!(store.have(&id), Some((d.len() as u64, vec![true])));
}

/// The unsynced variant writes the same records to the same pack (only the `fdatasync` is
/// left out), so a reopened store (a restarted process) finds them.
#[test]
fn an_unsynced_small_batch_is_in_the_pack_and_found_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), None).unwrap();
    let small = [data(100, 1), data(5000, 3)];
    store.put_small_batch_unsynced(&small).unwrap();
    store.put_small_batch(&[data(10, 5)]).unwrap();
    let pack_len: u64 = small.iter().map(|d| record_len(d)).sum::<u64>() + record_len(&data(10, 5));
    assert_eq!(
        packs(dir.path()),
        vec![("0000000000000000.pack".into(), pack_len)]
    );
    drop(store);
    let store = BlobStore::open(dir.path(), None).unwrap();
    for d in small.iter().chain([&data(10, 5)]) {
        assert_serves(&store, d);
    }
}

#[test]
fn small_batch_round_trips_through_one_pack_and_reopen_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), None).unwrap();
    let small = [data(100, 1), data(0, 0), data(CHUNK_SIZE, 2), data(5000, 3)];
    let big = data(CHUNK_SIZE + 1, 4);
    let mut batch: Vec<Vec<u8>> = small.to_vec();
    batch.push(small[0].clone()); // twice in one batch: one record
    batch.push(big.clone());
    let refs = store.put_small_batch(&batch).unwrap();
    assert_eq!(
        refs,
        batch.iter().map(|b| BlobRef::of(b)).collect::<Vec<_>>()
    );
    let pack_len: u64 = small.iter().map(|d| record_len(d)).sum();
    assert_eq!(
        packs(dir.path()),
        vec![("0000000000000000.pack".into(), pack_len)]
    );
    for d in &small {
        assert_serves(&store, d);
        assert!(!dir.path().join(BlobId::of(d).to_string()).exists());
    }
    // Over one chunk: a file with its outboard, as `put` makes.
    assert!(dir.path().join(BlobId::of(&big).to_string()).exists());
    assert_eq!(store.read(&BlobId::of(&big)).unwrap(), big);
    assert_eq!(store.total_bytes(), pack_len + big.len() as u64);
    assert_eq!(store.list().len(), 5);

    let store = BlobStore::open(dir.path(), None).unwrap();
    for d in &small {
        assert_serves(&store, d);
    }
    assert_eq!(store.total_bytes(), pack_len + big.len() as u64);
    // Put again: only touched, nothing appended.
    store.put_small_batch(&small).unwrap();
    assert_eq!(
        packs(dir.path()),
        vec![("0000000000000000.pack".into(), pack_len)]
    );
}

#[test]
fn torn_tail_is_cut_on_open_and_appends_go_on_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = [data(300, 1), data(400, 2)];
    let b = [data(500, 3)];
    let whole: u64 = a.iter().map(|d| record_len(d)).sum();
    {
        let store = BlobStore::open(dir.path(), None).unwrap();
        store.put_small_batch(&a).unwrap();
    }
    // A crash mid-append: a header promising 1000 bytes, then 10 of them.
    let path = dir.path().join("packs").join("0000000000000000.pack");
    let mut torn = Vec::new();
    pack::encode(&mut torn, &BlobId::of(&data(1000, 9)), &data(1000, 9));
    torn.truncate(pack::HEADER as usize + 10);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&torn).unwrap();
    drop(f);

    let store = BlobStore::open(dir.path(), None).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
    assert_eq!(store.total_bytes(), whole);
    assert!(!store.has(&BlobId::of(&data(1000, 9))));
    store.put_small_batch(&b).unwrap();
    drop(store);

    let store = BlobStore::open(dir.path(), None).unwrap();
    for d in a.iter().chain(&b) {
        assert_serves(&store, d);
    }
    assert_eq!(
        packs(dir.path()),
        vec![("0000000000000000.pack".into(), whole + record_len(&b[0]))]
    );
}

#[test]
fn corrupt_record_is_skipped_on_open_and_the_others_survive() {
    let dir = tempfile::tempdir().unwrap();
    let ds = [data(300, 1), data(400, 2), data(500, 3)];
    {
        let store = BlobStore::open(dir.path(), None).unwrap();
        store.put_small_batch(&ds).unwrap();
    }
    // Flip a byte in the second record's data.
    let path = dir.path().join("packs").join("0000000000000000.pack");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = (record_len(&ds[0]) + pack::HEADER + 7) as usize;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let store = BlobStore::open(dir.path(), None).unwrap();
    assert_serves(&store, &ds[0]);
    assert!(!store.has(&BlobId::of(&ds[1])));
    assert!(matches!(
        store.read(&BlobId::of(&ds[1])),
        Err(StoreError::NotFound(_))
    ));
    assert_serves(&store, &ds[2]);
    assert_eq!(store.list().len(), 2);
}

#[test]
fn eviction_deletes_a_pack_once_all_its_records_are_evicted_and_keeps_the_total_under_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    // A pack takes at most cap / 8 = 4096 bytes: three records of 1000 bytes.
    let cap = 32 * 1024;
    let store = BlobStore::open(dir.path(), Some(cap)).unwrap();
    let ds: Vec<Vec<u8>> = (0..60).map(|i| data(1000, i)).collect();
    let pinned = BlobId::of(&ds[0]);
    let _pin = store.pin(&pinned);
    for d in &ds {
        store.put_small_batch(std::slice::from_ref(d)).unwrap();
        let on_disk: u64 = packs(dir.path()).iter().map(|p| p.1).sum();
        assert_eq!(store.total_bytes(), on_disk, "the total counts whole packs");
        assert!(
            on_disk <= cap,
            "{on_disk} bytes of packs over the cap {cap}"
        );
    }
    let names: Vec<String> = packs(dir.path()).into_iter().map(|p| p.0).collect();
    // The first pack stays for its pinned record; the next oldest ones are gone.
    assert_eq!(names[0], "0000000000000000.pack");
    assert_ne!(names[1], "0000000000000001.pack");
    assert_eq!(names.last().unwrap(), "0000000000000019.pack");
    assert_serves(&store, &ds[0]);
    assert!(!store.has(&BlobId::of(&ds[1])));
    assert!(!store.has(&BlobId::of(&ds[3])));
    assert_serves(&store, &ds[59]);
    // Nothing in the index points into a deleted pack.
    for id in store.list() {
        assert!(store.read(&id).is_ok());
    }
    // Reopening finds the same blobs and the same total.
    let held = store.list();
    let total = store.total_bytes();
    drop(store);
    let store = BlobStore::open(dir.path(), Some(cap)).unwrap();
    assert_eq!(store.total_bytes(), total);
    for id in &held {
        assert!(store.has(id));
    }
}

#[test]
fn blob_held_as_a_file_is_only_touched_when_put_in_a_pack() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), Some(3000)).unwrap();
    let a = store.put(&data(1000, 1)).unwrap();
    let b = store.put(&data(1000, 2)).unwrap();
    let _c = store.put(&data(1000, 3)).unwrap();
    // `a` is now the most recently used, and still a file.
    store.put_small_batch(&[data(1000, 1)]).unwrap();
    assert!(packs(dir.path()).iter().all(|p| p.1 == 0));
    assert_eq!(store.total_bytes(), 3000);
    store.put(&data(1000, 4)).unwrap();
    assert!(store.has(&a.id), "touched by the batch, so not the oldest");
    assert!(!store.has(&b.id));
    assert_eq!(store.read(&a.id).unwrap(), data(1000, 1));
}

#[test]
fn blob_found_both_as_a_file_and_in_a_pack_counts_as_the_file_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let ds = [data(300, 1), data(400, 2)];
    let pack_len: u64 = ds.iter().map(|d| record_len(d)).sum();
    {
        let store = BlobStore::open(dir.path(), None).unwrap();
        store.put_small_batch(&ds).unwrap();
    }
    // E.g. evicted from the index (its pack kept for others), then downloaded again.
    std::fs::write(dir.path().join(BlobId::of(&ds[0]).to_string()), &ds[0]).unwrap();
    // The pack older than the file, so that the file is found second and takes over.
    let pack = dir.path().join("packs").join("0000000000000000.pack");
    std::fs::File::options()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        .unwrap();
    let store = BlobStore::open(dir.path(), None).unwrap();
    assert_eq!(
        store.total_bytes(),
        pack_len + ds[0].len() as u64,
        "the file counts on its own, the pack whole"
    );
    assert_serves(&store, &ds[0]);
    assert_serves(&store, &ds[1]);
}

/// What a worker announces: blob files before packed small blobs, each most recently used
/// first, and never more than asked for, however many are held.
#[test]
fn blobs_to_announce_are_files_first_then_packed_newest_first_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), None).unwrap();
    let f1 = data(10, 1);
    let f2 = data(CHUNK_SIZE + 1, 2);
    store.put(&f1).unwrap();
    let packed: Vec<Vec<u8>> = (0..5).map(|i| data(20, 10 + i)).collect();
    store.put_small_batch(&packed).unwrap();
    store.put(&f2).unwrap();
    let id = |d: &Vec<u8>| BlobId::of(d);
    let mut want = vec![id(&f2), id(&f1)];
    want.extend(packed.iter().rev().map(id));
    assert_eq!(store.list_to_announce(100), want);
    assert_eq!(store.list_to_announce(3), want[..3].to_vec());
    assert_eq!(store.list_to_announce(0), Vec::<BlobId>::new());
}

/// Tiny blobs are bounded in number, not only in bytes: past `MAX_PACKED_BLOBS` (and an
/// eighth) the least recently used leave the index, and the newest stay served.
#[test]
fn packed_blobs_are_bounded_in_number_keeping_the_newest() {
    use super::MAX_PACKED_BLOBS;
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), Some(4 << 30)).unwrap();
    let blob = |i: u32| i.to_le_bytes().to_vec();
    let n = (MAX_PACKED_BLOBS + MAX_PACKED_BLOBS / 4) as u32;
    for start in (0..n).step_by(4096) {
        let batch: Vec<Vec<u8>> = (start..(start + 4096).min(n)).map(blob).collect();
        store.put_small_batch_unsynced(&batch).unwrap();
    }
    let held = store.list().len();
    assert!(
        (MAX_PACKED_BLOBS..=MAX_PACKED_BLOBS + MAX_PACKED_BLOBS / 8).contains(&held),
        "{held} packed blobs held"
    );
    assert!(!store.has(&BlobId::of(&blob(0))), "the oldest went");
    assert_serves(&store, &blob(n - 1));
    // A reopened store is bounded the same way.
    drop(store);
    let store = BlobStore::open(dir.path(), Some(4 << 30)).unwrap();
    assert!(store.list().len() <= MAX_PACKED_BLOBS + MAX_PACKED_BLOBS / 8);
    assert_serves(&store, &blob(n - 1));
}
