//! [`Store`] on a PostgreSQL server (`coordinator serve --store postgres://...`): the same
//! tables and semantics as [`super::SqliteStore`], for a coordinator whose state should live
//! in a database server (backups, replication, monitoring the operator already runs).
//!
//! Durability is the server's: every [`Store::commit`] is one transaction, committed with the
//! server's `synchronous_commit` (on by default: the commit returns once the WAL is flushed).
//! The store refuses to run with `synchronous_commit = off`, which would lose acknowledged
//! results on a server crash.
//!
//! Ingest speed comes from batching: a commit groups its mutations by statement and sends
//! each group as **one** statement over arrays (`INSERT ... SELECT FROM unnest($1, $2, ...)`,
//! `UPDATE ... FROM unnest(...)`), so a batch of thousands of reports costs a handful of
//! round trips, not thousands. Grouping never reorders two mutations of the same row (see
//! [`plan`]), so a batch means exactly what it means to SQLite, which applies it in order.
//!
//! The client is the synchronous `postgres` crate, which drives its connection on a private
//! single-threaded runtime: call it only from a plain thread (the engine's, or
//! `tokio::task::spawn_blocking`), never from inside an async task.
//!
//! The schema is versioned like SQLite's ([`MIGRATIONS`], table `schema_version`): a newer
//! database is refused with [`StoreError::TooNew`].

pub mod throwaway;

use std::collections::HashMap;
use std::time::Duration;

use postgres::{Client, NoTls, Statement, Transaction};

use tasks::wire::{FailurePage, TaskFailure, TaskResult};
use tasks::{BlobId, EngineFingerprint, JobId, JobManifest, NodeId, RunResult, TaskId};

use super::codec::{
    dec, enc, id32, parse_phase, parse_state, phase_code, read_decision, read_output, state_str,
    task_failure, task_result,
};
use super::{
    Decision, JobRow, Mutation, Output, ReplicaRow, Snapshot, Store, StoreError, TaskRow, Verdict,
    WorkerRecord,
};
use crate::core::trust::Reputation;

/// Migration `i` brings the schema from version `i` to `i + 1`. Append-only: never edit a
/// shipped one. Version 1 is SQLite's schema after its four migrations (the same tables,
/// columns and meaning), in PostgreSQL's types: integers are `BIGINT` (u64 values stored
/// as their i64 bit pattern, as in SQLite), blobs `BYTEA`.
pub const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE jobs (
        id BIGINT PRIMARY KEY,
        name TEXT NOT NULL,
        manifest BYTEA NOT NULL,         -- postcard JobManifest
        state TEXT NOT NULL,             -- running | done | failed | cancelled
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE fingerprints (
        short TEXT PRIMARY KEY,          -- EngineFingerprint::short_id
        json TEXT NOT NULL
    );
    -- Pending tasks have no row.
    CREATE TABLE tasks (
        job BIGINT NOT NULL,
        idx BIGINT NOT NULL,
        state TEXT NOT NULL,             -- pending | accepted | failed
        quorum BIGINT,                   -- set when the policy chose a quorum other than the job's
        digest BYTEA,
        result BYTEA,                    -- postcard RunResult of the accepted outcome
        fingerprint TEXT,
        agreeing BYTEA,                  -- postcard Vec<NodeId>
        reason TEXT,
        output BYTEA,                    -- inline output bytes
        output_blob BYTEA,               -- or the id of the output in the blob store
        decided_ms BIGINT,
        replicas_from BIGINT,            -- retried: replicas below this id are earlier attempts'
        PRIMARY KEY (job, idx)
    );
    CREATE TABLE replicas (
        id BIGINT PRIMARY KEY,
        job BIGINT NOT NULL,
        idx BIGINT NOT NULL,
        worker BYTEA NOT NULL,
        fingerprint TEXT NOT NULL,
        assigned_ms BIGINT NOT NULL,
        deadline_ms BIGINT NOT NULL,
        phase BIGINT NOT NULL,           -- 0 in flight, 1 reported, 2 lost, 3 cancelled
        result BYTEA,                    -- postcard RunResult
        reported_ms BIGINT,
        verdict BIGINT                   -- NULL none, 1 valid, 0 invalid
    );
    CREATE TABLE workers (
        node BYTEA PRIMARY KEY,
        fingerprint TEXT,
        credit_fuel BIGINT NOT NULL,
        valid BIGINT NOT NULL,
        invalid BIGINT NOT NULL,
        consecutive_valid BIGINT NOT NULL,
        trust DOUBLE PRECISION NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        peer_addr TEXT,
        lost BIGINT NOT NULL DEFAULT 0   -- replicas lost and not yet made up for
    );
    CREATE TABLE blob_locations (
        blob BYTEA NOT NULL,
        worker BYTEA NOT NULL,
        PRIMARY KEY (blob, worker)
    );
    CREATE TABLE replica_stderr (
        replica BIGINT PRIMARY KEY,
        job BIGINT NOT NULL,
        idx BIGINT NOT NULL,
        stderr BYTEA NOT NULL
    );
    CREATE INDEX replica_stderr_task ON replica_stderr (job, idx);
    "#,
    // 2: a job's determinism class (SQLite's migration 5): jobs created before classes ran
    // with NaN canonicalization, i.e. 'portable'.
    r#"
    ALTER TABLE jobs ADD COLUMN determinism TEXT NOT NULL DEFAULT 'portable';
    "#,
    // 3: several coordinators on one database (`crate::ha`): the leader lease (its epoch
    // fences commits), the deployment's submit token, its coordinators' ticket entries, and
    // the blobs a standby needs to take over.
    r#"
    CREATE TABLE peergrid_lease (
        id INT PRIMARY KEY CHECK (id = 1),
        epoch BIGINT NOT NULL,           -- +1 at every change of leader
        holder TEXT NOT NULL,            -- the leader's instance id (its data dir's)
        entry TEXT NOT NULL,             -- its ticket entry, <node-id>@<host:port>
        expires_at TIMESTAMPTZ NOT NULL  -- the server's clock
    );
    CREATE TABLE peergrid_deployment (
        id INT PRIMARY KEY CHECK (id = 1),
        submit_token TEXT NOT NULL
    );
    CREATE TABLE peergrid_coordinators (
        instance TEXT PRIMARY KEY,
        entry TEXT NOT NULL,
        seen TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE peergrid_blobs (
        id BYTEA PRIMARY KEY,            -- blake3 of data
        data BYTEA NOT NULL
    );
    "#,
    // 4: newcomers to an established pool (SQLite's migration 6).
    r#"
    ALTER TABLE workers ADD COLUMN junior BOOLEAN NOT NULL DEFAULT false;
    "#,
];

/// Key of the advisory lock held while migrating, so two coordinators started at once on
/// one database cannot both apply a migration ("pgrd" in ASCII).
const MIGRATION_LOCK: i64 = 0x7067_7264;

/// `coordinator serve --store URL`: what `URL` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite` (the default): `DATA_DIR/coordinator.db`.
    Sqlite,
    /// `postgres://...` or `postgresql://...`.
    Postgres(String),
}

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<StoreUrl, String> {
        let s = s.trim();
        if s.is_empty() || s == "sqlite" {
            return Ok(StoreUrl::Sqlite);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(s.to_string()));
        }
        Err(format!(
            "unknown store {:?}: use `sqlite` (DATA_DIR/coordinator.db, the default) or a PostgreSQL URL such as postgres://user@host/dbname",
            redact(s)
        ))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sqlite => f.write_str("sqlite"),
            StoreUrl::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

/// `url` with any password replaced by `***` (in `user:password@` and `password=`), for
/// logs and error messages.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(c) => format!("{}:***{host}", &userinfo[..c]),
                None => authority.to_string(),
            }
        }
        None => authority.to_string(),
    };
    let tail = match tail.find('?') {
        Some(q) => {
            let (path, query) = tail.split_at(q + 1);
            let params: Vec<String> = query
                .split('&')
                .map(|p| {
                    if p.to_ascii_lowercase().starts_with("password=") {
                        "password=***".to_string()
                    } else {
                        p.to_string()
                    }
                })
                .collect();
            format!("{path}{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
}

/// A PostgreSQL error in one line: the server's message (and detail) when it sent one,
/// else the client's error and its cause.
pub fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(d) = db.detail() {
            s += &format!(" ({d})");
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s.replace('\n', " ")
}

/// The store on a PostgreSQL server.
pub struct PostgresStore {
    client: Client,
    /// The URL as given, password included (to ask who leads when this connection fails
    /// while fenced).
    connect_url: String,
    /// The URL without its password (for messages).
    shown: String,
    st: Statements,
    /// The leader lease's epoch this store commits under ([`PostgresStore::fence`]).
    fence: Option<(i64, Statement)>,
    /// How long the server lets a transaction of a fenced store sit open.
    hold: Duration,
    /// Whether the batch being committed got as far as sending `COMMIT` (after which a
    /// broken connection leaves it unknown whether it committed).
    commit_sent: bool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresStore({})", self.shown)
    }
}

/// The batched statements, prepared once per connection.
struct Statements {
    assign: Statement,
    reported: Statement,
    phase: Statement,
    verdict: Statement,
    quorum: Statement,
    accepted: Statement,
    failed: Statement,
    output: Statement,
    retried: Statement,
    worker: Statement,
    blob_add: Statement,
    blob_del: Statement,
    peer_addr: Statement,
    stderr: Statement,
}

impl Statements {
    fn prepare(c: &mut Client) -> Result<Statements, postgres::Error> {
        Ok(Statements {
            assign: c.prepare(
                "INSERT INTO replicas (id, job, idx, worker, fingerprint, assigned_ms, deadline_ms, phase)
                 SELECT u.id, u.job, u.idx, u.worker, u.fp, u.assigned, u.deadline, 0
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[], $5::text[], $6::bigint[], $7::bigint[])
                 AS u(id, job, idx, worker, fp, assigned, deadline)",
            )?,
            reported: c.prepare(
                "UPDATE replicas r SET phase = 1, result = u.result, reported_ms = u.ms, verdict = u.verdict
                 FROM unnest($1::bigint[], $2::bytea[], $3::bigint[], $4::bigint[]) AS u(id, result, ms, verdict)
                 WHERE r.id = u.id",
            )?,
            phase: c.prepare(
                "UPDATE replicas r SET phase = u.phase
                 FROM unnest($1::bigint[], $2::bigint[]) AS u(id, phase) WHERE r.id = u.id",
            )?,
            verdict: c.prepare(
                "UPDATE replicas r SET verdict = u.verdict
                 FROM unnest($1::bigint[], $2::bigint[]) AS u(id, verdict) WHERE r.id = u.id",
            )?,
            quorum: c.prepare(
                "INSERT INTO tasks (job, idx, state, quorum)
                 SELECT u.job, u.idx, 'pending', u.quorum FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(job, idx, quorum)
                 ON CONFLICT (job, idx) DO UPDATE SET quorum = excluded.quorum",
            )?,
            accepted: c.prepare(
                "INSERT INTO tasks (job, idx, state, digest, result, fingerprint, agreeing, decided_ms, output, output_blob)
                 SELECT u.job, u.idx, 'accepted', u.digest, u.result, u.fp, u.agreeing, u.ms, u.output, u.blob
                 FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[], $5::text[], $6::bytea[], $7::bigint[], $8::bytea[], $9::bytea[])
                 AS u(job, idx, digest, result, fp, agreeing, ms, output, blob)
                 ON CONFLICT (job, idx) DO UPDATE SET state = 'accepted', digest = excluded.digest, result = excluded.result,
                 fingerprint = excluded.fingerprint, agreeing = excluded.agreeing, decided_ms = excluded.decided_ms,
                 output = excluded.output, output_blob = excluded.output_blob",
            )?,
            failed: c.prepare(
                "INSERT INTO tasks (job, idx, state, reason, decided_ms)
                 SELECT u.job, u.idx, 'failed', u.reason, u.ms FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[]) AS u(job, idx, reason, ms)
                 ON CONFLICT (job, idx) DO UPDATE SET state = 'failed', reason = excluded.reason, decided_ms = excluded.decided_ms",
            )?,
            output: c.prepare(
                "UPDATE tasks t SET output = u.output, output_blob = u.blob
                 FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[]) AS u(job, idx, output, blob)
                 WHERE t.job = u.job AND t.idx = u.idx",
            )?,
            retried: c.prepare(
                "UPDATE tasks t SET state = 'pending', reason = NULL, decided_ms = NULL, replicas_from = u.from_id
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(job, idx, from_id)
                 WHERE t.job = u.job AND t.idx = u.idx",
            )?,
            worker: c.prepare(
                "INSERT INTO workers (node, fingerprint, credit_fuel, valid, invalid, consecutive_valid, trust, last_seen_ms, lost, junior)
                 SELECT * FROM unnest($1::bytea[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::float8[], $8::bigint[], $9::bigint[], $10::bool[])
                 ON CONFLICT (node) DO UPDATE SET fingerprint = excluded.fingerprint, credit_fuel = excluded.credit_fuel, valid = excluded.valid,
                 invalid = excluded.invalid, consecutive_valid = excluded.consecutive_valid, trust = excluded.trust, last_seen_ms = excluded.last_seen_ms,
                 lost = excluded.lost, junior = excluded.junior",
            )?,
            blob_add: c.prepare(
                "INSERT INTO blob_locations (blob, worker) SELECT * FROM unnest($1::bytea[], $2::bytea[]) ON CONFLICT DO NOTHING",
            )?,
            blob_del: c.prepare(
                "DELETE FROM blob_locations b USING unnest($1::bytea[], $2::bytea[]) AS u(blob, worker)
                 WHERE b.blob = u.blob AND b.worker = u.worker",
            )?,
            peer_addr: c.prepare(
                "UPDATE workers w SET peer_addr = u.addr FROM unnest($1::bytea[], $2::text[]) AS u(node, addr) WHERE w.node = u.node",
            )?,
            stderr: c.prepare(
                "INSERT INTO replica_stderr (replica, job, idx, stderr)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[]) ON CONFLICT DO NOTHING",
            )?,
        })
    }
}

fn index(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("task index {v}")))
}

/// Which statement a mutation becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    PutJob,
    JobState,
    Fingerprint,
    Assign,
    Reported,
    Phase,
    Verdict,
    LateAgreement,
    TaskQuorum,
    Accepted,
    Failed,
    TaskOutput,
    Retried,
    Worker,
    BlobAdd,
    BlobDel,
    PeerAddr,
    Stderr,
}

impl Kind {
    /// Kinds applied one statement per mutation (rare, or read-modify-write).
    fn single(self) -> bool {
        matches!(
            self,
            Kind::PutJob | Kind::JobState | Kind::Fingerprint | Kind::LateAgreement
        )
    }
}

/// The row a mutation writes (table and primary key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Row {
    Job(u64),
    Fingerprint(String),
    Replica(u64),
    Task(TaskId),
    Worker(NodeId),
    Blob(BlobId, NodeId),
    Stderr(u64),
}

fn classify(m: &Mutation) -> (Kind, Row) {
    match m {
        Mutation::PutJob { job, .. } => (Kind::PutJob, Row::Job(job.0)),
        Mutation::JobState { job, .. } => (Kind::JobState, Row::Job(job.0)),
        Mutation::Fingerprint { short, .. } => (Kind::Fingerprint, Row::Fingerprint(short.clone())),
        Mutation::Assign { replica, .. } => (Kind::Assign, Row::Replica(*replica)),
        Mutation::Reported { replica, .. } => (Kind::Reported, Row::Replica(*replica)),
        Mutation::Phase { replica, .. } => (Kind::Phase, Row::Replica(*replica)),
        Mutation::Verdict { replica, .. } => (Kind::Verdict, Row::Replica(*replica)),
        Mutation::LateAgreement { task, .. } => (Kind::LateAgreement, Row::Task(*task)),
        Mutation::TaskQuorum { task, .. } => (Kind::TaskQuorum, Row::Task(*task)),
        Mutation::Decided { task, decision, .. } => match decision {
            Decision::Accepted { .. } => (Kind::Accepted, Row::Task(*task)),
            Decision::Failed { .. } => (Kind::Failed, Row::Task(*task)),
        },
        Mutation::TaskOutput { task, .. } => (Kind::TaskOutput, Row::Task(*task)),
        Mutation::Retried { task, .. } => (Kind::Retried, Row::Task(*task)),
        Mutation::Worker(w) => (Kind::Worker, Row::Worker(w.node)),
        Mutation::BlobLocation {
            blob,
            worker,
            present,
        } => (
            if *present {
                Kind::BlobAdd
            } else {
                Kind::BlobDel
            },
            Row::Blob(*blob, *worker),
        ),
        Mutation::PeerAddr { worker, .. } => (Kind::PeerAddr, Row::Worker(*worker)),
        Mutation::ReplicaStderr { replica, .. } => (Kind::Stderr, Row::Stderr(*replica)),
    }
}

/// Split a batch into groups of one statement kind each, to run in order, such that running
/// them means the same as applying the batch's mutations one by one: a mutation joins the
/// latest group of its kind only if no later group touches its row, and a group never holds
/// one row twice (a multi-row `ON CONFLICT DO UPDATE` may not touch a row twice; an
/// `UPDATE ... FROM` would apply just one of them). Mutations of different rows commute.
fn plan(batch: &[Mutation]) -> Vec<(Kind, Vec<&Mutation>)> {
    let mut groups: Vec<(Kind, Vec<&Mutation>)> = Vec::new();
    let mut last_of_kind: HashMap<Kind, usize> = HashMap::new();
    let mut last_touch: HashMap<Row, usize> = HashMap::new();
    for m in batch {
        let (kind, row) = classify(m);
        let joinable = match (kind.single(), last_of_kind.get(&kind)) {
            (false, Some(&g)) => last_touch.get(&row).is_none_or(|&t| t < g),
            _ => false,
        };
        let g = if joinable {
            last_of_kind[&kind]
        } else {
            groups.push((kind, Vec::new()));
            last_of_kind.insert(kind, groups.len() - 1);
            groups.len() - 1
        };
        groups[g].1.push(m);
        last_touch.insert(row, g);
    }
    groups
}

fn output_cols(o: Option<&Output>) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    match o {
        Some(Output::Inline(b)) => (Some(b.clone()), None),
        Some(Output::Blob(id)) => (None, Some(id.0.to_vec())),
        None => (None, None),
    }
}

/// A client connected to `url` (10 s connect timeout unless the URL sets one; application
/// name `app` unless it sets one), with a one-line error naming the URL without its
/// password. Call from a plain thread, not an async task (see the module docs).
pub fn connect(url: &str, app: &str) -> Result<Client, StoreError> {
    let shown = redact(url);
    let mut config: postgres::Config =
        url.parse()
            .map_err(|e: postgres::Error| StoreError::Connect {
                url: shown.clone(),
                reason: format!("{} (not a valid PostgreSQL URL)", describe(&e)),
            })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name(app);
    }
    config.connect(NoTls).map_err(|e| StoreError::Connect {
        url: shown,
        reason: if e.as_db_error().is_some() {
            describe(&e)
        } else {
            format!("{} — is the server running?", describe(&e))
        },
    })
}

/// Whether `e` means the connection is gone (closed, broken, or ended by the server with a
/// `FATAL` error) rather than that a statement failed on a live one.
fn connection_lost(e: &postgres::Error) -> bool {
    e.is_closed()
        || e.as_db_error()
            .is_none_or(|db| db.severity() == "FATAL" || db.severity() == "PANIC")
}

/// Have the server end this session when it leaves a transaction open, idle, longer than
/// `hold`: a client that stalls mid-transaction then holds its row locks for at most that
/// long (PostgreSQL's `idle_in_transaction_session_timeout`).
pub fn limit_open_transactions(client: &mut Client, hold: Duration) -> Result<(), postgres::Error> {
    client.batch_execute(&format!(
        "SET idle_in_transaction_session_timeout = {}",
        hold.as_millis().clamp(1, i32::MAX as u128)
    ))
}

impl PostgresStore {
    /// Connect to the server at `url` (`postgres://user[:password]@host[:port]/dbname`, or
    /// `postgres:///dbname?host=/run/postgresql` for a Unix socket), then create or migrate
    /// the schema. Call from a plain thread, not an async task (see the module docs).
    pub fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let shown = redact(url);
        let mut client = connect(url, "peergrid-coordinator")?;
        let sync: String = client.query_one("SHOW synchronous_commit", &[])?.get(0);
        if sync == "off" {
            return Err(StoreError::Connect {
                url: shown,
                reason: "the server runs with synchronous_commit = off, which can lose acknowledged results in a server crash; set it to on (the default) for this database or user".into(),
            });
        }
        migrate(&mut client, &shown)?;
        let st = Statements::prepare(&mut client)?;
        Ok(PostgresStore {
            client,
            connect_url: url.to_string(),
            shown,
            st,
            fence: None,
            hold: Duration::ZERO,
            commit_sent: false,
        })
    }

    /// Commit only while the leader lease (`crate::ha`) has epoch `epoch`: every commit
    /// first reads the lease row `FOR SHARE` (a take-over, which updates it, waits for the
    /// commit in flight) and fails with [`StoreError::Fenced`] once another coordinator
    /// took the lease.
    ///
    /// A commit left open longer than `hold` (the process stalled mid-commit: stopped,
    /// swapped out, frozen in a VM) is ended by the server ([`limit_open_transactions`]),
    /// so its lock on the lease row cannot keep a standby from taking over; pass the lease's
    /// time to live. A commit that fails that way, or on any broken connection, reports
    /// [`StoreError::Fenced`] when a fresh connection shows another coordinator leads.
    ///
    /// A fenced store whose connection breaks *before* a batch's `COMMIT` was sent (nothing
    /// of that batch committed) reconnects and runs the batch once more while the lease is
    /// still its own: a lone coordinator frozen for a few seconds mid-commit carries on.
    pub fn fence(&mut self, epoch: i64, hold: Duration) -> Result<(), StoreError> {
        limit_open_transactions(&mut self.client, hold)?;
        self.hold = hold;
        let st = self
            .client
            .prepare("SELECT epoch FROM peergrid_lease WHERE id = 1 FOR SHARE")?;
        self.fence = Some((epoch, st));
        Ok(())
    }

    /// One transaction for the batch (fenced: first checks the lease is still ours).
    fn commit_batch(&mut self, batch: &[Mutation]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let groups = plan(batch);
        self.commit_sent = false;
        let mut tx = self.client.transaction()?;
        if let Some((ours, st)) = &self.fence {
            let now: Option<i64> = tx.query_opt(st, &[])?.map(|r| r.get(0));
            if now != Some(*ours) {
                return Err(StoreError::Fenced { ours: *ours, now });
            }
        }
        for (kind, ms) in &groups {
            Self::run(&self.st, &mut tx, *kind, ms)?;
        }
        self.commit_sent = true;
        tx.commit()?;
        Ok(())
    }

    /// A fresh connection in place of a broken one, set up as this one was.
    fn reconnect(&mut self) -> Result<(), StoreError> {
        let mut client = connect(&self.connect_url, "peergrid-coordinator")?;
        self.st = Statements::prepare(&mut client)?;
        self.client = client;
        // Re-fence on the new connection. Should that fail, the old fence stays (its
        // statement belongs to the dead connection, so every commit fails): the store never
        // commits unfenced.
        if let Some(&(epoch, _)) = self.fence.as_ref() {
            self.fence(epoch, self.hold)?;
        }
        Ok(())
    }

    /// `e` stopped a fenced commit: [`StoreError::Fenced`] if the lease moved on meanwhile
    /// (asked on a fresh connection: this one may be gone), else `e`.
    fn fenced_or(&self, e: postgres::Error) -> StoreError {
        let Some((ours, _)) = &self.fence else {
            return StoreError::Postgres(e);
        };
        let now = connect(&self.connect_url, "peergrid-coordinator").and_then(|mut c| {
            Ok(
                c.query_opt("SELECT epoch FROM peergrid_lease WHERE id = 1", &[])?
                    .map(|r| r.get::<_, i64>(0)),
            )
        });
        match now {
            Ok(now) if now != Some(*ours) => StoreError::Fenced { ours: *ours, now },
            _ => StoreError::Postgres(e),
        }
    }

    /// The schema version (for tests and diagnostics).
    pub fn schema_version(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .client
            .query_one("SELECT version FROM schema_version", &[])?
            .get(0))
    }

    /// The URL this store is connected to, without its password.
    pub fn url(&self) -> &str {
        &self.shown
    }

    fn run(
        st: &Statements,
        tx: &mut Transaction<'_>,
        kind: Kind,
        ms: &[&Mutation],
    ) -> Result<(), StoreError> {
        macro_rules! cols {
            ($($v:ident),*) => { $(let mut $v = Vec::with_capacity(ms.len());)* };
        }
        match kind {
            Kind::PutJob | Kind::JobState | Kind::Fingerprint | Kind::LateAgreement => {
                for m in ms {
                    Self::single(tx, m)?;
                }
            }
            Kind::Assign => {
                cols!(id, job, idx, worker, fp, assigned, deadline);
                for m in ms {
                    if let Mutation::Assign {
                        replica,
                        task,
                        worker: w,
                        fingerprint,
                        assigned_ms,
                        deadline_ms,
                    } = m
                    {
                        id.push(*replica as i64);
                        job.push(task.job.0 as i64);
                        idx.push(task.index as i64);
                        worker.push(w.0.to_vec());
                        fp.push(fingerprint.as_str());
                        assigned.push(*assigned_ms as i64);
                        deadline.push(*deadline_ms as i64);
                    }
                }
                tx.execute(
                    &st.assign,
                    &[&id, &job, &idx, &worker, &fp, &assigned, &deadline],
                )?;
            }
            Kind::Reported => {
                cols!(id, result, at, verdict);
                for m in ms {
                    if let Mutation::Reported {
                        replica,
                        result: r,
                        reported_ms,
                        verdict: v,
                    } = m
                    {
                        id.push(*replica as i64);
                        result.push(enc(r));
                        at.push(*reported_ms as i64);
                        verdict.push(v.map(|v| (v == Verdict::Valid) as i64));
                    }
                }
                tx.execute(&st.reported, &[&id, &result, &at, &verdict])?;
            }
            Kind::Phase => {
                cols!(id, phase);
                for m in ms {
                    if let Mutation::Phase { replica, phase: p } = m {
                        id.push(*replica as i64);
                        phase.push(phase_code(*p));
                    }
                }
                tx.execute(&st.phase, &[&id, &phase])?;
            }
            Kind::Verdict => {
                cols!(id, verdict);
                for m in ms {
                    if let Mutation::Verdict {
                        replica,
                        verdict: v,
                    } = m
                    {
                        id.push(*replica as i64);
                        verdict.push((*v == Verdict::Valid) as i64);
                    }
                }
                tx.execute(&st.verdict, &[&id, &verdict])?;
            }
            Kind::TaskQuorum => {
                cols!(job, idx, quorum);
                for m in ms {
                    if let Mutation::TaskQuorum { task, quorum: q } = m {
                        job.push(task.job.0 as i64);
                        idx.push(task.index as i64);
                        quorum.push(*q as i64);
                    }
                }
                tx.execute(&st.quorum, &[&job, &idx, &quorum])?;
            }
            Kind::Accepted => {
                cols!(job, idx, digest, result, fp, agreeing, at, output, blob);
                for m in ms {
                    if let Mutation::Decided {
                        task,
                        decision:
                            Decision::Accepted {
                                digest: d,
                                result: r,
                                fingerprint,
                                agreeing: a,
                            },
                        decided_ms,
                        output: o,
                    } = m
                    {
                        let (inline, b) = output_cols(o.as_ref());
                        job.push(task.job.0 as i64);
                        idx.push(task.index as i64);
                        digest.push(d.0.to_vec());
                        result.push(enc(r));
                        fp.push(fingerprint.as_str());
                        agreeing.push(enc(a));
                        at.push(*decided_ms as i64);
                        output.push(inline);
                        blob.push(b);
                    }
                }
                tx.execute(
                    &st.accepted,
                    &[
                        &job, &idx, &digest, &result, &fp, &agreeing, &at, &output, &blob,
                    ],
                )?;
            }
            Kind::Failed => {
                cols!(job, idx, reason, at);
                for m in ms {
                    if let Mutation::Decided {
                        task,
                        decision: Decision::Failed { reason: r },
                        decided_ms,
                        ..
                    } = m
                    {
                        job.push(task.job.0 as i64);
                        idx.push(task.index as i64);
                        reason.push(r.as_str());
                        at.push(*decided_ms as i64);
                    }
                }
                tx.execute(&st.failed, &[&job, &idx, &reason, &at])?;
            }
            Kind::TaskOutput => {
                cols!(job, idx, output, blob);
                for m in ms {
                    if let Mutation::TaskOutput { task, output: o } = m {
                        let (inline, b) = output_cols(Some(o));
                        job.push(task.job.0 as i64);
                        idx.push(task.index as i64);
                        output.push(inline);
                        blob.push(b);
                    }
                }
                tx.execute(&st.output, &[&job, &idx, &output, &blob])?;
            }
            Kind::Retried => {
                cols!(job, idx, from);
                for m in ms {
                    if let Mutation::Retried {
                        task,
                        replicas_from,
                    } = m
                    {
                        job.push(task.job.0 as i64);
                        idx.push(task.index as i64);
                        from.push(*replicas_from as i64);
                    }
                }
                tx.execute(&st.retried, &[&job, &idx, &from])?;
            }
            Kind::Worker => {
                cols!(
                    node,
                    fp,
                    credit,
                    valid,
                    invalid,
                    consecutive,
                    trust,
                    seen,
                    lost,
                    junior
                );
                for m in ms {
                    if let Mutation::Worker(w) = m {
                        node.push(w.node.0.to_vec());
                        fp.push(w.fingerprint.as_deref());
                        credit.push(w.credit_fuel as i64);
                        valid.push(w.reputation.valid as i64);
                        invalid.push(w.reputation.invalid as i64);
                        consecutive.push(w.reputation.consecutive_valid as i64);
                        trust.push(w.reputation.score());
                        seen.push(w.last_seen_ms as i64);
                        lost.push(w.lost as i64);
                        junior.push(w.junior);
                    }
                }
                tx.execute(
                    &st.worker,
                    &[
                        &node,
                        &fp,
                        &credit,
                        &valid,
                        &invalid,
                        &consecutive,
                        &trust,
                        &seen,
                        &lost,
                        &junior,
                    ],
                )?;
            }
            Kind::BlobAdd | Kind::BlobDel => {
                cols!(blob, worker);
                for m in ms {
                    if let Mutation::BlobLocation {
                        blob: b, worker: w, ..
                    } = m
                    {
                        blob.push(b.0.to_vec());
                        worker.push(w.0.to_vec());
                    }
                }
                let s = if kind == Kind::BlobAdd {
                    &st.blob_add
                } else {
                    &st.blob_del
                };
                tx.execute(s, &[&blob, &worker])?;
            }
            Kind::PeerAddr => {
                cols!(node, addr);
                for m in ms {
                    if let Mutation::PeerAddr { worker, addr: a } = m {
                        node.push(worker.0.to_vec());
                        addr.push(a.map(|a| a.to_string()));
                    }
                }
                tx.execute(&st.peer_addr, &[&node, &addr])?;
            }
            Kind::Stderr => {
                cols!(replica, job, idx, stderr);
                for m in ms {
                    if let Mutation::ReplicaStderr {
                        replica: r,
                        task,
                        stderr: s,
                    } = m
                    {
                        replica.push(*r as i64);
                        job.push(task.job.0 as i64);
                        idx.push(task.index as i64);
                        stderr.push(s.as_slice());
                    }
                }
                tx.execute(&st.stderr, &[&replica, &job, &idx, &stderr])?;
            }
        }
        Ok(())
    }

    /// The kinds applied one statement per mutation.
    fn single(tx: &mut Transaction<'_>, m: &Mutation) -> Result<(), StoreError> {
        match m {
            Mutation::PutJob {
                job,
                manifest,
                determinism,
                created_ms,
            } => {
                tx.execute(
                    "INSERT INTO jobs (id, name, manifest, state, created_ms, determinism) VALUES ($1, $2, $3, 'running', $4, $5) ON CONFLICT DO NOTHING",
                    &[&(job.0 as i64), &manifest.name, &enc(manifest.as_ref()), &(*created_ms as i64), &determinism.as_str()],
                )?;
            }
            Mutation::JobState { job, state } => {
                tx.execute(
                    "UPDATE jobs SET state = $2 WHERE id = $1",
                    &[&(job.0 as i64), &state_str(*state)],
                )?;
            }
            Mutation::Fingerprint { short, fingerprint } => {
                let json = serde_json::to_string(fingerprint).expect("fingerprints serialize");
                tx.execute(
                    "INSERT INTO fingerprints (short, json) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[short, &json],
                )?;
            }
            Mutation::LateAgreement { task, worker } => {
                let row = tx.query_opt(
                    "SELECT agreeing FROM tasks WHERE job = $1 AND idx = $2 AND state = 'accepted'",
                    &[&(task.job.0 as i64), &(task.index as i64)],
                )?;
                if let Some(row) = row {
                    let agreeing: Option<Vec<u8>> = row.get(0);
                    let mut agreeing: Vec<NodeId> =
                        dec(&agreeing.unwrap_or_default(), "agreeing workers")?;
                    if !agreeing.contains(worker) {
                        agreeing.push(*worker);
                        tx.execute(
                            "UPDATE tasks SET agreeing = $3 WHERE job = $1 AND idx = $2",
                            &[&(task.job.0 as i64), &(task.index as i64), &enc(&agreeing)],
                        )?;
                    }
                }
            }
            other => unreachable!("batched kind applied singly: {other:?}"),
        }
        Ok(())
    }
}

/// Bring the database up to the newest schema: each migration in its own transaction with
/// the version bump, under an advisory lock (see [`MIGRATION_LOCK`]).
fn migrate(client: &mut Client, shown: &str) -> Result<(), StoreError> {
    let supported = MIGRATIONS.len() as i64;
    loop {
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
        let current: i64 = tx
            .query_opt("SELECT version FROM schema_version", &[])?
            .map(|r| r.get(0))
            .unwrap_or(0);
        if current > supported {
            return Err(StoreError::TooNew {
                path: shown.to_string(),
                found: current,
                supported,
            });
        }
        if current == supported {
            tx.commit()?;
            return Ok(());
        }
        tx.batch_execute(MIGRATIONS[current as usize])?;
        tx.execute("DELETE FROM schema_version", &[])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(current + 1)],
        )?;
        tx.commit()?;
    }
}

impl Store for PostgresStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let c = &mut self.client;
        let mut snap = Snapshot::default();
        for r in c.query(
            "SELECT id, manifest, state, created_ms, determinism FROM jobs ORDER BY id",
            &[],
        )? {
            let manifest: JobManifest = dec(r.get::<_, &[u8]>(1), "job manifest")?;
            snap.jobs.push(JobRow {
                job: JobId(r.get::<_, i64>(0) as u64),
                manifest,
                state: parse_state(r.get(2))?,
                created_ms: r.get::<_, i64>(3) as u64,
                determinism: r
                    .get::<_, &str>(4)
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("job determinism: {e}")))?,
            });
        }
        for r in c.query("SELECT short, json FROM fingerprints", &[])? {
            let fp: EngineFingerprint = serde_json::from_str(r.get(1))
                .map_err(|e| StoreError::Corrupt(format!("fingerprint: {e}")))?;
            snap.fingerprints.push((r.get(0), fp));
        }
        for r in c.query("SELECT job, idx, state, quorum, digest, result, fingerprint, agreeing, reason, replicas_from FROM tasks", &[])? {
            let state: &str = r.get(2);
            snap.tasks.push(TaskRow {
                task: TaskId {
                    job: JobId(r.get::<_, i64>(0) as u64),
                    index: index(r.get(1))?,
                },
                quorum: r.get::<_, Option<i64>>(3).map(|q| q as u32),
                decision: read_decision(state, r.get(4), r.get(5), r.get(6), r.get(7), r.get(8))?,
                replicas_from: r.get::<_, Option<i64>>(9).map(|v| v as u64),
            });
        }
        // Streamed: a large job's replicas need not be held twice in memory.
        let mut rows = c.query_raw(
            "SELECT id, job, idx, worker, fingerprint, assigned_ms, deadline_ms, phase, result, verdict FROM replicas ORDER BY id",
            std::iter::empty::<i64>(),
        )?;
        while let Some(r) = postgres::fallible_iterator::FallibleIterator::next(&mut rows)? {
            let result: Option<&[u8]> = r.get(8);
            let verdict: Option<i64> = r.get(9);
            snap.replicas.push(ReplicaRow {
                replica: r.get::<_, i64>(0) as u64,
                task: TaskId {
                    job: JobId(r.get::<_, i64>(1) as u64),
                    index: index(r.get(2))?,
                },
                worker: NodeId(id32(r.get(3), "worker")?),
                fingerprint: r.get(4),
                assigned_ms: r.get::<_, i64>(5) as u64,
                deadline_ms: r.get::<_, i64>(6) as u64,
                phase: parse_phase(r.get(7))?,
                result: result
                    .map(|b| dec::<RunResult>(b, "replica result"))
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
        drop(rows);
        for r in c.query("SELECT node, fingerprint, credit_fuel, valid, invalid, consecutive_valid, last_seen_ms, peer_addr, lost, junior FROM workers", &[])? {
            let node = NodeId(id32(r.get(0), "worker")?);
            snap.workers.push(WorkerRecord {
                node,
                fingerprint: r.get(1),
                credit_fuel: r.get::<_, i64>(2) as u64,
                reputation: Reputation {
                    valid: r.get::<_, i64>(3) as u64,
                    invalid: r.get::<_, i64>(4) as u64,
                    consecutive_valid: r.get::<_, i64>(5) as u64,
                },
                last_seen_ms: r.get::<_, i64>(6) as u64,
                lost: r.get::<_, i64>(8) as u64,
                junior: r.get(9),
            });
            if let Some(addr) = r.get::<_, Option<&str>>(7).and_then(|s| s.parse().ok()) {
                snap.peer_addrs.push((node, addr));
            }
        }
        for r in c.query("SELECT blob, worker FROM blob_locations", &[])? {
            snap.blob_locations.push((
                BlobId(id32(r.get(0), "blob")?),
                NodeId(id32(r.get(1), "worker")?),
            ));
        }
        Ok(snap)
    }

    fn commit(&mut self, batch: &[Mutation]) -> Result<(), StoreError> {
        let e = match self.commit_batch(batch) {
            Err(StoreError::Postgres(e)) => e,
            r => return r,
        };
        let e = match self.fenced_or(e) {
            StoreError::Postgres(e) => e,
            fenced => return Err(fenced),
        };
        // Still the leader. A connection lost before `COMMIT` was sent committed nothing of
        // the batch: a fenced store (whose server ends transactions left open too long)
        // reconnects and runs it once more.
        if self.fence.is_none() || self.commit_sent || !connection_lost(&e) {
            return Err(StoreError::Postgres(e));
        }
        tracing::warn!(error = %describe(&e), "lost the PostgreSQL connection mid-commit; reconnecting and committing the batch again");
        self.reconnect()?;
        match self.commit_batch(batch) {
            Err(StoreError::Postgres(e)) => Err(self.fenced_or(e)),
            r => r,
        }
    }

    fn task_results_range(
        &mut self,
        job: JobId,
        first: u32,
        end: u32,
    ) -> Result<Vec<(TaskResult, Option<Output>)>, StoreError> {
        // The primary key (job, idx) makes this a range scan of just the page.
        let rows = self.client.query(
            "SELECT idx, state, digest, result, fingerprint, agreeing, reason, output, output_blob FROM tasks WHERE job = $1 AND idx >= $2 AND idx < $3 AND state != 'pending' ORDER BY idx",
            &[&(job.0 as i64), &(first as i64), &(end as i64)],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let index = index(r.get(0))?;
            let decision =
                read_decision(r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6))?;
            let inline: Option<Vec<u8>> = r.get(7);
            let blob: Option<Vec<u8>> = r.get(8);
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
        let rows = self.client.query(
            "SELECT idx, state, result, reason FROM tasks WHERE job = $1 AND state IN ('accepted', 'failed') ORDER BY idx",
            &[&(job.0 as i64)],
        )?;
        let mut total = 0u32;
        let mut more = false;
        // (failure, the accepted result's encoding: its replicas' stderr is the one shown)
        let mut page: Vec<(TaskFailure, Option<Vec<u8>>)> = Vec::new();
        for r in rows {
            let index = index(r.get(0))?;
            let state: &str = r.get(1);
            let Some(failure) = task_failure(index, state, r.get(2), r.get(3))? else {
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
        let mut failures = Vec::with_capacity(page.len());
        for (mut f, accepted) in page {
            let row = match accepted {
                // One replica of the accepted result: its stored result is byte-equal.
                Some(encoded) => self.client.query_opt(
                    "SELECT s.stderr FROM replica_stderr s JOIN replicas r ON r.id = s.replica
                     WHERE s.job = $1 AND s.idx = $2 AND r.result = $3 ORDER BY s.replica LIMIT 1",
                    &[&(job.0 as i64), &(f.index as i64), &encoded],
                )?,
                None => self.client.query_opt(
                    "SELECT stderr FROM replica_stderr WHERE job = $1 AND idx = $2 ORDER BY replica LIMIT 1",
                    &[&(job.0 as i64), &(f.index as i64)],
                )?,
            };
            f.stderr = row.map(|r| r.get(0));
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
        let rows = self.client.query(
            "SELECT job, idx, result, agreeing FROM tasks WHERE state = 'accepted' AND output IS NULL AND output_blob IS NULL",
            &[],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let task = TaskId {
                job: JobId(r.get::<_, i64>(0) as u64),
                index: index(r.get(1))?,
            };
            let result: RunResult = dec(r.get::<_, &[u8]>(2), "task result")?;
            let agreeing: Vec<NodeId> = dec(r.get::<_, &[u8]>(3), "agreeing workers")?;
            out.push((task, result, agreeing));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ReplicaPhase;

    #[test]
    fn urls_are_redacted_and_store_names_parsed() {
        assert_eq!(
            redact("postgres://peer:s3cret@db.example:5432/grid?sslmode=disable&password=x"),
            "postgres://peer:***@db.example:5432/grid?sslmode=disable&password=***"
        );
        assert_eq!(redact("postgres://peer@db/grid"), "postgres://peer@db/grid");
        assert_eq!(
            redact("postgresql:///grid?host=/run/postgresql"),
            "postgresql:///grid?host=/run/postgresql"
        );
        assert_eq!("sqlite".parse(), Ok(StoreUrl::Sqlite));
        assert_eq!(
            "postgresql://u@h/d".parse(),
            Ok(StoreUrl::Postgres("postgresql://u@h/d".into()))
        );
        let e = "mysql://u:pw@h/d".parse::<StoreUrl>().unwrap_err();
        assert!(
            e.contains("unknown store") && !e.contains("pw") && !e.contains('\n'),
            "{e}"
        );
        assert_eq!(
            StoreUrl::Postgres("postgres://u:pw@h/d".into()).to_string(),
            "postgres://u:***@h/d"
        );
    }

    /// An unreachable server is one line naming the URL without its password.
    #[test]
    fn a_connection_failure_is_one_clear_line_without_the_password() {
        // Port 1 on loopback: refused at once.
        let e = PostgresStore::open("postgres://peer:s3cret@127.0.0.1:1/grid").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "cannot connect to the PostgreSQL store at postgres://peer:***@127.0.0.1:1/grid: "
            ) && msg.ends_with("is the server running?")
                && !msg.contains("s3cret")
                && !msg.contains('\n'),
            "{msg}"
        );
    }

    /// Grouping keeps each row's mutations in batch order and never puts a row twice in a
    /// group; different rows share groups.
    #[test]
    fn plan_groups_by_kind_without_reordering_a_row() {
        let task = |i| TaskId {
            job: JobId(1),
            index: i,
        };
        let assign = |r: u64| Mutation::Assign {
            replica: r,
            task: task(r as u32),
            worker: NodeId([1; 32]),
            fingerprint: "f".into(),
            assigned_ms: 0,
            deadline_ms: 1,
        };
        let phase = |r: u64| Mutation::Phase {
            replica: r,
            phase: ReplicaPhase::Lost,
        };
        let reported = |r: u64| Mutation::Reported {
            replica: r,
            result: RunResult {
                status: tasks::Status::Ok,
                exit_code: 0,
                trap: String::new(),
                fuel_used: 1,
                output_hash: BlobId([0; 32]),
                output_len: 0,
            },
            reported_ms: 2,
            verdict: None,
        };
        // 1 and 2 assigned; 1 lost then (late) reported; 3 reported then lost.
        let batch = vec![
            assign(1),
            assign(2),
            phase(1),
            reported(3),
            reported(1),
            phase(3),
            reported(2),
        ];
        let groups = plan(&batch);
        let kinds: Vec<(Kind, usize)> = groups.iter().map(|(k, m)| (*k, m.len())).collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::Assign, 2),
                // phase(1) and phase(3): 3's phase must follow its report.
                (Kind::Phase, 1),
                (Kind::Reported, 3),
                (Kind::Phase, 1),
            ]
        );
        // The order each row's mutations run in is the batch's.
        let flat: Vec<&Mutation> = groups.iter().flat_map(|(_, m)| m.iter().copied()).collect();
        for r in 1..=3u64 {
            let of = |ms: &[&Mutation]| -> Vec<Mutation> {
                ms.iter()
                    .filter(|m| classify(m).1 == Row::Replica(r))
                    .map(|m| (*m).clone())
                    .collect()
            };
            let batch_refs: Vec<&Mutation> = batch.iter().collect();
            assert_eq!(of(&flat), of(&batch_refs), "replica {r}");
        }
    }
}
