//! Task slots: dedicated OS threads that run sandboxed tasks, by default at the lowest
//! scheduling priority so the volunteer's own work always comes first (see
//! [`crate::priority`]).

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tasks::wire::ReplicaId;

use crate::priority::Priority;
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
    /// The engine of the replica's determinism class (`module` was loaded on it).
    pub sandbox: Sandbox,
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
        priority: Priority,
        done: tokio::sync::mpsc::UnboundedSender<Done>,
    ) -> Executor {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..slots)
            .map(|i| {
                let rx = rx.clone();
                let done = done.clone();
                std::thread::Builder::new()
                    .name(format!("slot-{i}"))
                    .spawn(move || {
                        crate::priority::set_current_thread(priority);
                        loop {
                            let idle_since = Instant::now();
                            let job = match rx.lock().map(|r| r.recv()) {
                                Ok(Ok(job)) => job,
                                _ => return,
                            };
                            let queue_wait = job.received.max(idle_since).elapsed();
                            job.control.mark_started();
                            let _span =
                                tracing::info_span!("task", replica = job.replica).entered();
                            let sandbox = &job.sandbox;
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
