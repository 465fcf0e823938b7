//! The SQLite schema and its migrations.
//!
//! `schema_version` holds one row: the number of migrations applied. Each migration runs in
//! its own transaction together with the version bump, so a crash mid-upgrade leaves the
//! database at the previous version. Migrations are append-only: never edit a shipped one.

use rusqlite::{Connection, OptionalExtension};

use super::StoreError;

/// Migration `i` brings the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        manifest BLOB NOT NULL,          -- postcard JobManifest
        state TEXT NOT NULL,             -- running | done | failed | cancelled
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE fingerprints (
        short TEXT PRIMARY KEY,          -- EngineFingerprint::short_id
        json TEXT NOT NULL
    );
    -- Pending tasks have no row.
    CREATE TABLE tasks (
        job INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        state TEXT NOT NULL,             -- pending | accepted | failed
        quorum INTEGER,                  -- set when the policy chose a quorum other than the job's
        digest BLOB,
        result BLOB,                     -- postcard RunResult of the accepted outcome
        fingerprint TEXT,
        agreeing BLOB,                   -- postcard Vec<NodeId>
        reason TEXT,
        output BLOB,                     -- inline output bytes
        output_blob BLOB,                -- or the id of the output in the blob store
        decided_ms INTEGER,
        PRIMARY KEY (job, idx)
    ) WITHOUT ROWID;
    CREATE TABLE replicas (
        id INTEGER PRIMARY KEY,
        job INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        worker BLOB NOT NULL,
        fingerprint TEXT NOT NULL,
        assigned_ms INTEGER NOT NULL,
        deadline_ms INTEGER NOT NULL,
        phase INTEGER NOT NULL,          -- 0 in flight, 1 reported, 2 lost, 3 cancelled
        result BLOB,                     -- postcard RunResult
        reported_ms INTEGER,
        verdict INTEGER                  -- NULL none, 1 valid, 0 invalid
    );
    CREATE TABLE workers (
        node BLOB PRIMARY KEY,
        fingerprint TEXT,
        credit_fuel INTEGER NOT NULL,
        valid INTEGER NOT NULL,
        invalid INTEGER NOT NULL,
        consecutive_valid INTEGER NOT NULL,
        trust REAL NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        peer_addr TEXT
    );
    CREATE TABLE blob_locations (
        blob BLOB NOT NULL,
        worker BLOB NOT NULL,
        PRIMARY KEY (blob, worker)
    ) WITHOUT ROWID;
    "#,
    // 2: replicas a worker lost and has not yet made up for (they cost it capacity); kept
    // across restarts, so a coordinator restart does not wipe a worker's record of losses.
    r#"
    ALTER TABLE workers ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
    "#,
    // 3: a retried task (`coordinator retry`) is pending again; its replicas with ids below
    // this belong to earlier attempts and are not attached to it on restart.
    r#"
    ALTER TABLE tasks ADD COLUMN replicas_from INTEGER;
    "#,
    // 4: the stderr tail of replicas whose result is not ok (diagnostics for the scientist,
    // not part of any digest): at most one row per replica, bounded in size by the engine.
    r#"
    CREATE TABLE replica_stderr (
        replica INTEGER PRIMARY KEY,
        job INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        stderr BLOB NOT NULL
    );
    CREATE INDEX replica_stderr_task ON replica_stderr (job, idx);
    "#,
    // 5: a job's determinism class ('native' or 'portable'); jobs created before classes
    // existed ran with NaN canonicalization, i.e. 'portable'.
    r#"
    ALTER TABLE jobs ADD COLUMN determinism TEXT NOT NULL DEFAULT 'portable';
    "#,
    // 6: a worker that first joined an established pool (anchors connected) is a newcomer
    // whose results anchors decide on; workers known before were not.
    r#"
    ALTER TABLE workers ADD COLUMN junior INTEGER NOT NULL DEFAULT 0;
    "#,
];

/// Bring the database up to the newest schema.
pub fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: i64 = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let supported = MIGRATIONS.len() as i64;
    if current > supported {
        return Err(StoreError::TooNew {
            path: path.to_string(),
            found: current,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [i as i64 + 1],
        )?;
        tx.commit()?;
    }
    Ok(())
}

/// The schema version of an open database.
pub fn version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0))?)
}
