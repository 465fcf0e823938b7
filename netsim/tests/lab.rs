//! The lab itself: routing between public blocks, NAT (source address, port behaviour,
//! unreachability of private addresses), cleanup. Needs root; prints `skipped: ...` and
//! passes otherwise.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use netsim::{lab_or_skip, Host, Nat, Proc};

const PROBE: &str = env!("CARGO_BIN_EXE_netsim-probe");
const GUARD: Duration = Duration::from_secs(60);

/// `netsim-probe serve 0.0.0.0:PORT` in `host`, once it listens.
fn serve(host: &Host, port: u16) -> Proc {
    let mut cmd = host.command(PROBE);
    cmd.args(["serve", &format!("0.0.0.0:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut p = Proc::spawn(&format!("probe@{}", host.name), &mut cmd).unwrap();
    let mut line = String::new();
    BufReader::new(p.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening"), "probe server said {line:?}");
    p
}

/// The address `to` saw `from` as, or `None` without an answer within `timeout_ms`.
fn ask(
    from: &Host,
    to: SocketAddr,
    timeout_ms: u64,
    local_port: Option<u16>,
) -> Option<SocketAddr> {
    let mut args = vec!["ask".to_string(), to.to_string(), timeout_ms.to_string()];
    if let Some(p) = local_port {
        args.push(p.to_string());
    }
    let out = from.run(PROBE, &args, GUARD).unwrap();
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
}

#[test]
fn public_hosts_in_different_blocks_reach_each_other_through_the_router() {
    let Some(mut lab) = lab_or_skip() else { return };
    let a = lab.public_host("a", 0).unwrap();
    let b = lab.public_host("b", 1).unwrap();
    let c = lab.public_host("c", 1).unwrap();
    assert_eq!(a.ip.to_string(), "192.0.2.10");
    assert_eq!(b.ip.to_string(), "198.51.100.10");
    assert_eq!(c.ip.to_string(), "198.51.100.11");

    // ICMP when `ping` is installed (iputils-ping); the UDP probe below in any case.
    if std::process::Command::new("ping")
        .arg("-V")
        .output()
        .is_ok()
    {
        for (x, y) in [(&a, &b), (&b, &a), (&a, &c)] {
            let out = x
                .run("ping", ["-c", "1", "-W", "5", &y.ip.to_string()], GUARD)
                .unwrap();
            assert!(
                out.status.success(),
                "{} cannot ping {}: {}",
                x.name,
                y.ip,
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }

    let _sb = serve(&b, 9000);
    let _sa = serve(&a, 9000);
    let seen = ask(&a, SocketAddr::new(b.ip.into(), 9000), 10_000, None).expect("a reaches b");
    assert_eq!(seen.ip(), a.ip, "no NAT between public hosts");
    let seen = ask(&b, SocketAddr::new(a.ip.into(), 9000), 10_000, None).expect("b reaches a");
    assert_eq!(seen.ip(), b.ip);
    let seen = ask(&c, SocketAddr::new(b.ip.into(), 9000), 10_000, None).expect("same block");
    assert_eq!(seen.ip(), c.ip);
    // Nothing outside the lab is routed.
    let out = std::process::Command::new("ip")
        .args(["-n", lab.router_ns(), "route", "get", "8.8.8.8"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the router must have no route out of the lab: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn nat_hosts_appear_from_the_nat_address_and_are_unreachable_from_outside() {
    let Some(mut lab) = lab_or_skip() else { return };
    let public = lab.public_host("pub", 0).unwrap();
    let easy = lab
        .nat_site("easy", 1, Nat::PortPreserving, [192, 168, 1], 2)
        .unwrap();
    // Same private range behind another NAT, as home routers do.
    let hard = lab
        .nat_site("hard", 2, Nat::RandomPorts, [192, 168, 1], 1)
        .unwrap();
    assert_eq!(easy.hosts[0].ip.to_string(), "192.168.1.10");
    assert_eq!(easy.hosts[0].public_ip, easy.router.ip);
    assert_eq!(hard.hosts[0].ip, easy.hosts[0].ip);

    let _s0 = serve(&public, 9000);
    let _s1 = serve(&public, 9001);
    let to0 = SocketAddr::new(public.ip.into(), 9000);
    let to1 = SocketAddr::new(public.ip.into(), 9001);

    // Port-preserving: the NAT's address, our own port, whatever the destination.
    let h = &easy.hosts[0];
    let a = ask(h, to0, 10_000, Some(40000)).expect("NATed host reaches a public host");
    let b = ask(h, to1, 10_000, Some(40000)).expect("NATed host reaches a public host");
    assert_eq!(
        a.ip(),
        easy.router.ip,
        "traffic appears from the NAT's public address"
    );
    assert_eq!(
        (a.port(), b.port()),
        (40000, 40000),
        "MASQUERADE keeps the port"
    );

    // Port-randomizing: the NAT's address, another port per flow.
    let h = &hard.hosts[0];
    let a = ask(h, to0, 10_000, Some(40000)).expect("NATed host reaches a public host");
    let b = ask(h, to1, 10_000, Some(40000)).expect("NATed host reaches a public host");
    assert_eq!(a.ip(), hard.router.ip);
    assert_eq!(b.ip(), hard.router.ip);
    assert!(
        a.port() != 40000 || b.port() != 40000,
        "--random-fully picks random ports: {a} {b}"
    );

    // A server behind the easy NAT: its LAN neighbour reaches it (so it is up)...
    let _s2 = serve(&easy.hosts[0], 9000);
    let private = SocketAddr::new(easy.hosts[0].ip.into(), 9000);
    let seen = ask(&easy.hosts[1], private, 10_000, None).expect("same LAN");
    assert_eq!(seen.ip(), easy.hosts[1].ip, "no NAT inside the LAN");
    // ...but neither its private address nor the NAT's public one is reachable from outside.
    assert_eq!(ask(&public, private, 1500, None), None);
    assert_eq!(
        ask(
            &public,
            SocketAddr::new(easy.router.ip.into(), 9000),
            1500,
            None
        ),
        None
    );
    // And the other site's host with the same private address is a different machine.
    assert_eq!(ask(&hard.hosts[0], private, 1500, None), None);
}

#[test]
fn dropping_a_lab_removes_namespaces_and_processes_even_after_a_panic() {
    let Some(_probe) = lab_or_skip() else { return };
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(move || {
        let mut lab = netsim::Lab::new().unwrap();
        let h = lab
            .nat_site("site", 0, Nat::PortPreserving, [10, 9, 8], 1)
            .unwrap()
            .hosts[0]
            .clone();
        // Not wrapped in a Proc: the lab alone must end it.
        let child = h.command("sleep").arg("600").spawn().unwrap();
        tx.send((lab.id().to_string(), child)).unwrap();
        panic!("test failure inside a lab");
    });
    assert!(r.is_err());
    let (id, mut child) = rx.recv().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the sleeper was killed");
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        !list.lines().any(|l| l.starts_with(&format!("{id}-"))),
        "namespaces of {id} left behind: {list}"
    );
}
