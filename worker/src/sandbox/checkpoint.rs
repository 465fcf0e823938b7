//! The guest checkpoint API (import module `peergrid`, docs/guest-abi.md): a long task hands
//! the host its state (`checkpoint`), asks for it back when it starts (`restore`) and says
//! how far it is (`progress`).
//!
//! Where states are kept is the caller's business ([`CheckpointStore`], attached to the
//! run's [`RunControl`](super::RunControl)); without a store a run still accepts checkpoints
//! (kept in memory for the run) so a module behaves the same everywhere.
//!
//! # Determinism
//! What `checkpoint` returns depends only on the guest's arguments (a state larger than
//! [`MAX_CHECKPOINT_BYTES`] is refused with [`ERR_TOO_LARGE`], everywhere alike): a failure
//! to store it durably is the host's problem, logged, never shown to the guest. `restore`
//! differs between a fresh and a resumed run by design; a task must compute the same output
//! either way. Fuel differs too (the restore path is not the path the uninterrupted run
//! took), which is why the coordinator compares the results of such tasks without fuel
//! (docs/guest-abi.md, "Checkpoints and fuel").
//!
//! # Bounded host work
//! Like the WASI calls of [`wasi`](super::wasi): pointers and lengths are checked against
//! guest memory first (out of bounds traps: `trap`/`host error`), and every byte copied
//! costs [`FUEL_PER_HOST_BYTE`] on top of [`FUEL_PER_HOST_CALL`], charged before the copy.

use std::sync::Arc;

use tasks::limits::MAX_CHECKPOINT_BYTES;
use wasmtime::{Caller, Linker};

use super::run::StoreState;
use super::wasi::{charge, guest_memory as memory, span, FUEL_PER_HOST_BYTE, FUEL_PER_HOST_CALL};

/// The import module of the checkpoint API.
pub const MODULE: &str = "peergrid";

/// `checkpoint`/`restore` error: the state is larger than [`MAX_CHECKPOINT_BYTES`].
pub const ERR_TOO_LARGE: i32 = -1;
/// `checkpoint`/`restore` error: negative length or capacity.
pub const ERR_INVALID: i32 = -2;

/// A saved state and the fuel the task had used when it was saved (over all its runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub data: Vec<u8>,
    pub fuel_used: u64,
}

/// Where a run's checkpoints go. Called on the run's thread, inside the guest's call: a
/// `save` that returns has made the state durable (or failed, which only costs the work
/// since the previous checkpoint after a crash).
pub trait CheckpointStore: Send + Sync {
    /// The newest saved state, to resume from (`None`: start from zero).
    fn load(&self) -> Option<Checkpoint>;
    /// Keep `ckpt` as the newest state; `Err` is logged, never shown to the guest.
    fn save(&self, ckpt: &Checkpoint) -> Result<(), String>;
    /// The guest reported its progress (0..=1, already clamped).
    fn progress(&self, _fraction: f64) {}
}

/// The checkpoint state of one run.
#[derive(Default)]
pub(crate) struct RunCheckpoints {
    pub(crate) store: Option<Arc<dyn CheckpointStore>>,
    /// What `restore` hands out: the state loaded at start, then the newest one saved.
    pub(crate) newest: Option<Vec<u8>>,
    /// Fuel used by earlier runs of this task, up to the checkpoint this run resumed from.
    pub(crate) fuel_base: u64,
    /// The task's whole fuel budget (this run's budget is what remains of it).
    pub(crate) budget: u64,
    /// The latest progress the guest reported.
    pub(crate) progress: Option<f64>,
}

/// Add the `peergrid` calls to `linker`.
pub fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    use super::wasi::yielding;
    yielding!(linker, MODULE, "checkpoint", checkpoint(a: i32, b: i32));
    yielding!(linker, MODULE, "restore", restore(a: i32, b: i32));
    yielding!(linker, MODULE, "progress", progress(a: f64));
    Ok(())
}

/// `checkpoint(ptr, len) -> i32`: keep `[ptr, ptr + len)` as the task's newest state.
fn checkpoint(mut caller: Caller<'_, StoreState>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    const CALL: &str = "peergrid.checkpoint";
    charge(&mut caller, FUEL_PER_HOST_CALL)?;
    if len < 0 {
        return Ok(ERR_INVALID);
    }
    let len = len as usize;
    if len > MAX_CHECKPOINT_BYTES {
        return Ok(ERR_TOO_LARGE);
    }
    let mem = memory(&mut caller, CALL)?;
    let range = span(CALL, mem.data_size(&caller), ptr, len, 1)?;
    charge(&mut caller, FUEL_PER_HOST_BYTE.saturating_mul(len as u64))?;
    // Fuel used so far by the task over all its runs: what a run resumed from this state
    // starts its count at.
    let ck = &caller.data().ckpt;
    let used_now = ck
        .budget
        .saturating_sub(ck.fuel_base)
        .saturating_sub(caller.get_fuel()?);
    let fuel_used = caller.data().ckpt.fuel_base.saturating_add(used_now);
    let data = mem.data(&caller)[range].to_vec();
    let ckpt = Checkpoint { data, fuel_used };
    if let Some(store) = caller.data().ckpt.store.clone() {
        if let Err(e) = store.save(&ckpt) {
            tracing::warn!("could not keep a checkpoint ({} bytes): {e}", len);
        }
    }
    caller.data_mut().ckpt.newest = Some(ckpt.data);
    Ok(0)
}

/// `restore(ptr, cap) -> i32`: copy the newest state to `[ptr, ptr + len)`; its length, 0
/// when there is none, `-len` when `cap` is too small (nothing copied).
fn restore(mut caller: Caller<'_, StoreState>, ptr: i32, cap: i32) -> wasmtime::Result<i32> {
    const CALL: &str = "peergrid.restore";
    charge(&mut caller, FUEL_PER_HOST_CALL)?;
    if cap < 0 {
        return Ok(ERR_INVALID);
    }
    let len = match &caller.data().ckpt.newest {
        None => return Ok(0),
        Some(d) => d.len(),
    };
    // Saved states are at most MAX_CHECKPOINT_BYTES (64 MiB): the length fits an i32.
    if len > cap as usize {
        return Ok(-(len as i32));
    }
    let mem = memory(&mut caller, CALL)?;
    let range = span(CALL, mem.data_size(&caller), ptr, len, 1)?;
    charge(&mut caller, FUEL_PER_HOST_BYTE.saturating_mul(len as u64))?;
    let (bytes, state) = mem.data_and_store_mut(&mut caller);
    let data = state.ckpt.newest.as_ref().expect("checked above");
    bytes[range].copy_from_slice(data);
    Ok(len as i32)
}

/// `progress(fraction)`: how far the task is, 0..=1 (clamped; NaN ignored).
fn progress(mut caller: Caller<'_, StoreState>, fraction: f64) -> wasmtime::Result<()> {
    charge(&mut caller, FUEL_PER_HOST_CALL)?;
    if fraction.is_nan() {
        return Ok(());
    }
    let f = fraction.clamp(0.0, 1.0);
    caller.data_mut().ckpt.progress = Some(f);
    if let Some(store) = caller.data().ckpt.store.clone() {
        store.progress(f);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::sandbox::{RunControl, RunSpec, Sandbox, SandboxConfig};
    use tasks::Status;

    /// Keeps states in memory.
    #[derive(Default)]
    struct Mem {
        saved: Mutex<Vec<Checkpoint>>,
        progress: Mutex<Vec<f64>>,
    }

    impl CheckpointStore for Mem {
        fn load(&self) -> Option<Checkpoint> {
            self.saved.lock().unwrap().last().cloned()
        }
        fn save(&self, c: &Checkpoint) -> Result<(), String> {
            self.saved.lock().unwrap().push(c.clone());
            Ok(())
        }
        fn progress(&self, f: f64) {
            self.progress.lock().unwrap().push(f);
        }
    }

    /// Restores into 0..16 (prints the restore answer as one byte + the state), then
    /// checkpoints "abcd", reports progress, and probes the error codes.
    const GUEST: &str = r#"(module
        (import "peergrid" "checkpoint" (func $ck (param i32 i32) (result i32)))
        (import "peergrid" "restore" (func $rs (param i32 i32) (result i32)))
        (import "peergrid" "progress" (func $pr (param f64)))
        (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (data (i32.const 100) "abcd")
        (func $out (param $ptr i32) (param $len i32)
            (i32.store (i32.const 200) (local.get $ptr))
            (i32.store (i32.const 204) (local.get $len))
            (drop (call $w (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 208))))
        (func (export "_start") (local $n i32)
            ;; too small a buffer: -(len) when a state exists, 0 otherwise
            (i32.store8 (i32.const 300) (i32.add (i32.const 100) (call $rs (i32.const 0) (i32.const 1))))
            (call $out (i32.const 300) (i32.const 1))
            (local.set $n (call $rs (i32.const 0) (i32.const 16)))
            (if (i32.gt_s (local.get $n) (i32.const 0))
                (then (call $out (i32.const 0) (local.get $n))))
            (if (i32.ne (call $ck (i32.const 100) (i32.const 4)) (i32.const 0)) (then unreachable))
            ;; larger than the bound: -1, nothing kept
            (if (i32.ne (call $ck (i32.const 0) (i32.const 0x7fffffff)) (i32.const -1)) (then unreachable))
            (if (i32.ne (call $ck (i32.const 0) (i32.const -5)) (i32.const -2)) (then unreachable))
            (call $pr (f64.const 0.5))
            (call $pr (f64.const 7))
            (call $pr (f64.const nan))))"#;

    fn run(control: &RunControl, wat: &str) -> crate::sandbox::RunOutput {
        let sandbox = Sandbox::new(SandboxConfig::default()).unwrap();
        let module = wat::parse_str(wat).unwrap();
        sandbox
            .run_bytes(&module, &RunSpec::default(), control)
            .unwrap()
    }

    #[test]
    fn checkpoint_restore_progress_and_error_codes() {
        let mem = Arc::new(Mem::default());
        let control = RunControl::default();
        control.set_checkpoints(mem.clone());
        let fresh = run(&control, GUEST);
        assert_eq!(fresh.result.status, Status::Ok, "{:?}", fresh.error);
        assert_eq!(
            fresh.output, b"d",
            "no state: restore says 0 (100 + 0 = 'd')"
        );
        let saved = mem.saved.lock().unwrap().clone();
        assert_eq!(saved.len(), 1, "refused states are not kept");
        assert_eq!(saved[0].data, b"abcd");
        assert!(saved[0].fuel_used > 0 && saved[0].fuel_used < fresh.result.fuel_used);
        assert_eq!(
            *mem.progress.lock().unwrap(),
            vec![0.5, 1.0],
            "clamped, NaN ignored"
        );

        // A resumed run sees the state, and counts the fuel used up to the checkpoint.
        let control = RunControl::default();
        control.set_checkpoints(mem.clone());
        let resumed = run(&control, GUEST);
        assert_eq!(resumed.result.status, Status::Ok, "{:?}", resumed.error);
        assert_eq!(resumed.output, b"`abcd", "100 - 4 = '`', then the state");
        assert!(resumed.result.fuel_used > saved[0].fuel_used + fresh.result.fuel_used / 2);

        // Without a store the calls work alike within the run.
        let plain = run(&RunControl::default(), GUEST);
        assert_eq!(plain.output, b"d");
        assert_eq!(
            plain.result, fresh.result,
            "same result with or without a store"
        );
    }

    #[test]
    fn out_of_bounds_states_trap_and_cost_fuel_per_byte() {
        let wat = |len: u32| {
            format!(
                r#"(module
                (import "peergrid" "checkpoint" (func $ck (param i32 i32) (result i32)))
                (memory (export "memory") 1)
                (func (export "_start") (drop (call $ck (i32.const 0) (i32.const {len})))))"#
            )
        };
        let out = run(&RunControl::default(), &wat(65537));
        assert_eq!(out.result.status, Status::Trap);
        assert_eq!(out.result.trap, "host error");
        let small = run(&RunControl::default(), &wat(0)).result.fuel_used;
        let big = run(&RunControl::default(), &wat(65536)).result.fuel_used;
        assert_eq!(big - small, 65536 * FUEL_PER_HOST_BYTE);
    }
}
