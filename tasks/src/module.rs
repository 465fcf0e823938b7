//! What a coordinator needs to know about a task module without a wasm engine: whether it
//! imports the checkpoint API (import module [`CHECKPOINT_MODULE`], docs/guest-abi.md).
//!
//! A job whose module imports it is a *checkpointing* job: its replicas may be resumed from a
//! checkpoint, which changes the fuel they use (the restore path is not the path an
//! uninterrupted run took), so their results are compared without fuel
//! ([`crate::RunResult::digest_without_fuel`]) and credited with the smallest fuel among the
//! agreeing replicas. It is a property of the module bytes, the same on every node, so it
//! needs no job-file key and nothing on the wire.

/// The import module of the guest checkpoint API.
pub const CHECKPOINT_MODULE: &str = "peergrid";

/// Whether `wasm` (a binary module) imports anything from module `name`. A module that does
/// not parse as far as its import section answers `false` (it will not run anywhere).
pub fn imports_module(wasm: &[u8], name: &str) -> bool {
    scan(wasm, name).unwrap_or(false)
}

fn leb(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn bytes<'a>(b: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let n = usize::try_from(leb(b, at)?).ok()?;
    let end = at.checked_add(n)?;
    let s = b.get(*at..end)?;
    *at = end;
    Some(s)
}

fn scan(b: &[u8], name: &str) -> Option<bool> {
    if b.get(..8)? != b"\0asm\x01\0\0\0" {
        return None;
    }
    let mut at = 8;
    while at < b.len() {
        let id = b[at];
        at += 1;
        let body = bytes(b, &mut at)?;
        if id != 2 {
            // Import section is id 2; sections are ordered, so past it there is none.
            if id > 2 && id != 0 {
                return Some(false);
            }
            continue;
        }
        let mut p = 0;
        let count = leb(body, &mut p)?;
        for _ in 0..count {
            let module = bytes(body, &mut p)?;
            if module == name.as_bytes() {
                return Some(true);
            }
            let _field = bytes(body, &mut p)?;
            // Skip the import's description.
            match *body.get(p)? {
                0x00 => {
                    p += 1;
                    leb(body, &mut p)?;
                }
                0x01 => {
                    p += 2; // tag, reftype
                    let flag = *body.get(p)?;
                    p += 1;
                    leb(body, &mut p)?;
                    if flag & 1 != 0 {
                        leb(body, &mut p)?;
                    }
                }
                0x02 => {
                    p += 1;
                    let flag = *body.get(p)?;
                    p += 1;
                    leb(body, &mut p)?;
                    if flag & 1 != 0 {
                        leb(body, &mut p)?;
                    }
                }
                0x03 => p += 3, // valtype, mutability
                _ => return None,
            }
        }
        return Some(false);
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module importing `wasi_snapshot_preview1.fd_write`, a memory, a global and then
    /// (optionally) `peergrid.checkpoint`.
    fn module(with: bool) -> Vec<u8> {
        let mut imports: Vec<Vec<u8>> = vec![
            [&b"\x16wasi_snapshot_preview1\x08fd_write\x00\x00"[..]].concat(),
            b"\x03env\x03mem\x02\x01\x01\x02".to_vec(),
            b"\x03env\x01g\x03\x7f\x00".to_vec(),
            b"\x03env\x01t\x01\x70\x00\x01".to_vec(),
        ];
        if with {
            imports.push(b"\x08peergrid\x0acheckpoint\x00\x01".to_vec());
        }
        let mut body = vec![imports.len() as u8];
        for i in &imports {
            body.extend_from_slice(i);
        }
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        // type section: (func (param i32 i32 i32 i32) (result i32)), (func (param i32 i32) (result i32))
        let types = b"\x02\x60\x04\x7f\x7f\x7f\x7f\x01\x7f\x60\x02\x7f\x7f\x01\x7f";
        m.push(1);
        m.push(types.len() as u8);
        m.extend_from_slice(types);
        m.push(2);
        m.push(body.len() as u8);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn finds_the_checkpoint_import_and_only_it() {
        assert!(imports_module(&module(true), CHECKPOINT_MODULE));
        assert!(!imports_module(&module(false), CHECKPOINT_MODULE));
        assert!(!imports_module(b"not wasm", CHECKPOINT_MODULE));
        let m = module(true);
        assert!(!imports_module(&m[..m.len() - 3], CHECKPOINT_MODULE));
    }

    #[test]
    fn the_longrun_sample_checkpoints_and_the_others_do_not() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
        let read = |p: &str| std::fs::read(format!("{dir}{p}")).unwrap();
        assert!(imports_module(
            &read("longrun/longrun.wasm"),
            CHECKPOINT_MODULE
        ));
        assert!(!imports_module(
            &read("primes/primes.wasm"),
            CHECKPOINT_MODULE
        ));
        assert!(!imports_module(&read("seti/seti.wasm"), CHECKPOINT_MODULE));
    }
}
