//! The deterministic wasmtime sandbox: runs one untrusted task module under the guest ABI
//! described in docs/guest-abi.md and reports a [`RunResult`] that every honest
//! worker with the same [`EngineFingerprint`] reproduces bit for bit.
//!
//! The API is blocking: call it from a dedicated thread or `spawn_blocking`.
//!
//! ```no_run
//! use worker::sandbox::{RunControl, RunSpec, Sandbox, SandboxConfig};
//! let sandbox = Sandbox::new(SandboxConfig::default())?;
//! let module = sandbox.load(&std::fs::read("primes.wasm")?)?;
//! let spec = RunSpec { argv: vec!["primes".into(), "100".into()], ..RunSpec::default() };
//! let out = sandbox.run(&module, &spec, &RunControl::default())?;
//! println!("{} {}", out.result.status, out.result.digest());
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! # Layout
//! - [`engine`](self::engine): the wasmtime `Config` (every determinism setting), the
//!   [`EngineFingerprint`] derived from it.
//! - [`cache`](self::cache): the on-disk compile cache (our own serialized modules only).
//! - [`wasi`](self::wasi): the guest's world: capped stdout/stderr, fixed clocks, seeded
//!   random, virtual-time `poll_oneoff`, nothing else.
//! - [`control`](self::control): [`RunControl`]: pause, resume, cancel, CPU duty cycle, at
//!   the guest's fuel yields.
//! - [`pool`](self::pool): wasmtime's pooling allocator (memories, tables, fiber stacks
//!   reused across runs), sized so no run fails or waits for a slot.
//! - [`run`](self::run): one run: store, limits, fuel, the guest's async call polled on the
//!   run's thread, and the status classification.
//! - [`checkpoint`](self::checkpoint): the guest checkpoint API (`peergrid.checkpoint`,
//!   `restore`, `progress`) and the [`CheckpointStore`] a caller keeps states in.
//!
//! # Status classification
//! Checked in this order when `_start` does not return normally:
//! 1. the run was cancelled through [`RunControl::cancel`] → `Err(Cancelled)`;
//! 2. the guest wrote more than `max_output` bytes to stdout → `output_limit` (the write that
//!    crossed the cap stops the guest; the first `max_output` bytes are kept and hashed);
//! 3. the fuel budget ran out → `out_of_fuel` (`fuel_used` = the budget);
//! 4. the sandbox refused a `memory.grow` (or the initial memory) beyond `memory_mb` and the
//!    guest then trapped or exited non-zero → `memory_limit` (a guest that copes with the
//!    failed grow and exits 0 is `ok`);
//! 5. `proc_exit(0)` → `ok`; `proc_exit(n)` → `exit` with `exit_code` n;
//! 6. a wasm trap → `trap` with a stable kind name ([`run::trap_kind`]); an error raised by a
//!    host call (e.g. a WASI call given an out-of-bounds pointer) → `trap` with kind
//!    `host error`;
//! 7. instantiation failing for any other reason → `invalid_module`.
//!
//! Compile and link failures, a missing or mistyped `_start`, and unknown imports are found by
//! [`Sandbox::load`]; [`Sandbox::run_bytes`] reports them as `invalid_module`.
//!
//! # Compilation
//! [`Sandbox::load`] first checks the module against the deterministic size and shape
//! limits of [`admit`](self::admit) (size, function, import and export counts, function body
//! size) without compiling anything; a module over a limit is `invalid_module` with a
//! reason naming the limit, on every worker alike. It then compiles at most once per module
//! hash at a time (concurrent loads of the same new module wait for the one compilation, and
//! its outcome, success or failure, is remembered), on a dedicated thread at the lowest OS
//! priority (`SCHED_IDLE` on Linux, nice 19 elsewhere; Cranelift runs on that thread only,
//! not on a parallel pool). An optional wall-clock budget ([`SandboxConfig::compile_budget`],
//! off by default) refuses a compilation still running at the budget as `invalid_module`.
//! It is host-dependent: on a busy machine an idle-priority compiler can be starved for
//! minutes, and two overloaded workers would then agree on a wrong `invalid_module`; so it
//! is off, and such refusals are never remembered. The deterministic limits are the guard.

pub mod admit;
pub mod cache;
pub mod checkpoint;
pub mod control;
pub mod engine;
pub mod pool;
pub mod run;
pub mod wasi;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

pub use crate::priority::Priority;
use tasks::{BlobId, EngineFingerprint, RunResult, TaskManifest};
use wasmtime::{InstancePre, Linker, Module};

pub use checkpoint::{Checkpoint, CheckpointStore};
pub use control::RunControl;

use run::StoreState;

/// Stderr kept per run (diagnostics only; not part of the result).
pub const STDERR_CAP: usize = 64 * 1024;

/// How many compiled modules the in-memory cache keeps.
const MEMORY_CACHE_ENTRIES: usize = 64;

/// How many modules that failed to load are remembered (so they are not compiled again).
const FAILED_CACHE_ENTRIES: usize = 256;

/// A wall-clock budget for one compilation, for callers that set one (host-dependent,
/// unlike the deterministic limits of [`admit`]; off by default, see the module doc).
pub const COMPILE_WALL_BUDGET: Duration = Duration::from_secs(60);

/// How a [`Sandbox`] is set up.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Where compiled modules are cached across processes (`None`: memory only).
    pub cache_dir: Option<PathBuf>,
    /// Full determinism (the default). `false` turns NaN canonicalization off; only for
    /// measuring what it costs. It changes the fingerprint, so such results never mix.
    pub deterministic: bool,
    /// Wall-clock budget of one compilation (`None`, the default: no budget); a compilation
    /// that takes longer is refused as `invalid_module`, and not remembered.
    pub compile_budget: Option<Duration>,
    /// Priority of the compiler threads ([`Priority::Idle`] by default, like the task slots).
    pub priority: Priority,
    /// How many runs at once get a preallocated slot of wasmtime's pooling allocator
    /// ([`pool`]): set it to the most runs the caller makes at once (the worker: its
    /// `--slots`). Runs beyond it run on demand (same results, slower); 0 turns the pool
    /// off. Default [`DEFAULT_POOLED_RUNS`].
    pub pooled_runs: usize,
}

/// [`SandboxConfig::pooled_runs`] by default: a few runs at once (tools and tests; the
/// worker sizes its pool from its slots).
pub const DEFAULT_POOLED_RUNS: usize = 4;

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            cache_dir: None,
            deterministic: true,
            compile_budget: None,
            priority: Priority::Idle,
            pooled_runs: DEFAULT_POOLED_RUNS,
        }
    }
}

/// Compilation counters of a [`Sandbox`] (for tests and diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompileStats {
    /// Compilations started (cache misses that reached the compiler).
    pub compiles: u64,
    /// Of those, how many ran on a thread at idle priority.
    pub at_idle_priority: u64,
    /// Compilations refused for exceeding the wall-clock budget.
    pub budget_refusals: u64,
}

/// Why the sandbox or a module could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot configure the wasm engine: {0}")]
    Engine(String),
    #[error("invalid module: {reason}")]
    InvalidModule { reason: String },
    #[error("compile cache {path}: {source}")]
    Cache {
        path: String,
        source: std::io::Error,
    },
}

/// The run was stopped by [`RunControl::cancel`]; it has no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the run was cancelled")]
pub struct Cancelled;

/// What to run: the task's argv, stdin and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// `[name, args...]`
    pub argv: Vec<String>,
    /// The guest's stdin.
    pub input: Vec<u8>,
    /// Instruction budget.
    pub fuel: u64,
    /// Linear memory limit.
    pub memory_mb: u32,
    /// Stdout cap in bytes.
    pub max_output: u64,
    /// Seed of the guest's `random_get` stream.
    pub seed: [u8; 32],
}

impl Default for RunSpec {
    fn default() -> Self {
        use tasks::job::defaults;
        RunSpec {
            argv: vec!["task".into()],
            input: Vec::new(),
            fuel: defaults::FUEL,
            memory_mb: defaults::MEMORY_MB,
            max_output: defaults::MAX_OUTPUT,
            seed: [0; 32],
        }
    }
}

impl RunSpec {
    /// The spec of an assigned task; `input` is the content of `m.input` (empty if none).
    pub fn from_manifest(m: &TaskManifest, input: Vec<u8>) -> RunSpec {
        RunSpec {
            argv: m.argv(),
            input,
            fuel: m.fuel,
            memory_mb: m.memory_mb,
            max_output: m.max_output,
            seed: m.id.random_seed(),
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The deterministic outcome (what the digest covers).
    pub result: RunResult,
    /// Stdout (at most `max_output` bytes).
    pub output: Vec<u8>,
    /// Stderr (at most [`STDERR_CAP`] bytes); not part of the result.
    pub stderr: Vec<u8>,
    /// Human detail: the trap message, why the module is invalid, ...; not part of the result.
    pub error: Option<String>,
    /// Wall time of the run (including pauses).
    pub wall: Duration,
}

/// A compiled, linked module, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct LoadedModule {
    pub(crate) id: BlobId,
    /// Linked in the on-demand engine: any run can use it.
    pub(crate) pre: InstancePre<StoreState>,
    /// Linked in the pooled engine, if the sandbox has a pool and the module fits it.
    pub(crate) pooled: Option<InstancePre<StoreState>>,
    /// Whether it came from the on-disk cache rather than the compiler.
    from_disk: bool,
}

impl LoadedModule {
    /// The module's blob id (blake3 of its bytes).
    pub fn id(&self) -> BlobId {
        self.id
    }

    /// Whether this module was loaded from the on-disk compile cache (not compiled now).
    pub fn from_disk_cache(&self) -> bool {
        self.from_disk
    }

    /// The compiled module (the on-demand engine's).
    pub fn module(&self) -> &Module {
        self.pre.module()
    }

    /// Whether runs of this module can use the sandbox's pooling allocator (see [`pool`]).
    pub fn pooled(&self) -> bool {
        self.pooled.is_some()
    }
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("id", &self.id)
            .field("from_disk", &self.from_disk)
            .field("pooled", &self.pooled())
            .finish()
    }
}

/// The sandbox: one shared engine, linker and compile cache. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    engine: wasmtime::Engine,
    linker: Linker<StoreState>,
    /// The pooled engine (`None`: pool off, or its reservation was refused).
    pool: Option<pool::Pool>,
    fingerprint: EngineFingerprint,
    disk: Option<cache::DiskCache>,
    memory: Mutex<HashMap<BlobId, LoadedModule>>,
    /// Why recently seen modules failed to load.
    failed: Mutex<HashMap<BlobId, String>>,
    /// Loads in progress, one per module hash (single flight).
    inflight: Mutex<HashMap<BlobId, Arc<Flight>>>,
    compile_budget: Option<Duration>,
    priority: Priority,
    compiles: AtomicU64,
    compiles_at_idle: AtomicU64,
    budget_refusals: AtomicU64,
}

/// One load in progress; other loads of the same module wait for its outcome.
#[derive(Default)]
struct Flight {
    outcome: Mutex<Option<Result<LoadedModule, String>>>,
    done: Condvar,
}

impl Flight {
    fn finish(&self, outcome: Result<LoadedModule, String>) {
        *self.outcome.lock().expect("flight lock poisoned") = Some(outcome);
        self.done.notify_all();
    }

    fn wait(&self) -> Result<LoadedModule, String> {
        let mut g = self.outcome.lock().expect("flight lock poisoned");
        loop {
            if let Some(o) = &*g {
                return o.clone();
            }
            g = self.done.wait(g).expect("flight lock poisoned");
        }
    }
}

/// Ends a flight even if the leader panics, so no follower waits forever.
struct FlightGuard<'a> {
    inner: &'a Inner,
    id: BlobId,
    flight: Arc<Flight>,
    outcome: Option<Result<LoadedModule, String>>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| Err("loading the module panicked".into()));
        self.flight.finish(outcome);
        self.inner
            .inflight
            .lock()
            .expect("inflight lock poisoned")
            .remove(&self.id);
    }
}

impl Sandbox {
    /// Build the engine (with every determinism setting), the WASI linker, and the cache.
    pub fn new(cfg: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let (engine, fingerprint) = engine::build(cfg.deterministic)?;
        let linker = wasi::linker(&engine).map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
        let pool_config = engine::config(cfg.deterministic, engine::Isa::Baseline)?;
        let pool = match pool::Pool::new(pool_config, cfg.pooled_runs) {
            Ok(p) => p,
            Err(e) => {
                // Address space refused (ulimit -v, a small address space): every run maps
                // its own memory, as wasmtime does by default; results are the same.
                tracing::warn!(
                    runs = cfg.pooled_runs,
                    "cannot reserve the sandbox's instance pool ({e}); runs allocate on demand (slower for tiny tasks)"
                );
                None
            }
        };
        let disk = match cfg.cache_dir {
            Some(dir) => Some(cache::DiskCache::open(&dir, &fingerprint)?),
            None => None,
        };
        Ok(Sandbox {
            inner: Arc::new(Inner {
                engine,
                linker,
                pool,
                fingerprint,
                disk,
                memory: Mutex::new(HashMap::new()),
                failed: Mutex::new(HashMap::new()),
                inflight: Mutex::new(HashMap::new()),
                compile_budget: cfg.compile_budget,
                priority: cfg.priority,
                compiles: AtomicU64::new(0),
                compiles_at_idle: AtomicU64::new(0),
                budget_refusals: AtomicU64::new(0),
            }),
        })
    }

    /// What results of this sandbox may be compared with.
    pub fn fingerprint(&self) -> &EngineFingerprint {
        &self.inner.fingerprint
    }

    /// Where the compiled form of module `id` is cached on disk (`None` without a cache dir).
    pub fn cache_path(&self, id: &BlobId) -> Option<PathBuf> {
        self.inner.disk.as_ref().map(|d| d.path(id))
    }

    /// Compilation counters so far.
    pub fn compile_stats(&self) -> CompileStats {
        CompileStats {
            compiles: self.inner.compiles.load(Ordering::SeqCst),
            at_idle_priority: self.inner.compiles_at_idle.load(Ordering::SeqCst),
            budget_refusals: self.inner.budget_refusals.load(Ordering::SeqCst),
        }
    }

    /// The shared (on-demand) engine, the one [`LoadedModule::module`] belongs to (for tools
    /// and benchmarks).
    pub fn engine(&self) -> &wasmtime::Engine {
        &self.inner.engine
    }

    /// How many runs at once use the pooling allocator (0: pool off).
    pub fn pooled_runs(&self) -> usize {
        self.inner.pool.as_ref().map_or(0, |p| p.runs())
    }

    /// Compile `module` (or load it from the on-disk cache, keyed by its blake3 and the
    /// fingerprint), link it against the guest ABI and check it is a command (`_start`).
    /// Loaded modules are also kept in memory; see "Compilation" in the module doc for the
    /// limits, the single flight and the priority.
    pub fn load(&self, module: &[u8]) -> Result<LoadedModule, SandboxError> {
        let invalid = |reason: String| SandboxError::InvalidModule { reason };
        // Binary modules only (wasmtime would also parse the text format; tasks are binaries).
        if !module.starts_with(b"\0asm") {
            return Err(invalid(
                "not a WebAssembly binary (no `\\0asm` header)".into(),
            ));
        }
        // Deterministic limits first, before hashing or compiling anything.
        admit::check(module).map_err(invalid)?;
        let id = BlobId::of(module);
        let inner = &*self.inner;
        let flight = {
            let mut inflight = inner.inflight.lock().expect("inflight lock poisoned");
            // Checked under the inflight lock: a finished leader has filled these caches
            // before leaving the inflight map, so a module is never compiled twice.
            if let Some(m) = inner.memory.lock().expect("module cache poisoned").get(&id) {
                return Ok(m.clone());
            }
            if let Some(r) = inner.failed.lock().expect("failed cache poisoned").get(&id) {
                return Err(invalid(r.clone()));
            }
            match inflight.get(&id) {
                Some(f) => Err(f.clone()),
                None => {
                    let f = Arc::new(Flight::default());
                    inflight.insert(id, f.clone());
                    Ok(f)
                }
            }
        };
        let flight = match flight {
            Ok(f) => f,
            // Another load of this module is compiling it: wait for its outcome.
            Err(leader) => return leader.wait().map_err(invalid),
        };
        let mut guard = FlightGuard {
            inner,
            id,
            flight,
            outcome: None,
        };
        // A budget refusal says how busy this host was, not what the module is: never
        // remembered as the module's failure.
        let mut remember = true;
        let outcome = match self.compile_or_fetch(id, module) {
            Ok((compiled, from_disk)) => self.link(id, compiled, from_disk),
            Err(Refusal::Invalid(reason)) => Err(SandboxError::InvalidModule { reason }),
            Err(Refusal::Transient(reason)) => {
                remember = false;
                Err(SandboxError::InvalidModule { reason })
            }
        };
        let shared = match &outcome {
            Ok(loaded) => {
                insert_bounded(&inner.memory, id, loaded.clone(), MEMORY_CACHE_ENTRIES);
                Ok(loaded.clone())
            }
            Err(e) => {
                let reason = match e {
                    SandboxError::InvalidModule { reason } => reason.clone(),
                    other => other.to_string(),
                };
                if remember {
                    insert_bounded(&inner.failed, id, reason.clone(), FAILED_CACHE_ENTRIES);
                }
                Err(reason)
            }
        };
        guard.outcome = Some(shared);
        drop(guard);
        outcome
    }

    fn compile_or_fetch(&self, id: BlobId, module: &[u8]) -> Result<(Module, bool), Refusal> {
        let engine = &self.inner.engine;
        if let Some(disk) = &self.inner.disk {
            if let Some(m) = disk.get(engine, &id) {
                return Ok((m, true));
            }
        }
        let compiled = self.compile_at_idle_priority(module)?;
        if let Some(disk) = &self.inner.disk {
            if let Err(e) = disk.put(&id, &compiled) {
                tracing::warn!(module = %id, "could not write the compile cache: {e}");
            }
        }
        Ok((compiled, false))
    }

    /// Compile on a fresh thread at the lowest OS priority, waiting at most the compile
    /// budget. Past the budget the compilation is refused and left to finish (its result is
    /// dropped): Cranelift cannot be interrupted, and the thread only gets idle CPU.
    fn compile_at_idle_priority(&self, module: &[u8]) -> Result<Module, Refusal> {
        let inner = &*self.inner;
        inner.compiles.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::sync_channel(1);
        let engine = inner.engine.clone();
        let bytes = module.to_vec();
        let priority = inner.priority;
        std::thread::Builder::new()
            .name("wasm-compile".into())
            .spawn(move || {
                let idle = crate::priority::set_current_thread(priority);
                let _ = tx.send((Module::new(&engine, &bytes), idle));
            })
            .map_err(|e| Refusal::Transient(format!("cannot start a compiler thread: {e}")))?;
        let received = match inner.compile_budget {
            Some(budget) => rx.recv_timeout(budget),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match received {
            Ok((compiled, idle)) => {
                if idle {
                    inner.compiles_at_idle.fetch_add(1, Ordering::SeqCst);
                }
                compiled.map_err(|e| Refusal::Invalid(one_line(&e)))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                inner.budget_refusals.fetch_add(1, Ordering::SeqCst);
                Err(Refusal::Transient(format!(
                    "compiling the module took longer than the {:?} wall-clock compile budget \
                     (COMPILE_WALL_BUDGET); refused (a host-dependent safety net)",
                    inner.compile_budget
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(Refusal::Invalid("the compiler thread panicked".into()))
            }
        }
    }

    fn link(
        &self,
        id: BlobId,
        module: Module,
        from_disk: bool,
    ) -> Result<LoadedModule, SandboxError> {
        match module.get_export("_start") {
            Some(wasmtime::ExternType::Func(f))
                if f.params().len() == 0 && f.results().len() == 0 => {}
            Some(_) => {
                return Err(SandboxError::InvalidModule {
                    reason: "`_start` is not a function of no arguments and no results".into(),
                })
            }
            None => {
                return Err(SandboxError::InvalidModule {
                    reason: "no `_start` export: task modules must be WASI commands".into(),
                })
            }
        }
        let pre = self.inner.linker.instantiate_pre(&module).map_err(|e| {
            SandboxError::InvalidModule {
                reason: one_line(&e),
            }
        })?;
        let pooled = self.inner.pool.as_ref().and_then(|p| match p.adopt(&module) {
            Ok(pre) => Some(pre),
            Err(reason) => {
                tracing::debug!(module = %id, "runs on demand, outside the instance pool: {reason}");
                None
            }
        });
        Ok(LoadedModule {
            id,
            pre,
            pooled,
            from_disk,
        })
    }

    /// The linked module a run uses: the pooled one with a pool slot when the module fits and
    /// a slot is free, else the on-demand one (never a failure or a wait; see [`pool`]).
    fn pick<'a>(
        &'a self,
        module: &'a LoadedModule,
        spec: &RunSpec,
    ) -> (&'a InstancePre<StoreState>, Option<pool::Permit<'a>>) {
        // A limit beyond MAX_MEMORY_MB (only a direct caller can ask for one) could let a
        // 64-bit memory grow past the pool's 4 GiB slot: on demand, as before.
        if spec.memory_mb <= tasks::job::limits::MAX_MEMORY_MB {
            if let (Some(pre), Some(pool)) = (&module.pooled, &self.inner.pool) {
                if let Some(permit) = pool.try_acquire() {
                    return (pre, Some(permit));
                }
            }
        }
        (&module.pre, None)
    }

    /// Run one task. Returns `Err(Cancelled)` only if `control.cancel()` was called.
    pub fn run(
        &self,
        module: &LoadedModule,
        spec: &RunSpec,
        control: &RunControl,
    ) -> Result<RunOutput, Cancelled> {
        let (pre, _permit) = self.pick(module, spec);
        run::run(pre, spec, control)
    }

    /// Store setup + instantiation time of `module`, without running it (for benchmarks).
    #[doc(hidden)]
    pub fn instantiate_only(
        &self,
        module: &LoadedModule,
        spec: &RunSpec,
    ) -> Result<Duration, SandboxError> {
        let (pre, _permit) = self.pick(module, spec);
        run::instantiate_only(pre, spec).map_err(|e| SandboxError::InvalidModule {
            reason: one_line(&e),
        })
    }

    /// Load then run; a module that fails to load gives status `invalid_module` (not an `Err`).
    pub fn run_bytes(
        &self,
        module: &[u8],
        spec: &RunSpec,
        control: &RunControl,
    ) -> Result<RunOutput, Cancelled> {
        let start = std::time::Instant::now();
        match self.load(module) {
            Ok(m) => self.run(&m, spec, control),
            Err(e) => {
                if control.is_cancelled() {
                    return Err(Cancelled);
                }
                Ok(run::invalid_module(e.to_string(), start.elapsed()))
            }
        }
    }
}

/// Insert into a bounded cache, evicting any entry when full.
fn insert_bounded<V>(cache: &Mutex<HashMap<BlobId, V>>, id: BlobId, v: V, cap: usize) {
    let mut c = cache.lock().expect("module cache poisoned");
    if c.len() >= cap && !c.contains_key(&id) {
        if let Some(k) = c.keys().next().copied() {
            c.remove(&k);
        }
    }
    c.insert(id, v);
}

/// Why a module was not compiled.
enum Refusal {
    /// What the module is (it fails the same way everywhere): remembered.
    Invalid(String),
    /// What this host was at that moment (over the wall-clock budget, no thread to spare):
    /// never remembered as the module's failure.
    Transient(String),
}

/// An error chain on one line, capped (it is shown to users, never hashed).
pub(crate) fn one_line(e: &wasmtime::Error) -> String {
    let mut s = format!("{e:#}").replace('\n', " ");
    if s.len() > 1000 {
        let mut cut = 1000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}
