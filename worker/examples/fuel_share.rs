//! What the sandbox's interruption checks cost on a compute kernel (a measurement, not a
//! test): runs a WASI module in the `native` class's engine (fixed ISA baseline, no NaN
//! canonicalization) with fuel and epoch checks each on or off, and prints the wall time of
//! each (median of interleaved runs, compilation excluded) beside "neither". The sandbox
//! compiles fuel checks only (it yields on fuel); it compiled both until 2026-12-03.
//!
//!   cargo run -p worker --example fuel_share -- MODULE.wasm [RUNS] [ARG...]
//!
//! Output goes to /dev/null; every variant's output is checked to be the same.

use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::{Engine, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::WasiCtxBuilder;
use worker::sandbox::engine::{self, Isa};

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args().skip(1);
    let path = argv
        .next()
        .context("usage: fuel_share MODULE.wasm [RUNS] [ARG...]")?;
    let runs: usize = argv.next().map(|r| r.parse()).transpose()?.unwrap_or(3);
    let args: Vec<String> = argv.collect();
    let wasm = std::fs::read(&path).with_context(|| format!("read {path}"))?;
    let variants = [
        ("fuel+epoch (earlier)", true, true),
        ("fuel only (sandbox)", true, false),
        ("epoch only", false, true),
        ("neither", false, false),
    ];
    let mut prepared = Vec::new();
    for (name, fuel, epoch) in variants {
        let mut c = engine::config(false, Isa::Baseline)?;
        c.consume_fuel(fuel);
        c.epoch_interruption(epoch);
        let engine = Engine::new(&c)?;
        let module = Module::new(&engine, &wasm)?;
        let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |t| t)?;
        prepared.push((name, fuel, epoch, engine, module, linker));
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); prepared.len()];
    let mut outputs: Vec<Vec<u8>> = vec![Vec::new(); prepared.len()];
    for _ in 0..runs {
        for (i, (name, fuel, epoch, engine, module, linker)) in prepared.iter().enumerate() {
            let out = MemoryOutputPipe::new(1 << 20);
            let mut b = WasiCtxBuilder::new();
            b.stdout(out.clone()).arg(&path).args(&args);
            let mut store = Store::new(engine, b.build_p1());
            if *fuel {
                store.set_fuel(u64::MAX / 2)?;
            }
            if *epoch {
                store.set_epoch_deadline(u64::MAX / 2);
            }
            let t = Instant::now();
            let inst = linker.instantiate(&mut store, module)?;
            let start = inst.get_typed_func::<(), ()>(&mut store, "_start")?;
            if let Err(e) = start.call(&mut store, ()) {
                if e.downcast_ref::<wasmtime_wasi::I32Exit>().map(|x| x.0) != Some(0) {
                    anyhow::bail!("{name}: {e:#}");
                }
            }
            times[i].push(t.elapsed());
            outputs[i] = out.contents().to_vec();
        }
    }
    anyhow::ensure!(
        outputs.iter().all(|o| *o == outputs[0]),
        "variants printed different outputs"
    );
    let med = |v: &Vec<Duration>| {
        let mut v = v.clone();
        v.sort();
        v[v.len() / 2]
    };
    let base = med(&times[3]);
    for (i, (name, ..)) in prepared.iter().enumerate() {
        let m = med(&times[i]);
        println!(
            "{path} {name:22} {:8.3} s  {:.2}x of neither",
            m.as_secs_f64(),
            m.as_secs_f64() / base.as_secs_f64()
        );
    }
    Ok(())
}
