//! Task slots: dedicated OS threads at the lowest scheduling priority that run sandboxed
//! tasks, so the volunteer's own work always comes first.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tasks::wire::ReplicaId;

use crate::sandbox::{Cancelled, LoadedModule, RunControl, RunOutput, RunSpec, Sandbox};

/// What a slot runs.
pub enum Module {
    Loaded(LoadedModule),
    /// A module that failed to load: run through the sandbox anyway so the canonical
    /// `invalid_module` result is reported (identical on every worker).
    Invalid(Arc<Vec<u8>>),
}

pub struct Job {
    pub replica: ReplicaId,
    pub module: Module,
    pub spec: RunSpec,
    pub control: RunControl,
    /// When the assignment arrived (for the start-latency figure).
    pub received: Instant,
}

pub struct Done {
    pub replica: ReplicaId,
    pub outcome: Result<RunOutput, Cancelled>,
    /// Start latency: from when the task could have started (its assignment arrived and a
    /// slot was free, whichever came later) until the slot began running it. Time spent
    /// queued behind other tasks while every slot was busy is not counted.
    pub queue_wait: Duration,
}

/// A pool of task slots.
pub struct Executor {
    tx: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Executor {
    pub fn start(
        slots: usize,
        sandbox: Sandbox,
        done: tokio::sync::mpsc::UnboundedSender<Done>,
    ) -> Executor {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..slots)
            .map(|i| {
                let rx = rx.clone();
                let sandbox = sandbox.clone();
                let done = done.clone();
                std::thread::Builder::new()
                    .name(format!("slot-{i}"))
                    .spawn(move || {
                        lower_priority();
                        loop {
                            let idle_since = Instant::now();
                            let job = match rx.lock().map(|r| r.recv()) {
                                Ok(Ok(job)) => job,
                                _ => return,
                            };
                            let queue_wait = job.received.max(idle_since).elapsed();
                            let _span =
                                tracing::info_span!("task", replica = job.replica).entered();
                            let outcome = match &job.module {
                                Module::Loaded(m) => sandbox.run(m, &job.spec, &job.control),
                                Module::Invalid(bytes) => {
                                    sandbox.run_bytes(bytes, &job.spec, &job.control)
                                }
                            };
                            if done
                                .send(Done {
                                    replica: job.replica,
                                    outcome,
                                    queue_wait,
                                })
                                .is_err()
                            {
                                return;
                            }
                        }
                    })
                    .expect("spawning a slot thread")
            })
            .collect();
        Executor {
            tx: Some(tx),
            threads,
        }
    }

    pub fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Put the calling thread at the lowest priority the OS offers: `SCHED_IDLE` on Linux (it
/// only gets CPU nobody else wants), and nice 19 as a fallback elsewhere.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    unsafe {
        // SAFETY: plain syscalls on the calling thread with valid arguments.
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    unsafe {
        // SAFETY: as above.
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// Is the calling thread at idle priority? (For tests.)
pub fn current_policy_is_idle() -> bool {
    #[cfg(target_os = "linux")]
    unsafe {
        // SAFETY: reads the calling thread's policy.
        return libc::sched_getscheduler(0) == libc::SCHED_IDLE;
    }
    #[allow(unreachable_code)]
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn slot_threads_run_at_idle_priority() {
        let ok = std::thread::spawn(|| {
            super::lower_priority();
            super::current_policy_is_idle()
        })
        .join()
        .unwrap();
        assert!(ok);
    }
}
