//! Sandbox benchmark (not a test): `cargo bench -p worker --bench sandbox`.
//!
//! For each kernel: native vs sandbox wall time (median of N runs), in the engines of both
//! determinism classes (`tasks::Determinism`): `det` is the `portable` class (NaN
//! canonicalization on), `no-det` the `native` class (the default; the x86-64 baseline ISA
//! without NaN canonicalization), and the ratios. Then cold compile vs compile-cache load for a ~100 KB module, and
//! instantiation time.
//!
//! Then, per kernel, **what each determinism setting costs**: the same module on plain
//! wasmtime (default `Config`, stock WASI preview 1, none of our settings), then with only
//! fuel metering, only epoch interruption, only NaN canonicalization turned on. The ratios
//! against plain wasmtime separate the cost of wasm itself (plain / native) from the cost of
//! each setting the sandbox needs.
//!
//! Kernels: every `benches/kernels/<name>.rs` (std-only Rust; `<name>.args` holds its
//! arguments), and every sample `examples/<name>/` that has `<name>.wasm`, a source
//! (`<name>.rs` or `src/main.rs`) and a `bench.args`. That file gives the benchmark run: first
//! line = the guest's arguments (whitespace-separated; argv[0] is the name), optional second
//! line = a file (relative to the example dir) fed to stdin; `#` lines are comments.
//! Native builds use `/usr/bin/rustc -O`; kernel wasm builds `/usr/bin/rustc -O --target
//! wasm32-wasi -C strip=symbols` (examples use their committed .wasm).
//!
//! Env: `PEERGRID_BENCH_RUNS=N` (default 5); `PEERGRID_BENCH_SMOKE=1`: tiny sizes, 1 run,
//! built-in kernels only (for a quick check that the benchmark works).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tasks::Status;
use worker::sandbox::{RunControl, RunSpec, Sandbox, SandboxConfig};

const RUSTC: &str = "/usr/bin/rustc";

struct Kernel {
    name: String,
    wasm: Vec<u8>,
    native: PathBuf,
    args: Vec<String>,
    input: Vec<u8>,
}

fn main() {
    let smoke = std::env::var_os("PEERGRID_BENCH_SMOKE").is_some_and(|v| v != "0");
    let runs: usize = if smoke {
        1
    } else {
        std::env::var("PEERGRID_BENCH_RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5)
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join(format!("peergrid-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("create a temp dir");

    let det = Sandbox::new(SandboxConfig::default()).expect("sandbox");
    let loose = Sandbox::new(SandboxConfig {
        deterministic: false,
        ..SandboxConfig::default()
    })
    .expect("sandbox");
    println!(
        "# peergrid sandbox benchmark ({} run{} per measurement, median{})",
        runs,
        if runs == 1 { "" } else { "s" },
        if smoke { ", SMOKE sizes" } else { "" }
    );
    println!("# fingerprint (deterministic): {}", det.fingerprint());
    println!("# fingerprint (loose):         {}", loose.fingerprint());

    let kernels = collect_kernels(manifest, &work, smoke);
    println!();
    println!(
        "{:<12} {:>11} {:>11} {:>11} {:>9} {:>9}  {}",
        "kernel", "native", "det", "no-det", "det/nat", "nodet/nat", "check"
    );
    for k in &kernels {
        bench_kernel(k, runs, &det, &loose);
    }

    println!();
    println!("# what each setting costs, alone, on plain wasmtime (median of {runs})");
    println!(
        "{:<12} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "kernel", "plain", "+fuel", "+epoch", "+nan-canon", "plain/nat", "fuel", "epoch", "nan"
    );
    for k in &kernels {
        settings_cost(k, runs);
    }

    println!();
    compile_and_cache(&kernels, &work, runs.max(3));
    instantiation(&det, &kernels, if smoke { 20 } else { 200 });
    let _ = std::fs::remove_dir_all(&work);
}

fn toolchain_ok() -> Result<(), String> {
    if !Path::new(RUSTC).exists() {
        return Err(format!(
            "{RUSTC} not found (install Debian's rustc and libstd-rust-dev-wasm32)"
        ));
    }
    let sysroot = Command::new(RUSTC)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("{RUSTC}: {e}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if !Path::new(&sysroot).join("lib/rustlib/wasm32-wasi").is_dir() {
        return Err(format!(
            "{RUSTC} has no wasm32-wasi std (install libstd-rust-dev-wasm32)"
        ));
    }
    Ok(())
}

fn rustc(src: &Path, out: &Path, wasm: bool) -> Result<(), String> {
    let mut c = Command::new(RUSTC);
    c.arg("-O");
    if wasm {
        c.args(["--target", "wasm32-wasi", "-C", "strip=symbols"]);
    }
    let o = c
        .arg(src)
        .arg("-o")
        .arg(out)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr)
            .lines()
            .next()
            .unwrap_or("rustc failed")
            .to_string());
    }
    Ok(())
}

fn collect_kernels(manifest: &Path, work: &Path, smoke: bool) -> Vec<Kernel> {
    let mut out = Vec::new();
    if let Err(why) = toolchain_ok() {
        println!("SKIP all kernels: {why}");
        return out;
    }
    // Built-in kernels.
    let mut srcs: Vec<PathBuf> = std::fs::read_dir(manifest.join("benches/kernels"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                .collect()
        })
        .unwrap_or_default();
    srcs.sort();
    for src in srcs {
        let name = src.file_stem().unwrap().to_string_lossy().into_owned();
        let (wasm_path, native) = (work.join(format!("{name}.wasm")), work.join(&name));
        if let Err(e) = rustc(&src, &wasm_path, true).and_then(|()| rustc(&src, &native, false)) {
            println!("SKIP {name}: {e}");
            continue;
        }
        let args = if smoke {
            vec!["100000".to_string()]
        } else {
            std::fs::read_to_string(src.with_extension("args"))
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        out.push(Kernel {
            name,
            wasm: std::fs::read(&wasm_path).unwrap(),
            native,
            args,
            input: Vec::new(),
        });
    }
    // Sample workloads.
    let examples = manifest.join("../examples");
    if smoke {
        println!("SKIP examples/*: smoke mode");
        return out;
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&examples)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let wasm_path = dir.join(format!("{name}.wasm"));
        let src = [dir.join(format!("{name}.rs")), dir.join("src/main.rs")]
            .into_iter()
            .find(|p| p.is_file());
        let (Ok(wasm), Some(src)) = (std::fs::read(&wasm_path), src) else {
            continue;
        };
        let native = work.join(format!("example-{name}"));
        if let Err(e) = rustc(&src, &native, false) {
            println!("SKIP examples/{name}: native build failed: {e}");
            continue;
        }
        // A sample is a benchmark when it says how to run one (longrun, a checkpointing
        // demo that needs a worker's checkpoint store, does not).
        let Ok(text) = std::fs::read_to_string(dir.join("bench.args")) else {
            println!("SKIP examples/{name}: no bench.args (not a benchmark sample)");
            continue;
        };
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let args = lines
            .next()
            .unwrap_or("")
            .split_whitespace()
            .map(String::from)
            .collect();
        let input = match lines.next() {
            Some(f) => match std::fs::read(dir.join(f)) {
                Ok(b) => b,
                Err(e) => {
                    println!("SKIP examples/{name}: input {f}: {e}");
                    continue;
                }
            },
            None => Vec::new(),
        };
        out.push(Kernel {
            name,
            wasm,
            native,
            args,
            input,
        });
    }
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run_native(k: &Kernel) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let mut child = Command::new(&k.native)
        .args(&k.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the native kernel");
    let mut stdin = child.stdin.take().unwrap();
    let input = k.input.clone();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("native kernel output");
    let elapsed = start.elapsed();
    feeder.join().ok();
    (elapsed, out.stdout)
}

fn spec(k: &Kernel) -> RunSpec {
    RunSpec {
        argv: std::iter::once(k.name.clone())
            .chain(k.args.iter().cloned())
            .collect(),
        input: k.input.clone(),
        fuel: u64::MAX / 4,
        memory_mb: 1024,
        max_output: 64 << 20,
        seed: [0; 32],
    }
}

fn run_sandbox(sb: &Sandbox, k: &Kernel, runs: usize) -> Result<(Duration, Vec<u8>, u64), String> {
    let m = sb.load(&k.wasm).map_err(|e| e.to_string())?;
    let spec = spec(k);
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let out = sb
            .run(&m, &spec, &RunControl::default())
            .map_err(|e| e.to_string())?;
        if out.result.status != Status::Ok {
            return Err(format!("status {} {:?}", out.result.status, out.error));
        }
        times.push(out.wall);
        last = Some(out);
    }
    let out = last.unwrap();
    Ok((median(times), out.output, out.result.fuel_used))
}

/// One setting on top of plain wasmtime.
#[derive(Clone, Copy, PartialEq)]
enum Extra {
    None,
    Fuel,
    Epoch,
    NanCanon,
}

/// Run `k` on plain wasmtime (stock WASI p1, in-memory stdio) with at most one extra setting.
fn run_plain(k: &Kernel, extra: Extra, runs: usize) -> Result<(Duration, Vec<u8>), String> {
    use wasmtime::{Config, Engine, Linker, Module, Store};
    use wasmtime_wasi::p1::WasiP1Ctx;
    use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
    let mut c = Config::new();
    c.consume_fuel(extra == Extra::Fuel);
    c.epoch_interruption(extra == Extra::Epoch);
    c.cranelift_nan_canonicalization(extra == Extra::NanCanon);
    let engine = Engine::new(&c).map_err(|e| e.to_string())?;
    let module = Module::new(&engine, &k.wasm).map_err(|e| e.to_string())?;
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |t| t).map_err(|e| e.to_string())?;
    let pre = linker.instantiate_pre(&module).map_err(|e| e.to_string())?;
    let argv: Vec<String> = std::iter::once(k.name.clone())
        .chain(k.args.iter().cloned())
        .collect();
    let mut times = Vec::new();
    let mut output = Vec::new();
    for _ in 0..runs {
        let stdout = MemoryOutputPipe::new(64 << 20);
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .args(&argv)
            .stdin(MemoryInputPipe::new(k.input.clone()))
            .stdout(stdout.clone())
            .build_p1();
        let mut store = Store::new(&engine, wasi);
        if extra == Extra::Fuel {
            store.set_fuel(u64::MAX / 4).map_err(|e| e.to_string())?;
        }
        if extra == Extra::Epoch {
            // Never reached: only the checks' cost is measured.
            store.set_epoch_deadline(u64::MAX / 2);
        }
        let t = Instant::now();
        let res = pre.instantiate(&mut store).and_then(|i| {
            i.get_typed_func::<(), ()>(&mut store, "_start")?
                .call(&mut store, ())
        });
        times.push(t.elapsed());
        if let Err(e) = res {
            match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(x) if x.0 == 0 => {}
                _ => return Err(format!("{e:#}")),
            }
        }
        drop(store);
        output = stdout.contents().to_vec();
    }
    Ok((median(times), output))
}

fn settings_cost(k: &Kernel, runs: usize) {
    let mut native = Vec::new();
    for _ in 0..runs {
        native.push(run_native(k).0);
    }
    let native = median(native);
    let mut t = Vec::new();
    for extra in [Extra::None, Extra::Fuel, Extra::Epoch, Extra::NanCanon] {
        match run_plain(k, extra, runs) {
            Ok((d, _)) => t.push(d),
            Err(e) => {
                println!("{:<12} FAILED on plain wasmtime: {e}", k.name);
                return;
            }
        }
    }
    let r = |d: Duration, base: Duration| d.as_secs_f64() / base.as_secs_f64();
    println!(
        "{:<12} {:>11} {:>11} {:>11} {:>11} {:>8.2}x {:>8.2}x {:>8.2}x {:>8.2}x",
        k.name,
        ms(t[0]),
        ms(t[1]),
        ms(t[2]),
        ms(t[3]),
        r(t[0], native),
        r(t[1], t[0]),
        r(t[2], t[0]),
        r(t[3], t[0]),
    );
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn bench_kernel(k: &Kernel, runs: usize, det: &Sandbox, loose: &Sandbox) {
    let mut native = Vec::new();
    let mut native_out = Vec::new();
    for _ in 0..runs {
        let (t, o) = run_native(k);
        native.push(t);
        native_out = o;
    }
    let native = median(native);
    let (d, l) = match (run_sandbox(det, k, runs), run_sandbox(loose, k, runs)) {
        (Ok(d), Ok(l)) => (d, l),
        (Err(e), _) | (_, Err(e)) => {
            println!("{:<12} FAILED in the sandbox: {e}", k.name);
            return;
        }
    };
    let check = if d.1 == native_out && l.1 == native_out {
        "output = native".to_string()
    } else {
        "OUTPUT DIFFERS from native".to_string()
    };
    let ratio = |t: Duration| t.as_secs_f64() / native.as_secs_f64();
    println!(
        "{:<12} {:>11} {:>11} {:>11} {:>8.2}x {:>8.2}x  {check}, fuel {}",
        k.name,
        ms(native),
        ms(d.0),
        ms(l.0),
        ratio(d.0),
        ratio(l.0),
        d.2
    );
}

fn compile_and_cache(kernels: &[Kernel], work: &Path, runs: usize) {
    // The module closest to 100 KB.
    let Some(k) = kernels
        .iter()
        .min_by_key(|k| (k.wasm.len() as i64 - 100_000).abs())
    else {
        println!("SKIP compile/cache: no module");
        return;
    };
    let cache = work.join("cache");
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for i in 0..runs {
        let _ = std::fs::remove_dir_all(&cache);
        let sb = Sandbox::new(SandboxConfig {
            cache_dir: Some(cache.clone()),
            ..SandboxConfig::default()
        })
        .unwrap();
        let t = Instant::now();
        let m = sb.load(&k.wasm).expect("load");
        cold.push(t.elapsed());
        assert!(!m.from_disk_cache());
        let sb2 = Sandbox::new(SandboxConfig {
            cache_dir: Some(cache.clone()),
            ..SandboxConfig::default()
        })
        .unwrap();
        let t = Instant::now();
        let m2 = sb2.load(&k.wasm).expect("load from cache");
        warm.push(t.elapsed());
        assert!(m2.from_disk_cache(), "run {i}: not loaded from the cache");
    }
    println!(
        "compile {} ({} KB): cold compile {} | compile-cache load {} (median of {runs})",
        k.name,
        k.wasm.len() / 1000,
        ms(median(cold)),
        format!("{:.2} ms", median(warm).as_secs_f64() * 1e3)
    );
}

fn instantiation(sb: &Sandbox, kernels: &[Kernel], n: usize) {
    let tiny = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
        .unwrap();
    let mut rows: Vec<(String, Vec<u8>)> = vec![("empty".into(), tiny.clone())];
    rows.extend(kernels.iter().map(|k| (k.name.clone(), k.wasm.clone())));
    for (name, wasm) in rows {
        let m = sb.load(&wasm).unwrap();
        let spec = RunSpec {
            argv: vec![name.clone()],
            ..RunSpec::default()
        };
        let times: Vec<Duration> = (0..n)
            .map(|_| sb.instantiate_only(&m, &spec).unwrap())
            .collect();
        println!(
            "instantiate {name:<12} {:>8.1} µs (store + WASI ctx + instance, median of {n})",
            median(times).as_secs_f64() * 1e6
        );
    }
    let m = sb.load(&tiny).unwrap();
    let spec = RunSpec::default();
    let times: Vec<Duration> = (0..n)
        .map(|_| sb.run(&m, &spec, &RunControl::default()).unwrap().wall)
        .collect();
    println!(
        "full run of an empty _start: {:.1} µs (median of {n})",
        median(times).as_secs_f64() * 1e6
    );
}
