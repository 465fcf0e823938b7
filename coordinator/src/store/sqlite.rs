//! [`Store`] on an embedded SQLite database (WAL, `synchronous = FULL`: a committed batch
//! survives power loss; one fsync per batch thanks to group commit).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use tasks::wire::{FailurePage, TaskFailure, TaskResult};
use tasks::{BlobId, EngineFingerprint, JobId, JobManifest, NodeId, RunResult, TaskId};

use super::codec::{
    dec, enc, id32, parse_phase, parse_state, phase_code, read_decision, read_output, state_str,
    task_failure, task_result,
};
use super::{
    schema, Decision, JobRow, Mutation, Output, ReplicaPhase, ReplicaRow, Snapshot, Store,
    StoreError, TaskRow, Verdict, WorkerRecord,
};
use crate::core::trust::Reputation;

/// The default store.
pub struct SqliteStore {
    conn: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    /// Open (creating and migrating as needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let shown = path.display().to_string();
        let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: shown.clone(),
            source,
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        // 64 MiB page cache: reports update recent replica rows, which then stay in memory.
        conn.pragma_update(None, "cache_size", -65536)?;
        // Checkpoint less often (each checkpoint is an fsync of the main file).
        conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(64);
        schema::migrate(&mut conn, &shown)?;
        Ok(SqliteStore { conn })
    }

    /// The file name inside a data dir.
    pub const FILE: &'static str = "coordinator.db";

    /// The schema version (for tests and diagnostics).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        schema::version(&self.conn)
    }

    /// A replica's owner and recorded phase, straight from disk.
    pub fn replica_owner(
        &self,
        replica: u64,
    ) -> Result<Option<(NodeId, ReplicaPhase)>, StoreError> {
        let row: Option<(Vec<u8>, i64)> = self
            .conn
            .query_row(
                "SELECT worker, phase FROM replicas WHERE id = ?1",
                [replica as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(w, p)| Ok((NodeId(id32(w, "worker")?), parse_phase(p)?)))
            .transpose()
    }

    fn apply(tx: &rusqlite::Transaction<'_>, m: &Mutation) -> Result<(), StoreError> {
        match m {
            Mutation::PutJob {
                job,
                manifest,
                determinism,
                created_ms,
            } => {
                tx.prepare_cached("INSERT OR IGNORE INTO jobs (id, name, manifest, state, created_ms, determinism) VALUES (?1, ?2, ?3, 'running', ?4, ?5)")?
                    .execute(params![job.0 as i64, manifest.name, enc(manifest.as_ref()), *created_ms as i64, determinism.as_str()])?;
            }
            Mutation::JobState { job, state } => {
                tx.prepare_cached("UPDATE jobs SET state = ?2 WHERE id = ?1")?
                    .execute(params![job.0 as i64, state_str(*state)])?;
            }
            Mutation::Fingerprint { short, fingerprint } => {
                let json = serde_json::to_string(fingerprint).expect("fingerprints serialize");
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO fingerprints (short, json) VALUES (?1, ?2)",
                )?
                .execute(params![short, json])?;
            }
            Mutation::Assign {
                replica,
                task,
                worker,
                fingerprint,
                assigned_ms,
                deadline_ms,
            } => {
                tx.prepare_cached(
                    "INSERT INTO replicas (id, job, idx, worker, fingerprint, assigned_ms, deadline_ms, phase) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)",
                )?
                .execute(params![
                    *replica as i64,
                    task.job.0 as i64,
                    task.index,
                    &worker.0[..],
                    fingerprint,
                    *assigned_ms as i64,
                    *deadline_ms as i64
                ])?;
            }
            Mutation::Reported {
                replica,
                result,
                reported_ms,
                verdict,
            } => {
                tx.prepare_cached("UPDATE replicas SET phase = 1, result = ?2, reported_ms = ?3, verdict = ?4 WHERE id = ?1")?
                    .execute(params![*replica as i64, enc(result), *reported_ms as i64, verdict.map(|v| (v == Verdict::Valid) as i64)])?;
            }
            Mutation::Phase { replica, phase } => {
                tx.prepare_cached("UPDATE replicas SET phase = ?2 WHERE id = ?1")?
                    .execute(params![*replica as i64, phase_code(*phase)])?;
            }
            Mutation::Verdict { replica, verdict } => {
                tx.prepare_cached("UPDATE replicas SET verdict = ?2 WHERE id = ?1")?
                    .execute(params![
                        *replica as i64,
                        (*verdict == Verdict::Valid) as i64
                    ])?;
            }
            Mutation::LateAgreement { task, worker } => {
                let agreeing: Option<Option<Vec<u8>>> = tx
                    .prepare_cached("SELECT agreeing FROM tasks WHERE job = ?1 AND idx = ?2 AND state = 'accepted'")?
                    .query_row(params![task.job.0 as i64, task.index], |r| r.get(0))
                    .optional()?;
                if let Some(agreeing) = agreeing {
                    let mut agreeing: Vec<NodeId> =
                        dec(&agreeing.unwrap_or_default(), "agreeing workers")?;
                    if !agreeing.contains(worker) {
                        agreeing.push(*worker);
                        tx.prepare_cached(
                            "UPDATE tasks SET agreeing = ?3 WHERE job = ?1 AND idx = ?2",
                        )?
                        .execute(params![
                            task.job.0 as i64,
                            task.index,
                            enc(&agreeing)
                        ])?;
                    }
                }
            }
            Mutation::TaskQuorum { task, quorum } => {
                tx.prepare_cached(
                    "INSERT INTO tasks (job, idx, state, quorum) VALUES (?1, ?2, 'pending', ?3) ON CONFLICT (job, idx) DO UPDATE SET quorum = excluded.quorum",
                )?
                .execute(params![task.job.0 as i64, task.index, *quorum])?;
            }
            Mutation::Decided {
                task,
                decision,
                decided_ms,
                output,
            } => match decision {
                Decision::Accepted {
                    digest,
                    result,
                    fingerprint,
                    agreeing,
                } => {
                    let (inline, blob): (Option<&[u8]>, Option<&[u8]>) = match output {
                        Some(Output::Inline(b)) => (Some(b), None),
                        Some(Output::Blob(id)) => (None, Some(&id.0[..])),
                        None => (None, None),
                    };
                    tx.prepare_cached(
                        "INSERT INTO tasks (job, idx, state, digest, result, fingerprint, agreeing, decided_ms, output, output_blob) VALUES (?1, ?2, 'accepted', ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                         ON CONFLICT (job, idx) DO UPDATE SET state = 'accepted', digest = excluded.digest, result = excluded.result,
                         fingerprint = excluded.fingerprint, agreeing = excluded.agreeing, decided_ms = excluded.decided_ms,
                         output = excluded.output, output_blob = excluded.output_blob",
                    )?
                    .execute(params![
                        task.job.0 as i64,
                        task.index,
                        &digest.0[..],
                        enc(result),
                        fingerprint,
                        enc(agreeing),
                        *decided_ms as i64,
                        inline,
                        blob
                    ])?;
                }
                Decision::Failed { reason } => {
                    tx.prepare_cached(
                        "INSERT INTO tasks (job, idx, state, reason, decided_ms) VALUES (?1, ?2, 'failed', ?3, ?4)
                         ON CONFLICT (job, idx) DO UPDATE SET state = 'failed', reason = excluded.reason, decided_ms = excluded.decided_ms",
                    )?
                    .execute(params![task.job.0 as i64, task.index, reason, *decided_ms as i64])?;
                }
            },
            Mutation::TaskOutput { task, output } => {
                let (inline, blob): (Option<&[u8]>, Option<&[u8]>) = match output {
                    Output::Inline(b) => (Some(b), None),
                    Output::Blob(id) => (None, Some(&id.0[..])),
                };
                tx.prepare_cached(
                    "UPDATE tasks SET output = ?3, output_blob = ?4 WHERE job = ?1 AND idx = ?2",
                )?
                .execute(params![task.job.0 as i64, task.index, inline, blob])?;
            }
            Mutation::Retried {
                task,
                replicas_from,
            } => {
                tx.prepare_cached(
                    "UPDATE tasks SET state = 'pending', reason = NULL, decided_ms = NULL, replicas_from = ?3 WHERE job = ?1 AND idx = ?2",
                )?
                .execute(params![task.job.0 as i64, task.index, *replicas_from as i64])?;
            }
            Mutation::Worker(w) => {
                tx.prepare_cached(
                    "INSERT INTO workers (node, fingerprint, credit_fuel, valid, invalid, consecutive_valid, trust, last_seen_ms, lost, junior) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (node) DO UPDATE SET fingerprint = excluded.fingerprint, credit_fuel = excluded.credit_fuel, valid = excluded.valid,
                     invalid = excluded.invalid, consecutive_valid = excluded.consecutive_valid, trust = excluded.trust, last_seen_ms = excluded.last_seen_ms,
                     lost = excluded.lost, junior = excluded.junior",
                )?
                .execute(params![
                    &w.node.0[..],
                    w.fingerprint,
                    w.credit_fuel as i64,
                    w.reputation.valid as i64,
                    w.reputation.invalid as i64,
                    w.reputation.consecutive_valid as i64,
                    w.reputation.score(),
                    w.last_seen_ms as i64,
                    w.lost as i64,
                    w.junior
                ])?;
            }
            Mutation::BlobLocation {
                blob,
                worker,
                present,
            } => {
                if *present {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO blob_locations (blob, worker) VALUES (?1, ?2)",
                    )?
                    .execute(params![&blob.0[..], &worker.0[..]])?;
                } else {
                    tx.prepare_cached(
                        "DELETE FROM blob_locations WHERE blob = ?1 AND worker = ?2",
                    )?
                    .execute(params![&blob.0[..], &worker.0[..]])?;
                }
            }
            Mutation::PeerAddr { worker, addr } => {
                tx.prepare_cached("UPDATE workers SET peer_addr = ?2 WHERE node = ?1")?
                    .execute(params![&worker.0[..], addr.map(|a| a.to_string())])?;
            }
            Mutation::ReplicaStderr {
                replica,
                task,
                stderr,
            } => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO replica_stderr (replica, job, idx, stderr) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![*replica as i64, task.job.0 as i64, task.index, stderr])?;
            }
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let c = &self.conn;
        let mut snap = Snapshot::default();
        let mut st =
            c.prepare("SELECT id, manifest, state, created_ms, determinism FROM jobs ORDER BY id")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let manifest: JobManifest = dec(&r.get::<_, Vec<u8>>(1)?, "job manifest")?;
            snap.jobs.push(JobRow {
                job: JobId(r.get::<_, i64>(0)? as u64),
                manifest,
                state: parse_state(&r.get::<_, String>(2)?)?,
                created_ms: r.get::<_, i64>(3)? as u64,
                determinism: r
                    .get::<_, String>(4)?
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("job determinism: {e}")))?,
            });
        }
        let mut st = c.prepare("SELECT short, json FROM fingerprints")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let fp: EngineFingerprint = serde_json::from_str(&r.get::<_, String>(1)?)
                .map_err(|e| StoreError::Corrupt(format!("fingerprint: {e}")))?;
            snap.fingerprints.push((r.get(0)?, fp));
        }
        let mut st = c.prepare("SELECT job, idx, state, quorum, digest, result, fingerprint, agreeing, reason, replicas_from FROM tasks")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let state: String = r.get(2)?;
            snap.tasks.push(TaskRow {
                task: TaskId {
                    job: JobId(r.get::<_, i64>(0)? as u64),
                    index: r.get(1)?,
                },
                quorum: r.get(3)?,
                decision: read_decision(
                    &state,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                )?,
                replicas_from: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
            });
        }
        let mut st = c.prepare("SELECT id, job, idx, worker, fingerprint, assigned_ms, deadline_ms, phase, result, verdict FROM replicas ORDER BY id")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let result: Option<Vec<u8>> = r.get(8)?;
            let verdict: Option<i64> = r.get(9)?;
            snap.replicas.push(ReplicaRow {
                replica: r.get::<_, i64>(0)? as u64,
                task: TaskId {
                    job: JobId(r.get::<_, i64>(1)? as u64),
                    index: r.get(2)?,
                },
                worker: NodeId(id32(r.get(3)?, "worker")?),
                fingerprint: r.get(4)?,
                assigned_ms: r.get::<_, i64>(5)? as u64,
                deadline_ms: r.get::<_, i64>(6)? as u64,
                phase: parse_phase(r.get(7)?)?,
                result: result
                    .map(|b| dec::<RunResult>(&b, "replica result"))
                    .transpose()?,
                verdict: verdict.map(|v| {
                    if v == 1 {
                        Verdict::Valid
                    } else {
                        Verdict::Invalid
                    }
                }),
            });
        }
        let mut st = c.prepare("SELECT node, fingerprint, credit_fuel, valid, invalid, consecutive_valid, last_seen_ms, peer_addr, lost, junior FROM workers")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let node = NodeId(id32(r.get(0)?, "worker")?);
            snap.workers.push(WorkerRecord {
                node,
                fingerprint: r.get(1)?,
                credit_fuel: r.get::<_, i64>(2)? as u64,
                reputation: Reputation {
                    valid: r.get::<_, i64>(3)? as u64,
                    invalid: r.get::<_, i64>(4)? as u64,
                    consecutive_valid: r.get::<_, i64>(5)? as u64,
                },
                last_seen_ms: r.get::<_, i64>(6)? as u64,
                lost: r.get::<_, i64>(8)? as u64,
                junior: r.get(9)?,
            });
            if let Some(addr) = r.get::<_, Option<String>>(7)?.and_then(|s| s.parse().ok()) {
                snap.peer_addrs.push((node, addr));
            }
        }
        let mut st = c.prepare("SELECT blob, worker FROM blob_locations")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            snap.blob_locations.push((
                BlobId(id32(r.get(0)?, "blob")?),
                NodeId(id32(r.get(1)?, "worker")?),
            ));
        }
        Ok(snap)
    }

    fn commit(&mut self, batch: &[Mutation]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for m in batch {
            Self::apply(&tx, m)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn task_results_range(
        &mut self,
        job: JobId,
        first: u32,
        end: u32,
    ) -> Result<Vec<(TaskResult, Option<Output>)>, StoreError> {
        // The primary key (job, idx) makes this a range scan of just the page.
        let mut st = self.conn.prepare_cached(
            "SELECT idx, state, digest, result, fingerprint, agreeing, reason, output, output_blob FROM tasks WHERE job = ?1 AND idx >= ?2 AND idx < ?3 AND state != 'pending' ORDER BY idx",
        )?;
        let mut rows = st.query(params![job.0 as i64, first as i64, end as i64])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let index: u32 = r.get(0)?;
            let state: String = r.get(1)?;
            let decision = read_decision(
                &state,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            )?;
            let inline: Option<Vec<u8>> = r.get(7)?;
            let blob: Option<Vec<u8>> = r.get(8)?;
            if let Some(tr) = task_result(index, decision) {
                out.push((tr, read_output(inline, blob)?));
            }
        }
        Ok(out)
    }

    fn task_failures(
        &mut self,
        job: JobId,
        after: Option<u32>,
        max: u32,
    ) -> Result<FailurePage, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT idx, state, result, reason FROM tasks WHERE job = ?1 AND state IN ('accepted', 'failed') ORDER BY idx",
        )?;
        let mut rows = st.query([job.0 as i64])?;
        let mut total = 0u32;
        let mut more = false;
        // (failure, the accepted result's encoding: its replicas' stderr is the one shown)
        let mut page: Vec<(TaskFailure, Option<Vec<u8>>)> = Vec::new();
        while let Some(r) = rows.next()? {
            let index: u32 = r.get(0)?;
            let state: String = r.get(1)?;
            let Some(failure) = task_failure(index, &state, r.get(2)?, r.get(3)?)? else {
                continue;
            };
            total += 1;
            if after.is_some_and(|a| index <= a) {
                continue;
            }
            if page.len() < max as usize {
                page.push(failure);
            } else {
                more = true;
            }
        }
        drop(rows);
        drop(st);
        let mut failures = Vec::with_capacity(page.len());
        for (mut f, accepted) in page {
            f.stderr = match accepted {
                // One replica of the accepted result: its stored result is byte-equal.
                Some(encoded) => self
                    .conn
                    .prepare_cached(
                        "SELECT s.stderr FROM replica_stderr s JOIN replicas r ON r.id = s.replica
                         WHERE s.job = ?1 AND s.idx = ?2 AND r.result = ?3 ORDER BY s.replica LIMIT 1",
                    )?
                    .query_row(params![job.0 as i64, f.index, encoded], |r| r.get(0))
                    .optional()?,
                None => self
                    .conn
                    .prepare_cached(
                        "SELECT stderr FROM replica_stderr WHERE job = ?1 AND idx = ?2 ORDER BY replica LIMIT 1",
                    )?
                    .query_row(params![job.0 as i64, f.index], |r| r.get(0))
                    .optional()?,
            };
            failures.push(f);
        }
        Ok(FailurePage {
            job,
            total,
            failures,
            more,
        })
    }

    fn outputs_missing(&mut self) -> Result<Vec<(TaskId, RunResult, Vec<NodeId>)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT job, idx, result, agreeing FROM tasks WHERE state = 'accepted' AND output IS NULL AND output_blob IS NULL",
        )?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let task = TaskId {
                job: JobId(r.get::<_, i64>(0)? as u64),
                index: r.get(1)?,
            };
            let result: RunResult = dec(&r.get::<_, Vec<u8>>(2)?, "task result")?;
            let agreeing: Vec<NodeId> = dec(&r.get::<_, Vec<u8>>(3)?, "agreeing workers")?;
            out.push((task, result, agreeing));
        }
        Ok(out)
    }
}
