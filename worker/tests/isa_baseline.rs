//! The fixed ISA baseline (`sandbox::engine::BASELINE`) makes compiled code a function of the
//! module and the fingerprint alone: two engines that share the baseline and the code
//! generation settings, but differ in everything else a worker may vary (allocator, cache,
//! memory reservation of the allocator, ...), produce byte-identical artifacts; an engine
//! left to detect this CPU's features produces different code whenever the CPU has more than
//! the baseline (this machine has AVX2, so it does).

use std::path::Path;

use object::{Object, ObjectSection};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use worker::sandbox::engine::{self, Isa, BASELINE};

/// Modules with scalar float code (the samples) and wasm SIMD lane arithmetic.
fn modules() -> Vec<(String, Vec<u8>)> {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut v: Vec<(String, Vec<u8>)> = ["mandelbrot", "seti", "pi", "primes"]
        .iter()
        .map(|n| {
            let p = ex.join(n).join(format!("{n}.wasm"));
            (
                n.to_string(),
                std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            )
        })
        .collect();
    let simd = wat::parse_str(
        r#"(module (memory 1)
            (func (export "k") (param i32) (result f64)
              (local v128)
              (local.set 1 (v128.load (local.get 0)))
              (local.set 1 (f64x2.add (f64x2.mul (local.get 1) (local.get 1)) (f64x2.sqrt (local.get 1))))
              (local.set 1 (f32x4.min (local.get 1) (f32x4.nearest (local.get 1))))
              (local.set 1 (i32x4.dot_i16x8_s (local.get 1) (i8x16.popcnt (local.get 1))))
              (v128.store (local.get 0) (local.get 1))
              (f64.add (f64x2.extract_lane 0 (local.get 1))
                       (f64.convert_i32_u (i32.popcnt (i32.clz (local.get 0)))))))"#,
    )
    .unwrap();
    v.push(("simd".into(), simd));
    v
}

fn engine_with(cfg: wasmtime::Config) -> Engine {
    Engine::new(&cfg).expect("engine")
}

/// The baseline configuration as the sandbox builds it, then varied in what must not change
/// the code: the pooling allocator (with its own limits) and parallel compilation.
fn varied_baseline(deterministic: bool) -> Engine {
    let mut c = engine::config(deterministic, Isa::Baseline).unwrap();
    let mut pool = PoolingAllocationConfig::default();
    pool.total_memories(8)
        .total_tables(8)
        .total_core_instances(8);
    pool.max_memory_size(64 << 20);
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    c.parallel_compilation(true);
    engine_with(c)
}

fn text(artifact: &[u8]) -> Vec<u8> {
    let file = object::File::parse(artifact).expect("an ELF artifact");
    file.section_by_name(".text")
        .expect("a .text section")
        .data()
        .expect("section data")
        .to_vec()
}

#[test]
fn baseline_artifacts_are_byte_identical_across_differently_configured_engines() {
    for deterministic in [true, false] {
        let (a, fp) = engine::build(deterministic).unwrap();
        let b = varied_baseline(deterministic);
        assert!(
            fp.arch.ends_with(&format!(" isa={}", BASELINE.name)),
            "the fingerprint names the baseline: {fp}"
        );
        for (name, wasm) in modules() {
            let x = a.precompile_module(&wasm).unwrap();
            let y = b.precompile_module(&wasm).unwrap();
            assert!(
                x == y,
                "{name} (nan canonicalization {deterministic}): artifacts differ between two baseline engines"
            );
            // And each engine runs the other's artifact (wasmtime checks flags and tunables).
            // SAFETY: the bytes were produced by `precompile_module` just above.
            unsafe { wasmtime::Module::deserialize(&b, &x) }.expect("compatible artifact");
        }
    }
}

#[test]
fn nan_canonicalization_changes_the_code_and_the_fingerprint() {
    let (on, fp_on) = engine::build(true).unwrap();
    let (off, fp_off) = engine::build(false).unwrap();
    assert_ne!(fp_on, fp_off);
    let (_, wasm) = modules()
        .into_iter()
        .find(|(n, _)| n == "mandelbrot")
        .unwrap();
    assert_ne!(
        text(&on.precompile_module(&wasm).unwrap()),
        text(&off.precompile_module(&wasm).unwrap())
    );
}

/// Host detection changes the machine code on a CPU with more than the baseline: that is why
/// the worker never uses it. On a CPU with exactly the baseline the two would agree; this
/// test reports which case this machine is, and asserts the case it is in.
#[test]
fn host_detection_differs_from_the_baseline_on_a_cpu_beyond_it() {
    let (base, fp_base) = engine::build(true).unwrap();
    let (host, fp_host) = engine::build_for(true, Isa::HostDetected).unwrap();
    assert_ne!(
        fp_base.arch, fp_host.arch,
        "the fingerprint tells host-detected code apart"
    );
    #[cfg(target_arch = "x86_64")]
    let beyond = std::is_x86_feature_detected!("avx");
    #[cfg(not(target_arch = "x86_64"))]
    let beyond = false;
    let mut differing = Vec::new();
    for (name, wasm) in modules() {
        let b = text(&base.precompile_module(&wasm).unwrap());
        let h = text(&host.precompile_module(&wasm).unwrap());
        eprintln!(
            "{name}: .text {} bytes (baseline {}) vs {} bytes (host-detected): {}",
            b.len(),
            BASELINE.name,
            h.len(),
            if b == h { "identical" } else { "different" }
        );
        if b != h {
            differing.push(name);
        }
    }
    if beyond {
        // With AVX, Cranelift emits VEX encodings for float and SIMD code.
        assert!(
            differing.contains(&"simd".to_string())
                && differing.contains(&"mandelbrot".to_string()),
            "host detection should change float/SIMD code on an AVX host; differing: {differing:?}"
        );
    } else {
        eprintln!("this CPU has no AVX: host detection differs on {differing:?}");
    }
}
