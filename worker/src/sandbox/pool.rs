//! Wasmtime's pooling allocator for the sandbox: linear memories, tables, instances and the
//! fiber stack each run needs are reserved once, when the [`Sandbox`](super::Sandbox) is
//! built, and reused run after run, instead of being mapped, touched and unmapped for every
//! run (which cost a tiny task ~27 µs for its 2 MiB fiber stack alone, plus the kernel time of
//! unmapping its memory).
//!
//! # Why no run can fail for lack of a slot
//! A pooled instantiation fails when the pool is full or when the module exceeds a pool limit;
//! either would make a run's outcome depend on this worker, not on the task. So:
//! - **Concurrency**: the pool has `runs` slots of everything one run can use (1 instance,
//!   1 memory, [`MAX_TABLES`] tables, 1 fiber stack). A run takes a [`Permit`] first; when all
//!   `runs` are taken the run uses the module's on-demand copy instead (wasmtime's default
//!   allocator, what every run used before), so it neither fails nor waits. The worker sizes
//!   the pool from its `--slots` (a slot runs one task at a time), so there the fallback is
//!   only a guard.
//! - **Module shape**: a module that does not fit the pool's per-instance limits (a memory
//!   whose *initial* size exceeds 4 GiB, a table whose initial size exceeds
//!   [`MAX_TABLE_ELEMENTS`], more memories or tables than the limiter allows, a very large
//!   instance) is refused by wasmtime when it is adopted into the pooled engine (see
//!   [`Pool::adopt`]); it then only ever runs on demand, where the memory/table limiter
//!   classifies it exactly as before (`memory_limit` or `invalid_module`). Every module that
//!   does fit behaves identically in both allocators: the limiter (`memory_mb`, tables
//!   counted in it) is asked first for every initial allocation and every grow, and a pooled
//!   memory slot (4 GiB, = `MAX_MEMORY_MB`) is never smaller than what the limiter allows.
//!   Fuel and results are the same (tested in `tests/sandbox.rs`).
//!
//! # What it costs
//! Address space, not memory: each slot reserves 4 GiB + 32 MiB of guard for its linear
//! memory (what an on-demand run reserves too, for as long as it runs) and
//! [`MAX_TABLES`] x 8 MiB for its tables, all `PROT_NONE`/untouched until used. 256 slots
//! (the `MAX_WORKER_SLOTS` cap) reserve ~1 TiB per sandbox, ~2 TiB for the worker's two (one
//! per determinism class), of the 128 TiB a 64-bit Linux process has.
//! Where the reservation is refused (a `ulimit -v`, a small address space), the sandbox runs
//! everything on demand, with the same results. A module that fits is linked in both
//! engines, so its machine code is held twice.

use std::sync::Mutex;

use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig,
};

use super::run::{StoreState, MAX_TABLE_ELEMENTS};
use super::{one_line, SandboxError};

/// Tables one instance may define (the limiter's `tables()`).
pub const MAX_TABLES: u32 = 16;

/// The largest linear memory a run may have, in bytes: `MAX_MEMORY_MB` (4 GiB, all of a
/// 32-bit memory), so the pool's memory slot never refuses what `memory_mb` allows.
const MAX_MEMORY_BYTES: usize = (tasks::job::limits::MAX_MEMORY_MB as usize) << 20;

/// Linear memory bytes a freed slot keeps mapped (zeroed with `memset`) rather than giving
/// back to the kernel with `madvise`: the few pages a small task touches are then reused
/// without page faults.
const KEEP_RESIDENT: usize = 64 << 10;

/// The pooled engine: its linker and the free run slots.
pub(crate) struct Pool {
    engine: Engine,
    linker: Linker<StoreState>,
    free: Mutex<usize>,
    runs: usize,
}

/// A run slot of the pool, given back when dropped.
pub(crate) struct Permit<'a> {
    pool: &'a Pool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.pool.free.lock().expect("pool lock poisoned") += 1;
    }
}

/// The pooling allocator's limits for `runs` runs at once (see the module doc).
pub fn allocation_config(runs: u32) -> PoolingAllocationConfig {
    let mut p = PoolingAllocationConfig::new();
    p.total_core_instances(runs)
        .total_memories(runs)
        .total_tables(runs.saturating_mul(MAX_TABLES))
        .total_stacks(runs)
        .max_memories_per_module(1)
        .max_tables_per_module(MAX_TABLES)
        .max_memory_size(MAX_MEMORY_BYTES)
        .table_elements(MAX_TABLE_ELEMENTS)
        .linear_memory_keep_resident(KEEP_RESIDENT);
    p
}

impl Pool {
    /// A pooled engine configured like `config` (same code generation, so the same machine
    /// code and fingerprint) with room for `runs` runs at once. `Ok(None)` for `runs == 0`.
    pub(crate) fn new(mut config: Config, runs: usize) -> Result<Option<Pool>, SandboxError> {
        if runs == 0 {
            return Ok(None);
        }
        let slots = u32::try_from(runs).unwrap_or(u32::MAX);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(allocation_config(
            slots,
        )));
        let engine = Engine::new(&config).map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
        let linker =
            super::wasi::linker(&engine).map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
        Ok(Some(Pool {
            engine,
            linker,
            free: Mutex::new(runs),
            runs,
        }))
    }

    /// How many runs at once the pool has room for.
    pub(crate) fn runs(&self) -> usize {
        self.runs
    }

    /// A free run slot, if any.
    pub(crate) fn try_acquire(&self) -> Option<Permit<'_>> {
        let mut free = self.free.lock().expect("pool lock poisoned");
        if *free == 0 {
            return None;
        }
        *free -= 1;
        Some(Permit { pool: self })
    }

    /// `module` (compiled by the on-demand engine) linked in the pooled engine, or why not:
    /// wasmtime refuses a module that exceeds a pool limit here, before any run, so such a
    /// module simply runs on demand.
    pub(crate) fn adopt(&self, module: &Module) -> Result<InstancePre<StoreState>, String> {
        let bytes = module.serialize().map_err(|e| one_line(&e))?;
        // SAFETY: `bytes` is what wasmtime serialized from a module compiled in this process
        // by an engine with the same code generation settings (only the allocator differs,
        // which compiled artifacts do not depend on); wasmtime checks the header again.
        let pooled =
            unsafe { Module::deserialize(&self.engine, &bytes) }.map_err(|e| one_line(&e))?;
        self.linker
            .instantiate_pre(&pooled)
            .map_err(|e| one_line(&e))
    }
}
