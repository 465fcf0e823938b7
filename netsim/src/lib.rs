//! A lab of separate hosts on one Linux machine, for tests that need real networks: every
//! host is a network namespace, hosts reach each other only through a router, and some sit
//! behind NAT. Std and anyhow only, so a test crate can also `#[path]`-include this file.
//!
//! # Topology
//!
//! ```text
//!   ┌──────────────────────── router (namespace <lab>-router) ─────────────────────────┐
//!   │  br0 192.0.2.1/24         br1 198.51.100.1/24         br2 203.0.113.1/24          │
//!   └──────┬───────────────────────────┬───────────────────────────┬───────────────────┘
//!          │ (one link per block)      │                           │
//!   public hosts                public hosts                 NAT box wan0 203.0.113.10
//!   192.0.2.10, .11, ...        198.51.100.10, ...           MASQUERADE [--random-fully]
//!                                                            lan0 192.168.1.1/24
//!                                                              │
//!                                                   LAN hosts 192.168.1.10, .11, ...
//! ```
//!
//! - The **router** joins three "public" /24 blocks, only the documentation ranges
//!   (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 — [`PUBLIC_BLOCKS`]); it owns `.1` of
//!   each (a bridge per block) and forwards between them. It has no other routes, so nothing
//!   in a lab can send a packet anywhere outside the lab's namespaces.
//! - A **public host** ([`Lab::public_host`]) has one interface with the next free address
//!   of a block (from `.10`) and a default route via that block's `.1`. Hosts in one block
//!   share a link (like one subnet); hosts in different blocks talk through the router.
//! - A **NAT site** ([`Lab::nat_site`]) is a NAT box with a public address in a block and a
//!   private LAN (10.x.y.0/24 or 192.168.x.0/24, the box at `.1`, hosts from `.10`) behind
//!   it. The box masquerades LAN traffic leaving its public interface, either
//!   port-preserving ([`Nat::PortPreserving`], plain `MASQUERADE`: an "easy" NAT) or with a
//!   random port per flow ([`Nat::RandomPorts`], `MASQUERADE --random-fully`: a "hard",
//!   symmetric NAT), and like a home router's firewall drops inbound packets that belong to
//!   no flow the LAN started: both those it would forward to the LAN (FORWARD) and those
//!   addressed to the box itself (INPUT; see "The NAT box's INPUT firewall" below). No
//!   hairpinning. The router knows no route to private ranges, so a private address is
//!   unreachable from outside its site; two sites may use the same LAN range.
//! - Every namespace has `lo` up; the router and NAT boxes forward (`ip_forward=1`).
//!
//! Names are unique per lab (`nsim<pid>x<n>-<host>`), so labs of parallel tests never meet;
//! the interfaces live only inside the lab's namespaces (nothing is added to the machine's
//! own namespace), so their names are short and fixed (`eth0`, `wan0`, `lan0`, `br<n>`, `v<n>`,
//! `l<n>`).
//!
//! # The NAT box's INPUT firewall
//!
//! A home router also drops unsolicited packets addressed to itself (INPUT from the WAN:
//! replies only), and so does every NAT box here unless [`Lab::set_nat_input_firewall`]
//! turned that off before [`Lab::nat_site`]. It matters to hole punching: without it, a
//! peer's first packet of a simultaneous open that reaches the box before the LAN host's own
//! packet went out is accepted by the box itself (no socket: ICMP port unreachable) and leaves
//! a *confirmed* conntrack entry for that 4-tuple; the LAN host's packet to the same peer then
//! collides with it and MASQUERADE gives it another source port, so the punch fails even
//! between two port-preserving NATs. Dropped in INPUT, the packet leaves no entry (conntrack
//! confirms only accepted packets) and the mapping keeps its port.
//!
//! # Names, shaping and measuring
//!
//! [`Host::set_hosts`] gives a host its own `/etc/hosts` (names for the lab's addresses, which
//! can be repointed while processes run: an address change under a stable name).
//!
//! [`Host::limit_upload`] caps what a host sends (a `tbf` qdisc); [`Host::tx_bytes`] is what
//! its interface has sent; [`Host::count_sent_to`] / [`Host::sent_to`] count what it sends to
//! given addresses (iptables rules in its OUTPUT chain).
//!
//! # Processes and cleanup
//!
//! [`Host::command`] is `ip netns exec <ns> PROGRAM`; [`Proc::spawn`] starts it as a child
//! killed (SIGKILL) when dropped; [`run_with_timeout`] runs one to completion with a hang
//! guard; [`workspace_bin`] finds (and rebuilds when stale) a binary of the cargo workspace
//! to run in hosts. Dropping the [`Lab`] kills every process still inside its namespaces and
//! deletes the namespaces (their links go with them) — also when a test panics. Namespaces
//! left by a test process that died without unwinding (SIGKILL) are removed by the next
//! [`Lab::new`].
//!
//! # Requirements
//!
//! Root (CAP_SYS_ADMIN and CAP_NET_ADMIN), `ip` (iproute2), `iptables` with the nat table,
//! and bridge/veth support in the kernel. [`Lab::new`] checks them and fails with a one-line
//! reason otherwise; tests call [`lab_or_skip`], which prints `skipped: <reason>` so they can
//! return early (and pass) on machines that cannot host a lab.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The public /24 blocks a lab's router joins: the three IPv4 documentation ranges
/// (RFC 5737). Blocks are named by their index here (0, 1, 2).
pub const PUBLIC_BLOCKS: [[u8; 3]; 3] = [[192, 0, 2], [198, 51, 100], [203, 0, 113]];

/// How a NAT box maps its LAN's flows to its public address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `MASQUERADE`: keeps the source port when it is free ("easy" NAT, hole punching works).
    PortPreserving,
    /// `MASQUERADE --random-fully`: a random public port for every flow ("hard", symmetric
    /// NAT: the port a peer sees differs per destination).
    RandomPorts,
}

/// A host of a lab: a network namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    /// The name given to [`Lab::public_host`] / [`Lab::nat_site`] (for logs).
    pub name: String,
    /// The network namespace (`ip netns exec <ns> ...`).
    pub ns: String,
    /// Its own address (private for hosts behind NAT).
    pub ip: Ipv4Addr,
    /// The address its traffic appears from outside its site: `ip` for public hosts, the
    /// NAT box's public address for hosts behind NAT.
    pub public_ip: Ipv4Addr,
    /// The NAT site it sits in, if any.
    pub site: Option<String>,
    /// Its interface towards the router (`eth0`; `wan0` for a NAT box).
    pub dev: String,
}

/// A NAT box and the hosts of its LAN.
#[derive(Debug, Clone)]
pub struct NatSite {
    pub name: String,
    pub nat: Nat,
    /// The NAT box itself: `ip` is its public address (its LAN address is `<lan>.1`).
    pub router: Host,
    /// The LAN's /24, e.g. `[192, 168, 1]`.
    pub lan: [u8; 3],
    pub hosts: Vec<Host>,
}

/// A set of namespaces forming one simulated network. See the module doc.
#[derive(Debug)]
pub struct Lab {
    id: String,
    router: String,
    /// Every namespace created, in creation order (the router first).
    namespaces: Vec<String>,
    names: HashSet<String>,
    /// Next free host octet per public block.
    next_octet: [u8; 3],
    /// Counter for the router's veth ends (`v<n>`).
    links: u32,
    /// Whether NAT boxes made from now on get the home router's INPUT firewall.
    nat_input_firewall: bool,
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// Prefix of every lab namespace: `nsim<pid>x<n>-<host>`.
const PREFIX: &str = "nsim";
/// Hang guard for the `ip`/`iptables` commands that build and remove a lab.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// [`Lab::new`], or `None` after printing `skipped: <reason>` (for tests that cannot run on
/// this machine and should pass without doing anything).
pub fn lab_or_skip() -> Option<Lab> {
    match Lab::new() {
        Ok(lab) => Some(lab),
        Err(e) => {
            // Straight to stderr: visible even when the test harness captures output.
            let line = format!("skipped: {}\n", one_line(&format!("{e:#}")));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            None
        }
    }
}

impl Lab {
    /// A new lab with its router (and nothing else yet). Fails with a one-line reason when
    /// this machine cannot make network namespaces (not root, no `ip`, no iptables nat).
    pub fn new() -> Result<Lab> {
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        preflight(&format!("{id}-probe"))?;
        remove_stale_labs();
        let mut lab = Lab {
            router: format!("{id}-router"),
            id,
            namespaces: Vec::new(),
            names: HashSet::new(),
            next_octet: [10; 3],
            links: 0,
            nat_input_firewall: true,
        };
        lab.build_router().map_err(|e| {
            anyhow!(
                "cannot build a network lab (needs root, iproute2, bridge and veth support): {}",
                one_line(&format!("{e:#}"))
            )
        })?;
        // The nat table must work inside a namespace (iptables-nft or legacy with modules).
        iptables(&lab.router, &["-t", "nat", "-L", "-n"]).map_err(|e| {
            anyhow!(
                "iptables nat table unusable in a network namespace: {}",
                one_line(&format!("{e:#}"))
            )
        })?;
        Ok(lab)
    }

    /// This lab's unique id (the prefix of its namespace names).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The router's namespace (to inspect it, e.g. `ip -n NS route`).
    pub fn router_ns(&self) -> &str {
        &self.router
    }

    /// Whether the NAT boxes of sites made from now on drop unsolicited packets addressed to
    /// themselves, as home routers do (default: yes; see "The NAT box's INPUT firewall" in
    /// the module doc for why it matters).
    pub fn set_nat_input_firewall(&mut self, on: bool) {
        self.nat_input_firewall = on;
    }

    fn build_router(&mut self) -> Result<()> {
        let r = self.router.clone();
        self.add_namespace(&r)?;
        for (i, b) in PUBLIC_BLOCKS.iter().enumerate() {
            let br = format!("br{i}");
            ip(&["-n", &r, "link", "add", &br, "type", "bridge"])?;
            ip(&[
                "-n",
                &r,
                "addr",
                "add",
                &format!("{}/24", addr(*b, 1)),
                "dev",
                &br,
            ])?;
            ip(&["-n", &r, "link", "set", &br, "up"])?;
        }
        enable_forwarding(&r)
    }

    /// Create namespace `ns` (recorded for cleanup first) with `lo` up.
    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        self.namespaces.push(ns.to_string());
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    fn claim_name(&mut self, name: &str) -> Result<String> {
        let ok = !name.is_empty()
            && name.len() <= 24
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            bail!("host name {name:?}: use 1-24 characters of a-z, 0-9 and '-'");
        }
        if name == "router" || !self.names.insert(name.to_string()) {
            bail!("host name {name:?} is already used in this lab");
        }
        Ok(format!("{}-{name}", self.id))
    }

    fn next_public_ip(&mut self, block: usize) -> Result<Ipv4Addr> {
        let Some(b) = PUBLIC_BLOCKS.get(block) else {
            bail!(
                "public block {block} does not exist (0..{})",
                PUBLIC_BLOCKS.len()
            );
        };
        let o = self.next_octet[block];
        if o == 255 {
            bail!("public block {block} is full");
        }
        self.next_octet[block] += 1;
        Ok(addr(*b, o))
    }

    /// Plug namespace `ns` into public block `block` as interface `dev` with address `ip`,
    /// default route via the router.
    fn attach_public(
        &mut self,
        ns: &str,
        dev: &str,
        block: usize,
        ip_addr: Ipv4Addr,
    ) -> Result<()> {
        let v = format!("v{}", self.links);
        self.links += 1;
        let r = self.router.clone();
        ip(&[
            "-n", &r, "link", "add", &v, "type", "veth", "peer", "name", dev, "netns", ns,
        ])?;
        ip(&[
            "-n",
            &r,
            "link",
            "set",
            &v,
            "master",
            &format!("br{block}"),
            "up",
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            dev,
        ])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        let gw = addr(PUBLIC_BLOCKS[block], 1).to_string();
        ip(&["-n", ns, "route", "add", "default", "via", &gw])
    }

    /// A host with the next free address of public block `block` (0, 1 or 2: see
    /// [`PUBLIC_BLOCKS`]).
    pub fn public_host(&mut self, name: &str, block: usize) -> Result<Host> {
        let ns = self.claim_name(name)?;
        let ip_addr = self.next_public_ip(block)?;
        self.add_namespace(&ns)?;
        self.attach_public(&ns, "eth0", block, ip_addr)
            .with_context(|| format!("plugging {name} into block {block}"))?;
        Ok(Host {
            name: name.to_string(),
            ns,
            ip: ip_addr,
            public_ip: ip_addr,
            site: None,
            dev: "eth0".into(),
        })
    }

    /// A NAT site: a NAT box (namespace `<name>`) with the next free address of public block
    /// `block`, and `hosts` hosts (`<name>-h0`, `<name>-h1`, ...) on the private LAN
    /// `lan` (`[10, x, y]` or `[192, 168, x]`) behind it. Like a home router, the box lets in
    /// from the outside only replies to flows the LAN started, both to the LAN and to itself
    /// (the latter unless [`Lab::set_nat_input_firewall`] turned it off).
    pub fn nat_site(
        &mut self,
        name: &str,
        block: usize,
        nat: Nat,
        lan: [u8; 3],
        hosts: usize,
    ) -> Result<NatSite> {
        if !(lan[0] == 10 || (lan[0] == 192 && lan[1] == 168)) {
            bail!(
                "LAN {}.{}.{}.0/24 is not private: use 10.x.y.0/24 or 192.168.x.0/24",
                lan[0],
                lan[1],
                lan[2]
            );
        }
        if hosts > 200 {
            bail!("at most 200 hosts per NAT site");
        }
        let ns = self.claim_name(name)?;
        let public = self.next_public_ip(block)?;
        self.add_namespace(&ns)?;
        self.attach_public(&ns, "wan0", block, public)
            .with_context(|| format!("plugging NAT box {name} into block {block}"))?;
        ip(&["-n", &ns, "link", "add", "lan0", "type", "bridge"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", addr(lan, 1)),
            "dev",
            "lan0",
        ])?;
        ip(&["-n", &ns, "link", "set", "lan0", "up"])?;
        enable_forwarding(&ns)?;
        let mut masq = vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan0",
            "-j",
            "MASQUERADE",
        ];
        if nat == Nat::RandomPorts {
            masq.push("--random-fully");
        }
        iptables(&ns, &masq)?;
        // A home router's firewall: from the outside, only replies to the LAN's own flows ...
        replies_only(&ns, "FORWARD", &["-i", "wan0", "-o", "lan0"])?;
        // ... and none to the box itself either (see the module doc: hole punching needs it).
        if self.nat_input_firewall {
            replies_only(&ns, "INPUT", &["-i", "wan0"])?;
        }
        let router = Host {
            name: name.to_string(),
            ns: ns.clone(),
            ip: public,
            public_ip: public,
            site: Some(name.to_string()),
            dev: "wan0".into(),
        };
        let mut list = Vec::new();
        for i in 0..hosts {
            let hname = format!("{name}-h{i}");
            let hns = self.claim_name(&hname)?;
            let hip = addr(lan, 10 + i as u8);
            self.add_namespace(&hns)?;
            let l = format!("l{i}");
            ip(&[
                "-n", &ns, "link", "add", &l, "type", "veth", "peer", "name", "eth0", "netns", &hns,
            ])?;
            ip(&["-n", &ns, "link", "set", &l, "master", "lan0", "up"])?;
            ip(&[
                "-n",
                &hns,
                "addr",
                "add",
                &format!("{hip}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &hns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &hns,
                "route",
                "add",
                "default",
                "via",
                &addr(lan, 1).to_string(),
            ])?;
            list.push(Host {
                name: hname,
                ns: hns,
                ip: hip,
                public_ip: public,
                site: Some(name.to_string()),
                dev: "eth0".into(),
            });
        }
        Ok(NatSite {
            name: name.to_string(),
            nat,
            router,
            lan,
            hosts: list,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            remove_namespace(ns);
        }
    }
}

impl Host {
    /// Limit what this host sends (its uplink) to `kbit` kbit/s (a `tbf` qdisc on its
    /// interface); receiving stays unlimited.
    pub fn limit_upload(&self, kbit: u32) -> Result<()> {
        let rate = format!("{kbit}kbit");
        ip(&[
            "netns", "exec", &self.ns, "tc", "qdisc", "replace", "dev", &self.dev, "root", "tbf",
            "rate", &rate, "burst", "32kb", "latency", "400ms",
        ])
    }

    /// Bytes sent on its interface so far (every packet it put on the wire).
    pub fn tx_bytes(&self) -> Result<u64> {
        let path = format!("/sys/class/net/{}/statistics/tx_bytes", self.dev);
        let text = self.run_ok("cat", [&path], SETUP_TIMEOUT)?;
        text.trim()
            .parse()
            .with_context(|| format!("reading {path} in {}: {text:?}", self.name))
    }

    /// Count the bytes this host sends to each of `dests` (iptables rules without a target in
    /// its OUTPUT chain); read them with [`Host::sent_to`].
    pub fn count_sent_to(&self, dests: &[Ipv4Addr]) -> Result<()> {
        for d in dests {
            iptables(&self.ns, &["-A", "OUTPUT", "-d", &format!("{d}/32")])?;
        }
        Ok(())
    }

    /// Bytes sent so far to each destination given to [`Host::count_sent_to`] (IP packets,
    /// headers included).
    pub fn sent_to(&self) -> Result<Vec<(Ipv4Addr, u64)>> {
        let text = self.run_ok(
            "iptables",
            ["-w", "30", "-S", "OUTPUT", "-v"],
            SETUP_TIMEOUT,
        )?;
        let mut out = Vec::new();
        for line in text.lines() {
            // -A OUTPUT -d 192.0.2.11/32 -c PACKETS BYTES
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(d), Some(c)) = (
                f.iter().position(|x| *x == "-d"),
                f.iter().position(|x| *x == "-c"),
            ) else {
                continue;
            };
            let ip_addr = f.get(d + 1).and_then(|a| a.split('/').next()?.parse().ok());
            let bytes = f.get(c + 2).and_then(|b| b.parse().ok());
            if let (Some(ip_addr), Some(bytes)) = (ip_addr, bytes) {
                out.push((ip_addr, bytes));
            }
        }
        Ok(out)
    }

    /// Give this host its own `/etc/hosts`: `localhost` and the `(address, name)` pairs. It is
    /// `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over `/etc/hosts` for the
    /// processes it starts (so write it before [`Host::command`]); a later call rewrites the
    /// file in place, and processes already running resolve the new addresses from their
    /// next lookup on (the C library reads `/etc/hosts` at each one). Removed with the lab.
    pub fn set_hosts(&self, entries: &[(Ipv4Addr, &str)]) -> Result<()> {
        let dir = netns_etc(&self.ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut text = String::from("127.0.0.1\tlocalhost\n");
        for (addr, name) in entries {
            text += &format!("{addr}\t{name}\n");
        }
        let path = dir.join("hosts");
        // Truncate and write the same inode: a bind mount follows the inode, not the name.
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// `ip netns exec <ns> program`: add arguments, stdio, environment, then spawn it with
    /// [`Proc::spawn`] or run it with [`run_with_timeout`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Run `program args...` in this host to completion (stdout and stderr captured), killed
    /// after `timeout`.
    pub fn run<I, S>(
        &self,
        program: impl AsRef<OsStr>,
        args: I,
        timeout: Duration,
    ) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command(program);
        c.args(args);
        run_with_timeout(&mut c, timeout)
    }

    /// Like [`Host::run`], but an unsuccessful exit is an error (with its stderr); returns
    /// stdout.
    pub fn run_ok<I, S>(
        &self,
        program: impl AsRef<OsStr>,
        args: I,
        timeout: Duration,
    ) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref().to_owned();
        let out = self.run(&program, args, timeout)?;
        if !out.status.success() {
            bail!(
                "{} in {} failed ({}): {}",
                program.to_string_lossy(),
                self.name,
                out.status,
                one_line(&String::from_utf8_lossy(&out.stderr))
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Spawn `cmd` (typically from [`Host::command`]).
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap (no-op once it has exited).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run `cmd` to completion with stdout and stderr captured; SIGKILL it and fail after
/// `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for a child")? {
            break s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            bail!(
                "timed out after {:.0} s: {cmd:?}; stderr: {}",
                timeout.as_secs_f64(),
                one_line(&String::from_utf8_lossy(&stderr))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// The binary `name` of this cargo workspace, in the same target directory as `beside`
/// (typically `env!("CARGO_BIN_EXE_<a binary of the crate under test>")`). `cargo test` and
/// `cargo bench` build only the binaries of the package under test, so when it is missing or
/// older than one of the sources its dep-info file lists, it is rebuilt first with
/// `cargo build --workspace --bin NAME` (`--release` beside a release binary): with
/// `--workspace`, so that shared dependencies resolve with the same features as in every
/// other build and are not built a second time. `announce` gets a line to show before such a
/// build.
pub fn workspace_bin(beside: &Path, name: &str, announce: impl FnOnce(&str)) -> Result<PathBuf> {
    let path = beside.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // Cargo's dep-info beside the binary lists the sources it was built from.
    let dep_info = std::fs::read_to_string(path.with_extension("d")).unwrap_or_default();
    let sources: Vec<&str> = dep_info
        .split_once(": ")
        .map(|(_, list)| list.split_whitespace().collect())
        .unwrap_or_default();
    let built = mtime(&path);
    let stale = built.is_none()
        || sources.is_empty()
        || sources
            .iter()
            .any(|s| mtime(Path::new(s)).is_none_or(|m| Some(m) > built));
    if stale {
        announce(&format!(
            "building the {name} binary (missing, or older than its sources)"
        ));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--bin", name]);
        if beside
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "release")
        {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .with_context(|| format!("running cargo build for the {name} binary"))?;
        if !status.success() {
            bail!("building the {name} binary failed");
        }
    }
    if !path.exists() {
        bail!("no {name} binary at {}", path.display());
    }
    Ok(path)
}

fn addr(block: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(block[0], block[1], block[2], host)
}

/// The first non-empty line of `s`, trimmed (error messages stay one line).
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no output)")
        .to_string()
}

/// Run a setup command; failure is an error naming it and its stderr.
fn run_setup(program: &str, args: &[&str]) -> Result<()> {
    let out = run_with_timeout(Command::new(program).args(args), SETUP_TIMEOUT)
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            one_line(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run_setup("ip", args)
}

/// In namespace `ns`, of the packets in `chain` that `matches` selects, let through only those
/// of flows already established (replies), and drop the rest.
fn replies_only(ns: &str, chain: &str, matches: &[&str]) -> Result<()> {
    let accept = [
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ];
    let mut args = vec!["-A", chain];
    args.extend_from_slice(matches);
    iptables(ns, &[&args[..], &accept[..]].concat())?;
    args.extend_from_slice(&["-j", "DROP"]);
    iptables(ns, &args)
}

/// `iptables -w` (waits for the xtables lock other labs may hold) inside namespace `ns`.
fn iptables(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["netns", "exec", ns, "iptables", "-w", "30"];
    all.extend_from_slice(args);
    run_setup("ip", &all)
}

fn enable_forwarding(ns: &str) -> Result<()> {
    run_setup(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ],
    )
}

/// The tools a lab needs, checked before touching anything.
fn preflight(probe: &str) -> Result<()> {
    for (tool, arg, hint) in [
        ("ip", "-V", "install iproute2"),
        ("iptables", "--version", "install iptables"),
    ] {
        match Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => bail!("`{tool} {arg}` failed ({s}); {hint}"),
            Err(e) => bail!("no `{tool}` command ({e}); {hint}"),
        }
    }
    if !Path::new("/proc/self/ns/net").exists() {
        bail!("this kernel has no network namespaces");
    }
    // Creating a namespace is the real test of privileges.
    let out = Command::new("ip")
        .args(["netns", "add", probe])
        .output()
        .context("running ip netns add")?;
    if !out.status.success() {
        bail!(
            "cannot create network namespaces (needs root): {}",
            one_line(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let exec = Command::new("ip")
        .args(["netns", "exec", probe, "true"])
        .output();
    let _ = Command::new("ip")
        .args(["netns", "del", probe])
        .stderr(Stdio::null())
        .status();
    match exec {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!(
            "cannot run processes in a network namespace: {}",
            one_line(&String::from_utf8_lossy(&o.stderr))
        ),
        Err(e) => bail!("cannot run ip netns exec: {e}"),
    }
}

/// Kill every process inside `ns` and delete it (its interfaces go with it).
fn remove_namespace(ns: &str) {
    for _ in 0..3 {
        let pids = Command::new("ip")
            .args(["netns", "pids", ns])
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if pids.is_empty() {
            break;
        }
        let _ = Command::new("kill")
            .arg("-9")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(netns_etc(ns));
}

/// Where `ip netns exec` finds a namespace's own `/etc` files ([`Host::set_hosts`]).
fn netns_etc(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns)
}

/// Remove namespaces of labs whose test process is gone (killed before it could unwind).
fn remove_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(name);
        }
    }
}
