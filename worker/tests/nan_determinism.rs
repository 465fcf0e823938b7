//! Determinism of NaN bit patterns in each determinism class of the engine
//! (`sandbox::engine::build(deterministic)`): `portable` (NaN canonicalization on) and
//! `native` (the fixed ISA baseline, no canonicalization). A guest that produces and
//! propagates NaNs with payloads (0/0, sqrt(-1), min/max, copysign, reinterpret, promote and
//! demote, f32 and f64, scalar and SIMD lanes) prints every result's bits; it runs under
//! several worker configurations that must not change the class (fresh compile or loaded
//! from the disk cache, different fuel budgets, several slots at once, the pooling allocator
//! with epoch interruption off), and every run of a class must print the same bytes.

use std::path::Path;

use tasks::Status;
use wasmtime::{
    Caller, Engine, InstanceAllocationStrategy, Linker, Module, PoolingAllocationConfig, Store,
};
use worker::sandbox::engine::{self, Isa};
use worker::sandbox::{RunControl, RunSpec, Sandbox, SandboxConfig};

fn guest() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nan_payloads.wat");
    wat::parse_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn spec(fuel: u64) -> RunSpec {
    RunSpec {
        argv: vec!["nan".into()],
        fuel,
        memory_mb: 16,
        max_output: 1 << 16,
        ..RunSpec::default()
    }
}

/// Run through the sandbox; returns (stdout, fuel used).
fn run(sandbox: &Sandbox, fuel: u64) -> (Vec<u8>, u64) {
    let out = sandbox
        .run_bytes(&guest(), &spec(fuel), &RunControl::default())
        .unwrap();
    assert_eq!(out.result.status, Status::Ok, "{:?}", out.error);
    (out.output, out.result.fuel_used)
}

/// The same engine configuration, but with the pooling allocator, epoch interruption off and
/// parallel compilation: allocator and interruption settings that must not change a result.
/// The guest runs with a bare `fd_write` (its only import).
fn run_pooled(deterministic: bool) -> Vec<u8> {
    let mut c = engine::config(deterministic, Isa::Baseline).unwrap();
    let mut pool = PoolingAllocationConfig::default();
    pool.total_memories(4)
        .total_tables(4)
        .total_core_instances(4);
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    c.epoch_interruption(false);
    c.parallel_compilation(true);
    let engine = Engine::new(&c).unwrap();
    let module = Module::new(&engine, guest()).unwrap();
    let mut linker: Linker<Vec<u8>> = Linker::new(&engine);
    linker
        .func_wrap(
            "wasi_snapshot_preview1",
            "fd_write",
            |mut caller: Caller<'_, Vec<u8>>, fd: i32, iov: i32, n: i32, nw: i32| -> i32 {
                assert_eq!((fd, n), (1, 1));
                let mem = caller.get_export("memory").unwrap().into_memory().unwrap();
                let mut b = [0u8; 8];
                mem.read(&caller, iov as usize, &mut b).unwrap();
                let ptr = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
                let len = u32::from_le_bytes(b[4..].try_into().unwrap()) as usize;
                let mut data = vec![0u8; len];
                mem.read(&caller, ptr, &mut data).unwrap();
                mem.write(&mut caller, nw as usize, &(len as u32).to_le_bytes())
                    .unwrap();
                caller.data_mut().extend_from_slice(&data);
                0
            },
        )
        .unwrap();
    let mut store = Store::new(&engine, Vec::new());
    store.set_fuel(1_000_000_000).unwrap();
    let instance = linker.instantiate(&mut store, &module).unwrap();
    instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .unwrap()
        .call(&mut store, ())
        .unwrap();
    store.into_data()
}

/// Every configuration of one class; asserts they all print the same bytes and use the same
/// fuel, and returns the output.
fn outputs_of_class(deterministic: bool) -> String {
    let fresh = Sandbox::new(SandboxConfig {
        deterministic,
        ..SandboxConfig::default()
    })
    .unwrap();
    let (reference, fuel) = run(&fresh, 1_000_000_000);
    assert!(!reference.is_empty());
    // A bigger budget: the same output and the same fuel used.
    assert_eq!(run(&fresh, 50_000_000_000), (reference.clone(), fuel));

    // Compiled by one sandbox into the disk cache, loaded from it by another.
    let dir = tempfile::tempdir().unwrap();
    let cached = || {
        Sandbox::new(SandboxConfig {
            deterministic,
            cache_dir: Some(dir.path().to_path_buf()),
            ..SandboxConfig::default()
        })
        .unwrap()
    };
    let first = cached();
    assert_eq!(run(&first, 1_000_000_000), (reference.clone(), fuel));
    drop(first);
    let second = cached();
    assert_eq!(run(&second, 1_000_000_000), (reference.clone(), fuel));
    assert_eq!(
        second.compile_stats().compiles,
        0,
        "loaded from the disk cache"
    );

    // Four slots at once on one sandbox.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| run(&fresh, 1_000_000_000)))
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), (reference.clone(), fuel));
        }
    });

    assert_eq!(run_pooled(deterministic), reference, "pooling allocator");
    String::from_utf8(reference).unwrap()
}

/// Whether a printed line is a NaN, and whether that NaN is the canonical one.
fn nan(line: &str) -> Option<bool> {
    let (kind, hex) = line.split_once(' ').expect("`d|s <hex>`");
    match kind {
        "d" => {
            let bits = u64::from_str_radix(hex, 16).unwrap();
            f64::from_bits(bits)
                .is_nan()
                .then_some(bits == 0x7ff8_0000_0000_0000)
        }
        "s" => {
            let bits = u32::from_str_radix(hex, 16).unwrap();
            f32::from_bits(bits).is_nan().then_some(bits == 0x7fc0_0000)
        }
        other => panic!("unexpected line kind {other:?}"),
    }
}

#[test]
fn portable_class_is_identical_across_configurations_and_prints_only_canonical_nans() {
    let out = outputs_of_class(true);
    let lines: Vec<&str> = out.lines().collect();
    let nans = lines.iter().filter(|l| nan(l).is_some()).count();
    assert!(
        nans >= 40,
        "the guest produces NaNs ({nans} of {})",
        lines.len()
    );
    for l in &lines {
        assert_ne!(
            nan(l),
            Some(false),
            "non-canonical NaN in the portable class: {l}"
        );
    }
}

#[test]
fn native_class_is_identical_across_configurations() {
    let out = outputs_of_class(false);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), outputs_of_class(true).lines().count());
    // Without canonicalization the hardware propagates payloads: on x86_64 (SSE, the
    // baseline) an operation on a NaN operand returns it quieted, so payloads show. This
    // also proves the canonical check above is not vacuous.
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            lines.iter().any(|l| nan(l) == Some(false)),
            "expected propagated NaN payloads in the native class:\n{out}"
        );
        // sNaN 0x7ff4000000000123 + 1.0 comes back quieted with its payload.
        assert_eq!(lines[2], "d 7ffc000000000123", "{out}");
    }
}
