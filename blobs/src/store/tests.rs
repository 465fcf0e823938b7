use super::*;

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
