//! The latch passes of our Cranelift patch (third_party/README.md "3."): after the mid-end,
//! a loop counter's compare and the values its exit computes from it are rewritten in terms
//! of the incremented counter (`latch-counters=rebased`), and commutative operations on a
//! loop-carried value take it as their first operand (`latch-carried=first`). These tests
//! check that both fire on the loop shapes they are for, that the IR they leave passes
//! Cranelift's verifier, and that they change no result: counters that wrap around (i32 and
//! i64, up and down, `eq` and `ne` exits, nested loops) and integer and float reductions
//! give what a Rust reference computes, in both determinism classes, and the same as the code
//! compiled without the mid-end (where the passes do not run).

use wasmtime::{Config, Engine, Instance, Module, OptLevel, Store};
use worker::sandbox::engine::{self, Isa};

const WAT: &str = r#"(module
  ;; i from s by +7 until i == 5 (mod 2^32); every i mixed into acc; then acc + (i + 100)
  (func $up32 (export "up32") (param $s i32) (result i64)
    (local $i i32) (local $acc i64)
    (local.set $i (local.get $s))
    (loop $l
      (local.set $acc (i64.add (i64.mul (local.get $acc) (i64.const 31))
                               (i64.extend_i32_u (local.get $i))))
      (br_if $l (i32.ne (local.tee $i (i32.add (local.get $i) (i32.const 7))) (i32.const 5))))
    (i64.add (local.get $acc) (i64.extend_i32_u (i32.add (local.get $i) (i32.const 100)))))
  ;; i from s by -3, leaving when i == -1; then acc + (i + i64::MAX)
  (func $down64 (export "down64") (param $s i64) (result i64)
    (local $i i64) (local $acc i64)
    (local.set $i (local.get $s))
    (block $done
      (loop $l
        (local.set $acc (i64.xor (i64.rotl (local.get $acc) (i64.const 5)) (local.get $i)))
        (local.set $i (i64.add (local.get $i) (i64.const -3)))
        (br_if $done (i64.eq (local.get $i) (i64.const -1)))
        (br $l)))
    (i64.add (local.get $acc) (i64.add (local.get $i) (i64.const 0x7fffffffffffffff))))
  ;; an inner counter's final value feeds the outer loop, whose bound is not a constant
  (func $nested (export "nested") (param $n i32) (result i32)
    (local $i i32) (local $j i32) (local $acc i32)
    (loop $outer
      (local.set $j (i32.const 0))
      (loop $inner
        (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const 17))
                                 (i32.xor (local.get $i) (local.get $j))))
        (br_if $inner (i32.ne (local.tee $j (i32.add (local.get $j) (i32.const 4))) (i32.const 64))))
      (local.set $acc (i32.add (local.get $acc) (i32.add (local.get $j) (i32.const -60))))
      (br_if $outer (i32.ne (local.tee $i (i32.add (local.get $i) (i32.const 1))) (local.get $n))))
    (local.get $acc))
  ;; a dot product unrolled twice, the product first (acc = x*y + acc, as LLVM orders it)
  (func $dot (export "dot") (param $n i32) (result f64)
    (local $i i32) (local $acc f64) (local $x f64)
    (loop $l
      (local.set $x (f64.convert_i32_u (local.get $i)))
      (local.set $acc (f64.add (f64.mul (local.get $x) (f64.const 0.1)) (local.get $acc)))
      (local.set $acc (f64.add (f64.mul (local.get $x) (local.get $x)) (local.get $acc)))
      (br_if $l (i32.ne (local.tee $i (i32.add (local.get $i) (i32.const 1))) (local.get $n))))
    (local.get $acc))
  ;; integer reductions, the carried value second: xor, add, mul
  (func $mix (export "mix") (param $n i32) (result i64)
    (local $i i32) (local $a i64) (local $m i64)
    (local.set $m (i64.const 1))
    (loop $l
      (local.set $a (i64.xor (i64.mul (i64.extend_i32_u (local.get $i))
                                      (i64.const 0x9e3779b97f4a7c15)) (local.get $a)))
      (local.set $a (i64.add (i64.rotl (local.get $a) (i64.const 7)) (local.get $a)))
      (local.set $m (i64.mul (i64.or (i64.extend_i32_u (local.get $i)) (i64.const 1))
                             (local.get $m)))
      (br_if $l (i32.ne (local.tee $i (i32.add (local.get $i) (i32.const 1))) (local.get $n))))
    (i64.xor (local.get $a) (local.get $m)))
)"#;

fn up32(s: u32) -> u64 {
    let (mut i, mut acc) = (s, 0u64);
    loop {
        acc = acc.wrapping_mul(31).wrapping_add(u64::from(i));
        i = i.wrapping_add(7);
        if i == 5 {
            break;
        }
    }
    acc.wrapping_add(u64::from(i.wrapping_add(100)))
}

fn down64(s: i64) -> i64 {
    let (mut i, mut acc) = (s, 0i64);
    loop {
        acc = acc.rotate_left(5) ^ i;
        i = i.wrapping_sub(3);
        if i == -1 {
            break;
        }
    }
    acc.wrapping_add(i.wrapping_add(i64::MAX))
}

fn nested(n: u32) -> u32 {
    let (mut i, mut acc) = (0u32, 0u32);
    loop {
        let mut j = 0u32;
        loop {
            acc = acc.wrapping_mul(17).wrapping_add(i ^ j);
            j = j.wrapping_add(4);
            if j == 64 {
                break;
            }
        }
        acc = acc.wrapping_add(j.wrapping_sub(60));
        i = i.wrapping_add(1);
        if i == n {
            break;
        }
    }
    acc
}

fn dot(n: u32) -> f64 {
    let (mut i, mut acc) = (0u32, 0f64);
    loop {
        let x = f64::from(i);
        acc = x * 0.1 + acc;
        acc = x * x + acc;
        i = i.wrapping_add(1);
        if i == n {
            break;
        }
    }
    acc
}

fn mix(n: u32) -> u64 {
    let (mut i, mut a, mut m) = (0u32, 0u64, 1u64);
    loop {
        a ^= u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        a = a.rotate_left(7).wrapping_add(a);
        m = (u64::from(i) | 1).wrapping_mul(m);
        i = i.wrapping_add(1);
        if i == n {
            break;
        }
    }
    a ^ m
}

const REDUCTION_ARGS: [u32; 3] = [1, 7, 1000];

/// Arguments: each loop crosses zero (the counters wrap) or runs a few thousand times.
fn up32_args() -> Vec<u32> {
    [1u32, 2, 3, 1000, 4321]
        .iter()
        .map(|k| 5u32.wrapping_sub(7u32.wrapping_mul(*k)))
        .collect()
}
fn down64_args() -> Vec<i64> {
    [1i64, 2, 7, 5000].iter().map(|k| -1 + 3 * k).collect()
}
const NESTED_ARGS: [u32; 3] = [1, 5, 300];

/// Every function's result on every argument, on an engine built from `c`.
fn results(c: &Config) -> Vec<i64> {
    let engine = Engine::new(c).expect("engine");
    let module = Module::new(&engine, WAT).expect("module");
    let mut store = Store::new(&engine, ());
    store.set_fuel(u64::MAX).expect("fuel");
    let inst = Instance::new(&mut store, &module, &[]).expect("instance");
    let f32 = inst.get_typed_func::<i32, i64>(&mut store, "up32").unwrap();
    let f64_ = inst
        .get_typed_func::<i64, i64>(&mut store, "down64")
        .unwrap();
    let fnest = inst
        .get_typed_func::<i32, i32>(&mut store, "nested")
        .unwrap();
    let mut out = Vec::new();
    for s in up32_args() {
        out.push(f32.call(&mut store, s as i32).unwrap());
    }
    for s in down64_args() {
        out.push(f64_.call(&mut store, s).unwrap());
    }
    for n in NESTED_ARGS {
        out.push(i64::from(fnest.call(&mut store, n as i32).unwrap()));
    }
    let fdot = inst.get_typed_func::<i32, f64>(&mut store, "dot").unwrap();
    let fmix = inst.get_typed_func::<i32, i64>(&mut store, "mix").unwrap();
    for n in REDUCTION_ARGS {
        out.push(fdot.call(&mut store, n as i32).unwrap().to_bits() as i64);
        out.push(fmix.call(&mut store, n as i32).unwrap());
    }
    out
}

fn reference() -> Vec<i64> {
    let mut out: Vec<i64> = up32_args().into_iter().map(|s| up32(s) as i64).collect();
    out.extend(down64_args().into_iter().map(down64));
    out.extend(NESTED_ARGS.iter().map(|&n| i64::from(nested(n) as i32)));
    for n in REDUCTION_ARGS {
        out.push(dot(n).to_bits() as i64);
        out.push(mix(n) as i64);
    }
    out
}

/// The CLIF the sandbox's engine compiled for function `name` of [`WAT`] (after the passes).
fn compiled_clif(name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut c = sandbox_config(false);
    c.emit_clif(dir.path());
    let engine = Engine::new(&c).unwrap();
    Module::new(&engine, WAT).unwrap();
    let file = format!("--{name}.clif");
    std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(&file))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .unwrap_or_else(|| panic!("{name}'s CLIF"))
}

fn sandbox_config(deterministic: bool) -> Config {
    let mut c = engine::config(deterministic, Isa::Baseline).expect("config");
    // Cranelift's IR verifier also runs on what the latch pass leaves.
    c.cranelift_debug_verifier(true);
    c
}

#[test]
fn rebased_counters_change_no_result_in_either_class() {
    let want = reference();
    for deterministic in [false, true] {
        assert_eq!(
            results(&sandbox_config(deterministic)),
            want,
            "deterministic = {deterministic}"
        );
        // Without the mid-end the pass does not run: the same results.
        let mut plain = sandbox_config(deterministic);
        plain.cranelift_opt_level(OptLevel::None);
        assert_eq!(
            results(&plain),
            want,
            "opt level none, deterministic = {deterministic}"
        );
    }
}

/// The pass fires on the loop shape it is for: the mid-end turns `i + 7 != 5` into
/// `i != -2` (comparing the old counter); after the pass the compare reads the incremented
/// counter against 5 again, and the value after the loop (`i + 100`, which the mid-end
/// folds into `old + 107`) is computed from a parameter of the exit block as `+ 100`.
#[test]
fn latch_compares_the_incremented_counter() {
    let clif = compiled_clif("up32");
    let consts: Vec<&str> = clif
        .lines()
        .filter(|l| l.contains("icmp") && l.contains("ne "))
        .collect();
    assert!(
        consts.iter().any(|l| l.ends_with("= 5")),
        "the latch compares against 5 (the incremented counter): {consts:?}\n{clif}"
    );
    assert!(
        !clif.contains("= -2") && !clif.contains("= 0xffff_fffe") && !clif.contains("0xfffffffe"),
        "no compare of the old counter (against -2) is left:\n{clif}"
    );
    assert!(
        !clif.contains("= 107"),
        "the exit computes from the incremented counter (+ 100), not the old one (+ 107):\n{clif}"
    );
}

/// The carried operand goes first: in the dot product every `fadd` takes the accumulator
/// (the loop header's parameter, or the previous `fadd` of the chain) as its first operand,
/// where the wasm has the product first.
#[test]
fn reductions_take_the_accumulator_first() {
    let clif = compiled_clif("dot");
    // Values defined as f64 block parameters, and as results of `fadd`.
    let mut carried: Vec<String> = Vec::new();
    for line in clif.lines() {
        let line = line.trim();
        if line.starts_with("block") {
            for param in line.split(['(', ',', ')']) {
                if let Some((v, ty)) = param.trim().split_once(':') {
                    if ty.trim() == "f64" {
                        carried.push(v.trim().to_string());
                    }
                }
            }
        }
    }
    let fadds: Vec<(String, String)> = clif
        .lines()
        .filter_map(|l| {
            // `v9 = fadd v1, v2` or `v9 = fadd.f64 v1, v2`
            let (def, rest) = l.split_once(" = fadd")?;
            let (_, operands) = rest.split_once(' ')?;
            let first = operands.split(',').next()?.trim().to_string();
            Some((def.split_whitespace().last()?.to_string(), first))
        })
        .collect();
    assert!(fadds.len() >= 2, "two fadds in the loop:\n{clif}");
    carried.extend(fadds.iter().map(|(def, _)| def.clone()));
    for (def, first) in &fadds {
        assert!(
            carried.contains(first),
            "{def} = fadd {first}, ...: the first operand is not the accumulator:\n{clif}"
        );
    }
}
