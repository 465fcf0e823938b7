//! One run of a loaded module: a fresh store with the task's limits, fuel and WASI context,
//! `_start`, and the classification of how it ended (see the module doc of `sandbox`).
//!
//! The guest runs as a wasmtime async call (on a fiber) that yields every
//! [`YIELD_FUEL`] fuel; [`drive`] polls it on the run's own thread and, at each yield, lets
//! the [`RunControl`] pause, throttle or cancel it. No async runtime is involved: the only
//! thing that suspends the call is that yield, which is ready again at once.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tasks::{BlobId, RunResult, Status};
use wasmtime::{InstancePre, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::I32Exit;

use super::checkpoint::RunCheckpoints;
use super::engine::YIELD_FUEL;
use super::wasi::{self, CappedPipe};
use super::{one_line, Cancelled, RunControl, RunOutput, RunSpec, STDERR_CAP};

/// Most table elements a guest may have (per table), whatever its memory budget.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// What one table element costs against the `memory_mb` budget: a pointer. Fixed (not
/// `size_of::<usize>()`) so the limit is the same on every host.
pub const TABLE_ELEMENT_BYTES: usize = 8;

/// The per-run store data.
pub struct StoreState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) io: wasi::GuestIo,
    pub(crate) limits: Limits,
    pub(crate) ckpt: RunCheckpoints,
    /// The store's fuel when the guest last yielded, as far as host calls know (see
    /// `wasi::yield_if_due`).
    pub(crate) fuel_at_yield: u64,
}

/// The memory/table limiter. Linear memory and tables share one budget, `memory_mb`: a
/// table of n elements counts n × [`TABLE_ELEMENT_BYTES`]. Refusing a grow makes
/// `memory.grow`/`table.grow` return -1 (or instantiation fail), deterministically; the
/// refusal is remembered for the `memory_limit` classification.
pub struct Limits {
    max_memory: usize,
    /// Bytes of linear memory (one memory per instance).
    memory_bytes: usize,
    /// Elements over all tables.
    table_elements: usize,
    pub(crate) memory_denied: bool,
}

impl Limits {
    pub(crate) fn new(memory_mb: u32) -> Limits {
        Limits {
            max_memory: (memory_mb as usize).saturating_mul(1 << 20),
            memory_bytes: 0,
            table_elements: 0,
            memory_denied: false,
        }
    }

    fn used(&self, memory_bytes: usize, table_elements: usize) -> usize {
        memory_bytes.saturating_add(table_elements.saturating_mul(TABLE_ELEMENT_BYTES))
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let memory = self
            .memory_bytes
            .saturating_sub(current)
            .saturating_add(desired);
        if desired > self.max_memory || self.used(memory, self.table_elements) > self.max_memory {
            self.memory_denied = true;
            return Ok(false);
        }
        self.memory_bytes = memory;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let elements = self
            .table_elements
            .saturating_sub(current)
            .saturating_add(desired);
        if desired > MAX_TABLE_ELEMENTS || self.used(self.memory_bytes, elements) > self.max_memory
        {
            self.memory_denied = true;
            return Ok(false);
        }
        self.table_elements = elements;
        Ok(true)
    }

    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        super::pool::MAX_TABLES as usize
    }
}

pub(crate) fn run(
    pre: &InstancePre<StoreState>,
    spec: &RunSpec,
    control: &RunControl,
) -> Result<RunOutput, Cancelled> {
    let start = Instant::now();
    if control.is_cancelled() {
        return Err(Cancelled);
    }
    let max_output = usize::try_from(spec.max_output).unwrap_or(usize::MAX);
    let stdout = CappedPipe::trapping(max_output);
    let stderr = CappedPipe::truncating(STDERR_CAP);
    // A resumed run starts from the newest checkpoint, with the fuel the task had used
    // when it was saved already counted (so the budget is the task's, over all its runs).
    let mut ckpt = RunCheckpoints {
        store: control.checkpoints(),
        budget: spec.fuel,
        ..RunCheckpoints::default()
    };
    if let Some(saved) = ckpt.store.as_ref().and_then(|s| s.load()) {
        ckpt.fuel_base = saved.fuel_used.min(spec.fuel);
        ckpt.newest = Some(saved.data);
    }
    let fuel_base = ckpt.fuel_base;
    let state = StoreState {
        wasi: wasi::context(spec, &stdout, &stderr),
        io: wasi::guest_io(spec, &stdout, &stderr),
        limits: Limits::new(spec.memory_mb),
        ckpt,
        fuel_at_yield: spec.fuel - fuel_base,
    };
    let mut store = Store::new(pre.module().engine(), state);
    store.limiter(|s| &mut s.limits);
    store
        .set_fuel(spec.fuel - fuel_base)
        .expect("fuel is enabled");
    store
        .fuel_async_yield_interval(Some(YIELD_FUEL))
        .expect("fuel is enabled");

    let mut instantiated = false;
    let mut ran_since = Instant::now();
    let guest = async {
        let instance = pre.instantiate_async(&mut store).await?;
        instantiated = true;
        let f = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        f.call_async(&mut store, ()).await
    };
    let Some(outcome) = drive(guest, || control.on_yield(&mut ran_since)) else {
        // Cancelled at a yield: the guest's fiber was unwound when its future was dropped.
        return Err(Cancelled);
    };
    let remaining = store.get_fuel().unwrap_or(0);
    // The budget was `spec.fuel - fuel_base`: this counts the earlier runs' fuel too.
    let fuel_used = spec.fuel.saturating_sub(remaining);
    let memory_denied = store.data().limits.memory_denied;
    drop(store);

    let (result, output, error) = finish(outcome, &stdout, memory_denied, instantiated, fuel_used);
    Ok(RunOutput {
        result,
        output,
        stderr: stderr.take(),
        error,
        wall: start.elapsed(),
    })
}

/// The run's result from how the guest ended and what it wrote: with its output and, for a
/// run that did not end `ok`, the host's one-line reason.
fn finish(
    outcome: wasmtime::Result<()>,
    stdout: &CappedPipe,
    memory_denied: bool,
    instantiated: bool,
    fuel_used: u64,
) -> (RunResult, Vec<u8>, Option<String>) {
    let (status, exit_code, trap, error) = match outcome {
        Ok(()) => (Status::Ok, 0, String::new(), None),
        Err(e) => classify(&e, stdout.overflowed(), memory_denied, instantiated),
    };
    let output = stdout.take();
    let result = RunResult {
        status,
        exit_code,
        trap,
        fuel_used,
        output_hash: BlobId::of(&output),
        output_len: output.len() as u64,
    };
    (result, output, error)
}

/// Run `guest` to completion on this thread, calling `at_yield` each time it yields; `None`
/// (and `guest` dropped, which unwinds a suspended wasm call) as soon as `at_yield` says
/// stop. The guest suspends only at its fuel yields, which are ready again at once (wasmtime
/// wakes the waker before returning `Pending`), so a no-op waker and polling again is all
/// the executor it needs.
fn drive<F: Future>(guest: F, mut at_yield: impl FnMut() -> bool) -> Option<F::Output> {
    let mut guest = pin!(guest);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match guest.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return Some(out),
            Poll::Pending => {
                if !at_yield() {
                    return None;
                }
            }
        }
    }
}

/// Time to set up a store (limits, fuel, WASI context) and instantiate `module`, without
/// running it. For the benchmark.
pub(crate) fn instantiate_only(
    pre: &InstancePre<StoreState>,
    spec: &RunSpec,
) -> wasmtime::Result<Duration> {
    let start = Instant::now();
    let stdout = CappedPipe::trapping(1024);
    let stderr = CappedPipe::truncating(1024);
    let state = StoreState {
        wasi: wasi::context(spec, &stdout, &stderr),
        io: wasi::guest_io(spec, &stdout, &stderr),
        limits: Limits::new(spec.memory_mb),
        ckpt: RunCheckpoints::default(),
        fuel_at_yield: spec.fuel,
    };
    let mut store = Store::new(pre.module().engine(), state);
    store.limiter(|s| &mut s.limits);
    store.set_fuel(spec.fuel)?;
    drive(pre.instantiate_async(&mut store), || true).expect("never stopped")?;
    Ok(start.elapsed())
}

/// Status, exit code, trap kind and human detail of a run that did not return normally.
fn classify(
    e: &wasmtime::Error,
    overflowed: bool,
    memory_denied: bool,
    instantiated: bool,
) -> (Status, i32, String, Option<String>) {
    let detail = Some(one_line(e));
    if overflowed {
        return (Status::OutputLimit, 0, String::new(), detail);
    }
    let trap = e.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::OutOfFuel) {
        return (Status::OutOfFuel, 0, String::new(), detail);
    }
    let exit = e.downcast_ref::<I32Exit>().map(|x| x.0);
    if exit == Some(0) {
        return (Status::Ok, 0, String::new(), None);
    }
    if memory_denied {
        return (Status::MemoryLimit, 0, String::new(), detail);
    }
    if let Some(code) = exit {
        return (Status::Exit, code, String::new(), None);
    }
    match trap {
        Some(t) => (Status::Trap, 0, trap_kind(t).to_string(), detail),
        None if instantiated => (Status::Trap, 0, "host error".to_string(), detail),
        None => (Status::InvalidModule, 0, String::new(), detail),
    }
}

/// A stable name for a trap kind (part of the digest; must not change within an engine
/// fingerprint). Never a backtrace or a message with addresses.
pub fn trap_kind(t: Trap) -> &'static str {
    match t {
        Trap::StackOverflow => "stack overflow",
        Trap::MemoryOutOfBounds => "memory out of bounds",
        Trap::HeapMisaligned => "heap misaligned",
        Trap::TableOutOfBounds => "table out of bounds",
        Trap::IndirectCallToNull => "indirect call to null",
        Trap::BadSignature => "bad signature",
        Trap::IntegerOverflow => "integer overflow",
        Trap::IntegerDivisionByZero => "integer divide by zero",
        Trap::BadConversionToInteger => "invalid conversion to integer",
        Trap::UnreachableCodeReached => "unreachable",
        Trap::Interrupt => "interrupt",
        Trap::OutOfFuel => "out of fuel",
        Trap::NullReference => "null reference",
        Trap::ArrayOutOfBounds => "array out of bounds",
        Trap::AllocationTooLarge => "allocation too large",
        Trap::CastFailure => "cast failure",
        Trap::DisabledOpcode => "disabled opcode",
        _ => "other trap",
    }
}

/// The output of a module that could not be loaded.
pub(crate) fn invalid_module(reason: String, wall: Duration) -> RunOutput {
    RunOutput {
        result: RunResult {
            status: Status::InvalidModule,
            exit_code: 0,
            trap: String::new(),
            fuel_used: 0,
            output_hash: BlobId::of(b""),
            output_len: 0,
        },
        output: Vec::new(),
        stderr: Vec::new(),
        error: Some(reason),
        wall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{LoadedModule, Sandbox, SandboxConfig};

    fn wat(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}.wat", env!("CARGO_MANIFEST_DIR"));
        wat::parse_file(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// `spec` run as [`run`] does, but with no yield interval: the whole budget in the store
    /// at once, so the wasm code never yields (host calls still may, after every
    /// `YIELD_FUEL`): the reference the yielding run must match.
    fn run_without_yields(sandbox: &Sandbox, module: &LoadedModule, spec: &RunSpec) -> RunResult {
        let stdout = CappedPipe::trapping(spec.max_output as usize);
        let stderr = CappedPipe::truncating(STDERR_CAP);
        let state = StoreState {
            wasi: wasi::context(spec, &stdout, &stderr),
            io: wasi::guest_io(spec, &stdout, &stderr),
            limits: Limits::new(spec.memory_mb),
            ckpt: RunCheckpoints {
                budget: spec.fuel,
                ..RunCheckpoints::default()
            },
            fuel_at_yield: spec.fuel,
        };
        let mut store = Store::new(sandbox.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(spec.fuel).unwrap();
        let mut instantiated = false;
        let guest = async {
            let instance = module.pre.instantiate_async(&mut store).await?;
            instantiated = true;
            let f = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            f.call_async(&mut store, ()).await
        };
        let outcome = drive(guest, || true).expect("never stopped");
        let fuel_used = spec.fuel - store.get_fuel().unwrap();
        let memory_denied = store.data().limits.memory_denied;
        drop(store);
        finish(outcome, &stdout, memory_denied, instantiated, fuel_used).0
    }

    /// Yielding every `YIELD_FUEL` changes neither what a guest computes nor the fuel it is
    /// charged, on every way a run ends: finishing, running out of fuel in wasm code or in
    /// a host call that charges per byte (budgets that are not multiples of the interval),
    /// and overflowing the stack.
    #[test]
    fn fuel_yields_change_no_result_and_no_fuel() {
        let sandbox = Sandbox::new(SandboxConfig {
            deterministic: false,
            ..SandboxConfig::default()
        })
        .unwrap();
        let stdin = |a: u32, b: Option<u32>| {
            let mut v = a.to_le_bytes().to_vec();
            v.extend(b.map(u32::to_le_bytes).into_iter().flatten());
            v
        };
        let cases = [
            // ~100 yields' worth of fuel, all of it spent: `ok`.
            (
                "busy",
                stdin(40_000_000, None),
                10 * YIELD_FUEL * 100,
                Status::Ok,
            ),
            // Runs out in wasm code, mid-interval.
            (
                "busy",
                stdin(40_000_000, None),
                7 * YIELD_FUEL + 12_345,
                Status::OutOfFuel,
            ),
            // Runs out in `fd_write`, charged per byte, mid-interval.
            (
                "stdio_cost",
                stdin(3, Some(100_000)),
                5 * YIELD_FUEL + 777,
                Status::OutOfFuel,
            ),
            ("recursion", Vec::new(), 10 * YIELD_FUEL, Status::Trap),
        ];
        for (name, input, fuel, status) in cases {
            let module = sandbox.load(&wat(name)).unwrap();
            let spec = RunSpec {
                input,
                fuel,
                ..RunSpec::default()
            };
            let control = RunControl::default();
            let yielding = sandbox.run(&module, &spec, &control).unwrap().result;
            let straight = run_without_yields(&sandbox, &module, &spec);
            assert_eq!(yielding.status, status, "{name} with {fuel} fuel");
            assert_eq!(yielding, straight, "{name} with {fuel} fuel");
            if status == Status::OutOfFuel {
                assert_eq!(yielding.fuel_used, fuel, "{name}: the whole budget is used");
            }
            if name != "recursion" {
                assert!(
                    control.ticks() >= 4,
                    "{name}: the run yielded ({} times)",
                    control.ticks()
                );
            }
        }
    }
}
