//! The guest's world (README.md, "Writing a task") on WASI preview 1: stdin is the input, argv
//! the task's, stdout captured up to the cap, stderr captured for diagnostics; no
//! environment, no preopened directories, no network; fixed clocks; a `random_get` stream
//! derived from the task's seed; `poll_oneoff` in virtual time (every timer has already
//! expired, every stream is ready), so `sleep` neither waits nor depends on the host.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Caller, Engine, Extern, Linker};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, RngCore, WasiCtxBuilder};

use super::run::StoreState;
use super::RunSpec;

/// The guest's wall clock: 2026-01-01T00:00:00Z, forever.
pub const WALL_CLOCK_SECS: u64 = 1_767_225_600;
/// The guest's monotonic clock, in nanoseconds, forever.
pub const MONOTONIC_NANOS: u64 = 1_000_000_000;
/// Fuel charged per `poll_oneoff` subscription (host work must cost the guest something).
const POLL_FUEL_PER_SUBSCRIPTION: u64 = 100;

/// The linker every module is linked against: WASI preview 1 (sync), with `poll_oneoff`
/// replaced by the virtual-time version.
pub fn linker(engine: &Engine) -> anyhow::Result<Linker<StoreState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut StoreState| &mut s.wasi)?;
    linker.allow_shadowing(true);
    linker.func_wrap("wasi_snapshot_preview1", "poll_oneoff", poll_oneoff)?;
    linker.allow_shadowing(false);
    Ok(linker)
}

/// The WASI context of one run.
pub fn context(spec: &RunSpec, stdout: &CappedPipe, stderr: &CappedPipe) -> WasiP1Ctx {
    let insecure_seed = {
        let mut r = XofRng::new(&spec.seed, "insecure-seed");
        (r.next_u64() as u128) << 64 | r.next_u64() as u128
    };
    WasiCtxBuilder::new()
        .args(&spec.argv)
        .stdin(MemoryInputPipe::new(Bytes::from(spec.input.clone())))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .wall_clock(FixedWallClock)
        .monotonic_clock(FixedMonotonicClock)
        .secure_random(XofRng::new(&spec.seed, "secure"))
        .insecure_random(XofRng::new(&spec.seed, "insecure"))
        .insecure_random_seed(insecure_seed)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build_p1()
}

/// Raised (as a host trap) by the write that crosses the stdout cap.
#[derive(Debug, thiserror::Error)]
#[error("output limit exceeded")]
pub struct OutputLimitExceeded;

/// An in-memory stdout/stderr that keeps at most `cap` bytes. Past the cap it either stops
/// the guest (stdout: the result must not depend on what we cut) or drops the excess (stderr).
#[derive(Clone)]
pub struct CappedPipe {
    state: Arc<Mutex<PipeState>>,
}

struct PipeState {
    buf: Vec<u8>,
    cap: usize,
    overflowed: bool,
    trap_on_overflow: bool,
}

impl CappedPipe {
    /// Stops the guest on overflow.
    pub fn trapping(cap: usize) -> CappedPipe {
        CappedPipe::new(cap, true)
    }

    /// Silently drops what does not fit.
    pub fn truncating(cap: usize) -> CappedPipe {
        CappedPipe::new(cap, false)
    }

    fn new(cap: usize, trap_on_overflow: bool) -> CappedPipe {
        CappedPipe {
            state: Arc::new(Mutex::new(PipeState {
                buf: Vec::new(),
                cap,
                overflowed: false,
                trap_on_overflow,
            })),
        }
    }

    /// Whether the guest tried to write past the cap.
    pub fn overflowed(&self) -> bool {
        self.state.lock().expect("pipe lock poisoned").overflowed
    }

    /// The captured bytes.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.state.lock().expect("pipe lock poisoned").buf)
    }

    fn push(&self, bytes: &[u8]) -> Result<(), OutputLimitExceeded> {
        let mut s = self.state.lock().expect("pipe lock poisoned");
        let room = s.cap - s.buf.len();
        if bytes.len() <= room {
            s.buf.extend_from_slice(bytes);
            return Ok(());
        }
        s.buf.extend_from_slice(&bytes[..room]);
        s.overflowed = true;
        if s.trap_on_overflow {
            Err(OutputLimitExceeded)
        } else {
            Ok(())
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes).map_err(|e| StreamError::Trap(e.into()))
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always accept a write: one that crosses the cap is where the guest stops.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(
            self.push(buf)
                .map(|()| buf.len())
                .map_err(std::io::Error::other),
        )
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

struct FixedWallClock;

impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        Duration::from_secs(WALL_CLOCK_SECS)
    }
}

struct FixedMonotonicClock;

impl HostMonotonicClock for FixedMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        MONOTONIC_NANOS
    }
}

/// A deterministic random stream: the blake3 XOF keyed by the task's seed.
pub struct XofRng(blake3::OutputReader);

impl XofRng {
    pub fn new(seed: &[u8; 32], stream: &str) -> XofRng {
        let mut h = blake3::Hasher::new_keyed(seed);
        h.update(b"peergrid random_get v1 ");
        h.update(stream.as_bytes());
        XofRng(h.finalize_xof())
    }
}

impl RngCore for XofRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.0.fill(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.0.fill(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill(dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.0.fill(dest);
        Ok(())
    }
}

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const SUBSCRIPTION_SIZE: usize = 48;
const EVENT_SIZE: usize = 32;

/// `poll_oneoff(in, out, nsubscriptions, nevents_ptr)` in virtual time: every subscription
/// fires at once (clocks have expired, stdin/stdout are ready).
fn poll_oneoff(
    mut caller: Caller<'_, StoreState>,
    subs: i32,
    events: i32,
    nsubs: i32,
    nevents_ptr: i32,
) -> anyhow::Result<i32> {
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return Ok(ERRNO_FAULT);
    };
    let n = nsubs as u32 as usize;
    if n == 0 {
        return Ok(ERRNO_INVAL);
    }
    let fuel = caller.get_fuel()?;
    caller.set_fuel(fuel.saturating_sub(POLL_FUEL_PER_SUBSCRIPTION.saturating_mul(n as u64)))?;
    let mem = memory.data_mut(&mut caller);
    let (subs, events, nevents_ptr) = (
        subs as u32 as usize,
        events as u32 as usize,
        nevents_ptr as u32 as usize,
    );
    let in_bounds = |at: usize, len: usize| at.checked_add(len).is_some_and(|end| end <= mem.len());
    if !in_bounds(subs, n.saturating_mul(SUBSCRIPTION_SIZE))
        || !in_bounds(events, n.saturating_mul(EVENT_SIZE))
        || !in_bounds(nevents_ptr, 4)
    {
        return Ok(ERRNO_FAULT);
    }
    for i in 0..n {
        let s = subs + i * SUBSCRIPTION_SIZE;
        let mut userdata = [0u8; 8];
        userdata.copy_from_slice(&mem[s..s + 8]);
        let tag = mem[s + 8];
        let e = events + i * EVENT_SIZE;
        let ev = &mut mem[e..e + EVENT_SIZE];
        ev.fill(0);
        ev[..8].copy_from_slice(&userdata);
        // error = 0 (u16 at 8), type = the subscription's tag (u8 at 10),
        // fd_readwrite.nbytes = 0, flags = 0.
        ev[10] = tag;
    }
    mem[nevents_ptr..nevents_ptr + 4].copy_from_slice(&(n as u32).to_le_bytes());
    Ok(ERRNO_SUCCESS)
}
