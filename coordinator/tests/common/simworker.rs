//! A simulated worker for the tests that drive a coordinator over real QUIC (`quic`, `http`,
//! `redteam`, `hostile`): it speaks `peergrid/coord/1` by hand and runs no wasm. Its "honest"
//! output and fuel for an assignment come from [`Options::output`] and [`Options::fuel`]; the
//! raw session streams are public so a test can also send garbage.
//!
//! How it behaves as a peer ([`Peer`]) matters to the coordinator: it dials back every
//! worker's observed address on `peergrid/blob/1`, and lists workers that answer first.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tasks::net;
use tasks::wire::{
    self, Assignment, CoordMsg, WorkerMsg, ALPN_BLOB, ALPN_COORD, INLINE_OUTPUT_MAX,
};
use tasks::{BlobId, EngineFingerprint, NodeId, NodeKey, RunResult, Status, Ticket};

/// A hang guard for every wait on the coordinator, not a speed claim: generous so a loaded
/// machine never trips it.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// What a simulated worker does on the peer side (`peergrid/blob/1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Announces its address and serves its blob store there and on its session connection,
    /// as the protocol asks (the coordinator collects outputs not sent inline that way): the
    /// coordinator's dial-back reaches it.
    Serve,
    /// Announces its address, and its endpoint speaks `peergrid/blob/1`, but it accepts no
    /// connection and serves nothing: the dial-back never completes (not directly reachable).
    Silent,
    /// No peer side: announces no address, and its endpoint speaks no ALPN of its own.
    None,
}

/// How a [`SimWorker`] introduces itself and what it reports.
#[derive(Clone)]
pub struct Options {
    pub key: NodeKey,
    /// `agent` of its Hello.
    pub agent: String,
    pub fingerprint: EngineFingerprint,
    /// `slots` of its Hello.
    pub slots: u32,
    /// Blobs its Hello announces it holds.
    pub blobs: Vec<BlobId>,
    pub peer: Peer,
    /// Its honest output for an assignment ([`SimWorker::report`]).
    pub output: fn(&Assignment) -> Vec<u8>,
    /// The fuel it claims for one.
    pub fuel: fn(&Assignment) -> u64,
    /// Local address its endpoint binds; `None`: 127.0.0.1, any port. (Linux routes all of
    /// 127.0.0.0/8 to the loopback interface, so a test can give each worker an address of
    /// its own.)
    pub bind: Option<SocketAddr>,
    /// Bind inside this network namespace (a [`netsim`] host's `ns`): the worker is then
    /// that host, reached over the lab's network. `bind` defaults to 0.0.0.0:0 there.
    pub netns: Option<String>,
    /// Name a native engine (`WorkerMsg::Engines`: its hello's engine and architecture with
    /// this release's native settings) to a coordinator that runs both determinism classes,
    /// as a real worker does; without it, it gets no replica of a `native` job.
    pub native: bool,
}

impl Default for Options {
    /// A fresh key, agent `sim`, engine `wasmtime test`, 4 slots, no blobs, serving its
    /// blobs, [`output_for`] and [`fuel_for`], bound to 127.0.0.1.
    fn default() -> Options {
        Options {
            key: NodeKey::generate(),
            agent: "sim".into(),
            fingerprint: fingerprint("wasmtime test"),
            slots: 4,
            blobs: vec![],
            peer: Peer::Serve,
            output: output_for,
            fuel: fuel_for,
            bind: None,
            netns: None,
            native: true,
        }
    }
}

/// This release's engine fingerprint (this machine's architecture and baseline, portable
/// settings): the one `coordinator serve` admits by default (`tasks::release`).
pub fn release_fingerprint() -> EngineFingerprint {
    EngineFingerprint {
        engine: tasks::release::ENGINE.into(),
        arch: tasks::release::native_arch(),
        settings: tasks::release::settings(true),
    }
}

/// An engine fingerprint with this engine name (this machine's architecture and baseline,
/// settings `det`).
pub fn fingerprint(engine: &str) -> EngineFingerprint {
    EngineFingerprint {
        engine: engine.into(),
        arch: tasks::release::native_arch(),
        settings: "det".into(),
    }
}

/// The default honest output of a task: `out of <args>\n`, or, when its first argument is
/// `big`, some 5 × [`INLINE_OUTPUT_MAX`] bytes (too large to travel inline: reported as a
/// blob).
pub fn output_for(a: &Assignment) -> Vec<u8> {
    if a.task.args.first().map(String::as_str) == Some("big") {
        (0..(INLINE_OUTPUT_MAX as usize * 5 + 123))
            .map(|i| (i % 251) as u8)
            .collect()
    } else {
        format!("out of {}\n", a.task.args.join(" ")).into_bytes()
    }
}

/// The default fuel claimed for a task: 1 000 000 + its index.
pub fn fuel_for(a: &Assignment) -> u64 {
    1_000_000 + a.task.id.index as u64
}

/// A successful run that produced `out` using `fuel`.
pub fn result_of(out: &[u8], fuel: u64) -> RunResult {
    RunResult {
        status: Status::Ok,
        exit_code: 0,
        trap: String::new(),
        fuel_used: fuel,
        output_hash: BlobId::of(out),
        output_len: out.len() as u64,
    }
}

/// A worker speaking `peergrid/coord/1` by hand over one session.
pub struct SimWorker {
    pub key: NodeKey,
    _ep: quinn::Endpoint,
    /// The session connection (e.g. to wait for the coordinator to close it).
    pub conn: quinn::Connection,
    /// The session stream: write raw bytes here to bypass the framing.
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// Its blob store: outputs too large to send inline go here (served with [`Peer::Serve`]).
    pub blobs: blobs::BlobStore,
    _dir: tempfile::TempDir,
    /// Replicas the coordinator cancelled, remembered by [`SimWorker::recv`].
    pub cancels: Vec<u64>,
    /// `Room` messages (a vote of ours was decided after we were refused at a full hand: ask
    /// again now) seen by [`SimWorker::recv`].
    pub rooms: u64,
    output: fn(&Assignment) -> Vec<u8>,
    fuel: fn(&Assignment) -> u64,
}

impl SimWorker {
    /// Join with the default [`Options`].
    pub async fn join(ticket: &Ticket) -> anyhow::Result<SimWorker> {
        Self::join_with(ticket, Options::default()).await
    }

    /// Join with the default [`Options`] under `key` (e.g. to come back as the same worker).
    pub async fn join_as(key: NodeKey, ticket: &Ticket) -> anyhow::Result<SimWorker> {
        Self::join_with(
            ticket,
            Options {
                key,
                ..Options::default()
            },
        )
        .await
    }

    /// Connect, say Hello and wait for the Welcome.
    pub async fn join_with(ticket: &Ticket, o: Options) -> anyhow::Result<SimWorker> {
        let dir = tempfile::tempdir()?;
        let blobs = blobs::BlobStore::open(dir.path(), None)?;
        let alpns: &[&[u8]] = match o.peer {
            Peer::Serve | Peer::Silent => &[ALPN_BLOB],
            Peer::None => &[],
        };
        let ep = match &o.netns {
            Some(ns) => {
                let bind = o.bind.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                net::endpoint_on_socket(&o.key, super::netns::udp_in(ns, bind)?, alpns)?
            }
            None => {
                let bind = o.bind.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
                net::endpoint(&o.key, bind, alpns)?
            }
        };
        let server = blobs::swarm::BlobServer::new(blobs.clone(), Default::default());
        if o.peer == Peer::Serve {
            let accept = ep.clone();
            let server = server.clone();
            tokio::spawn(async move {
                while let Some(inc) = accept.accept().await {
                    let server = server.clone();
                    tokio::spawn(async move {
                        if let Ok(c) = inc.await {
                            server.serve_connection(c).await;
                        }
                    });
                }
            });
        }
        let addr = ticket.socket_addrs()?[0];
        let conn = net::connect(&ep, addr, ticket.node_id, ALPN_COORD).await?;
        if o.peer == Peer::Serve {
            let c = conn.clone();
            tokio::spawn(async move { server.serve_connection(c).await });
        }
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = WorkerMsg::Hello {
            agent: o.agent,
            fingerprint: o.fingerprint.clone(),
            slots: o.slots,
            peer_addr: match o.peer {
                Peer::Serve | Peer::Silent => Some(ep.local_addr()?),
                Peer::None => None,
            },
            blobs: o.blobs,
        };
        net::write_frame(&mut send, &hello).await?;
        let welcome: CoordMsg = tokio::time::timeout(PATIENCE, net::read_frame(&mut recv))
            .await
            .context("timed out waiting for the Welcome")??
            .context("no welcome")?;
        let CoordMsg::Welcome { agent, .. } = welcome else {
            anyhow::bail!("expected Welcome, got {welcome:?}");
        };
        if o.native && wire::has_capability(&agent, wire::CAP_CLASSES) {
            let native = EngineFingerprint {
                settings: tasks::release::settings(false),
                ..o.fingerprint.clone()
            };
            net::write_frame(&mut send, &WorkerMsg::Engines { native }).await?;
        }
        Ok(SimWorker {
            key: o.key,
            _ep: ep,
            conn,
            send,
            recv,
            blobs,
            _dir: dir,
            cancels: vec![],
            rooms: 0,
            output: o.output,
            fuel: o.fuel,
        })
    }

    pub fn id(&self) -> NodeId {
        self.key.node_id()
    }

    pub async fn send(&mut self, msg: &WorkerMsg) -> anyhow::Result<()> {
        net::write_frame(&mut self.send, msg).await?;
        Ok(())
    }

    /// The next answer, skipping unsolicited messages (cancels are remembered in
    /// `cancels`, `Room` counted in `rooms`; news about our address and dial orders are
    /// dropped). An `AssignClass` comes back as an `Assign` (the class dropped: a simulated
    /// worker runs nothing).
    pub async fn recv(&mut self) -> anyhow::Result<CoordMsg> {
        loop {
            let m: CoordMsg = tokio::time::timeout(PATIENCE, net::read_frame(&mut self.recv))
                .await
                .context("timed out waiting for the coordinator")??
                .context("stream ended")?;
            match m {
                CoordMsg::Cancel { replicas } => self.cancels.extend(replicas),
                CoordMsg::Room => self.rooms += 1,
                CoordMsg::Reachability { .. } | CoordMsg::Punch { .. } => {}
                CoordMsg::AssignClass {
                    assignments,
                    retry_after_ms,
                } => {
                    return Ok(CoordMsg::Assign {
                        assignments: assignments.into_iter().map(|a| a.assignment).collect(),
                        retry_after_ms,
                    })
                }
                other => return Ok(other),
            }
        }
    }

    /// Ask for up to `max` assignments.
    pub async fn request(&mut self, max: u32) -> anyhow::Result<Vec<Assignment>> {
        self.send(&WorkerMsg::RequestWork { max }).await?;
        match self.recv().await? {
            CoordMsg::Assign { assignments, .. } => Ok(assignments),
            other => anyhow::bail!("expected Assign, got {other:?}"),
        }
    }

    /// Report `result` for `replica`, with `output` inline or not; the coordinator's answer.
    pub async fn report_raw(
        &mut self,
        replica: u64,
        result: RunResult,
        output: Option<Vec<u8>>,
    ) -> anyhow::Result<CoordMsg> {
        self.send(&WorkerMsg::Report(wire::Report {
            replica,
            result,
            output,
            wall_ms: 1,
        }))
        .await?;
        self.recv().await
    }

    /// Report a successful run of `replica` that output `out` using `fuel`: inline when small
    /// enough, otherwise stored as a blob for the coordinator to fetch.
    pub async fn report_output(
        &mut self,
        replica: u64,
        out: Vec<u8>,
        fuel: u64,
    ) -> anyhow::Result<CoordMsg> {
        let result = result_of(&out, fuel);
        let inline = if out.len() as u64 <= INLINE_OUTPUT_MAX {
            Some(out)
        } else {
            self.blobs.put(&out)?;
            None
        };
        self.report_raw(replica, result, inline).await
    }

    /// Run an assignment honestly ([`Options::output`], [`Options::fuel`]) and report it.
    pub async fn report(&mut self, a: &Assignment) -> anyhow::Result<CoordMsg> {
        let (out, fuel) = ((self.output)(a), (self.fuel)(a));
        self.report_output(a.replica, out, fuel).await
    }

    /// Ask for up to `max` assignments and report each honestly; every report must be
    /// acknowledged.
    pub async fn work(&mut self, max: u32) -> anyhow::Result<Vec<Assignment>> {
        let assignments = self.request(max).await?;
        for a in &assignments {
            let ack = self.report(a).await?;
            anyhow::ensure!(
                matches!(ack, CoordMsg::Ack { .. }),
                "expected Ack, got {ack:?}"
            );
        }
        Ok(assignments)
    }
}
