//! Where the time between the sandbox and a native build goes (a measurement, not a test).
//! Runs one WASI command module in-process under a ladder of engines, from a plain
//! `wasmtime::Config::default()` (host feature detection, no checks) to the sandbox itself
//! (`Sandbox::run`, `native` class), and the native build of the same source as a process,
//! and prints each one's wall time (median of interleaved runs, compilation excluded).
//!
//!   cargo run -p worker --example native_gap -- RUNS NATIVE_BIN MODULE.wasm [ARG...]
//!
//! Rungs (every wasm rung without NaN canonicalization, as in the `native` class):
//! - `native process`: NATIVE_BIN as a child process, stdout captured (its process start is
//!   included; ~1 ms);
//! - `plain, host ISA`: `Config::default()`: wasmtime detects this CPU's features (AVX, ...);
//! - `plain, baseline ISA`: the same with only the sandbox's fixed ISA baseline set;
//! - `ours, no checks, host ISA` / `ours, no checks`: the sandbox's `engine::config` with fuel
//!   and epoch checks off, for the detected ISA and for the baseline;
//! - `ours, fuel`: fuel checks only (what the sandbox compiles since fuel-based yields);
//! - `ours, fuel, coarse costs`: fuel checks with a coarser table (1 per branch and call, 0
//!   for every other operator): what coarser accounting alone would save;
//! - `ours, fuel+epoch`: both checks (what the sandbox compiled before);
//! - `ours, fuel, on a fiber` / `ours, fuel, fiber, yields`: the `ours, fuel` engine and
//!   module run as the sandbox runs them, on a fiber (`call_async`), without and with a yield
//!   every `engine::YIELD_FUEL` fuel (what the sandbox's pause, cancel and throttle need);
//! - `Sandbox::run`: the real sandbox API (its WASI world, limiter, fuel budget, yields, and
//!   the run control), in the `native` class, on its pooling allocator (what a worker's slots
//!   use); also how much fuel the guest burns per second (so how often it yields), and how
//!   soon a pause and a cancel take hold mid-run;
//! - `Sandbox::run, on demand`: the same without the pool (`pooled_runs: 0`).
//!
//! Every rung's output is checked to equal the native build's. `NATIVE_GAP_DUMP=DIR` also
//! writes each rung's compiled code to DIR (ELF files, for `objdump -d`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use wasmtime::{Config, Engine, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::WasiCtxBuilder;
use worker::sandbox::engine::{self, Isa, BASELINE};
use worker::sandbox::{RunControl, RunSpec, Sandbox, SandboxConfig};

/// One in-process wasmtime rung: its engine and which checks its stores need set up.
struct Rung {
    name: &'static str,
    engine: Engine,
    module: Module,
    linker: Linker<WasiP1Ctx>,
    fuel: bool,
    epoch: bool,
}

fn plain(baseline: bool) -> anyhow::Result<Config> {
    let mut c = Config::default();
    if baseline {
        c.target(&target_lexicon::HOST.to_string())?;
        // SAFETY: the baseline's features are checked on this host by `engine::config`
        // (called for the other rungs first); turning flags off is always safe.
        unsafe {
            for f in BASELINE.enabled {
                c.cranelift_flag_enable(f);
            }
            for f in BASELINE.disabled {
                c.cranelift_flag_set(f, "false");
            }
        }
    }
    Ok(c)
}

fn ours(isa: Isa, fuel: bool, epoch: bool) -> anyhow::Result<Config> {
    let mut c = engine::config(false, isa)?;
    c.consume_fuel(fuel);
    c.epoch_interruption(epoch);
    Ok(c)
}

/// A coarser fuel table (a measurement only, not what the sandbox uses): 1 per branch and
/// call, 0 for every other operator (the per-byte costs of bulk operations kept).
fn branch_and_call_costs() -> anyhow::Result<wasmtime::OperatorCost> {
    let mut v = serde_json::to_value(wasmtime::OperatorCost::new())?;
    let table = v.as_object_mut().context("the cost table is a map")?;
    for (op, cost) in table.iter_mut() {
        if op != "variable" {
            *cost = 0.into();
        }
    }
    for op in [
        "Br",
        "BrIf",
        "BrTable",
        "Call",
        "CallIndirect",
        "ReturnCall",
        "ReturnCallIndirect",
    ] {
        table.insert(op.into(), 1.into());
    }
    Ok(serde_json::from_value(v)?)
}

/// Index of the "ours, fuel" rung in `configs`: the engine the fiber rungs reuse.
const FUEL_RUNG: usize = 4;

/// Poll `fut` to completion on this thread. A guest on a fiber returns `Pending` only at its
/// fuel yields, and is ready to go on at once.
fn poll_to_end<F: std::future::Future>(mut fut: std::pin::Pin<&mut F>) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args().skip(1);
    let usage = "usage: native_gap RUNS NATIVE_BIN MODULE.wasm [ARG...]";
    let runs: usize = argv.next().context(usage)?.parse().context(usage)?;
    let native = argv.next().context(usage)?;
    let path = argv.next().context(usage)?;
    let args: Vec<String> = argv.collect();
    let wasm = std::fs::read(&path).with_context(|| format!("read {path}"))?;

    let configs = [
        ("plain, host ISA", plain(false)?, false, false),
        ("plain, baseline ISA", plain(true)?, false, false),
        (
            "ours, no checks, host ISA",
            ours(Isa::HostDetected, false, false)?,
            false,
            false,
        ),
        (
            "ours, no checks",
            ours(Isa::Baseline, false, false)?,
            false,
            false,
        ),
        ("ours, fuel", ours(Isa::Baseline, true, false)?, true, false),
        (
            "ours, fuel, coarse costs",
            {
                let mut c = ours(Isa::Baseline, true, false)?;
                c.operator_cost(branch_and_call_costs()?);
                c
            },
            true,
            false,
        ),
        (
            "ours, fuel+epoch",
            ours(Isa::Baseline, true, true)?,
            true,
            true,
        ),
    ];
    let mut rungs = Vec::new();
    for (name, c, fuel, epoch) in configs {
        let engine = Engine::new(&c)?;
        let module = Module::new(&engine, &wasm)?;
        // NATIVE_GAP_DUMP=DIR: keep each rung's compiled code (an ELF: `objdump -d`).
        if let Some(dir) = std::env::var_os("NATIVE_GAP_DUMP") {
            let file = format!("{}.cwasm", name.replace([',', ' ', '+'], "_"));
            std::fs::write(std::path::Path::new(&dir).join(file), module.serialize()?)?;
        }
        let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |t| t)?;
        rungs.push(Rung {
            name,
            engine,
            module,
            linker,
            fuel,
            epoch,
        });
    }
    ensure!(rungs[FUEL_RUNG].name == "ours, fuel" && rungs[FUEL_RUNG].fuel);
    let mut async_linker: Linker<WasiP1Ctx> = Linker::new(&rungs[FUEL_RUNG].engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut async_linker, |t| t)?;
    let sandbox = Sandbox::new(SandboxConfig {
        deterministic: false,
        ..SandboxConfig::default()
    })?;
    let loaded = sandbox.load(&wasm)?;
    let on_demand = Sandbox::new(SandboxConfig {
        deterministic: false,
        pooled_runs: 0,
        ..SandboxConfig::default()
    })?;
    let loaded_on_demand = on_demand.load(&wasm)?;
    let spec = RunSpec {
        argv: std::iter::once(path.clone())
            .chain(args.iter().cloned())
            .collect(),
        fuel: u64::MAX / 4,
        memory_mb: 4096,
        max_output: 1 << 28,
        ..RunSpec::default()
    };

    let names: Vec<&str> = std::iter::once("native process")
        .chain(rungs.iter().map(|r| r.name))
        .chain([
            "ours, fuel, on a fiber",
            "ours, fuel, fiber, yields",
            "Sandbox::run",
            "Sandbox::run, on demand",
        ])
        .collect();
    // The two fiber rungs come after the native process and the in-process rungs.
    let fiber_rungs = 1 + rungs.len();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    let mut want: Option<Vec<u8>> = None;
    let mut fuel_used = 0;
    for _ in 0..runs {
        // Native, as a process.
        let t = Instant::now();
        let out = Command::new(&native)
            .args(&args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .with_context(|| format!("run {native}"))?;
        times[0].push(t.elapsed());
        ensure!(out.status.success(), "{native} failed: {}", out.status);
        let want = want.get_or_insert(out.stdout);

        for (i, r) in rungs.iter().enumerate() {
            let pipe = MemoryOutputPipe::new(1 << 28);
            let mut b = WasiCtxBuilder::new();
            b.stdout(pipe.clone()).arg(&path).args(&args);
            let mut store = Store::new(&r.engine, b.build_p1());
            if r.fuel {
                store.set_fuel(u64::MAX / 4)?;
            }
            if r.epoch {
                store.set_epoch_deadline(u64::MAX / 4);
            }
            let t = Instant::now();
            let inst = r.linker.instantiate(&mut store, &r.module)?;
            let start = inst.get_typed_func::<(), ()>(&mut store, "_start")?;
            if let Err(e) = start.call(&mut store, ()) {
                if e.downcast_ref::<wasmtime_wasi::I32Exit>().map(|x| x.0) != Some(0) {
                    bail!("{}: {e:#}", r.name);
                }
            }
            times[i + 1].push(t.elapsed());
            ensure!(
                *pipe.contents() == **want,
                "{}: output differs from the native build's",
                r.name
            );
        }

        // The "ours, fuel" rung's engine and module driven as the sandbox drives them: on a
        // fiber (`call_async`), without and with a yield every `YIELD_FUEL`.
        for (k, yields) in [None, Some(engine::YIELD_FUEL)].into_iter().enumerate() {
            let (r, linker) = (&rungs[FUEL_RUNG], &async_linker);
            let pipe = MemoryOutputPipe::new(1 << 28);
            let mut b = WasiCtxBuilder::new();
            b.stdout(pipe.clone()).arg(&path).args(&args);
            let mut store = Store::new(&r.engine, b.build_p1());
            store.set_fuel(u64::MAX / 4)?;
            store.fuel_async_yield_interval(yields)?;
            let t = Instant::now();
            let guest = std::pin::pin!(async {
                let inst = linker.instantiate_async(&mut store, &r.module).await?;
                let start = inst.get_typed_func::<(), ()>(&mut store, "_start")?;
                start.call_async(&mut store, ()).await
            });
            if let Err(e) = poll_to_end(guest) {
                if e.downcast_ref::<wasmtime_wasi::I32Exit>().map(|x| x.0) != Some(0) {
                    bail!("{}: {e:#}", names[fiber_rungs + k]);
                }
            }
            times[fiber_rungs + k].push(t.elapsed());
            ensure!(
                *pipe.contents() == **want,
                "{}: output differs from the native build's",
                names[fiber_rungs + k]
            );
        }

        for (k, (sandbox, loaded)) in [(&sandbox, &loaded), (&on_demand, &loaded_on_demand)]
            .into_iter()
            .enumerate()
        {
            let out = sandbox
                .run(loaded, &spec, &RunControl::default())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            ensure!(
                out.result.status == tasks::Status::Ok,
                "Sandbox::run: {} {:?}",
                out.result.status,
                out.error
            );
            ensure!(
                out.output == *want,
                "Sandbox::run: output differs from the native build's"
            );
            times[names.len() - 2 + k].push(out.wall);
            fuel_used = out.result.fuel_used;
        }
    }

    let med = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let base = med(&times[0]);
    for (name, t) in names.iter().zip(&times) {
        let m = med(t);
        println!("{path} {name:26} {m:8.3} s  {:.2}x native", m / base);
    }
    // How fast this guest burns fuel: how often it yields (every `YIELD_FUEL`).
    let sandbox_s = med(&times[names.len() - 2]);
    let rate = fuel_used as f64 / sandbox_s;
    println!(
        "{path} fuel used {fuel_used} ({:.0} million/s in Sandbox::run: a yield every {:.1} ms)",
        rate / 1e6,
        engine::YIELD_FUEL as f64 / rate * 1e3
    );

    // How soon a pause takes hold and a cancel ends the run, mid-run.
    let control = RunControl::default();
    let run = {
        let (sandbox, loaded, spec, control) = (
            sandbox.clone(),
            loaded.clone(),
            spec.clone(),
            control.clone(),
        );
        std::thread::spawn(move || sandbox.run(&loaded, &spec, &control).map(|_| ()))
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| -> anyhow::Result<Duration> {
        let t = Instant::now();
        while !cond() {
            ensure!(t.elapsed() < Duration::from_secs(60), "timed out: {what}");
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(t.elapsed())
    };
    wait("the guest runs", &|| control.ticks() > 0)?;
    control.pause();
    let pause = wait("the pause takes hold", &|| control.held() == 1)?;
    control.resume();
    wait("the guest runs again", &|| control.held() == 0)?;
    control.cancel();
    let cancel = wait("the cancel ends the run", &|| run.is_finished())?;
    ensure!(
        run.join().expect("the run thread") == Err(worker::sandbox::Cancelled),
        "the cancelled run says so"
    );
    println!(
        "{path} pause took hold in {:.2} ms, cancel ended the run in {:.2} ms",
        pause.as_secs_f64() * 1e3,
        cancel.as_secs_f64() * 1e3
    );
    Ok(())
}
