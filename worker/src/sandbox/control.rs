//! [`RunControl`]: pause, resume, cancel and throttle a running task from another thread.
//!
//! A running guest yields to its run's thread every `engine::YIELD_FUEL` fuel (a few
//! milliseconds); at each yield the run calls [`RunControl::on_yield`], which blocks while
//! paused, sleeps to keep the CPU duty cycle, or says the guest is cancelled (the run then
//! drops it). None of this touches fuel, so a paused or throttled run produces exactly the
//! result of an uninterrupted one.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::checkpoint::CheckpointStore;

/// The shortest stretch of running time the CPU duty cycle sleeps after: shorter stretches
/// add up first, so a guest that yields often does not sleep in slivers.
const THROTTLE_SLICE: Duration = Duration::from_millis(5);

/// Shared controls of one (or several) runs. Clones control the same runs.
#[derive(Clone, Default)]
pub struct RunControl {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    paused: AtomicBool,
    cancelled: AtomicBool,
    /// 0 = no limit, else percent of CPU time.
    cpu_limit: AtomicU8,
    /// Yields reached by guests run under this control.
    ticks: AtomicU64,
    /// Guests blocked by a pause right now.
    held: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// When a task slot began running the guest (see [`RunControl::mark_started`]).
    started: OnceLock<Instant>,
    /// Where the guest's checkpoints go (see [`RunControl::set_checkpoints`]).
    checkpoints: OnceLock<Arc<dyn CheckpointStore>>,
}

impl std::fmt::Debug for RunControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunControl")
            .field("paused", &self.is_paused())
            .field("cancelled", &self.is_cancelled())
            .field("cpu_limit", &self.cpu_limit())
            .finish()
    }
}

impl RunControl {
    /// Suspend the guest at its next yield (within a few ms); it keeps its state.
    pub fn pause(&self) {
        self.inner.paused.store(true, Ordering::SeqCst);
    }

    /// Continue a paused guest.
    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::SeqCst);
        self.notify();
    }

    /// Stop the guest; its run returns `Err(Cancelled)`. Also wakes a paused guest.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        self.notify();
    }

    pub fn is_paused(&self) -> bool {
        self.inner.paused.load(Ordering::SeqCst)
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Use at most `pct`% of a core's time (duty cycle); `None` or 100: no limit.
    pub fn set_cpu_limit(&self, pct: Option<u8>) {
        let v = match pct {
            Some(p) if p < 100 => p.max(1),
            _ => 0,
        };
        self.inner.cpu_limit.store(v, Ordering::SeqCst);
        self.notify();
    }

    pub fn cpu_limit(&self) -> Option<u8> {
        match self.inner.cpu_limit.load(Ordering::SeqCst) {
            0 => None,
            p => Some(p),
        }
    }

    /// How many yields (every `engine::YIELD_FUEL` fuel) guests run under this control have
    /// reached so far. It grows only while a guest executes (a paused guest reaches no
    /// yield), so it shows that a run is under way and, together with [`held`](Self::held),
    /// that a pause took hold.
    pub fn ticks(&self) -> u64 {
        self.inner.ticks.load(Ordering::SeqCst)
    }

    /// How many guests run under this control are held by [`pause`](Self::pause) right now.
    pub fn held(&self) -> usize {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Record that a task slot begins running the guest now (the first call counts): the
    /// worker's `status` tells running tasks from queued ones, and for how long they ran.
    pub fn mark_started(&self) {
        let _ = self.inner.started.set(Instant::now());
    }

    /// When a slot began running the guest; `None` while it waits for one.
    pub fn started(&self) -> Option<Instant> {
        self.inner.started.get().copied()
    }

    /// Keep the guest's checkpoints in `store`, and resume from its newest one (the first
    /// call counts; set it before the run starts). Without one, checkpoints last as long as
    /// the run.
    pub fn set_checkpoints(&self, store: Arc<dyn CheckpointStore>) {
        let _ = self.inner.checkpoints.set(store);
    }

    /// The checkpoint store of these runs, if any.
    pub fn checkpoints(&self) -> Option<Arc<dyn CheckpointStore>> {
        self.inner.checkpoints.get().cloned()
    }

    fn notify(&self) {
        let _g = self.inner.lock.lock().expect("run control lock poisoned");
        self.inner.wake.notify_all();
    }

    /// Called at every yield of a running guest; `ran_since` is when the guest last resumed
    /// after a pause or a duty-cycle sleep. Returns `false` if the run is cancelled (the
    /// caller then stops the guest).
    pub(crate) fn on_yield(&self, ran_since: &mut Instant) -> bool {
        self.inner.ticks.fetch_add(1, Ordering::SeqCst);
        if self.is_cancelled() {
            return false;
        }
        match self.cpu_limit() {
            Some(pct) => {
                let ran = ran_since.elapsed();
                if ran >= THROTTLE_SLICE {
                    // Sleep so that running time is pct% of the total.
                    let rest = ran.mul_f64((100 - pct as u32) as f64 / pct as f64);
                    self.wait_unless_woken(rest.min(Duration::from_secs(1)));
                    *ran_since = Instant::now();
                }
            }
            // Unthrottled: a limit set later counts from now.
            None => *ran_since = Instant::now(),
        }
        if self.is_paused() {
            // Flags are checked under the lock that `resume`/`cancel` notify under: no lost wake-up.
            let mut g = self.inner.lock.lock().expect("run control lock poisoned");
            self.inner.held.fetch_add(1, Ordering::SeqCst);
            while self.is_paused() && !self.is_cancelled() {
                g = self
                    .inner
                    .wake
                    .wait_timeout(g, Duration::from_secs(1))
                    .expect("run control lock poisoned")
                    .0;
            }
            self.inner.held.fetch_sub(1, Ordering::SeqCst);
            *ran_since = Instant::now();
        }
        !self.is_cancelled()
    }

    fn wait_unless_woken(&self, d: Duration) {
        if d.is_zero() {
            return;
        }
        let g = self.inner.lock.lock().expect("run control lock poisoned");
        let _ = self.inner.wake.wait_timeout(g, d);
    }
}
