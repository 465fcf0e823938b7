//! Entering a [`netsim`] host's network namespace from inside a test process: a socket bound
//! there, or a whole tokio runtime living there. `setns(2)` changes only the calling
//! thread's namespace (and that of the threads it starts later), so each helper does it on a
//! thread of its own and the test's other threads are untouched. Root only, like the labs.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use anyhow::Context;

/// Move the calling thread into the network namespace `ns` (an `ip netns` name).
fn enter(ns: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    anyhow::ensure!(
        rc == 0,
        "setns into {ns}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A UDP socket bound to `addr` inside the namespace `ns`; it stays there wherever it is
/// used from (non-blocking, ready for quinn).
pub fn udp_in(ns: &str, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let ns = ns.to_string();
    std::thread::spawn(move || -> anyhow::Result<UdpSocket> {
        enter(&ns)?;
        let s = UdpSocket::bind(addr).with_context(|| format!("binding {addr} in {ns}"))?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread binding a socket in a namespace panicked"))?
}

/// Run `f` on a new thread inside the namespace `ns`: sockets it binds, and those of any
/// runtime it builds (its threads inherit the namespace), belong to that host.
pub fn run_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the test thread in namespace panicked"))?
}
