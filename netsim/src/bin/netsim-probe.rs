//! `netsim-probe`: a tiny UDP probe for the lab's tests, run inside a host with
//! `ip netns exec`.
//!
//! - `netsim-probe serve ADDR` binds ADDR, prints `listening <addr>`, and answers every
//!   datagram with the source address it came from (`<ip>:<port>`), until killed.
//! - `netsim-probe ask ADDR [TIMEOUT_MS] [LOCAL_PORT]` sends a datagram to ADDR every 100 ms
//!   from LOCAL_PORT (default: any) until an answer comes, prints it (the address the server
//!   saw us as) and exits 0; exits 1 after TIMEOUT_MS (default 5000) without one.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("serve") if args.len() == 2 => serve(&args[1]),
        Some("ask") if (2..=4).contains(&args.len()) => ask(
            &args[1],
            args.get(2).map(|t| t.parse()).transpose(),
            args.get(3).map(|p| p.parse()).transpose(),
        ),
        _ => Err("usage: netsim-probe serve ADDR | ask ADDR [TIMEOUT_MS] [LOCAL_PORT]".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netsim-probe: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(addr: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let sock = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!(
        "listening {}",
        sock.local_addr().map_err(|e| e.to_string())?
    );
    let mut buf = [0u8; 1500];
    loop {
        let (_, from) = sock.recv_from(&mut buf).map_err(|e| e.to_string())?;
        let _ = sock.send_to(from.to_string().as_bytes(), from);
    }
}

fn ask(
    addr: &str,
    timeout_ms: Result<Option<u64>, std::num::ParseIntError>,
    local_port: Result<Option<u16>, std::num::ParseIntError>,
) -> Result<(), String> {
    let to: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let timeout = Duration::from_millis(
        timeout_ms
            .map_err(|e| format!("timeout: {e}"))?
            .unwrap_or(5000),
    );
    let port = local_port
        .map_err(|e| format!("local port: {e}"))?
        .unwrap_or(0);
    let sock = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("bind port {port}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut buf = [0u8; 1500];
    while t0.elapsed() < timeout {
        let _ = sock.send_to(b"?", to);
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == to {
                println!("{}", String::from_utf8_lossy(&buf[..n]));
                return Ok(());
            }
        }
    }
    Err(format!(
        "no answer from {to} within {} ms",
        timeout.as_millis()
    ))
}
