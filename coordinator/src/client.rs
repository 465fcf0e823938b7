//! The submitter's client library: what `coordinator submit|status|results` and the demo use.
//!
//! ```no_run
//! # async fn f(ticket: tasks::Ticket, token: &str, spec: tasks::JobSpec) -> Result<(), coordinator::client::ClientError> {
//! let client = coordinator::client::Client::connect(&ticket, token).await?;
//! let (job, tasks) = client.submit(&spec).await?;
//! let results = client.results(job).await?; // outputs fetched and verified
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;

use blobs::swarm::FetchError;
use tasks::job::JobError;
use tasks::net::{self, FrameError, NetError};
use tasks::wire::{
    self, ErrorCode, FailurePage, JobResults, PeerAddr, ResultsPage, StatusReport, SubmitBody,
    SubmitRequest, SubmitResponse, TaskFailure, TaskResult, TaskState, ALPN_SUBMIT,
    MAX_FAILURES_PER_PAGE,
};
use tasks::{BlobId, BlobRef, Determinism, JobId, JobManifest, JobSpec, NodeId, NodeKey, Ticket};

/// Why a client call failed. Every message is one line saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot resolve the ticket's address {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    // (No `#[from]` here and on `Frame`: it would make the inner error a `source` too, and
    // `{:#}` would print its text twice.)
    #[error("cannot reach the coordinator: {0}")]
    Connect(NetError),
    #[error("the coordinator refused the submit token: use the token from its <data-dir>/submit-token file")]
    Unauthorized,
    #[error("no job {0} on this coordinator (see `coordinator status` for the job ids)")]
    UnknownJob(JobId),
    #[error("the coordinator refused the request ({code:?}): {message}")]
    Server { code: ErrorCode, message: String },
    #[error("talking to the coordinator failed: {0}")]
    Frame(FrameError),
    #[error("the job's manifest is {bytes} bytes, over the {max} bytes one request may carry: split its {tasks} tasks into jobs of at most about {fits} tasks each")]
    JobTooLarge {
        tasks: usize,
        bytes: usize,
        max: usize,
        fits: usize,
    },
    #[error("unexpected answer from the coordinator: {0}")]
    Unexpected(String),
    #[error("the coordinator predates determinism classes and runs every job `portable`: upgrade it, or put `determinism = \"portable\"` in the job file")]
    NoClasses,
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("output of task {index} failed verification: {reason}")]
    Verify { index: u32, reason: String },
    #[error("cannot fetch the output of task {index}: {reason}")]
    Fetch { index: u32, reason: String },
    #[error("local I/O: {0}")]
    Io(String),
}

impl From<NetError> for ClientError {
    fn from(e: NetError) -> ClientError {
        ClientError::Connect(e)
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> ClientError {
        ClientError::Frame(e)
    }
}

/// Disk the temporary store of fetched outputs may use ([`Client::fill_output`]); the least
/// recently fetched go first.
const OUTPUT_CACHE_BYTES: u64 = 256 << 20;

/// Where [`Client::fill_output`] keeps outputs fetched as blobs: a temporary store, made on
/// first use and removed on drop.
#[derive(Default)]
pub struct OutputFetcher {
    store: Option<(tempfile::TempDir, blobs::BlobStore, blobs::swarm::Fetcher)>,
}

/// A connection to one coordinator's submit service.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    token: String,
    ticket: Ticket,
    /// The coordinator of the ticket that answered (the leader, with standbys).
    addr: SocketAddr,
    node_id: NodeId,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.ticket)
    }
}

impl Client {
    /// A new connection to the same coordinator (same ticket, resolved again, same token):
    /// after it restarted, or moved to the address its ticket's name now gives.
    pub async fn reconnect(&self) -> Result<Client, ClientError> {
        Client::connect(&self.ticket, &self.token).await
    }

    /// Whether `e` says the coordinator could not be reached (it may come back), rather than
    /// that it refused the request.
    pub fn is_unreachable(e: &ClientError) -> bool {
        matches!(
            e,
            ClientError::Connect(_) | ClientError::Frame(_) | ClientError::Resolve { .. }
        )
    }

    /// Connect to the coordinator named by `ticket` (its key is pinned) and check the token.
    pub async fn connect(ticket: &Ticket, token: &str) -> Result<Client, ClientError> {
        let targets = ticket
            .resolve_all()
            .await
            .map_err(|e| ClientError::Resolve {
                addr: ticket.addr.clone(),
                reason: e.to_string(),
            })?;
        let bind: SocketAddr = if targets.iter().all(|(a, _)| a.is_ipv4()) {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        // Submitters are anonymous: a fresh key per client; the token is the credential.
        let key = NodeKey::generate();
        let endpoint = net::endpoint(&key, bind, &[])?;
        // Every coordinator the ticket lists is dialled at once; the one that leads answers
        // (and a dead one is noticed within seconds: see `net::FAILOVER_IDLE_TIMEOUT`).
        let failover = net::failover_client_config(&key)?;
        let (conn, i) = net::connect_any(&endpoint, &targets, ALPN_SUBMIT, Some(&failover)).await?;
        let (addr, node_id) = targets[i];
        let client = Client {
            endpoint,
            conn,
            token: token.trim().to_string(),
            ticket: ticket.clone(),
            addr,
            node_id,
        };
        // Cheap request that checks the token now, so a wrong one fails at connect.
        match client
            .call(SubmitBody::MissingBlobs { blobs: Vec::new() })
            .await?
        {
            SubmitResponse::Missing { .. } => Ok(client),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    async fn call(&self, body: SubmitBody) -> Result<SubmitResponse, ClientError> {
        self.call_with(body, &[]).await
    }

    async fn call_with(&self, body: SubmitBody, raw: &[u8]) -> Result<SubmitResponse, ClientError> {
        let req = SubmitRequest {
            token: self.token.clone(),
            body,
        };
        let (resp, _) = net::request_with_body::<_, SubmitResponse>(&self.conn, &req, raw).await?;
        match resp {
            SubmitResponse::Error {
                code: ErrorCode::Unauthorized,
                ..
            } => Err(ClientError::Unauthorized),
            other => Ok(other),
        }
    }

    fn not_found(job: JobId, resp: SubmitResponse) -> ClientError {
        match resp {
            SubmitResponse::Error {
                code: ErrorCode::NotFound,
                ..
            } => ClientError::UnknownJob(job),
            SubmitResponse::Error { code, message } => ClientError::Server { code, message },
            other => ClientError::Unexpected(format!("{other:?}")),
        }
    }

    /// Load a job file's blobs, upload those the coordinator lacks, create the job.
    pub async fn submit(&self, spec: &JobSpec) -> Result<(JobId, u32), ClientError> {
        let (manifest, blobs) = spec.load_blobs()?;
        self.submit_manifest_in(manifest, &blobs, spec.determinism)
            .await
    }

    /// Upload missing blobs (from `blobs`) and create a `portable` job.
    pub async fn submit_manifest(
        &self,
        manifest: JobManifest,
        blobs: &BTreeMap<BlobId, Vec<u8>>,
    ) -> Result<(JobId, u32), ClientError> {
        self.submit_manifest_in(manifest, blobs, Determinism::Portable)
            .await
    }

    /// Upload missing blobs (from `blobs`) and create the job in class `determinism`.
    pub async fn submit_manifest_in(
        &self,
        manifest: JobManifest,
        blobs: &BTreeMap<BlobId, Vec<u8>>,
        determinism: Determinism,
    ) -> Result<(JobId, u32), ClientError> {
        // A manifest too large for one request (a job of a million tasks) goes up as a blob
        // of its own. Checked before uploading anything: one too large even for that is
        // refused with what to do, not with an error after its blobs went up.
        let encoded = wire::encode(&manifest);
        let manifest_tasks = manifest.tasks.len();
        let bytes = encoded.len() as u64 + 1024;
        if bytes > wire::MAX_MANIFEST_BLOB {
            let tasks = manifest.tasks.len() as u64;
            return Err(ClientError::JobTooLarge {
                tasks: tasks as usize,
                bytes: bytes as usize,
                max: wire::MAX_MANIFEST_BLOB as usize,
                fits: (tasks * (wire::MAX_MANIFEST_BLOB * 9 / 10) / bytes) as usize,
            });
        }
        let as_blob = (bytes > wire::MAX_FRAME as u64).then(|| (BlobRef::of(&encoded), encoded));
        let mut wanted = manifest.blobs();
        wanted.extend(as_blob.as_ref().map(|(b, _)| *b));
        let missing = match self
            .call(SubmitBody::MissingBlobs { blobs: wanted })
            .await?
        {
            SubmitResponse::Missing { blobs } => blobs,
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        for b in missing {
            let bytes = match &as_blob {
                Some((m, bytes)) if m.id == b.id => bytes,
                _ => blobs.get(&b.id).ok_or_else(|| {
                    ClientError::Io(format!("blob {} is referenced but was not given", b.id))
                })?,
            };
            match self
                .call_with(SubmitBody::PutBlob { blob: b }, bytes)
                .await?
            {
                SubmitResponse::Ok => {}
                SubmitResponse::Error { code, message } => {
                    return Err(ClientError::Server { code, message })
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
        // `CreateJob` is a portable job to every coordinator, old ones included.
        let large = as_blob.is_some();
        let body = match (as_blob, determinism) {
            (Some((blob, _)), determinism) => SubmitBody::CreateJobFromBlob {
                manifest: blob,
                determinism,
            },
            (None, Determinism::Portable) => SubmitBody::CreateJob { manifest },
            (None, d) => SubmitBody::CreateJobIn {
                manifest,
                determinism: d,
            },
        };
        let answer = match self.call(body).await {
            // An older coordinator cannot decode the request and drops the stream.
            Err(ClientError::Frame(_)) if large => {
                let tasks = manifest_tasks;
                return Err(ClientError::JobTooLarge {
                    tasks,
                    bytes: bytes as usize,
                    max: wire::MAX_FRAME,
                    fits: (tasks as u64 * (wire::MAX_FRAME as u64 * 9 / 10) / bytes) as usize,
                });
            }
            Err(ClientError::Frame(_)) if determinism != Determinism::Portable => {
                return Err(ClientError::NoClasses)
            }
            r => r?,
        };
        match answer {
            SubmitResponse::JobCreated { job, tasks } => Ok((job, tasks)),
            SubmitResponse::Error { code, message } => Err(ClientError::Server { code, message }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// How far a job's running tasks are. `None` from a coordinator that predates the
    /// request (it answers with an error it cannot name better).
    pub async fn progress(
        &self,
        job: JobId,
    ) -> Result<Option<tasks::wire::JobProgress>, ClientError> {
        match self.call(SubmitBody::Progress { job }).await {
            Ok(SubmitResponse::Progress(p)) => Ok(Some(p)),
            Ok(other) => Err(Self::not_found(job, other)),
            // An older coordinator cannot decode the request and drops the stream.
            Err(ClientError::Frame(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The determinism class of a job, or of every job when `None`, in job id order. `None`
    /// from a coordinator that predates classes (all its jobs are `portable`).
    pub async fn classes(
        &self,
        job: Option<JobId>,
    ) -> Result<Option<Vec<(JobId, Determinism)>>, ClientError> {
        match self.call(SubmitBody::Classes { job }).await {
            Ok(SubmitResponse::Classes(v)) => Ok(Some(v)),
            Ok(other) => Err(match job {
                Some(j) => Self::not_found(j, other),
                None => ClientError::Unexpected(format!("{other:?}")),
            }),
            Err(ClientError::Frame(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One job's status, or all jobs' when `None`.
    pub async fn status(&self, job: Option<JobId>) -> Result<StatusReport, ClientError> {
        match self.call(SubmitBody::Status { job }).await? {
            SubmitResponse::Status(s) => Ok(s),
            other => Err(match job {
                Some(j) => Self::not_found(j, other),
                None => ClientError::Unexpected(format!("{other:?}")),
            }),
        }
    }

    /// A job's results with every accepted output filled in: inline ones checked against
    /// their hash, the others fetched from the coordinator over `peergrid/blob/1` (verified
    /// chunk by chunk). One request and one frame: a job of some ten thousand tasks
    /// overflows it; [`Client::results_page`] reads any job page by page.
    pub async fn results(&self, job: JobId) -> Result<JobResults, ClientError> {
        let mut results = match self.call(SubmitBody::Results { job }).await? {
            SubmitResponse::Results(r) => r,
            other => return Err(Self::not_found(job, other)),
        };
        let mut outputs = OutputFetcher::default();
        for t in &mut results.tasks {
            self.fill_output(t, &mut outputs).await?;
        }
        Ok(results)
    }

    /// Up to `max` task results of a job from index `first` on (the coordinator may send
    /// fewer, at least one unless `first` is past the end), outputs not filled in: see
    /// [`Client::fill_output`].
    pub async fn results_page(
        &self,
        job: JobId,
        first: u32,
        max: u32,
    ) -> Result<ResultsPage, ClientError> {
        match self
            .call(SubmitBody::ResultsPage { job, first, max })
            .await?
        {
            SubmitResponse::ResultsPage(p) => {
                let consecutive = p.tasks.iter().zip(first..).all(|(t, i)| t.index == i);
                if p.first != first.min(p.tasks_total)
                    || p.tasks.len() as u64 > u64::from(max.max(1))
                    || !consecutive
                    || (p.tasks.is_empty() && first < p.tasks_total)
                {
                    return Err(ClientError::Unexpected(format!(
                        "a results page from {first} holds {} tasks from {}",
                        p.tasks.len(),
                        p.first
                    )));
                }
                Ok(p)
            }
            other => Err(Self::not_found(job, other)),
        }
    }

    /// Fill in an accepted task's `output`: an inline one is checked against its hash, any
    /// other fetched from the coordinator over `peergrid/blob/1` (verified chunk by chunk)
    /// into `outputs`' temporary store. Leaves `output` empty (and returns false) when the
    /// coordinator is still collecting it from the agreeing workers; true otherwise.
    pub async fn fill_output(
        &self,
        t: &mut TaskResult,
        outputs: &mut OutputFetcher,
    ) -> Result<bool, ClientError> {
        if t.status != TaskState::Accepted {
            t.output = None;
            return Ok(true);
        }
        let (Some(hash), Some(len)) = (t.output_hash, t.output_len) else {
            return Ok(true);
        };
        if let Some(out) = &t.output {
            if BlobId::of(out) != hash || out.len() as u64 != len {
                return Err(ClientError::Verify {
                    index: t.index,
                    reason: "inline output does not match output_hash".into(),
                });
            }
            return Ok(true);
        }
        if len == 0 {
            t.output = Some(Vec::new());
            return Ok(true);
        }
        if outputs.store.is_none() {
            let dir = tempfile::tempdir().map_err(|e| ClientError::Io(e.to_string()))?;
            // Capped: a download of a large job keeps only recent outputs on disk.
            let bs = blobs::BlobStore::open(dir.path(), Some(OUTPUT_CACHE_BYTES))
                .map_err(|e| ClientError::Io(e.to_string()))?;
            let f = blobs::swarm::Fetcher::new(self.endpoint.clone(), bs.clone(), None);
            outputs.store = Some((dir, bs, f));
        }
        let (_, bs, fetcher) = outputs.store.as_ref().expect("created above");
        let seed = [PeerAddr {
            node_id: self.node_id,
            addr: self.addr,
        }];
        let blob = BlobRef {
            id: hash,
            size: len,
        };
        match fetcher.fetch(blob, &seed).await {
            Ok(_) => {}
            // Accepted, but the coordinator is still pulling the output from the agreeing
            // workers: leave `output` empty; ask again later.
            Err(FetchError::Unavailable {
                tried, not_found, ..
            }) if tried == not_found => return Ok(false),
            Err(e) => {
                return Err(ClientError::Fetch {
                    index: t.index,
                    reason: e.to_string(),
                })
            }
        }
        t.output = Some(bs.read(&hash).map_err(|e| ClientError::Fetch {
            index: t.index,
            reason: e.to_string(),
        })?);
        Ok(true)
    }

    /// Like [`Client::results`], but when the job has ended and some accepted outputs are still
    /// on their way from the workers to the coordinator, ask again (for up to `patience`) until
    /// every accepted task carries its output.
    pub async fn collect(
        &self,
        job: JobId,
        patience: std::time::Duration,
    ) -> Result<JobResults, ClientError> {
        let until = tokio::time::Instant::now() + patience;
        loop {
            let r = self.results(job).await?;
            let missing = r
                .tasks
                .iter()
                .any(|t| t.status == TaskState::Accepted && t.output.is_none());
            if !missing
                || r.state == tasks::wire::JobState::Running
                || tokio::time::Instant::now() >= until
            {
                return Ok(r);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Send a job's failed tasks back to pending with a fresh replica budget (accepted tasks
    /// are never touched; a job that had ended runs again). Returns how many went back.
    pub async fn retry(&self, job: JobId) -> Result<u32, ClientError> {
        match self.call(SubmitBody::Retry { job }).await? {
            SubmitResponse::Retried { tasks, .. } => Ok(tasks),
            other => Err(Self::not_found(job, other)),
        }
    }

    /// One page of the job's tasks that did not end `ok`, with their stderr (see
    /// [`SubmitBody::Failures`]).
    pub async fn failures_page(
        &self,
        job: JobId,
        after: Option<u32>,
        max: u32,
    ) -> Result<FailurePage, ClientError> {
        match self.call(SubmitBody::Failures { job, after, max }).await? {
            SubmitResponse::Failures(p) => Ok(p),
            other => Err(Self::not_found(job, other)),
        }
    }

    /// Every task of the job that did not end `ok`, with its stderr, page by page.
    pub async fn failures(&self, job: JobId) -> Result<Vec<TaskFailure>, ClientError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .failures_page(job, after, MAX_FAILURES_PER_PAGE)
                .await?;
            let last = page.failures.last().map(|f| f.index);
            all.extend(page.failures);
            match last {
                // An index must grow from page to page, or a hostile answer could loop us.
                Some(l) if page.more && after.is_none_or(|a| l > a) => after = Some(l),
                _ => return Ok(all),
            }
        }
    }

    /// Cancel a job: nothing more is scheduled, workers are told to stop.
    pub async fn cancel(&self, job: JobId) -> Result<(), ClientError> {
        match self.call(SubmitBody::Cancel { job }).await? {
            SubmitResponse::Ok => Ok(()),
            other => Err(Self::not_found(job, other)),
        }
    }

    /// Close the connection politely.
    pub async fn close(self) {
        net::close(&self.conn, tasks::wire::CloseCode::Done, "bye");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.endpoint.wait_idle())
            .await;
    }
}
