//! Hostile and ordinary modules through the sandbox's library API. Every case checks a clear
//! status, that the host is still fine afterwards, and that a second run gives the same digest.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tasks::{BlobId, Status};
use worker::sandbox::{Cancelled, RunControl, RunOutput, RunSpec, Sandbox, SandboxConfig};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.wat"));
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sandbox() -> &'static Sandbox {
    static S: OnceLock<Sandbox> = OnceLock::new();
    S.get_or_init(|| Sandbox::new(SandboxConfig::default()).unwrap())
}

fn spec() -> RunSpec {
    RunSpec {
        argv: vec!["test".into()],
        fuel: 1_000_000_000,
        memory_mb: 64,
        max_output: 1 << 20,
        ..RunSpec::default()
    }
}

/// Run twice; assert both results (and so digests) are identical; return the first.
fn run_twice(wasm: &[u8], spec: &RunSpec) -> RunOutput {
    let a = sandbox()
        .run_bytes(wasm, spec, &RunControl::default())
        .unwrap();
    let b = sandbox()
        .run_bytes(wasm, spec, &RunControl::default())
        .unwrap();
    assert_eq!(a.result, b.result, "second run differs");
    assert_eq!(a.result.digest(), b.result.digest());
    assert_eq!(a.output, b.output);
    host_still_fine();
    a
}

/// An ordinary task still runs correctly after whatever the previous one did.
fn host_still_fine() {
    let out = sandbox()
        .run_bytes(
            &fixture("echo"),
            &RunSpec {
                input: b"still here".to_vec(),
                ..spec()
            },
            &RunControl::default(),
        )
        .unwrap();
    assert_eq!(out.result.status, Status::Ok);
    assert_eq!(out.output, b"still here");
}

fn busy_input(iterations: u32) -> Vec<u8> {
    iterations.to_le_bytes().to_vec()
}

#[test]
fn ok_run_reads_stdin_writes_stdout_and_counts_fuel() {
    let out = run_twice(
        &fixture("echo"),
        &RunSpec {
            input: b"hello".to_vec(),
            ..spec()
        },
    );
    assert_eq!(out.result.status, Status::Ok);
    assert_eq!(out.result.exit_code, 0);
    assert_eq!(out.output, b"hello");
    assert_eq!(out.result.output_hash, BlobId::of(b"hello"));
    assert_eq!(out.result.output_len, 5);
    assert!(out.result.fuel_used > 0);
    assert!(out.error.is_none());
}

#[test]
fn infinite_loop_ends_out_of_fuel_with_the_whole_budget_used() {
    let out = run_twice(
        &fixture("infinite_loop"),
        &RunSpec {
            fuel: 10_000_000,
            ..spec()
        },
    );
    assert_eq!(out.result.status, Status::OutOfFuel);
    assert_eq!(out.result.fuel_used, 10_000_000);
}

#[test]
fn memory_bomb_ends_memory_limit() {
    let out = run_twice(
        &fixture("memory_bomb"),
        &RunSpec {
            memory_mb: 16,
            ..spec()
        },
    );
    assert_eq!(out.result.status, Status::MemoryLimit, "{:?}", out.error);
    assert_eq!(out.result.exit_code, 0);
}

#[test]
fn initial_memory_above_the_limit_is_memory_limit() {
    // 32 MiB of initial memory with a 16 MiB limit: refused at instantiation.
    let wasm =
        wat::parse_str(r#"(module (memory (export "memory") 512) (func (export "_start")))"#)
            .unwrap();
    let out = run_twice(
        &wasm,
        &RunSpec {
            memory_mb: 16,
            ..spec()
        },
    );
    assert_eq!(out.result.status, Status::MemoryLimit, "{:?}", out.error);
}

#[test]
fn unbounded_recursion_traps_with_stack_overflow() {
    let out = run_twice(&fixture("recursion"), &spec());
    assert_eq!(out.result.status, Status::Trap);
    assert_eq!(out.result.trap, "stack overflow");
    // Recursing from a fresh thread (different host stack depth) overflows at the same point.
    let wasm = fixture("recursion");
    let other = std::thread::spawn(move || {
        sandbox()
            .run_bytes(&wasm, &spec(), &RunControl::default())
            .unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(other.result, out.result);
}

#[test]
fn unreachable_traps_with_a_stable_kind_not_a_backtrace() {
    let out = run_twice(&fixture("unreachable"), &spec());
    assert_eq!(out.result.status, Status::Trap);
    assert_eq!(out.result.trap, "unreachable");
    assert!(out.error.is_some());
}

#[test]
fn huge_output_ends_output_limit_keeping_exactly_max_output_bytes() {
    let out = run_twice(
        &fixture("huge_output"),
        &RunSpec {
            max_output: 100_000,
            ..spec()
        },
    );
    assert_eq!(out.result.status, Status::OutputLimit);
    assert_eq!(out.result.output_len, 100_000);
    assert_eq!(out.output.len(), 100_000);
    assert!(out.output.iter().all(|&b| b == b'x'));
}

#[test]
fn proc_exit_nonzero_is_exit_with_its_code_and_stderr_is_captured_but_not_hashed() {
    let out = run_twice(&fixture("exit_code"), &spec());
    assert_eq!(out.result.status, Status::Exit);
    assert_eq!(out.result.exit_code, 7);
    assert_eq!(out.output, b"bye\n");
    assert_eq!(out.stderr, b"bye\n");
}

#[test]
fn file_env_and_socket_access_fail_cleanly() {
    let out = run_twice(&fixture("escape"), &spec());
    assert_eq!(out.result.status, Status::Ok, "{:?}", out.error);
    let [prestat, open, env, env_count, sock, read] = out.output[..] else {
        panic!("output {:?}", out.output)
    };
    const EBADF: u8 = 8;
    assert_eq!(prestat, EBADF, "fd 3 must not be a preopened dir");
    assert_eq!(open, EBADF, "path_open must have no directory to open from");
    assert_eq!(env, 0);
    assert_eq!(env_count, 0, "the environment must be empty");
    assert_ne!(sock, 0, "sock_accept must fail");
    assert_eq!(read, EBADF);
}

#[test]
fn module_without_start_is_invalid_module() {
    let out = run_twice(&fixture("no_start"), &spec());
    assert_eq!(out.result.status, Status::InvalidModule);
    assert!(out.error.unwrap().contains("_start"));
}

#[test]
fn malformed_binary_is_invalid_module() {
    for bytes in [
        &b"\0asm\x01\0\0\0\x01\xff\xff\xff garbage"[..],
        b"",
        b"not wasm at all",
        b"(module)",
    ] {
        let out = run_twice(bytes, &spec());
        assert_eq!(out.result.status, Status::InvalidModule, "{bytes:?}");
        assert!(sandbox().load(bytes).is_err());
    }
}

#[test]
fn unknown_imports_are_invalid_module() {
    let out = run_twice(&fixture("bad_import"), &spec());
    assert_eq!(out.result.status, Status::InvalidModule);
    assert!(out.error.unwrap().contains("fd_teleport"));
    let wasm = wat::parse_str(
        r#"(module (import "env" "launch_missiles" (func)) (func (export "_start") call 0))"#,
    )
    .unwrap();
    assert_eq!(
        run_twice(&wasm, &spec()).result.status,
        Status::InvalidModule
    );
}

#[test]
fn huge_module_with_a_5mb_data_segment_loads_and_runs() {
    let data = "a".repeat(5 << 20);
    let text = format!(
        r#"(module (memory (export "memory") 100) (data (i32.const 0) "{data}") (func (export "_start")))"#
    );
    let wasm = wat::parse_str(&text).unwrap();
    assert!(wasm.len() > 5 << 20);
    let out = run_twice(
        &wasm,
        &RunSpec {
            memory_mb: 16,
            ..spec()
        },
    );
    assert_eq!(out.result.status, Status::Ok, "{:?}", out.error);
    // Its 6.25 MiB of initial memory fits 16 MiB; with 4 MiB it must not.
    let small = run_twice(
        &wasm,
        &RunSpec {
            memory_mb: 4,
            ..spec()
        },
    );
    assert_eq!(small.result.status, Status::MemoryLimit);
}

#[test]
fn clocks_are_fixed_and_random_is_seeded_and_sleep_is_instant() {
    let wasm = fixture("clock_random");
    let seeded = |seed: u8| RunSpec {
        seed: [seed; 32],
        ..spec()
    };
    let start = Instant::now();
    let a = run_twice(&wasm, &seeded(1));
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "a one-hour sleep must not wait"
    );
    assert_eq!(a.result.status, Status::Ok, "{:?}", a.error);
    assert_eq!(a.output.len(), 57);
    let wall = u64::from_le_bytes(a.output[0..8].try_into().unwrap());
    let mono = u64::from_le_bytes(a.output[8..16].try_into().unwrap());
    assert_eq!(wall, worker::sandbox::wasi::WALL_CLOCK_SECS * 1_000_000_000);
    assert_eq!(mono, worker::sandbox::wasi::MONOTONIC_NANOS);
    assert_ne!(&a.output[16..48], &[0u8; 32][..]);
    assert_eq!(
        u64::from_le_bytes(a.output[48..56].try_into().unwrap()),
        42,
        "the timer event fired"
    );
    assert_eq!(a.output[56], 0, "poll_oneoff succeeded");

    // A second, independent sandbox sees the same bytes; another seed sees other random bytes.
    let other = Sandbox::new(SandboxConfig::default()).unwrap();
    let b = other
        .run_bytes(&wasm, &seeded(1), &RunControl::default())
        .unwrap();
    assert_eq!(a.result, b.result);
    assert_eq!(a.output, b.output);
    let c = run_twice(&wasm, &seeded(2));
    assert_ne!(&a.output[16..48], &c.output[16..48]);
    assert_eq!(&a.output[..16], &c.output[..16]);
}

fn nan_bits(out: &[u8]) -> (u32, u64, u32, u64) {
    assert_eq!(out.len(), 24, "{out:?}");
    (
        u32::from_le_bytes(out[0..4].try_into().unwrap()),
        u64::from_le_bytes(out[4..12].try_into().unwrap()),
        u32::from_le_bytes(out[12..16].try_into().unwrap()),
        u64::from_le_bytes(out[16..24].try_into().unwrap()),
    )
}

#[test]
fn nan_bits_are_canonical_when_deterministic() {
    const F32_CANON: u32 = 0x7fc0_0000;
    const F64_CANON: u64 = 0x7ff8_0000_0000_0000;
    let out = run_twice(&fixture("nan"), &spec());
    assert_eq!(out.result.status, Status::Ok);
    // Fresh NaNs and NaNs carrying a payload all come out canonical.
    assert_eq!(
        nan_bits(&out.output),
        (F32_CANON, F64_CANON, F32_CANON, F64_CANON)
    );

    // Without canonicalization the hardware's NaN comes through: the payload the fixture put
    // in survives the addition, and the results (so the digests) differ.
    let loose = Sandbox::new(SandboxConfig {
        deterministic: false,
        ..SandboxConfig::default()
    })
    .unwrap();
    assert_ne!(loose.fingerprint(), sandbox().fingerprint());
    let l = loose
        .run_bytes(&fixture("nan"), &spec(), &RunControl::default())
        .unwrap();
    assert_eq!(l.result.status, Status::Ok);
    let (f32_fresh, f64_fresh, f32_payload, f64_payload) = nan_bits(&l.output);
    assert!(f32::from_bits(f32_fresh).is_nan() && f64::from_bits(f64_fresh).is_nan());
    if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        // Both propagate a quiet NaN operand unchanged (RISC-V, say, would not).
        assert_eq!(
            (f32_payload, f64_payload),
            (0x7fc1_2345, 0x7ff8_0000_1234_5678)
        );
        assert_ne!(l.result.digest(), out.result.digest());
    }
}

/// Wait until `cond` holds. The limit only turns a hang into a failure; nothing here
/// assumes how fast the machine is.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn pause_and_resume_give_the_same_digest_as_an_uninterrupted_run() {
    let wasm = fixture("busy");
    // 300M steps burn hundreds of times the fuel between two yields; the pause below is
    // requested before the run starts, so the guest is held at its first yield.
    let spec = RunSpec {
        input: busy_input(300_000_000),
        fuel: 20_000_000_000,
        ..spec()
    };
    let straight = sandbox()
        .run_bytes(&wasm, &spec, &RunControl::default())
        .unwrap();
    assert_eq!(straight.result.status, Status::Ok);

    let control = RunControl::default();
    control.pause();
    let (c, w, s) = (control.clone(), wasm.clone(), spec.clone());
    let t = std::thread::spawn(move || sandbox().run_bytes(&w, &s, &c));
    wait_until("the guest is held by the pause", || {
        control.held() == 1 || t.is_finished()
    });
    assert_eq!(control.held(), 1, "the run ended before its first yield");
    let ticks = control.ticks();
    assert!(ticks >= 1, "a guest is held only at a yield");
    // Held means blocked at a yield: the guest reaches no further yield and cannot
    // finish, however long we look.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(control.held(), 1);
    assert_eq!(control.ticks(), ticks, "a paused guest does not run");
    assert!(!t.is_finished(), "a paused run does not finish");
    control.resume();
    let paused = t.join().unwrap().unwrap();
    assert_eq!(control.held(), 0);
    assert_eq!(paused.result, straight.result);
    assert_eq!(paused.result.digest(), straight.result.digest());
    assert_eq!(paused.output, straight.output);

    // The CPU duty cycle does not change the result either. The same 300M steps reach many
    // yields, where the duty cycle sleeps.
    let throttled = RunControl::default();
    throttled.set_cpu_limit(Some(50));
    let out = sandbox().run_bytes(&wasm, &spec, &throttled).unwrap();
    assert!(
        throttled.ticks() > 0,
        "the throttle was applied at least once"
    );
    assert_eq!(out.result, straight.result);
}

#[test]
fn cancel_returns_cancelled_while_running_and_while_paused() {
    let wasm = fixture("infinite_loop");
    let spec = RunSpec {
        fuel: u64::MAX / 2,
        ..spec()
    };
    for pause_first in [false, true] {
        let control = RunControl::default();
        let (c, w, s) = (control.clone(), wasm.clone(), spec.clone());
        let t = std::thread::spawn(move || sandbox().run_bytes(&w, &s, &c));
        // The guest spins forever: once it has reached a yield it is running wasm.
        wait_until("the guest is running", || control.ticks() > 0);
        if pause_first {
            control.pause();
            wait_until("the guest is held by the pause", || control.held() == 1);
        }
        assert!(!t.is_finished());
        control.cancel();
        wait_until("the cancelled run returns", || t.is_finished());
        assert_eq!(t.join().unwrap().unwrap_err(), Cancelled);
        assert_eq!(control.held(), 0, "a cancelled guest is no longer held");
    }
    host_still_fine();
}

/// A guest that spends its time in host calls which charge fuel (each call hands wasm a
/// fresh yield interval) still yields, so it can be paused and cancelled: `fd_write` of a
/// few bytes to stderr in an endless loop.
#[test]
fn a_guest_looping_over_host_calls_can_be_paused_and_cancelled() {
    let wasm = fixture("stdio_cost");
    let mut input = 3u32.to_le_bytes().to_vec();
    input.extend_from_slice(&10u32.to_le_bytes());
    let spec = RunSpec {
        input,
        fuel: u64::MAX / 2,
        ..spec()
    };
    let control = RunControl::default();
    let (c, w, s) = (control.clone(), wasm.clone(), spec.clone());
    let t = std::thread::spawn(move || sandbox().run_bytes(&w, &s, &c));
    wait_until("the guest yields", || control.ticks() > 0);
    control.pause();
    wait_until("the guest is held by the pause", || control.held() == 1);
    let ticks = control.ticks();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(control.ticks(), ticks, "a paused guest does not run");
    control.cancel();
    wait_until("the cancelled run returns", || t.is_finished());
    assert_eq!(t.join().unwrap().unwrap_err(), Cancelled);
    host_still_fine();
}

#[test]
fn compile_cache_round_trips_and_ignores_a_corrupted_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..SandboxConfig::default()
    };
    let wasm = fixture("busy");
    let spec = RunSpec {
        input: busy_input(1000),
        ..spec()
    };

    let first = Sandbox::new(cfg()).unwrap();
    let m = first.load(&wasm).unwrap();
    assert!(!m.from_disk_cache());
    let expected = first.run(&m, &spec, &RunControl::default()).unwrap().result;
    let path = first.cache_path(&BlobId::of(&wasm)).unwrap();
    assert!(path.is_file());

    let second = Sandbox::new(cfg()).unwrap();
    let m = second.load(&wasm).unwrap();
    assert!(m.from_disk_cache(), "a second sandbox loads from disk");
    assert_eq!(
        second
            .run(&m, &spec, &RunControl::default())
            .unwrap()
            .result,
        expected
    );

    // Flip a byte in the middle of the compiled code: the file must be rejected, not run.
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let third = Sandbox::new(cfg()).unwrap();
    let m = third.load(&wasm).unwrap();
    assert!(!m.from_disk_cache(), "a corrupted cache file is recompiled");
    assert_eq!(
        third.run(&m, &spec, &RunControl::default()).unwrap().result,
        expected
    );

    // Truncated file: also recompiled. And the rewritten entry is good again.
    std::fs::write(&path, &bytes[..100]).unwrap();
    let fourth = Sandbox::new(cfg()).unwrap();
    assert!(!fourth.load(&wasm).unwrap().from_disk_cache());
    let fifth = Sandbox::new(cfg()).unwrap();
    assert!(fifth.load(&wasm).unwrap().from_disk_cache());
}

#[test]
fn run_spec_from_manifest_uses_argv_limits_and_task_seed() {
    use tasks::{BlobRef, JobId, TaskId, TaskManifest};
    let m = TaskManifest {
        id: TaskId {
            job: JobId(3),
            index: 9,
        },
        name: "primes".into(),
        module: BlobRef::of(b"m"),
        input: None,
        args: vec!["1".into(), "2".into()],
        fuel: 123,
        memory_mb: 7,
        max_output: 99,
    };
    let s = RunSpec::from_manifest(&m, b"in".to_vec());
    assert_eq!(s.argv, vec!["primes", "1", "2"]);
    assert_eq!((s.fuel, s.memory_mb, s.max_output), (123, 7, 99));
    assert_eq!(s.seed, m.id.random_seed());
    assert_eq!(s.input, b"in");
}

// ---- Issue 17, item 4: the sandbox's limits ----

fn le_input(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[test]
fn random_get_is_bounded_by_guest_memory_and_paid_for_per_byte() {
    let wasm = fixture("random_get");
    let with_len = |len: u32, fuel: u64| RunSpec {
        input: le_input(&[len]),
        fuel,
        ..spec()
    };
    // 1 MiB of random bytes costs at least 1 MiB of fuel.
    let small = run_twice(&wasm, &with_len(16, 1_000_000_000));
    assert_eq!(small.result.status, Status::Ok, "{:?}", small.error);
    let big = run_twice(&wasm, &with_len(1 << 20, 1_000_000_000));
    assert_eq!(big.result.status, Status::Ok, "{:?}", big.error);
    assert_eq!(big.output[0], 0, "random_get succeeded");
    assert_ne!(&big.output[1..], &[0u8; 16][..]);
    assert_eq!(
        &big.output[1..],
        &small.output[1..],
        "the stream does not depend on how much is asked for"
    );
    assert!(
        big.result.fuel_used >= small.result.fuel_used + (1 << 20) - 16,
        "1 MiB of random_get must cost >= 1 MiB of fuel: {} vs {}",
        big.result.fuel_used,
        small.result.fuel_used
    );
    // A guest that cannot pay stops with out_of_fuel, its whole budget used.
    let poor = run_twice(&wasm, &with_len(1 << 20, 500_000));
    assert_eq!(poor.result.status, Status::OutOfFuel);
    assert_eq!(poor.result.fuel_used, 500_000);
    // A length beyond guest memory (2 MiB) traps at once: no 4 GiB host allocation.
    for len in [(2 << 20) - 15, u32::MAX] {
        let start = Instant::now();
        let out = run_twice(&wasm, &with_len(len, 1_000_000_000));
        assert_eq!(
            out.result.status,
            Status::Trap,
            "len {len}: {:?}",
            out.error
        );
        assert_eq!(out.result.trap, "host error");
        assert!(out.error.unwrap().contains("random_get"));
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "len {len} took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn stdio_host_calls_are_paid_for_per_byte_and_per_iovec() {
    let wasm = fixture("stdio_cost");
    let probe = |mode: u32, n: u32, extra: &[u8]| {
        let mut input = le_input(&[mode, n]);
        input.extend_from_slice(extra);
        run_twice(&wasm, &RunSpec { input, ..spec() })
    };
    let fuel = |o: &RunOutput| o.result.fuel_used;

    // fd_write: 1 MiB to stderr costs >= 1 MiB of fuel more than 1 byte does.
    let (one, mib) = (probe(0, 1, b""), probe(0, 1 << 20, b""));
    assert_eq!((one.result.status, one.output[0]), (Status::Ok, 0));
    assert_eq!((mib.result.status, mib.output[0]), (Status::Ok, 0));
    assert_eq!(mib.stderr.len(), worker::sandbox::STDERR_CAP);
    assert!(
        fuel(&mib) >= fuel(&one) + (1 << 20) - 1,
        "{} vs {}",
        fuel(&mib),
        fuel(&one)
    );

    // 100k empty iovecs before the one that is written cost >= 10 fuel each.
    let iovecs = probe(1, 100_000, b"");
    assert_eq!((iovecs.result.status, iovecs.output[0]), (Status::Ok, 0));
    assert!(fuel(&iovecs) >= fuel(&one) + 1_000_000, "{}", fuel(&iovecs));

    // fd_read: 1 MiB of stdin costs >= 1 MiB of fuel more than 1 byte does.
    let input = vec![7u8; 1 << 20];
    let (r1, rmib) = (probe(2, 1, &input[..1]), probe(2, 1 << 20, &input));
    for (r, n) in [(&r1, 1u32), (&rmib, 1 << 20)] {
        assert_eq!(
            (r.result.status, r.output[0]),
            (Status::Ok, 0),
            "{:?}",
            r.error
        );
        assert_eq!(u32::from_le_bytes(r.output[4..8].try_into().unwrap()), n);
    }
    assert!(
        fuel(&rmib) >= fuel(&r1) + (1 << 20) - 1,
        "{} vs {}",
        fuel(&rmib),
        fuel(&r1)
    );

    // Flooding the (truncating) stderr with 1 MiB writes ends out_of_fuel, and soon.
    let start = Instant::now();
    let flood = probe(3, 1 << 20, b"");
    assert_eq!(flood.result.status, Status::OutOfFuel);
    assert!(start.elapsed() < Duration::from_secs(60));

    // path_open never reads the path (there is no directory to open it in): EBADF, even
    // for a path far beyond memory.
    const EBADF: u8 = 8;
    for n in [16, u32::MAX] {
        let out = probe(4, n, b"");
        assert_eq!(
            (out.result.status, out.output[0]),
            (Status::Ok, EBADF),
            "{:?}",
            out.error
        );
    }
}

#[test]
fn tables_count_against_memory_mb() {
    let with_mb = |memory_mb| RunSpec {
        memory_mb,
        ..spec()
    };
    // A declared table of 1 Mi elements (8 MiB at 8 bytes each) does not fit 4 MiB.
    let huge =
        wat::parse_str(r#"(module (table 1048576 funcref) (func (export "_start")))"#).unwrap();
    let out = run_twice(&huge, &with_mb(4));
    assert_eq!(out.result.status, Status::MemoryLimit, "{:?}", out.error);
    assert_eq!(run_twice(&huge, &with_mb(16)).result.status, Status::Ok);

    // Growing a table until refused is memory_limit, like growing memory.
    // (4 MiB: the budget, not the per-table element cap, is what refuses it.)
    let out = run_twice(&fixture("table_bomb"), &with_mb(4));
    assert_eq!(out.result.status, Status::MemoryLimit, "{:?}", out.error);

    // Memory and tables share one budget: 15 MiB of memory plus a 2 MiB table exceed 16 MiB.
    let both = wat::parse_str(
        r#"(module (memory (export "memory") 240) (table 262144 funcref) (func (export "_start")))"#,
    )
    .unwrap();
    let out = run_twice(&both, &with_mb(16));
    assert_eq!(out.result.status, Status::MemoryLimit, "{:?}", out.error);
    assert_eq!(run_twice(&both, &with_mb(18)).result.status, Status::Ok);
}

/// `(module (memory ...) (func (export "_start")) <n more functions> ...)` as text.
fn many_functions(n: usize, body: &str) -> Vec<u8> {
    let mut text = String::from(r#"(module (memory (export "memory") 1) (func (export "_start"))"#);
    for _ in 0..n {
        text.push_str(&format!("(func {body})"));
    }
    text.push(')');
    wat::parse_str(&text).unwrap()
}

#[test]
fn modules_over_the_size_and_shape_limits_are_refused_before_compiling() {
    use worker::sandbox::admit;
    let sb = Sandbox::new(SandboxConfig::default()).unwrap();
    let refused = |wasm: &[u8], limit: &str| {
        let out = sb.run_bytes(wasm, &spec(), &RunControl::default()).unwrap();
        assert_eq!(out.result.status, Status::InvalidModule, "{limit}");
        let reason = out.error.unwrap();
        assert!(reason.contains(limit), "{limit}: {reason}");
    };

    // More functions than MAX_FUNCTIONS (each empty: cheap to compile, so without the limit
    // this module would load and run).
    refused(
        &many_functions(admit::MAX_FUNCTIONS as usize, ""),
        "MAX_FUNCTIONS",
    );

    let mut text = String::from(r#"(module (func $f) (func (export "_start"))"#);
    for i in 0..admit::MAX_EXPORTS {
        text.push_str(&format!(r#"(export "e{i}" (func $f))"#));
    }
    text.push(')');
    refused(&wat::parse_str(&text).unwrap(), "MAX_EXPORTS");

    let mut text = String::new();
    for i in 0..=admit::MAX_IMPORTS {
        text.push_str(&format!(
            r#"(import "wasi_snapshot_preview1" "sched_yield" (func $y{i} (result i32)))"#
        ));
    }
    let wasm = wat::parse_str(format!(
        r#"(module {text} (memory (export "memory") 1) (func (export "_start")))"#
    ))
    .unwrap();
    refused(&wasm, "MAX_IMPORTS");

    let body = "nop ".repeat(admit::MAX_FUNCTION_BYTES as usize);
    refused(&many_functions(1, &body), "MAX_FUNCTION_BYTES");

    // A valid module padded past MAX_MODULE_BYTES with a custom section.
    let mut wasm = fixture("echo");
    let pad = admit::MAX_MODULE_BYTES + 1 - wasm.len();
    wasm.push(0); // custom section
    let mut size = pad as u32 + 2; // name length byte + name + payload
    let name_and_payload = size;
    loop {
        let b = (size & 0x7f) as u8;
        size >>= 7;
        wasm.push(if size == 0 { b } else { b | 0x80 });
        if size == 0 {
            break;
        }
    }
    wasm.extend_from_slice(&[1, b'x']);
    wasm.resize(wasm.len() + name_and_payload as usize - 2, 0);
    assert!(wasm.len() > admit::MAX_MODULE_BYTES);
    refused(&wasm, "MAX_MODULE_BYTES");

    assert_eq!(sb.compile_stats().compiles, 0, "nothing was compiled");
    host_still_fine();
}

#[test]
fn concurrent_loads_of_a_new_module_compile_it_once_at_idle_priority() {
    let sb = Sandbox::new(SandboxConfig::default()).unwrap();
    // Enough code that compiling takes a while, so the loads overlap.
    let wasm = many_functions(3000, "(drop (i32.mul (i32.const 7) (i32.const 6)))");
    let barrier = std::sync::Barrier::new(4);
    let ids = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    sb.load(&wasm).unwrap().id()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(ids.iter().all(|id| *id == BlobId::of(&wasm)));
    let stats = sb.compile_stats();
    assert_eq!(stats.compiles, 1, "{stats:?}");
    assert_eq!(
        stats.at_idle_priority, 1,
        "compiled at SCHED_IDLE: {stats:?}"
    );

    // A module that fails to load is remembered too: loading it again compiles nothing.
    let bad = fixture("bad_import");
    for _ in 0..3 {
        assert!(sb.load(&bad).is_err());
    }
    assert_eq!(sb.compile_stats().compiles, 2);
    let out = sb.run_bytes(&bad, &spec(), &RunControl::default()).unwrap();
    assert_eq!(out.result.status, Status::InvalidModule);
    assert_eq!(sb.compile_stats().compiles, 2);
}

#[test]
fn a_compilation_over_the_wall_budget_is_invalid_module() {
    let sb = Sandbox::new(SandboxConfig {
        compile_budget: Some(Duration::from_nanos(1)),
        ..SandboxConfig::default()
    })
    .unwrap();
    let wasm = many_functions(3000, "(drop (i32.mul (i32.const 7) (i32.const 6)))");
    let out = sb
        .run_bytes(&wasm, &spec(), &RunControl::default())
        .unwrap();
    assert_eq!(out.result.status, Status::InvalidModule);
    let reason = out.error.unwrap();
    assert!(reason.contains("COMPILE_WALL_BUDGET"), "{reason}");
    assert_eq!(sb.compile_stats().budget_refusals, 1);
    // A refusal is not remembered: the next load tries again (and is refused again here).
    let again = sb
        .run_bytes(&wasm, &spec(), &RunControl::default())
        .unwrap();
    assert_eq!(again.result.status, Status::InvalidModule);
    assert_eq!(sb.compile_stats().budget_refusals, 2);
    // By default there is no budget: the same module loads.
    assert!(Sandbox::new(SandboxConfig::default())
        .unwrap()
        .load(&wasm)
        .is_ok());
}

/// The same sandbox configuration with the instance pool off (`pooled_runs: 0`) or sized
/// for `runs` runs at once.
fn with_pool(runs: usize) -> Sandbox {
    Sandbox::new(SandboxConfig {
        pooled_runs: runs,
        ..SandboxConfig::default()
    })
    .unwrap()
}

/// Every way a run ends gives the same result (status, exit code, trap, fuel, output) with
/// the pooling allocator as on demand, and runs of these modules do use the pool.
#[test]
fn pooled_runs_give_the_same_results_as_on_demand_runs() {
    let pooled = with_pool(2);
    let on_demand = with_pool(0);
    assert_eq!(pooled.pooled_runs(), 2, "the pool was reserved");
    assert_eq!(on_demand.pooled_runs(), 0);
    let mb = |memory_mb| RunSpec {
        memory_mb,
        ..spec()
    };
    let cases: Vec<(&str, Vec<u8>, RunSpec)> = vec![
        (
            "echo",
            fixture("echo"),
            RunSpec {
                input: b"pooled".to_vec(),
                ..spec()
            },
        ),
        (
            "busy",
            fixture("busy"),
            RunSpec {
                input: busy_input(2_000_000),
                ..spec()
            },
        ),
        (
            "out of fuel",
            fixture("infinite_loop"),
            RunSpec {
                fuel: 50_000_000,
                ..spec()
            },
        ),
        ("memory bomb", fixture("memory_bomb"), mb(16)),
        ("table bomb", fixture("table_bomb"), mb(4)),
        (
            "initial memory over the limit",
            wat::parse_str(r#"(module (memory 512) (func (export "_start")))"#).unwrap(),
            mb(16),
        ),
        (
            "table over the budget",
            wat::parse_str(r#"(module (table 1048576 funcref) (func (export "_start")))"#)
                .unwrap(),
            mb(4),
        ),
        (
            "the whole 4 GiB budget",
            wat::parse_str(
                r#"(module (memory 1)
                    (func (export "_start")
                      (if (i32.eq (memory.grow (i32.const 65535)) (i32.const -1)) (then unreachable))))"#,
            )
            .unwrap(),
            mb(4096),
        ),
        ("stack overflow", fixture("recursion"), spec()),
        ("unreachable", fixture("unreachable"), spec()),
        ("output limit", fixture("huge_output"), spec()),
        ("exit code", fixture("exit_code"), spec()),
    ];
    for (name, wasm, spec) in &cases {
        let module = pooled.load(wasm).unwrap();
        assert!(module.pooled(), "{name}: runs in the pool");
        assert!(!on_demand.load(wasm).unwrap().pooled());
        // Twice in the pool: the second run reuses the slot the first one left.
        for round in 0..2 {
            let a = pooled.run(&module, spec, &RunControl::default()).unwrap();
            let b = on_demand
                .run_bytes(wasm, spec, &RunControl::default())
                .unwrap();
            assert_eq!(a.result, b.result, "{name}, round {round}");
            assert_eq!(a.output, b.output, "{name}, round {round}");
        }
    }
}

/// A module the pool cannot hold (an initial table or memory larger than a pool slot, two
/// memories) runs on demand and ends as it did before there was a pool.
#[test]
fn modules_too_big_for_the_pool_run_on_demand_with_the_same_result() {
    let pooled = with_pool(2);
    let on_demand = with_pool(0);
    for (wat, memory_mb, status) in [
        // 2 Mi elements: over MAX_TABLE_ELEMENTS, refused by the limiter (memory_limit).
        (
            r#"(module (table 2097152 funcref) (func (export "_start")))"#,
            4096,
            Status::MemoryLimit,
        ),
        // A 64-bit memory whose initial size (70,000 pages, 4.3 GiB) exceeds any budget.
        (
            r#"(module (memory i64 70000) (func (export "_start")))"#,
            4096,
            Status::MemoryLimit,
        ),
        // Two memories: the limiter allows one.
        (
            r#"(module (memory 1) (memory 1) (func (export "_start")))"#,
            64,
            Status::InvalidModule,
        ),
    ] {
        let wasm = wat::parse_str(wat).unwrap();
        let spec = RunSpec {
            memory_mb,
            ..spec()
        };
        let module = pooled.load(&wasm).unwrap();
        assert!(!module.pooled(), "{wat}: does not fit the pool");
        let a = pooled.run(&module, &spec, &RunControl::default()).unwrap();
        let b = on_demand
            .run_bytes(&wasm, &spec, &RunControl::default())
            .unwrap();
        assert_eq!(a.result.status, status, "{wat}: {:?}", a.error);
        assert_eq!(a.result, b.result, "{wat}");
    }
}

/// More runs at once than the pool has slots: none fails or is refused; the runs without a
/// slot run on demand, with the same results.
#[test]
fn more_runs_at_once_than_pool_slots_all_succeed() {
    let pooled = Arc::new(with_pool(1));
    let module = pooled.load(&fixture("busy")).unwrap();
    assert!(module.pooled());
    let reference = with_pool(0)
        .run_bytes(
            &fixture("busy"),
            &RunSpec {
                input: busy_input(300_000),
                ..spec()
            },
            &RunControl::default(),
        )
        .unwrap()
        .result;
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (sb, m) = (pooled.clone(), module.clone());
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| {
                        sb.run(
                            &m,
                            &RunSpec {
                                input: busy_input(300_000),
                                ..spec()
                            },
                            &RunControl::default(),
                        )
                        .unwrap()
                        .result
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        for r in t.join().unwrap() {
            assert_eq!(r, reference);
        }
    }
}

/// A pool slot handed to the next run starts from the module's initial state: memory
/// written and grown, a table entry set and a global changed by one run are not seen by the
/// next.
#[test]
fn a_reused_pool_slot_starts_from_fresh_memory_tables_and_globals() {
    // Prints mem[1000], memory.size, the table entry 0 being null (1) and the global, as
    // digits, then changes all four.
    let wasm = wat::parse_str(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write"
            (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (table 2 funcref)
          (global $g (mut i32) (i32.const 3))
          (func $f)
          (elem declare func $f)
          (func (export "_start")
            (i32.store8 (i32.const 0) (i32.add (i32.const 48) (i32.load8_u (i32.const 1000))))
            (i32.store8 (i32.const 1) (i32.add (i32.const 48) (memory.size)))
            (i32.store8 (i32.const 2)
              (i32.add (i32.const 48) (ref.is_null (table.get (i32.const 0)))))
            (i32.store8 (i32.const 3) (i32.add (i32.const 48) (global.get $g)))
            (i32.store (i32.const 8) (i32.const 0))
            (i32.store (i32.const 12) (i32.const 4))
            (drop (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16)))
            (i32.store8 (i32.const 1000) (i32.const 7))
            (drop (memory.grow (i32.const 2)))
            (table.set (i32.const 0) (ref.func $f))
            (global.set $g (i32.const 9))))"#,
    )
    .unwrap();
    let sb = with_pool(1);
    let module = sb.load(&wasm).unwrap();
    assert!(module.pooled());
    for round in 0..3 {
        let out = sb.run(&module, &spec(), &RunControl::default()).unwrap();
        assert_eq!(out.result.status, Status::Ok, "{:?}", out.error);
        assert_eq!(out.output, b"0113", "round {round}");
    }
}
