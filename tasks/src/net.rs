//! Async QUIC helpers shared by the coordinator and the worker (feature `net`).
//!
//! - [`endpoint`]: one quinn endpoint per node, accepting the given ALPNs and connecting out;
//!   both directions use the node's key ([`crate::identity::tls`]).
//! - [`connect`]: a pinned connection: the peer must present the expected node id.
//! - [`remote_node_id`], [`alpn`]: who is on the other end, and which protocol it speaks.
//! - [`write_frame`], [`read_frame`], [`request`], [`request_with_body`]: the framing of
//!   [`crate::wire`]; a peer's bad frame is a [`FrameError`] whose [`FrameError::close_code`]
//!   says how to close *that* connection ([`close`]).
//!
//! Outgoing connections choose their pinned id and ALPN per call, while quinn's endpoint
//! holds one default client config. So that config is [`PinningClient`]: it carries the
//! node's TLS identity and builds the TLS session for each connection from the pin and ALPN
//! that [`connect`] encodes into quinn's `server_name` argument. The name is never sent
//! (SNI is off); it is only the way to hand per-connection data to the crypto layer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, TransportConfig, VarInt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::identity::tls::{self, Identity, TlsError};
use crate::identity::{NodeId, NodeKey};
use crate::wire::{self, CloseCode, DecodeError, MAX_FRAME};

/// How long [`connect`] waits for the handshake before calling the peer unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive interval: keeps NAT bindings open and notices dead peers. 10 s keeps three
/// pings inside one idle timeout, and costs a coordinator with 100k sessions 10k pings/s.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// A connection with no traffic (keep-alives included) for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bi-streams a peer may have open at once on one connection (see [`crate::limits`]).
pub const MAX_BIDI_STREAMS: u32 = crate::limits::MAX_BIDI_STREAMS;

/// Why an endpoint could not be made or a connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("node at {addr} did not answer within {}s: is it running, and is UDP to it allowed?", after.as_secs_f32())]
    Unreachable { addr: SocketAddr, after: Duration },
    #[error("node at {addr} is not the one we expected: we pinned node {expected} but it presented node {presented} (stale ticket or peer list?)")]
    WrongKey {
        addr: SocketAddr,
        expected: NodeId,
        presented: NodeId,
    },
    #[error("cannot start a connection to {addr}: {source}")]
    Start {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    /// The node refused the connection: a standby coordinator (another one of its
    /// deployment leads), or one at its connection limit.
    #[error("node at {addr} refused the connection (a standby coordinator, or one at its connection limit)")]
    Refused { addr: SocketAddr },
    #[error("none of the {tried} addresses answered: {errors}")]
    NoneAnswered { tried: usize, errors: String },
    #[error("connection to {addr} failed: {source}")]
    Connection {
        addr: SocketAddr,
        source: ConnectionError,
    },
}

/// The transport settings every peergrid connection uses. Every resource a peer can make
/// us hold is bounded explicitly (numbers and reasons in [`crate::limits`]): receive windows
/// per stream and per connection, bi-streams open at once, and no uni-streams at all (no
/// protocol uses them).
pub fn transport_config() -> Arc<TransportConfig> {
    use crate::limits;
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(IDLE_TIMEOUT).expect("30s fits a QUIC varint"),
    ));
    t.max_concurrent_bidi_streams(VarInt::from_u32(limits::MAX_BIDI_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(limits::MAX_UNI_STREAMS));
    t.stream_receive_window(VarInt::from_u32(limits::STREAM_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(limits::CONNECTION_RECEIVE_WINDOW));
    Arc::new(t)
}

/// A dead coordinator of a deployment with standbys is noticed this soon: sessions to a
/// ticket listing several coordinators send a keep-alive every [`FAILOVER_KEEP_ALIVE`] and
/// call the connection dead after this long without a packet. (A coordinator killed on a
/// host that stays up sends nothing: without it, clients would wait out [`IDLE_TIMEOUT`].)
pub const FAILOVER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive interval of those sessions.
pub const FAILOVER_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// [`transport_config`] with the failover timeouts above.
pub fn failover_transport_config() -> Arc<TransportConfig> {
    let mut t = Arc::try_unwrap(transport_config()).unwrap_or_else(|_| unreachable!());
    t.keep_alive_interval(Some(FAILOVER_KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(FAILOVER_IDLE_TIMEOUT).expect("5s fits a QUIC varint"),
    ));
    Arc::new(t)
}

/// A client config for `key` (pinning the server's key like the endpoint's default one)
/// with the failover timeouts, for [`connect_any`] to a ticket listing several coordinators.
pub fn failover_client_config(key: &NodeKey) -> Result<quinn::ClientConfig, NetError> {
    let mut client = quinn::ClientConfig::new(Arc::new(PinningClient::new(Identity::new(key)?)?));
    client.transport_config(failover_transport_config());
    Ok(client)
}

/// The key that makes this node's QUIC stateless resets: derived from its identity, so the
/// same node restarted (same data dir) resets the connections its previous process left
/// open. A peer that sends a keep-alive to a restarted coordinator learns at once that the
/// connection is gone (and reconnects) instead of waiting out [`IDLE_TIMEOUT`]: a random
/// key per process, quinn's default, makes those resets unverifiable. A blake3 keyed hash
/// (a MAC), domain-separated from every other use of the secret.
struct ResetKey([u8; 32]);

impl ResetKey {
    fn of(key: &NodeKey) -> ResetKey {
        ResetKey(blake3::derive_key(
            "peergrid 2026 quic stateless reset key",
            &key.secret_bytes(),
        ))
    }
}

impl quinn_proto::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], out: &mut [u8]) {
        out.copy_from_slice(blake3::keyed_hash(&self.0, data).as_bytes());
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(
        &self,
        data: &[u8],
        signature: &[u8],
    ) -> Result<(), quinn_proto::crypto::CryptoError> {
        // blake3::Hash compares in constant time.
        let ok = <[u8; 32]>::try_from(signature)
            .is_ok_and(|sig| blake3::keyed_hash(&self.0, data) == blake3::Hash::from(sig));
        if ok {
            Ok(())
        } else {
            Err(quinn_proto::crypto::CryptoError)
        }
    }
}

/// The node's QUIC endpoint, bound to `bind`. It accepts connections for `server_alpns`
/// (none: a client-only endpoint) and connects out with [`connect`].
///
/// Must be called inside a tokio runtime.
pub fn endpoint(
    key: &NodeKey,
    bind: SocketAddr,
    server_alpns: &[&[u8]],
) -> Result<quinn::Endpoint, NetError> {
    let socket =
        std::net::UdpSocket::bind(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    endpoint_on_socket(key, socket, server_alpns)
}

/// Kernel buffer asked for on every QUIC socket, each way. One socket carries every
/// connection of a node: a coordinator's, the keep-alives and requests of 100,000 workers
/// (~60,000 packets/s). With Linux's default (208 KiB, ~100 packets) a pause of a few
/// milliseconds overflowed it; a third of the packets were dropped and QUIC's backed-off
/// retransmissions made work requests wait ~20 s (the scale bench). The kernel caps it at
/// `net.core.rmem_max` / `wmem_max` (docs/operations.md); memory is used only while packets
/// wait.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Ask for [`SOCKET_BUFFER`] each way on `socket`; says so (debug) when the kernel grants
/// less. Never fails: a smaller buffer still works, only less well under load.
pub fn size_socket_buffers(socket: &std::net::UdpSocket) -> (usize, usize) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let got = (
        s.recv_buffer_size().unwrap_or(0),
        s.send_buffer_size().unwrap_or(0),
    );
    // Linux reports twice what it grants (the other half is its bookkeeping).
    if got.0 < SOCKET_BUFFER || got.1 < SOCKET_BUFFER {
        tracing::debug!(
            recv = got.0,
            send = got.1,
            wanted = SOCKET_BUFFER,
            "UDP socket buffers capped by the kernel (raise net.core.rmem_max / wmem_max)"
        );
    }
    got
}

/// [`endpoint`] on a socket the caller bound (e.g. inside another network namespace).
///
/// Must be called inside a tokio runtime.
pub fn endpoint_on_socket(
    key: &NodeKey,
    socket: std::net::UdpSocket,
    server_alpns: &[&[u8]],
) -> Result<quinn::Endpoint, NetError> {
    let identity = Identity::new(key)?;
    let server = if server_alpns.is_empty() {
        None
    } else {
        let tls = identity.server_config(server_alpns)?;
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        Some(server)
    };
    let bind = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let bind_err = |source| NetError::Bind { addr: bind, source };
    size_socket_buffers(&socket);
    let reset = ResetKey::of(key);
    // Connection ids are checked against a key before a stateless reset is considered:
    // derive it from the identity too, or the restarted node drops the old packets unread.
    let cid_key = u64::from_le_bytes(
        blake3::derive_key("peergrid 2026 quic connection id key", &reset.0)[..8]
            .try_into()
            .expect("8 bytes"),
    );
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let mut ep = quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
        .map_err(bind_err)?;
    let mut client = quinn::ClientConfig::new(Arc::new(PinningClient::new(identity)?));
    client.transport_config(transport_config());
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Connect to the node `expected` at `addr` speaking `alpn`, waiting at most
/// [`CONNECT_TIMEOUT`].
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    expected: NodeId,
    alpn: &[u8],
) -> Result<quinn::Connection, NetError> {
    connect_timeout(ep, addr, expected, alpn, CONNECT_TIMEOUT).await
}

/// [`connect`] with a chosen handshake timeout.
pub async fn connect_timeout(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    expected: NodeId,
    alpn: &[u8],
    timeout: Duration,
) -> Result<quinn::Connection, NetError> {
    connect_with(ep, None, addr, expected, alpn, timeout).await
}

/// [`connect_timeout`] with a client config other than the endpoint's default.
async fn connect_with(
    ep: &quinn::Endpoint,
    config: Option<quinn::ClientConfig>,
    addr: SocketAddr,
    expected: NodeId,
    alpn: &[u8],
    timeout: Duration,
) -> Result<quinn::Connection, NetError> {
    let name = pin_name(expected, alpn);
    let connecting = match config {
        Some(c) => ep.connect_with(c, addr, &name),
        None => ep.connect(addr, &name),
    }
    .map_err(|source| NetError::Start { addr, source })?;
    let result = match tokio::time::timeout(timeout, connecting).await {
        Err(_elapsed) => Err(NetError::Unreachable {
            addr,
            after: timeout,
        }),
        Ok(Ok(conn)) => match remote_node_id(&conn) {
            Some(id) if id == expected => Ok(conn),
            // The verifier already pinned the key; this only guards against a misconfigured
            // endpoint (e.g. someone replaced its default client config).
            Some(presented) => {
                close(&conn, CloseCode::Rejected, "wrong key");
                Err(NetError::WrongKey {
                    addr,
                    expected,
                    presented,
                })
            }
            None => {
                close(&conn, CloseCode::Rejected, "no certificate");
                Err(
                    TlsError::BadCertificate("the server presented no usable certificate".into())
                        .into(),
                )
            }
        },
        Ok(Err(ConnectionError::TimedOut)) => Err(NetError::Unreachable {
            addr,
            after: timeout,
        }),
        Ok(Err(source)) => Err(match &source {
            ConnectionError::TransportError(e) => {
                match TlsError::wrong_key_from_reason(&e.reason) {
                    Some(TlsError::WrongKey {
                        expected,
                        presented,
                    }) => NetError::WrongKey {
                        addr,
                        expected,
                        presented,
                    },
                    _ => NetError::Connection { addr, source },
                }
            }
            ConnectionError::ConnectionClosed(c)
                if c.error_code == quinn_proto::TransportErrorCode::CONNECTION_REFUSED =>
            {
                NetError::Refused { addr }
            }
            _ => NetError::Connection { addr, source },
        }),
    };
    if let Err(e) = &result {
        tracing::debug!(%addr, node = %expected.short(), error = %e, "connect failed");
    }
    result
}

/// How soon [`connect_any`] dials a target again that refused (a standby may be taking
/// over).
const REDIAL_REFUSED: Duration = Duration::from_millis(500);

/// Connect to whichever of `targets` (address, pinned key) accepts first, dialling all of
/// them at once: a ticket listing a deployment's coordinators reaches the one that leads (a
/// dead one costs no more than the others' answer). A target that refuses (a standby) is
/// dialled again every 500 ms while others are still trying and [`CONNECT_TIMEOUT`] has
/// not passed, so a client that lost its leader reaches the standby the moment it takes
/// over. With several targets, connections use `config` (e.g. [`failover_client_config`])
/// when given. Returns the connection and the index of the target it reached; when none
/// accepts, every target's last failure in one error.
pub async fn connect_any(
    ep: &quinn::Endpoint,
    targets: &[(SocketAddr, NodeId)],
    alpn: &[u8],
    config: Option<&quinn::ClientConfig>,
) -> Result<(quinn::Connection, usize), NetError> {
    if let [(addr, id)] = targets {
        return Ok((connect(ep, *addr, *id, alpn).await?, 0));
    }
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut tries = tokio::task::JoinSet::new();
    let dial = |tries: &mut tokio::task::JoinSet<_>, i: usize, delay: Duration| {
        let (ep, (addr, id), alpn, config) =
            (ep.clone(), targets[i], alpn.to_vec(), config.cloned());
        tries.spawn(async move {
            tokio::time::sleep(delay).await;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            (i, connect_with(&ep, config, addr, id, &alpn, left).await)
        });
    };
    for i in 0..targets.len() {
        dial(&mut tries, i, Duration::ZERO);
    }
    let mut errors: Vec<Option<String>> = vec![None; targets.len()];
    while let Some(done) = tries.join_next().await {
        match done {
            // The other attempts are aborted when `tries` drops; one that already
            // connected closes as its last handle goes.
            Ok((i, Ok(conn))) => return Ok((conn, i)),
            Ok((i, Err(e))) => {
                let again = matches!(e, NetError::Refused { .. })
                    && tokio::time::Instant::now() + REDIAL_REFUSED < deadline
                    && !tries.is_empty();
                errors[i] = Some(e.to_string());
                if again {
                    dial(&mut tries, i, REDIAL_REFUSED);
                }
            }
            Err(e) => tracing::debug!(error = %e, "connect task failed"),
        }
    }
    Err(NetError::NoneAnswered {
        tried: targets.len(),
        errors: errors.into_iter().flatten().collect::<Vec<_>>().join("; "),
    })
}

/// The node id the peer proved with its certificate (both sides present one).
pub fn remote_node_id(conn: &quinn::Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::node_id_from_cert(certs.first()?).ok()
}

/// The ALPN the connection negotiated.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<HandshakeData>()
        .ok()?
        .protocol
}

/// Close a connection with a wire close code and a short reason for the peer's logs.
pub fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    conn.close(VarInt::from_u32(code.code()), reason.as_bytes());
}

/// The close code of a connection the peer closed, if it used one of ours.
pub fn close_code_of(err: &ConnectionError) -> Option<CloseCode> {
    match err {
        ConnectionError::ApplicationClosed(close) => {
            CloseCode::from_code(close.error_code.into_inner())
        }
        _ => None,
    }
}

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer sent a bad frame: close the connection with [`FrameError::close_code`].
    #[error("bad frame from peer: {0}")]
    Decode(#[from] DecodeError),
    /// Our own message is over [`MAX_FRAME`]: a bug or a limit to respect, not the peer's fault.
    #[error("message of {len} bytes is too large to send (maximum {max})")]
    TooLargeToSend { len: usize, max: usize },
    #[error("peer ended the stream without answering")]
    NoResponse,
    #[error("cannot read from stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("cannot write to stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream already closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("cannot open a stream: {0}")]
    Connection(#[from] ConnectionError),
}

impl FrameError {
    /// How to close the connection when this error came from the peer's bytes
    /// ([`CloseCode::Protocol`] or [`CloseCode::FrameTooLarge`]); `None` for I/O and local
    /// errors, which are not the peer's protocol violations.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            FrameError::Decode(e) => Some(e.close_code()),
            _ => None,
        }
    }
}

/// Write one frame (length prefix + postcard body).
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), FrameError> {
    let frame = wire::encode_frame(msg).map_err(|e| match e {
        DecodeError::FrameTooLarge { len, max } => FrameError::TooLargeToSend { len, max },
        other => FrameError::Decode(other),
    })?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Read one frame. `Ok(None)` when the stream ended cleanly before a new frame began.
///
/// The length is checked against [`MAX_FRAME`] before anything is allocated, and the body
/// buffer grows only as bytes actually arrive, so a peer cannot make us reserve
/// `MAX_FRAME` bytes per stream by sending a bare length prefix.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(have)) => {
            return Err(DecodeError::Truncated { have, need: 4 }.into())
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = wire::check_frame_len(prefix)?;
    let mut body = Vec::with_capacity(len.min(64 << 10));
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => {
                return Err(DecodeError::Truncated {
                    have: 4 + body.len(),
                    need: 4 + len,
                }
                .into())
            }
        }
    }
    debug_assert!(len <= MAX_FRAME);
    Ok(Some(wire::decode(&body)?))
}

/// One request/response exchange on a new bi-stream: send `req`, finish our side, read one
/// response frame. Returns the response and the stream, from which raw bytes that follow
/// the response (e.g. [`wire::BlobResponse::Chunks`]) can be read.
pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    req: &Req,
) -> Result<(Resp, quinn::RecvStream), FrameError> {
    request_with_body(conn, req, &[]).await
}

/// [`request`], with raw `body` bytes written after the request frame (e.g.
/// [`wire::SubmitBody::PutBlob`]).
pub async fn request_with_body<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    req: &Req,
    body: &[u8],
) -> Result<(Resp, quinn::RecvStream), FrameError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, req).await?;
    if !body.is_empty() {
        send.write_all(body).await?;
    }
    send.finish()?;
    let resp = read_frame(&mut recv).await?.ok_or(FrameError::NoResponse)?;
    Ok((resp, recv))
}

/// quinn's `server_name` for a pinned connection: `<node id hex>.<alpn hex>`.
fn pin_name(expected: NodeId, alpn: &[u8]) -> String {
    format!("{expected}.{}", hex::encode(alpn))
}

fn parse_pin_name(name: &str) -> Option<(NodeId, Vec<u8>)> {
    let (id, alpn) = name.split_once('.')?;
    Some((id.parse().ok()?, hex::decode(alpn).ok()?))
}

/// The endpoint's default client crypto: makes each outgoing TLS session pin the node id
/// and offer the ALPN that [`connect`] put in the server name.
struct PinningClient {
    identity: Identity,
}

impl PinningClient {
    fn new(identity: Identity) -> Result<PinningClient, TlsError> {
        // Fail now, not on the first connection, if quinn cannot use these settings.
        let probe = identity.client_config(identity.node_id(), &[])?;
        QuicClientConfig::try_from(probe).map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(PinningClient { identity })
    }
}

impl quinn::crypto::ClientConfig for PinningClient {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        server_name: &str,
        params: &quinn_proto::transport_parameters::TransportParameters,
    ) -> Result<Box<dyn quinn::crypto::Session>, quinn::ConnectError> {
        let invalid = || {
            quinn::ConnectError::InvalidServerName(format!(
                "{server_name} (use tasks::net::connect)"
            ))
        };
        let (expected, alpn) = parse_pin_name(server_name).ok_or_else(invalid)?;
        let tls = self
            .identity
            .client_config(expected, &[&alpn])
            .map_err(|_| invalid())?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|_| invalid())?;
        Arc::new(crypto).start_session(version, tls::CERT_NAME, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sockets get the big buffers (as far as the kernel's cap allows), not its default.
    #[test]
    fn quic_sockets_get_big_kernel_buffers() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let (recv, send) = size_socket_buffers(&socket);
        let cap = |f: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/core/{f}"))
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        if let (Some(rmem), Some(wmem)) = (cap("rmem_max"), cap("wmem_max")) {
            assert!(
                recv >= SOCKET_BUFFER.min(rmem),
                "recv buffer {recv} (cap {rmem})"
            );
            assert!(
                send >= SOCKET_BUFFER.min(wmem),
                "send buffer {send} (cap {wmem})"
            );
            if rmem > before {
                assert!(recv > before, "recv buffer still the default {before}");
            }
        }
    }

    #[test]
    fn pin_name_round_trips() {
        let id = NodeKey::generate().node_id();
        let name = pin_name(id, wire::ALPN_BLOB);
        assert_eq!(parse_pin_name(&name), Some((id, wire::ALPN_BLOB.to_vec())));
        assert_eq!(parse_pin_name("localhost"), None);
    }
}
