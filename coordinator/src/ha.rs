//! High availability: several `coordinator serve` processes on one PostgreSQL database,
//! exactly one of which leads.
//!
//! - **The lease.** One row (`peergrid_lease`) names the leader, its lease's expiry (the
//!   database server's clock, so the coordinators' clocks do not matter) and an **epoch**
//!   that grows by one at every change of leader. The leader renews it every
//!   [`LeaseConfig::renew`]; a standby takes it once it has lapsed ([`LeaseConfig::ttl`]
//!   after the last renewal) or at once when the leader gave it up on a graceful stop. The
//!   same coordinator restarted (same data dir, so the same instance id) takes it back at
//!   once: a `kill -9` and restart of a lone coordinator waits for nothing.
//! - **Fencing.** Every commit of the leader's store first reads the lease row `FOR SHARE`
//!   and refuses to commit unless the epoch is still its own
//!   ([`crate::store::PostgresStore::fence`]). A standby's take-over updates that row, so it
//!   waits for the old leader's commit in flight, and every later commit of the old leader
//!   (one that stalled past its lease and woke up) fails: nothing it does after losing the
//!   lease is recorded. The new leader loads its state only after taking the lease, so it
//!   sees every commit of the old one. A leader that stalls *mid-commit* (stopped, frozen)
//!   would hold that row lock for as long as it stalls: the server ends its session once the
//!   transaction has been left open for the lease's time to live
//!   (`idle_in_transaction_session_timeout`), which releases the lock, and the resumed
//!   process finds its commit fenced.
//! - **What lives outside the database** is shared through it too: the submit token (one per
//!   deployment, `peergrid_deployment`), the coordinators' ticket entries (each writes a ticket
//!   listing all of them, `peergrid_coordinators`), and the blobs submitters upload and the
//!   outputs the leader collects (`peergrid_blobs`, copied into a standby's own blob store
//!   while it stands by, so a take-over does not wait for them).
//! - **Standing by**, a coordinator listens on its address and refuses every connection at
//!   once, so clients dialling every address of the ticket
//!   ([`tasks::net::connect_any`]) reach the leader without waiting for a timeout.
//!
//! All database calls here use the synchronous `postgres` client, on the lease's own thread
//! or on `spawn_blocking` threads (see [`crate::store::postgres`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use postgres::Client;
use tokio::sync::watch;

use blobs::BlobStore;
use tasks::{BlobId, BlobRef, NodeId, Ticket};

use crate::store::postgres::{describe, redact};

/// A data-dir file naming this coordinator instance: the lease's holder. Two processes on
/// one data dir are the same instance (the second takes over from the first at once).
pub const INSTANCE_FILE: &str = "instance";

/// Lease timing (`[ha]` in the config file).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseConfig {
    /// A lease not renewed for this long lapses and a standby takes over.
    pub ttl: Duration,
    /// How often the leader renews it.
    pub renew: Duration,
    /// How often a standby checks whether it lapsed.
    pub poll: Duration,
}

impl Default for LeaseConfig {
    /// 4 s: a dead leader is replaced within ~4.5 s (its clients notice within
    /// [`tasks::net::FAILOVER_IDLE_TIMEOUT`]); renewing every second leaves three renewals'
    /// slack before a busy but live leader loses its lease.
    fn default() -> LeaseConfig {
        LeaseConfig {
            ttl: Duration::from_secs(4),
            renew: Duration::from_secs(1),
            poll: Duration::from_millis(250),
        }
    }
}

/// The instance id of the data dir `dir`, created on first use.
pub fn instance_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(INSTANCE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => create_instance(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_instance(&path),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn create_instance(path: &Path) -> anyhow::Result<String> {
    let id = hex::encode(rand::random::<[u8; 16]>());
    tasks::identity::write_private(path, format!("{id}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// How long a lease statement waits for a row lock before giving up and retrying: a
/// standby keeps polling (and stops when asked) while the leader's commit in flight holds
/// the lease row.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// A connection of its own (lease, mirror), with the store's settings and one-line errors;
/// its statements wait at most [`LOCK_WAIT`] for a lock.
fn connect(url: &str) -> anyhow::Result<Client> {
    let mut c = crate::store::postgres::connect(url, "peergrid-coordinator-ha")?;
    c.batch_execute(&format!("SET lock_timeout = {}", LOCK_WAIT.as_millis()))?;
    Ok(c)
}

/// The lease row was locked longer than [`LOCK_WAIT`] (a commit in flight, or the session of
/// a leader that stalled mid-commit, which the server ends after the lease's time to live).
fn lock_busy(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// The deployment's submit token: the one already in the database, or `local` (this data
/// dir's) recorded as the deployment's when it is the first coordinator. Blocks.
pub fn deployment_token(url: &str, local: &str) -> anyhow::Result<String> {
    let mut c = connect(url)?;
    c.execute(
        "INSERT INTO peergrid_deployment (id, submit_token) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        &[&local],
    )?;
    Ok(c.query_one(
        "SELECT submit_token FROM peergrid_deployment WHERE id = 1",
        &[],
    )?
    .get(0))
}

/// What the lease thread reports.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseState {
    /// Another coordinator leads (its ticket entry, when known).
    Standby { leader: Option<String> },
    /// This coordinator leads with this epoch.
    Leading { epoch: i64 },
    /// It led and lost the lease (or could not renew it in time): it must stop.
    Lost(String),
}

/// This coordinator's place in the deployment: a thread that stands by until it can take
/// the lease, then renews it; it also keeps the ticket file and the blob mirror current.
pub struct Lease {
    state: watch::Receiver<LeaseState>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the lease thread works with.
pub struct LeaseCtx {
    pub url: String,
    pub instance: String,
    /// This coordinator's ticket entry (its key and advertised address).
    pub entry: (NodeId, String),
    /// Where its ticket file is written (listing every coordinator of the deployment).
    pub ticket_file: PathBuf,
    /// Its blob store, filled from the database's mirror while it stands by.
    pub blobs: BlobStore,
    pub config: LeaseConfig,
}

impl Lease {
    /// Register this coordinator and start the lease thread (standing by first).
    pub fn start(ctx: LeaseCtx) -> anyhow::Result<Lease> {
        let mut client = connect(&ctx.url)?;
        let entry = entry_text(&ctx.entry);
        client.execute(
            "INSERT INTO peergrid_coordinators (instance, entry, seen) VALUES ($1, $2, clock_timestamp())
             ON CONFLICT (instance) DO UPDATE SET entry = EXCLUDED.entry, seen = EXCLUDED.seen",
            &[&ctx.instance, &entry],
        )?;
        let (tx, rx) = watch::channel(LeaseState::Standby { leader: None });
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || lease_thread(ctx, client, tx, s))
            .context("starting the lease thread")?;
        Ok(Lease {
            state: rx,
            stop,
            thread: Some(thread),
        })
    }

    /// Wait until this coordinator leads; returns its epoch. Logs who leads meanwhile.
    pub async fn leading(&mut self) -> anyhow::Result<i64> {
        let mut said = None;
        loop {
            let now = self.state.borrow_and_update().clone();
            match now {
                LeaseState::Leading { epoch } => return Ok(epoch),
                LeaseState::Lost(why) => anyhow::bail!("{why}"),
                LeaseState::Standby { leader } => {
                    if leader.is_some() && said != leader {
                        tracing::info!(
                            leader = leader.as_deref().unwrap_or("?"),
                            "standing by: another coordinator of this deployment leads; taking over if its lease lapses"
                        );
                        said = leader;
                    }
                }
            }
            if self.state.changed().await.is_err() {
                anyhow::bail!("the lease thread stopped");
            }
        }
    }

    /// Who leads now, as far as this standby knows (its ticket entry); `None` when unknown or
    /// when this coordinator leads.
    pub fn leader(&self) -> Arc<dyn Fn() -> Option<String> + Send + Sync> {
        let state = self.state.clone();
        Arc::new(move || match &*state.borrow() {
            LeaseState::Standby { leader } => leader.clone(),
            _ => None,
        })
    }

    /// Resolves when the lease is lost; says why.
    pub fn lost(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            loop {
                if let LeaseState::Lost(why) = &*state.borrow_and_update() {
                    return why.clone();
                }
                if state.changed().await.is_err() {
                    return "the lease thread stopped".into();
                }
            }
        }
    }

    /// Stop renewing and give the lease up at once (after the last commit), so a standby
    /// takes over without waiting for it to lapse. Blocks: call from a plain thread.
    pub fn release(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Not released explicitly (e.g. the process is failing): the thread stops renewing
        // and the lease lapses by itself.
        self.stop.store(true, Ordering::SeqCst);
    }
}

const ACQUIRE: &str = "
    INSERT INTO peergrid_lease (id, epoch, holder, entry, expires_at)
    VALUES (1, 1, $1, $2, clock_timestamp() + make_interval(secs => $3))
    ON CONFLICT (id) DO UPDATE SET
        epoch = peergrid_lease.epoch + 1, holder = EXCLUDED.holder,
        entry = EXCLUDED.entry, expires_at = EXCLUDED.expires_at
    WHERE peergrid_lease.expires_at < clock_timestamp() OR peergrid_lease.holder = EXCLUDED.holder
    RETURNING epoch";
const RENEW: &str = "UPDATE peergrid_lease SET expires_at = clock_timestamp() + make_interval(secs => $2) WHERE id = 1 AND epoch = $1";
const RELEASE: &str = "UPDATE peergrid_lease SET expires_at = clock_timestamp() - interval '1 second' WHERE id = 1 AND epoch = $1";
const LEADER: &str =
    "SELECT entry FROM peergrid_lease WHERE id = 1 AND expires_at >= clock_timestamp()";

/// Take the lease for `instance` (ticket entry `entry`) if it is free, lapsed or already
/// ours; `Some(epoch)` when taken.
pub fn acquire(
    client: &mut Client,
    instance: &str,
    entry: &str,
    ttl: Duration,
) -> Result<Option<i64>, postgres::Error> {
    Ok(client
        .query_opt(ACQUIRE, &[&instance, &entry, &ttl.as_secs_f64()])?
        .map(|r| r.get(0)))
}

/// [`acquire`] on a connection of its own (for benchmarks and tools that commit as a
/// leader would: fenced by the epoch returned).
pub fn acquire_at(
    url: &str,
    instance: &str,
    entry: &str,
    ttl: Duration,
) -> anyhow::Result<Option<i64>> {
    Ok(acquire(&mut connect(url)?, instance, entry, ttl)?)
}

/// Extend the lease of `epoch`; false when another coordinator has taken it since.
pub fn renew(client: &mut Client, epoch: i64, ttl: Duration) -> Result<bool, postgres::Error> {
    Ok(client.execute(RENEW, &[&epoch, &ttl.as_secs_f64()])? == 1)
}

/// How often the ticket file and (standing by) the blob mirror are refreshed.
const REFRESH: Duration = Duration::from_secs(2);

fn lease_thread(
    ctx: LeaseCtx,
    mut client: Client,
    tx: watch::Sender<LeaseState>,
    stop: Arc<AtomicBool>,
) {
    let ttl = ctx.config.ttl;
    let mut ticket_text = String::new();
    let mut refresh = |client: &mut Client, mirror: bool| {
        if let Err(e) = write_ticket(client, &ctx, &mut ticket_text) {
            tracing::warn!(error = %format!("{e:#}"), "cannot refresh the ticket file");
        }
        if mirror {
            if let Err(e) = copy_mirror(client, &ctx.blobs) {
                tracing::warn!(error = %format!("{e:#}"), "cannot copy blobs from the database");
            }
        }
    };
    // Standing by.
    let entry = entry_text(&ctx.entry);
    let mut last_refresh: Option<Instant> = None;
    let epoch = loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if last_refresh.is_none_or(|t| t.elapsed() >= REFRESH) {
            refresh(&mut client, true);
            last_refresh = Some(Instant::now());
        }
        match acquire(&mut client, &ctx.instance, &entry, ttl) {
            Ok(Some(epoch)) => break epoch,
            Ok(None) => {
                let leader = client
                    .query_opt(LEADER, &[])
                    .ok()
                    .flatten()
                    .map(|r| r.get::<_, String>(0));
                tx.send_if_modified(|s| {
                    let new = LeaseState::Standby { leader };
                    (*s != new).then(|| *s = new).is_some()
                });
            }
            Err(e) if lock_busy(&e) => {
                tracing::debug!("the leader lease row is locked (a commit in flight); retrying");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %describe(&e), "cannot check the leader lease; retrying");
                std::thread::sleep(ctx.config.poll.max(Duration::from_secs(1)));
                if let Ok(c) = connect(&ctx.url) {
                    client = c;
                }
                continue;
            }
        }
        std::thread::sleep(ctx.config.poll);
    };
    // Everything the old leader stored is in the mirror: copy what is still missing before
    // serving.
    refresh(&mut client, true);
    tracing::info!(epoch, "took the leader lease: this coordinator leads");
    let _ = tx.send(LeaseState::Leading { epoch });
    // Leading: renew until stopped or lost.
    let mut renewed = Instant::now();
    let mut last_refresh = Instant::now();
    loop {
        std::thread::sleep(ctx.config.renew);
        if stop.load(Ordering::SeqCst) {
            if let Err(e) = client.execute(RELEASE, &[&epoch]) {
                tracing::warn!(error = %describe(&e), "cannot release the leader lease; it lapses by itself");
            } else {
                tracing::info!(epoch, "released the leader lease");
            }
            return;
        }
        match renew(&mut client, epoch, ttl) {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                let _ = tx.send(LeaseState::Lost(format!(
                    "another coordinator took the leader lease (ours was epoch {epoch}): this one stops; restarted, it stands by"
                )));
                return;
            }
            Err(e) => {
                if renewed.elapsed() >= ctx.config.ttl {
                    let _ = tx.send(LeaseState::Lost(format!(
                        "cannot renew the leader lease for {:.1} s ({}): a standby may lead now, so this one stops",
                        renewed.elapsed().as_secs_f64(),
                        describe(&e)
                    )));
                    return;
                }
                tracing::warn!(error = %describe(&e), "cannot renew the leader lease; retrying");
                if !lock_busy(&e) {
                    if let Ok(c) = connect(&ctx.url) {
                        client = c;
                    }
                }
                continue;
            }
        }
        if last_refresh.elapsed() >= REFRESH {
            refresh(&mut client, false);
            last_refresh = Instant::now();
        }
    }
}

/// A coordinator's ticket entry as stored: `<node-id>@<host:port>`.
fn entry_text((id, addr): &(NodeId, String)) -> String {
    format!("{id}@{addr}")
}

/// Write the ticket file listing every coordinator of the deployment, this one first, when
/// the list changed.
fn write_ticket(client: &mut Client, ctx: &LeaseCtx, last: &mut String) -> anyhow::Result<()> {
    let ticket = deployment_ticket(client, &ctx.instance, &ctx.entry)?;
    let text = ticket.to_string();
    if *last != text {
        tasks::identity::write_private(&ctx.ticket_file, format!("{text}\n").as_bytes())
            .context("writing the ticket file")?;
        if !last.is_empty() {
            tracing::info!(%ticket, "the deployment's coordinators changed; ticket file rewritten");
        }
        *last = text;
    }
    Ok(())
}

/// The ticket of the deployment as this coordinator sees it: itself first, then the others
/// registered in the database (at most [`Ticket::MAX_ENTRIES`]).
pub fn deployment_ticket(
    client: &mut Client,
    instance: &str,
    own: &(NodeId, String),
) -> anyhow::Result<Ticket> {
    let mut entries = vec![own.clone()];
    for row in client.query(
        "SELECT entry FROM peergrid_coordinators WHERE instance <> $1 ORDER BY instance",
        &[&instance],
    )? {
        let entry: String = row.get(0);
        let parsed: Option<(NodeId, String)> = entry
            .split_once('@')
            .and_then(|(id, addr)| Some((id.parse().ok()?, addr.to_string())));
        match parsed {
            Some(e) if !entries.contains(&e) && entries.len() < Ticket::MAX_ENTRIES => {
                entries.push(e)
            }
            Some(_) => {}
            None => tracing::warn!(
                entry,
                "ignoring a malformed coordinator entry in the database"
            ),
        }
    }
    Ok(Ticket::of_entries(entries).expect("own entry"))
}

/// The deployment's ticket for an in-process caller: connects, reads, disconnects. Blocks.
pub fn ticket_of(url: &str, instance: &str, own: &(NodeId, String)) -> anyhow::Result<Ticket> {
    deployment_ticket(&mut connect(url)?, instance, own)
}

/// Copy every mirrored blob this coordinator's store lacks.
fn copy_mirror(client: &mut Client, blobs: &BlobStore) -> anyhow::Result<()> {
    let ids: Vec<Vec<u8>> = client
        .query("SELECT id FROM peergrid_blobs", &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for raw in ids {
        let Ok(bytes) = <[u8; 32]>::try_from(raw.as_slice()) else {
            continue;
        };
        let id = BlobId(bytes);
        if blobs.has(&id) {
            continue;
        }
        let Some(row) =
            client.query_opt("SELECT data FROM peergrid_blobs WHERE id = $1", &[&raw])?
        else {
            continue;
        };
        let data: Vec<u8> = row.get(0);
        let blob = BlobRef {
            id,
            size: data.len() as u64,
        };
        blobs
            .put_verified(blob, &data)
            .with_context(|| format!("storing mirrored blob {}", id.short()))?;
        tracing::debug!(blob = %id.short(), size = data.len(), "blob copied from the database");
    }
    Ok(())
}

/// The leader's copy of its blobs in the database: every blob a submitter uploads and every
/// output the leader collects is written here before it is acknowledged or recorded, so a
/// standby that takes over has them. Blocking: call from `spawn_blocking`.
pub struct BlobMirror {
    url: String,
    client: Mutex<Option<Client>>,
}

impl std::fmt::Debug for BlobMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobMirror({})", redact(&self.url))
    }
}

impl BlobMirror {
    pub fn new(url: &str) -> BlobMirror {
        BlobMirror {
            url: url.to_string(),
            client: Mutex::new(None),
        }
    }

    /// Store `data` (whose id is `id`) unless it is there already. One reconnection on
    /// failure.
    pub fn put(&self, id: &BlobId, data: &[u8]) -> anyhow::Result<()> {
        let mut guard = self.client.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(connect(&self.url)?);
            }
            let c = guard.as_mut().expect("connected above");
            match c.execute(
                "INSERT INTO peergrid_blobs (id, data) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                &[&id.0.as_slice(), &data],
            ) {
                Ok(_) => return Ok(()),
                Err(e) if attempt == 0 && c.is_closed() => {
                    tracing::debug!(error = %describe(&e), "blob mirror connection lost; reconnecting");
                    *guard = None;
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "cannot copy blob {} to the database: {}",
                        id.short(),
                        describe(&e)
                    ))
                }
            }
        }
        unreachable!("the second attempt returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::throwaway::ThrowawayPostgres;
    use crate::store::{Mutation, PostgresStore, Store, StoreError};
    use tasks::wire::JobState;
    use tasks::JobId;

    /// A fresh database on a throwaway server (kept alive by the first field); `None`
    /// (the test skips) without PostgreSQL.
    fn fresh_database() -> Option<(ThrowawayPostgres, String)> {
        let pg = ThrowawayPostgres::for_tests()?;
        let url = pg.fresh_database().unwrap();
        Some((pg, url))
    }

    /// Instance `a` leads: a store on `url` (which creates the tables), a lease connection,
    /// the lease taken for `ttl`, the store fenced with it and one batch committed. Returns
    /// the store, the connection and the lease's epoch.
    fn a_leads(url: &str, ttl: Duration) -> (PostgresStore, Client, i64) {
        let mut a = PostgresStore::open(url).unwrap();
        let mut c = connect(url).unwrap();
        let e1 = acquire(&mut c, "instance-a", "a@192.0.2.1:7100", ttl)
            .unwrap()
            .expect("a free lease is taken");
        a.fence(e1, Duration::from_secs(30)).unwrap();
        a.commit(&a_commit()).expect("the leader commits");
        (a, c, e1)
    }

    /// The coordinator stores' sessions on `c`'s database (`PostgresStore` connects as
    /// application `peergrid-coordinator`).
    const STORE_SESSIONS: &str = "FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'peergrid-coordinator'";

    fn store_sessions(c: &mut Client) -> i64 {
        c.query_one(&format!("SELECT COUNT(*) {STORE_SESSIONS}"), &[])
            .unwrap()
            .get(0)
    }

    /// End those sessions, as the server ends a stalled one; returns how many.
    fn end_store_sessions(c: &mut Client) -> i64 {
        c.query_one(
            &format!(
                "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) {STORE_SESSIONS}) AS t"
            ),
            &[],
        )
        .unwrap()
        .get(0)
    }

    fn a_commit() -> Vec<Mutation> {
        vec![Mutation::JobState {
            job: JobId(1),
            state: JobState::Done,
        }]
    }

    /// The fencing rule on a real server: a leader whose lease another coordinator took
    /// cannot commit anything more, whatever it believes; the same instance restarted takes
    /// its lease back at once (and fences its previous process).
    #[test]
    fn a_coordinator_that_lost_the_lease_can_no_longer_commit() {
        let Some((_pg, url)) = fresh_database() else {
            return;
        };
        let short = Duration::from_millis(300);
        let (mut a, mut c, e1) = a_leads(&url, short);
        // Held and live: nobody else gets it.
        assert_eq!(
            acquire(&mut c, "instance-b", "b@192.0.2.2:7100", short).unwrap(),
            None
        );
        assert!(renew(&mut c, e1, short).unwrap());
        // A stalls past its lease; B takes over.
        std::thread::sleep(Duration::from_millis(500));
        let take_as_b =
            |c: &mut Client| acquire(c, "instance-b", "b@192.0.2.2:7100", Duration::from_secs(30));
        let e2 = take_as_b(&mut c).unwrap().expect("a lapsed lease is taken");
        assert_eq!(e2, e1 + 1);
        // A wakes up: neither its renewal nor its commit goes through.
        assert!(!renew(&mut c, e1, short).unwrap());
        match a.commit(&a_commit()) {
            Err(StoreError::Fenced { ours, now }) => assert_eq!((ours, now), (e1, Some(e2))),
            other => panic!("the old leader committed: {other:?}"),
        }
        let mut b = PostgresStore::open(&url).unwrap();
        b.fence(e2, Duration::from_secs(30)).unwrap();
        b.commit(&a_commit()).expect("the new leader commits");
        // B restarted (same instance id): takes the live lease back at once, and B's previous
        // process is fenced like A.
        let e3 = take_as_b(&mut c)
            .unwrap()
            .expect("the same instance takes its lease back");
        assert_eq!(e3, e2 + 1);
        assert!(matches!(
            b.commit(&a_commit()),
            Err(StoreError::Fenced { .. })
        ));
    }

    /// A leader stopped between its commit's fence read (the lease row `FOR SHARE`) and its
    /// `COMMIT` holds that row's lock while it is stopped; the take-over must not wait for it
    /// to resume (CI saw a standby wait past 120 s for a SIGSTOPped leader): the server ends
    /// the stalled session after the lease's time to live, and the standby takes over.
    #[test]
    fn a_leader_stalled_mid_commit_does_not_keep_the_standby_out() {
        let Some((_pg, url)) = fresh_database() else {
            return;
        };
        drop(PostgresStore::open(&url).unwrap());
        let mut c = connect(&url).unwrap();
        let ttl = Duration::from_millis(500);
        let e1 = acquire(&mut c, "instance-a", "a@192.0.2.1:7100", ttl)
            .unwrap()
            .expect("a free lease is taken");
        // A's store connection, as `PostgresStore::fence` sets it up, stalled mid-commit.
        let mut a = crate::store::postgres::connect(&url, "stalled-leader").unwrap();
        crate::store::postgres::limit_open_transactions(&mut a, ttl).unwrap();
        let mut tx = a.transaction().unwrap();
        tx.query_one(
            "SELECT epoch FROM peergrid_lease WHERE id = 1 FOR SHARE",
            &[],
        )
        .unwrap();
        // B polls as a standby does.
        let t0 = Instant::now();
        let e2 = loop {
            match acquire(&mut c, "instance-b", "b@192.0.2.2:7100", ttl) {
                Ok(Some(e)) => break e,
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) if lock_busy(&e) => {}
                Err(e) => panic!("acquire: {}", describe(&e)),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the standby never took over from a leader stalled mid-commit"
            );
        };
        assert_eq!(e2, e1 + 1);
        // A resumes: the server ended its transaction, nothing of it commits.
        assert!(tx.commit().is_err(), "the stalled commit went through");
    }

    /// A leader whose connection broke while it was fenced out (its stalled session ended
    /// by the server) says another coordinator leads, not just that the connection broke.
    #[test]
    fn a_fenced_leader_whose_connection_was_ended_is_told_another_leads() {
        let Some((_pg, url)) = fresh_database() else {
            return;
        };
        let short = Duration::from_millis(300);
        let (mut a, mut c, e1) = a_leads(&url, short);
        std::thread::sleep(Duration::from_millis(500));
        let e2 = acquire(
            &mut c,
            "instance-b",
            "b@192.0.2.2:7100",
            Duration::from_secs(30),
        )
        .unwrap()
        .expect("a lapsed lease is taken");
        assert_eq!(
            end_store_sessions(&mut c),
            1,
            "the leader's store connection"
        );
        match a.commit(&a_commit()) {
            Err(StoreError::Fenced { ours, now }) => assert_eq!((ours, now), (e1, Some(e2))),
            other => panic!("not told another coordinator leads: {other:?}"),
        }
    }

    /// The other side of ending stalled sessions: a leader whose connection broke before a
    /// batch's `COMMIT` was sent (nothing of it committed) while the lease is still its own
    /// (a lone coordinator frozen for a few seconds) reconnects and commits the batch.
    #[test]
    fn a_leader_whose_connection_broke_before_commit_reconnects_and_commits() {
        let Some((_pg, url)) = fresh_database() else {
            return;
        };
        let (mut a, mut c, _) = a_leads(&url, Duration::from_secs(30));
        assert_eq!(
            end_store_sessions(&mut c),
            1,
            "the leader's store connection"
        );
        let t0 = Instant::now();
        while store_sessions(&mut c) > 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        a.commit(&a_commit())
            .expect("the batch is committed on a new connection");
        assert_eq!(store_sessions(&mut c), 1, "one store connection again");
        a.commit(&a_commit()).expect("and the next one too");
    }

    #[test]
    fn the_deployment_has_one_token_and_a_ticket_listing_every_coordinator() {
        let Some((_pg, url)) = fresh_database() else {
            return;
        };
        drop(PostgresStore::open(&url).unwrap());
        assert_eq!(deployment_token(&url, "first").unwrap(), "first");
        assert_eq!(deployment_token(&url, "second").unwrap(), "first");
        let (ka, kb) = (tasks::NodeKey::generate(), tasks::NodeKey::generate());
        let own_a = (ka.node_id(), "192.0.2.1:7100".to_string());
        let own_b = (kb.node_id(), "192.0.2.2:7100".to_string());
        let mut c = connect(&url).unwrap();
        for (inst, own) in [("a", &own_a), ("b", &own_b)] {
            c.execute(
                "INSERT INTO peergrid_coordinators (instance, entry, seen) VALUES ($1, $2, clock_timestamp())",
                &[&inst, &entry_text(own)],
            )
            .unwrap();
        }
        let t = ticket_of(&url, "b", &own_b).unwrap();
        let entries: Vec<_> = t.entries().map(|(id, a)| (id, a.to_string())).collect();
        assert_eq!(
            entries,
            vec![own_b.clone(), own_a.clone()],
            "own entry first"
        );
    }
}
