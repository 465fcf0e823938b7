//! The guest's world (docs/guest-abi.md) on WASI preview 1: stdin is the input, argv
//! the task's, stdout captured up to the cap, stderr captured for diagnostics; no
//! environment, no preopened directories, no network; fixed clocks; a `random_get` stream
//! derived from the task's seed; `poll_oneoff` in virtual time (every timer has already
//! expired, every stream is ready), so `sleep` neither waits nor depends on the host.
//!
//! # Bounded host work
//! Every host call that copies guest-sized data is ours, not wasmtime-wasi's: `random_get`,
//! `fd_write`, `fd_read`, `args_get`/`args_sizes_get`, `poll_oneoff` and `path_open`. Each
//! one checks the guest's pointers and lengths against the guest's own memory *before* doing
//! any work (a length beyond it traps, like any out-of-bounds pointer: `trap`/`host error`),
//! never allocates host memory proportional to a guest-chosen length (it works in place in
//! guest memory, or in pieces of at most [`HOST_CHUNK`] bytes), and charges fuel for the
//! work: [`FUEL_PER_HOST_BYTE`] per byte produced or copied and [`FUEL_PER_IOVEC`] per
//! iovec inspected. A guest that cannot pay stops with `out_of_fuel` before the work is done.
//! (wasmtime-wasi's own `random_get` allocates the requested length, up to its 64 MiB
//! `max_random_size` default in wasmtime-wasi 48, before checking the guest pointer, and charges
//! no fuel for it; its `path_open` copies the path before looking at the directory fd.)

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Caller, Engine, Extern, Linker, Memory, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, Rng, WasiCtxBuilder};

use super::engine::YIELD_FUEL;
use super::run::StoreState;
use super::RunSpec;

/// The guest's wall clock: 2026-01-01T00:00:00Z, forever.
pub const WALL_CLOCK_SECS: u64 = 1_767_225_600;
/// The guest's monotonic clock, in nanoseconds, forever.
pub const MONOTONIC_NANOS: u64 = 1_000_000_000;
/// Fuel charged per `poll_oneoff` subscription (host work must cost the guest something).
const POLL_FUEL_PER_SUBSCRIPTION: u64 = 100;
/// Fuel charged per byte a host call produces or copies (`random_get`, `fd_write`,
/// `fd_read`, `args_get`).
pub const FUEL_PER_HOST_BYTE: u64 = 1;
/// Fuel charged per iovec a host call inspects (`fd_write`, `fd_read`).
pub const FUEL_PER_IOVEC: u64 = 10;
/// Fuel charged for any of our host calls, whatever it does.
pub const FUEL_PER_HOST_CALL: u64 = 10;
/// The largest piece a host call produces at once (`random_get` fills guest memory in
/// pieces of this size; nothing is ever allocated for the whole requested length).
pub const HOST_CHUNK: usize = 64 * 1024;

const WASI: &str = "wasi_snapshot_preview1";

/// Define host call `$f` (a sync function of a `Caller` and the listed parameters) as an
/// async host call that first yields if due (see [`yield_if_due`]).
macro_rules! yielding {
    ($linker:ident, $module:expr, $name:expr, $f:ident ($($a:ident: $t:ty),*)) => {
        $linker.func_wrap_async(
            $module,
            $name,
            |mut caller: Caller<'_, StoreState>, ($($a,)*): ($($t,)*)| {
                Box::new(async move {
                    $crate::sandbox::wasi::yield_if_due(&mut caller).await;
                    $f(caller, $($a),*)
                })
            },
        )?
    };
}
pub(super) use yielding;

/// Yield to the run's thread if the guest has used [`YIELD_FUEL`] or more since the last
/// yield this knows of. Host calls that charge fuel (`charge`) set the store's fuel, which
/// hands wasm a fresh yield interval, so a guest that calls them in a loop might never
/// reach the yield its wasm code would; this one keeps such a guest pausable and
/// cancellable. Where it yields changes nothing the guest sees, nor its fuel.
pub(super) async fn yield_if_due(caller: &mut Caller<'_, StoreState>) {
    let Ok(now) = caller.get_fuel() else { return };
    let at_yield = &mut caller.data_mut().fuel_at_yield;
    if at_yield.saturating_sub(now) >= YIELD_FUEL {
        *at_yield = now;
        YieldOnce(false).await;
    }
}

/// A future that is pending once (waking itself) and then ready: a yield to whoever polls
/// the guest (`run::drive`).
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The linker every module is linked against: WASI preview 1 (sync), with the calls that
/// copy guest-sized data (and `poll_oneoff`, in virtual time) replaced by ours, and the
/// checkpoint API ([`super::checkpoint`], import module `peergrid`).
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<StoreState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut StoreState| &mut s.wasi)?;
    linker.allow_shadowing(true);
    yielding!(linker, WASI, "poll_oneoff", poll_oneoff(a: i32, b: i32, c: i32, d: i32));
    yielding!(linker, WASI, "random_get", random_get(a: i32, b: i32));
    yielding!(linker, WASI, "fd_write", fd_write(a: i32, b: i32, c: i32, d: i32));
    yielding!(linker, WASI, "fd_read", fd_read(a: i32, b: i32, c: i32, d: i32));
    yielding!(linker, WASI, "args_get", args_get(a: i32, b: i32));
    yielding!(linker, WASI, "args_sizes_get", args_sizes_get(a: i32, b: i32));
    #[rustfmt::skip]
    yielding!(linker, WASI, "path_open", path_open(
        a: i32, b: i32, c: i32, d: i32, e: i32, f: i64, g: i64, h: i32, i: i32
    ));
    linker.allow_shadowing(false);
    super::checkpoint::add_to_linker(&mut linker)?;
    Ok(linker)
}

/// What our own host calls serve: stdin, argv, stdout/stderr and the `random_get` stream.
pub struct GuestIo {
    stdin: Vec<u8>,
    stdin_pos: usize,
    /// Each argument with its terminating NUL.
    args: Vec<Vec<u8>>,
    stdout: CappedPipe,
    stderr: CappedPipe,
    random: XofRng,
}

/// The guest I/O of one run.
pub fn guest_io(spec: &RunSpec, stdout: &CappedPipe, stderr: &CappedPipe) -> GuestIo {
    GuestIo {
        stdin: spec.input.clone(),
        stdin_pos: 0,
        args: spec
            .argv
            .iter()
            .map(|a| {
                let mut v = a.as_bytes().to_vec();
                v.push(0);
                v
            })
            .collect(),
        stdout: stdout.clone(),
        stderr: stderr.clone(),
        random: XofRng::new(&spec.seed, "random_get"),
    }
}

/// The WASI context of one run (what our own calls do not cover: fd_fdstat_get, clocks,
/// proc_exit, ...). Stdin is served by [`GuestIo`]; the context's stdin is empty.
pub fn context(spec: &RunSpec, stdout: &CappedPipe, stderr: &CappedPipe) -> WasiP1Ctx {
    let insecure_seed = {
        let mut r = XofRng::new(&spec.seed, "insecure-seed");
        (r.next_u64() as u128) << 64 | r.next_u64() as u128
    };
    WasiCtxBuilder::new()
        .args(&spec.argv)
        .stdin(MemoryInputPipe::new(Bytes::new()))
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

// wasmtime-wasi takes a `rand_core` 0.10 `Rng`, which every infallible `TryRng` is.
impl rand_core::TryRng for XofRng {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0; 4];
        self.0.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0; 8];
        self.0.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill(dest);
        Ok(())
    }
}

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const IOVEC_SIZE: usize = 8;

/// Raised by a host call given a pointer or length outside the guest's memory (or a
/// misaligned one): WASI says such a call traps.
#[derive(Debug, thiserror::Error)]
#[error("{0}: pointer out of bounds or misaligned")]
pub struct BadPointer(&'static str);

/// Take `fuel` from the guest before doing the work it pays for; a guest that cannot pay
/// stops with `out_of_fuel` (its whole budget used) and the work is not done.
pub(super) fn charge(caller: &mut Caller<'_, StoreState>, fuel: u64) -> wasmtime::Result<()> {
    let have = caller.get_fuel()?;
    if have < fuel {
        caller.set_fuel(0)?;
        return Err(Trap::OutOfFuel.into());
    }
    caller.set_fuel(have - fuel)?;
    Ok(())
}

pub(super) fn guest_memory(
    caller: &mut Caller<'_, StoreState>,
    call: &'static str,
) -> wasmtime::Result<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(wasmtime::format_err!(
            "{call}: the module exports no memory"
        )),
    }
}

/// `[ptr, ptr + len)` if it lies inside a guest memory of `mem_len` bytes and `ptr` is
/// `align`-aligned.
pub(super) fn span(
    call: &'static str,
    mem_len: usize,
    ptr: i32,
    len: usize,
    align: usize,
) -> Result<std::ops::Range<usize>, BadPointer> {
    let at = ptr as u32 as usize;
    match at.checked_add(len) {
        Some(end) if end <= mem_len && at.is_multiple_of(align) => Ok(at..end),
        _ => Err(BadPointer(call)),
    }
}

fn read_u32(mem: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(mem[at..at + 4].try_into().expect("4 bytes"))
}

/// The first non-empty buffer of an iovec array (what WASI preview 1 reads or writes; an
/// all-empty array gives an empty buffer), and how many iovecs were inspected. Traps on an
/// array outside guest memory; the caller checks the part of the buffer it uses.
fn first_iovec(
    call: &'static str,
    mem: &[u8],
    iovs: i32,
    iovs_len: i32,
) -> Result<((usize, usize), u64), BadPointer> {
    let n = iovs_len as u32 as usize;
    let array = span(call, mem.len(), iovs, n.saturating_mul(IOVEC_SIZE), 4)?;
    for i in 0..n {
        let at = array.start + i * IOVEC_SIZE;
        let (buf, len) = (read_u32(mem, at) as usize, read_u32(mem, at + 4) as usize);
        if len != 0 {
            return Ok(((buf, len), i as u64 + 1));
        }
    }
    Ok(((0, 0), n as u64))
}

/// `random_get(buf, len)`: `len` bytes of the task's seeded stream, written in place.
fn random_get(mut caller: Caller<'_, StoreState>, buf: i32, len: i32) -> wasmtime::Result<i32> {
    const CALL: &str = "random_get";
    let memory = guest_memory(&mut caller, CALL)?;
    let len = len as u32 as usize;
    // Bounds first: a length beyond guest memory is refused before any work or charge.
    let range = span(CALL, memory.data_size(&caller), buf, len, 1)?;
    charge(
        &mut caller,
        FUEL_PER_HOST_CALL.saturating_add(FUEL_PER_HOST_BYTE.saturating_mul(len as u64)),
    )?;
    let (mem, state) = memory.data_and_store_mut(&mut caller);
    for piece in mem[range].chunks_mut(HOST_CHUNK) {
        state.io.random.fill_bytes(piece);
    }
    Ok(ERRNO_SUCCESS)
}

/// `fd_write(fd, iovs, iovs_len, nwritten)` on stdout (1) and stderr (2); any other fd is
/// `EBADF` (there are no files or sockets). Writes the first non-empty iovec, as
/// wasmtime-wasi does.
fn fd_write(
    mut caller: Caller<'_, StoreState>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    const CALL: &str = "fd_write";
    charge(&mut caller, FUEL_PER_HOST_CALL)?;
    let pipe = match fd {
        1 => caller.data().io.stdout.clone(),
        2 => caller.data().io.stderr.clone(),
        _ => return Ok(ERRNO_BADF),
    };
    let memory = guest_memory(&mut caller, CALL)?;
    let mem = memory.data(&caller);
    let ((buf, len), inspected) = first_iovec(CALL, mem, iovs, iovs_len)?;
    let bytes = span(CALL, mem.len(), buf as i32, len, 1)?;
    let out = span(CALL, mem.len(), nwritten, 4, 4)?;
    charge(
        &mut caller,
        FUEL_PER_IOVEC
            .saturating_mul(inspected)
            .saturating_add(FUEL_PER_HOST_BYTE.saturating_mul(len as u64)),
    )?;
    let mem = memory.data_mut(&mut caller);
    // The pipe copies at most its remaining room (stdout: the write that crosses the cap
    // stops the guest; stderr: the excess is dropped).
    pipe.push(&mem[bytes])?;
    mem[out].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(ERRNO_SUCCESS)
}

/// `fd_read(fd, iovs, iovs_len, nread)` on stdin (0); any other fd is `EBADF`. Reads into
/// the first non-empty iovec, as wasmtime-wasi does; 0 bytes at the end of the input.
fn fd_read(
    mut caller: Caller<'_, StoreState>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nread: i32,
) -> wasmtime::Result<i32> {
    const CALL: &str = "fd_read";
    charge(&mut caller, FUEL_PER_HOST_CALL)?;
    if fd != 0 {
        return Ok(ERRNO_BADF);
    }
    let memory = guest_memory(&mut caller, CALL)?;
    let mem = memory.data(&caller);
    let ((buf, len), inspected) = first_iovec(CALL, mem, iovs, iovs_len)?;
    let io = &caller.data().io;
    let n = len.min(io.stdin.len() - io.stdin_pos);
    // Only the part actually filled must be inside memory.
    let dest = span(CALL, mem.len(), buf as i32, n, 1)?;
    let out = span(CALL, mem.len(), nread, 4, 4)?;
    charge(
        &mut caller,
        FUEL_PER_IOVEC
            .saturating_mul(inspected)
            .saturating_add(FUEL_PER_HOST_BYTE.saturating_mul(n as u64)),
    )?;
    let (mem, state) = memory.data_and_store_mut(&mut caller);
    let io = &mut state.io;
    mem[dest].copy_from_slice(&io.stdin[io.stdin_pos..io.stdin_pos + n]);
    io.stdin_pos += n;
    mem[out].copy_from_slice(&(n as u32).to_le_bytes());
    Ok(ERRNO_SUCCESS)
}

/// `args_sizes_get(argc, argv_buf_size)`.
fn args_sizes_get(
    mut caller: Caller<'_, StoreState>,
    argc: i32,
    size: i32,
) -> wasmtime::Result<i32> {
    const CALL: &str = "args_sizes_get";
    charge(&mut caller, FUEL_PER_HOST_CALL)?;
    let memory = guest_memory(&mut caller, CALL)?;
    let (mem, state) = memory.data_and_store_mut(&mut caller);
    let count = state.io.args.len() as u32;
    let bytes: usize = state.io.args.iter().map(Vec::len).sum();
    let (a, s) = (
        span(CALL, mem.len(), argc, 4, 4)?,
        span(CALL, mem.len(), size, 4, 4)?,
    );
    mem[a].copy_from_slice(&count.to_le_bytes());
    mem[s].copy_from_slice(&(bytes as u32).to_le_bytes());
    Ok(ERRNO_SUCCESS)
}

/// `args_get(argv, argv_buf)`: the pointer array and the NUL-terminated arguments.
fn args_get(mut caller: Caller<'_, StoreState>, argv: i32, argv_buf: i32) -> wasmtime::Result<i32> {
    const CALL: &str = "args_get";
    let memory = guest_memory(&mut caller, CALL)?;
    let io = &caller.data().io;
    let bytes: usize = io.args.iter().map(Vec::len).sum();
    let count = io.args.len();
    let mem_len = memory.data_size(&caller);
    let ptrs = span(CALL, mem_len, argv, count * 4, 4)?;
    let buf = span(CALL, mem_len, argv_buf, bytes, 1)?;
    charge(
        &mut caller,
        FUEL_PER_HOST_CALL
            .saturating_add(FUEL_PER_HOST_BYTE.saturating_mul((bytes + 4 * count) as u64)),
    )?;
    let (mem, state) = memory.data_and_store_mut(&mut caller);
    let (mut p, mut b) = (ptrs.start, buf.start);
    for arg in &state.io.args {
        mem[p..p + 4].copy_from_slice(&(b as u32).to_le_bytes());
        mem[b..b + arg.len()].copy_from_slice(arg);
        p += 4;
        b += arg.len();
    }
    Ok(ERRNO_SUCCESS)
}

/// `path_open(...)`: there are no preopened directories, so every directory fd is bad. The
/// path is never read (wasmtime-wasi copies it, whatever its length, before checking the fd).
#[allow(clippy::too_many_arguments)]
fn path_open(
    mut caller: Caller<'_, StoreState>,
    _dirfd: i32,
    _dirflags: i32,
    _path: i32,
    _path_len: i32,
    _oflags: i32,
    _rights_base: i64,
    _rights_inheriting: i64,
    _fdflags: i32,
    _fd_out: i32,
) -> wasmtime::Result<i32> {
    charge(&mut caller, FUEL_PER_HOST_CALL)?;
    Ok(ERRNO_BADF)
}
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
) -> wasmtime::Result<i32> {
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return Ok(ERRNO_FAULT);
    };
    let n = nsubs as u32 as usize;
    if n == 0 {
        return Ok(ERRNO_INVAL);
    }
    charge(
        &mut caller,
        POLL_FUEL_PER_SUBSCRIPTION.saturating_mul(n as u64),
    )?;
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
