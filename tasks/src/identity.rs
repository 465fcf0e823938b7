//! Node identities, tickets, and pinned-key TLS.
//!
//! Every node has an ed25519 key in its data dir (`node.key`, mode 0600); its [`NodeId`] is
//! the public key. QUIC connections use self-signed certificates made from that key, and a
//! connecting side pins the node id it expects (see [`tls`]). A [`Ticket`]
//! (`peergrid1:<node-id>@<host:port>`) tells a worker or submitter where a coordinator is and
//! which key it must present.

pub mod tls;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A node's public ed25519 key; shown as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 10 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..5])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// Why a text is not a node id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a node id: expected 64 hex digits (an ed25519 public key), got {got:?}")]
pub struct ParseNodeIdError {
    pub got: String,
}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(ParseNodeIdError {
                got: s.chars().take(80).collect(),
            });
        }
        Ok(NodeId(out))
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(NodeId(<[u8; 32]>::deserialize(d)?))
        }
    }
}

/// Errors loading or creating a node key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read node key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write node key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("node key {path} is corrupt (expected 32 bytes of ed25519 secret key); move it away to create a new identity")]
    Corrupt { path: String },
}

/// A node's secret key.
#[derive(Clone)]
pub struct NodeKey {
    secret: SigningKey,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.node_id().short())
    }
}

impl NodeKey {
    /// File name of the key inside a data dir.
    pub const FILE: &'static str = "node.key";

    pub fn generate() -> NodeKey {
        NodeKey {
            secret: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    pub fn from_secret_bytes(bytes: [u8; 32]) -> NodeKey {
        NodeKey {
            secret: SigningKey::from_bytes(&bytes),
        }
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    pub fn node_id(&self) -> NodeId {
        NodeId(self.secret.verifying_key().to_bytes())
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.secret
    }

    /// Load `DIR/node.key`, or create it (mode 0600) when it does not exist.
    pub fn load_or_create(dir: &Path) -> Result<NodeKey, KeyError> {
        let path = dir.join(Self::FILE);
        let shown = path.display().to_string();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Corrupt {
                    path: shown.clone(),
                })?;
                Ok(NodeKey::from_secret_bytes(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = NodeKey::generate();
                std::fs::create_dir_all(dir).map_err(|source| KeyError::Write {
                    path: shown.clone(),
                    source,
                })?;
                write_private(&path, &key.secret_bytes()).map_err(|source| KeyError::Write {
                    path: shown,
                    source,
                })?;
                Ok(key)
            }
            Err(source) => Err(KeyError::Read {
                path: shown,
                source,
            }),
        }
    }
}

/// Write a file readable by its owner only, atomically (temp file + rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Where a coordinator is and which key it presents: `peergrid1:<node-id>@<host:port>`.
///
/// A deployment with standby coordinators (`serve --store postgres://...` on several
/// machines) lists them all, comma-separated, each with its own key:
/// `peergrid1:<id-a>@<host-a:port>,<id-b>@<host-b:port>`; an entry without `<node-id>@` has
/// the key of the entry before it. Clients try every entry at once and keep the one that
/// answers (standbys refuse), so a ticket stays valid whichever coordinator leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// The first coordinator's key.
    pub node_id: NodeId,
    /// The first coordinator's `host:port`; the host may be a name, an IPv4 address or a
    /// bracketed IPv6 address.
    pub addr: String,
    /// The other coordinators of the deployment, `(key, host:port)`, in the ticket's order.
    pub more: Vec<(NodeId, String)>,
}

/// Why a text is not a ticket.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseTicketError {
    #[error("not a peergrid ticket: it must start with `peergrid1:` (got {0:?}); copy it from the coordinator's `ticket` file")]
    Prefix(String),
    #[error("ticket has no `@host:port` after the node id")]
    MissingAddr,
    #[error("ticket's node id is invalid: {0}")]
    NodeId(#[from] ParseNodeIdError),
    #[error("ticket's address {0:?} is not host:port")]
    Addr(String),
    #[error("ticket lists {0} coordinators; at most {max} are allowed", max = Ticket::MAX_ENTRIES)]
    TooMany(usize),
}

impl Ticket {
    pub const PREFIX: &'static str = "peergrid1:";
    /// At most this many coordinators in one ticket (each is dialled at every connection).
    pub const MAX_ENTRIES: usize = 16;

    pub fn new(node_id: NodeId, addr: impl Into<String>) -> Ticket {
        Ticket {
            node_id,
            addr: addr.into(),
            more: Vec::new(),
        }
    }

    /// A ticket listing `entries` in order (the first is [`Ticket::node_id`]/[`Ticket::addr`]);
    /// `None` if there are none.
    pub fn of_entries(entries: impl IntoIterator<Item = (NodeId, String)>) -> Option<Ticket> {
        let mut it = entries.into_iter();
        let (node_id, addr) = it.next()?;
        Some(Ticket {
            node_id,
            addr,
            more: it.collect(),
        })
    }

    /// Every coordinator the ticket lists, `(key, host:port)`, the first one first.
    pub fn entries(&self) -> impl Iterator<Item = (NodeId, &str)> + '_ {
        std::iter::once((self.node_id, self.addr.as_str()))
            .chain(self.more.iter().map(|(id, a)| (*id, a.as_str())))
    }

    /// Resolve the first address to socket addresses (may do DNS; blocks the calling thread).
    pub fn socket_addrs(&self) -> std::io::Result<Vec<std::net::SocketAddr>> {
        use std::net::ToSocketAddrs;
        Ok(self.addr.to_socket_addrs()?.collect())
    }

    /// [`Ticket::socket_addrs`] off the async threads. Called at every (re)connection, so a
    /// coordinator named in its ticket can move: the name is looked up afresh each time.
    #[cfg(feature = "net")]
    pub async fn resolve(&self) -> std::io::Result<Vec<std::net::SocketAddr>> {
        Ok(tokio::net::lookup_host(self.addr.as_str()).await?.collect())
    }

    /// Every entry resolved (the first address of each name), as `(address, key)` in the
    /// ticket's order. Entries that do not resolve are left out; the error is the first
    /// entry's failure when none resolves.
    #[cfg(feature = "net")]
    pub async fn resolve_all(&self) -> std::io::Result<Vec<(std::net::SocketAddr, NodeId)>> {
        let mut out = Vec::new();
        let mut first_err = None;
        for (id, addr) in self.entries() {
            match tokio::net::lookup_host(addr).await {
                Ok(mut a) => match a.next() {
                    Some(a) => out.push((a, id)),
                    None => {
                        first_err.get_or_insert_with(|| {
                            std::io::Error::other(format!("{addr} resolves to no address"))
                        });
                    }
                },
                Err(e) => {
                    first_err.get_or_insert(std::io::Error::new(
                        e.kind(),
                        format!("resolving {addr}: {e}"),
                    ));
                }
            }
        }
        match (out.is_empty(), first_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        }
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}@{}", Self::PREFIX, self.node_id, self.addr)?;
        for (id, addr) in &self.more {
            write!(f, ",{id}@{addr}")?;
        }
        Ok(())
    }
}

fn parse_addr(addr: &str) -> Result<String, ParseTicketError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| ParseTicketError::Addr(addr.into()))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(ParseTicketError::Addr(addr.into()));
    }
    Ok(addr.to_string())
}

impl FromStr for Ticket {
    type Err = ParseTicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let rest = s
            .strip_prefix(Self::PREFIX)
            .ok_or_else(|| ParseTicketError::Prefix(s.chars().take(40).collect()))?;
        let parts: Vec<&str> = rest.split(',').map(str::trim).collect();
        if parts.len() > Self::MAX_ENTRIES {
            return Err(ParseTicketError::TooMany(parts.len()));
        }
        let (id, addr) = parts[0]
            .split_once('@')
            .ok_or(ParseTicketError::MissingAddr)?;
        let node_id: NodeId = id.parse()?;
        let addr = parse_addr(addr)?;
        let mut last = node_id;
        let mut more = Vec::with_capacity(parts.len() - 1);
        for part in &parts[1..] {
            let (id, addr) = match part.split_once('@') {
                Some((id, addr)) => (id.parse()?, addr),
                None => (last, *part),
            };
            last = id;
            more.push((id, parse_addr(addr)?));
        }
        Ok(Ticket {
            node_id,
            addr,
            more,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_round_trips_and_rejects_garbage() {
        let key = NodeKey::generate();
        let t = Ticket::new(key.node_id(), "127.0.0.1:4433");
        let text = t.to_string();
        assert!(text.starts_with("peergrid1:"));
        assert_eq!(text.parse::<Ticket>().unwrap(), t);
        assert!(matches!(
            "http://x".parse::<Ticket>(),
            Err(ParseTicketError::Prefix(_))
        ));
        assert!(matches!(
            "peergrid1:abcd@1.2.3.4:5".parse::<Ticket>(),
            Err(ParseTicketError::NodeId(_))
        ));
        let no_port = format!("peergrid1:{}@1.2.3.4", key.node_id());
        assert!(matches!(
            no_port.parse::<Ticket>(),
            Err(ParseTicketError::Addr(_))
        ));
        let no_addr = format!("peergrid1:{}", key.node_id());
        assert_eq!(
            no_addr.parse::<Ticket>(),
            Err(ParseTicketError::MissingAddr)
        );
    }

    #[test]
    fn a_ticket_lists_several_coordinators_each_with_its_key() {
        let (a, b) = (NodeKey::generate().node_id(), NodeKey::generate().node_id());
        let t = Ticket::of_entries([
            (a, "192.0.2.1:7100".to_string()),
            (b, "[2001:db8::2]:7100".to_string()),
            (b, "coord-c.example:7100".to_string()),
        ])
        .unwrap();
        let text = t.to_string();
        assert_eq!(text.parse::<Ticket>().unwrap(), t);
        let entries: Vec<_> = t.entries().collect();
        assert_eq!(entries[0], (a, "192.0.2.1:7100"));
        assert_eq!(entries[2], (b, "coord-c.example:7100"));
        // An entry without a key has the key of the entry before it.
        let short = format!("peergrid1:{a}@192.0.2.1:7100, 192.0.2.2:7100,{b}@192.0.2.3:7100");
        let t: Ticket = short.parse().unwrap();
        assert_eq!(
            t.more,
            vec![
                (a, "192.0.2.2:7100".to_string()),
                (b, "192.0.2.3:7100".to_string())
            ]
        );
        // A one-coordinator ticket prints as it always did.
        assert_eq!(
            Ticket::new(a, "192.0.2.1:7100").to_string(),
            format!("peergrid1:{a}@192.0.2.1:7100")
        );
        let bad = format!("peergrid1:{a}@192.0.2.1:7100,nope");
        assert!(matches!(
            bad.parse::<Ticket>(),
            Err(ParseTicketError::Addr(_))
        ));
        let many = format!(
            "peergrid1:{a}@192.0.2.1:7100{}",
            ",192.0.2.1:7100".repeat(Ticket::MAX_ENTRIES)
        );
        assert_eq!(
            many.parse::<Ticket>(),
            Err(ParseTicketError::TooMany(Ticket::MAX_ENTRIES + 1))
        );
    }

    #[test]
    fn key_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeKey::load_or_create(dir.path()).unwrap();
        let b = NodeKey::load_or_create(dir.path()).unwrap();
        assert_eq!(a.node_id(), b.node_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(NodeKey::FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join(NodeKey::FILE), b"short").unwrap();
        assert!(matches!(
            NodeKey::load_or_create(dir.path()),
            Err(KeyError::Corrupt { .. })
        ));
    }
}
