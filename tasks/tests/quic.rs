//! Real quinn endpoints on loopback: pinned identities, frame I/O, and a bad peer costing
//! only its own connection.
#![cfg(feature = "net")]

use std::net::SocketAddr;
use std::time::Duration;

use tasks::blob::BlobRef;
use tasks::net::{self, FrameError, NetError};
use tasks::wire::{
    self, BlobResponse, CloseCode, CoordMsg, SubmitBody, SubmitRequest, SubmitResponse, WorkerMsg,
    ALPN_BLOB, ALPN_COORD, ALPN_SUBMIT, MAX_FRAME,
};
use tasks::{NodeId, NodeKey};
use tokio::sync::mpsc;

const LOOPBACK: &str = "127.0.0.1:0";
/// A hang guard, not a speed claim: generous so a loaded machine never trips it.
const PATIENCE: Duration = Duration::from_secs(60);

/// What the test server saw on one stream.
#[derive(Debug)]
struct Seen {
    client: Option<NodeId>,
    alpn: Option<Vec<u8>>,
    msg: Result<Option<WorkerMsg>, String>,
}

struct Server {
    key: NodeKey,
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
}

/// A server speaking `peergrid/coord/1` (one request per stream: a `WorkerMsg` in, an
/// `Ack` out) and `peergrid/submit/1` (`PutBlob` followed by raw bytes). A bad frame closes
/// that connection with the frame error's close code, as the wire spec says.
fn server() -> Server {
    let key = NodeKey::generate();
    let ep = net::endpoint(&key, LOOPBACK.parse().unwrap(), &[ALPN_COORD, ALPN_SUBMIT]).unwrap();
    let addr = ep.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    // The accept loop owns the endpoint; it lives as long as the test's runtime.
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(serve_stream(conn.clone(), send, recv, tx.clone()));
                }
            });
        }
    });
    Server { key, addr, seen }
}

async fn serve_stream(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    tx: mpsc::UnboundedSender<Seen>,
) {
    let client = net::remote_node_id(&conn);
    let alpn = net::alpn(&conn);
    if alpn.as_deref() == Some(ALPN_SUBMIT) {
        let req: SubmitRequest = match net::read_frame(&mut recv).await {
            Ok(Some(req)) => req,
            _ => return,
        };
        let SubmitBody::PutBlob { blob } = req.body else {
            return;
        };
        let mut bytes = vec![0; blob.size as usize];
        recv.read_exact(&mut bytes).await.unwrap();
        let resp = if BlobRef::of(&bytes) == blob {
            SubmitResponse::Ok
        } else {
            SubmitResponse::Error {
                code: wire::ErrorCode::BadRequest,
                message: "blob does not match".into(),
            }
        };
        net::write_frame(&mut send, &resp).await.unwrap();
        // Then raw bytes after the response, as blob `Chunks` answers do.
        send.write_all(b"trailer").await.unwrap();
        send.finish().unwrap();
        return;
    }
    let msg = net::read_frame::<WorkerMsg>(&mut recv).await;
    match &msg {
        Ok(Some(WorkerMsg::RequestWork { max })) => {
            let ack = CoordMsg::Ack {
                replicas: vec![u64::from(*max)],
            };
            net::write_frame(&mut send, &ack).await.unwrap();
            send.finish().unwrap();
        }
        Ok(_) => {
            let _ = send.finish();
        }
        Err(e) => {
            if let Some(code) = e.close_code() {
                net::close(&conn, code, &e.to_string());
            }
        }
    }
    let _ = tx.send(Seen {
        client,
        alpn,
        msg: msg.map_err(|e| e.to_string()),
    });
}

fn client() -> (NodeKey, quinn::Endpoint) {
    let key = NodeKey::generate();
    let ep = net::endpoint(&key, LOOPBACK.parse().unwrap(), &[]).unwrap();
    (key, ep)
}

async fn ask(conn: &quinn::Connection, max: u32) -> Result<CoordMsg, FrameError> {
    let (resp, _) = net::request::<_, CoordMsg>(conn, &WorkerMsg::RequestWork { max }).await?;
    Ok(resp)
}

async fn next_seen(server: &mut Server) -> Seen {
    tokio::time::timeout(PATIENCE, server.seen.recv())
        .await
        .expect("server saw the stream")
        .unwrap()
}

/// Send raw bytes on a new stream, then wait for the server to close the connection.
async fn send_raw_and_wait_for_close(
    conn: &quinn::Connection,
    bytes: &[u8],
    finish: bool,
) -> Option<CloseCode> {
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let err = tokio::time::timeout(PATIENCE, conn.closed())
        .await
        .expect("server closed the connection");
    net::close_code_of(&err)
}

#[tokio::test]
async fn pinned_connection_exchanges_frames_both_ways_and_each_side_learns_the_other() {
    let mut server = server();
    let (ckey, cep) = client();
    let conn = net::connect(&cep, server.addr, server.key.node_id(), ALPN_COORD)
        .await
        .unwrap();
    assert_eq!(net::remote_node_id(&conn), Some(server.key.node_id()));
    assert_eq!(net::alpn(&conn).as_deref(), Some(ALPN_COORD));

    assert_eq!(
        ask(&conn, 7).await.unwrap(),
        CoordMsg::Ack { replicas: vec![7] }
    );
    let seen = next_seen(&mut server).await;
    assert_eq!(
        seen.client,
        Some(ckey.node_id()),
        "server learns the client's node id from its certificate"
    );
    assert_eq!(seen.alpn.as_deref(), Some(ALPN_COORD));
    assert_eq!(seen.msg.unwrap(), Some(WorkerMsg::RequestWork { max: 7 }));

    // Many frames on one long-lived stream, both ways.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    net::write_frame(&mut send, &WorkerMsg::RequestWork { max: 1 })
        .await
        .unwrap();
    assert_eq!(
        net::read_frame::<CoordMsg>(&mut recv).await.unwrap(),
        Some(CoordMsg::Ack { replicas: vec![1] })
    );
    assert_eq!(
        net::read_frame::<CoordMsg>(&mut recv).await.unwrap(),
        None,
        "clean end of stream reads as None"
    );
}

#[tokio::test]
async fn client_pinning_the_wrong_node_id_is_refused_with_wrong_key() {
    let mut server = server();
    let (_, cep) = client();
    let impostor = NodeKey::generate().node_id();
    let err = net::connect(&cep, server.addr, impostor, ALPN_COORD)
        .await
        .unwrap_err();
    match &err {
        NetError::WrongKey {
            expected,
            presented,
            addr,
        } => {
            assert_eq!(*expected, impostor);
            assert_eq!(*presented, server.key.node_id());
            assert_eq!(*addr, server.addr);
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&impostor.to_string()) && text.contains(&server.key.node_id().to_string()),
        "{text}"
    );

    // The server is unharmed and the right pin still works from the same endpoint.
    let conn = net::connect(&cep, server.addr, server.key.node_id(), ALPN_COORD)
        .await
        .unwrap();
    assert_eq!(
        ask(&conn, 2).await.unwrap(),
        CoordMsg::Ack { replicas: vec![2] }
    );
    assert!(next_seen(&mut server).await.msg.is_ok());
}

#[tokio::test]
async fn connecting_with_an_alpn_the_server_does_not_speak_fails() {
    let server = server();
    let (_, cep) = client();
    let err = net::connect(&cep, server.addr, server.key.node_id(), ALPN_BLOB)
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::Connection { .. }), "{err:?}");
}

#[tokio::test]
async fn silent_address_is_reported_unreachable_within_the_timeout() {
    // A bound UDP socket that never answers (so no ICMP "port unreachable" either).
    let silent = std::net::UdpSocket::bind(LOOPBACK).unwrap();
    let (_, cep) = client();
    let id = NodeKey::generate().node_id();
    let started = std::time::Instant::now();
    let err = net::connect_timeout(
        &cep,
        silent.local_addr().unwrap(),
        id,
        ALPN_COORD,
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, NetError::Unreachable { .. }), "{err:?}");
    assert!(started.elapsed() < PATIENCE);
}

#[tokio::test]
async fn garbage_frame_closes_only_that_connection_with_the_protocol_code() {
    let mut server = server();
    let (_, cep) = client();
    let id = server.key.node_id();
    let bad = net::connect(&cep, server.addr, id, ALPN_COORD)
        .await
        .unwrap();
    let good = net::connect(&cep, server.addr, id, ALPN_COORD)
        .await
        .unwrap();
    assert_eq!(
        ask(&good, 1).await.unwrap(),
        CoordMsg::Ack { replicas: vec![1] }
    );
    next_seen(&mut server).await;

    // A well-formed length with a body that is not a WorkerMsg (variant 200 does not exist).
    let garbage = [0, 0, 0, 3, 200, 1, 2];
    assert_eq!(
        send_raw_and_wait_for_close(&bad, &garbage, true).await,
        Some(CloseCode::Protocol)
    );
    assert!(next_seen(&mut server).await.msg.is_err());

    assert_eq!(
        ask(&good, 2).await.unwrap(),
        CoordMsg::Ack { replicas: vec![2] },
        "other connection unaffected"
    );
}

#[tokio::test]
async fn oversized_frame_closes_only_that_connection_with_frame_too_large() {
    let mut server = server();
    let (_, cep) = client();
    let id = server.key.node_id();
    let bad = net::connect(&cep, server.addr, id, ALPN_COORD)
        .await
        .unwrap();
    let good = net::connect(&cep, server.addr, id, ALPN_COORD)
        .await
        .unwrap();

    // Only the length prefix: the receiver must refuse before waiting for (or allocating) a body.
    let prefix = ((MAX_FRAME + 1) as u32).to_be_bytes();
    assert_eq!(
        send_raw_and_wait_for_close(&bad, &prefix, false).await,
        Some(CloseCode::FrameTooLarge)
    );
    let seen = next_seen(&mut server).await;
    assert!(seen.msg.unwrap_err().contains("exceeds the maximum"));

    assert_eq!(
        ask(&good, 3).await.unwrap(),
        CoordMsg::Ack { replicas: vec![3] },
        "other connection unaffected"
    );
}

#[tokio::test]
async fn truncated_frame_and_trailing_bytes_are_protocol_violations() {
    let mut server = server();
    let (_, cep) = client();
    let id = server.key.node_id();
    let mut good_frame = wire::encode_frame(&WorkerMsg::RequestWork { max: 5 }).unwrap();

    // Body cut short, then the stream ends.
    let conn = net::connect(&cep, server.addr, id, ALPN_COORD)
        .await
        .unwrap();
    let cut = &good_frame[..good_frame.len() - 1];
    assert_eq!(
        send_raw_and_wait_for_close(&conn, cut, true).await,
        Some(CloseCode::Protocol)
    );
    assert!(next_seen(&mut server)
        .await
        .msg
        .unwrap_err()
        .contains("truncated"));

    // Prefix cut short.
    let conn = net::connect(&cep, server.addr, id, ALPN_COORD)
        .await
        .unwrap();
    assert_eq!(
        send_raw_and_wait_for_close(&conn, &[0, 0], true).await,
        Some(CloseCode::Protocol)
    );
    next_seen(&mut server).await;

    // A valid message with an extra byte inside the frame.
    let conn = net::connect(&cep, server.addr, id, ALPN_COORD)
        .await
        .unwrap();
    good_frame[3] += 1;
    good_frame.push(0);
    assert_eq!(
        send_raw_and_wait_for_close(&conn, &good_frame, true).await,
        Some(CloseCode::Protocol)
    );
    assert!(next_seen(&mut server)
        .await
        .msg
        .unwrap_err()
        .contains("trailing"));
}

#[tokio::test]
async fn request_with_body_carries_raw_bytes_both_ways() {
    let server = server();
    let (_, cep) = client();
    let conn = net::connect(&cep, server.addr, server.key.node_id(), ALPN_SUBMIT)
        .await
        .unwrap();
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let req = SubmitRequest {
        token: "t".into(),
        body: SubmitBody::PutBlob {
            blob: BlobRef::of(&blob),
        },
    };
    let (resp, mut recv) = net::request_with_body::<_, SubmitResponse>(&conn, &req, &blob)
        .await
        .unwrap();
    assert_eq!(resp, SubmitResponse::Ok);
    assert_eq!(recv.read_to_end(1024).await.unwrap(), b"trailer");
}

#[tokio::test]
async fn peer_ending_the_stream_without_an_answer_is_no_response() {
    let server = server();
    let (_, cep) = client();
    let conn = net::connect(&cep, server.addr, server.key.node_id(), ALPN_COORD)
        .await
        .unwrap();
    // The test server answers only RequestWork; anything else gets a finished, empty stream.
    let err = net::request::<_, BlobResponse>(&conn, &WorkerMsg::HaveBlobs { blobs: vec![] })
        .await
        .unwrap_err();
    assert!(matches!(err, FrameError::NoResponse), "{err:?}");
    assert_eq!(err.close_code(), None);
}

/// A node restarted with its identity (same key, same address) resets the connections its
/// previous process left behind: the peer's next packet gets a stateless reset it can
/// verify, so it learns the connection is gone and reconnects instead of waiting out the
/// 30 s idle timeout. The "previous process" runs on its own runtime, shut down abruptly:
/// like a process killed with SIGKILL, it sends no CONNECTION_CLOSE.
#[tokio::test]
async fn a_restarted_node_resets_the_connections_of_its_previous_process() {
    let key = NodeKey::generate();
    let previous = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let old = {
        let _in = previous.enter();
        net::endpoint(&key, LOOPBACK.parse().unwrap(), &[ALPN_COORD]).unwrap()
    };
    let addr = old.local_addr().unwrap();
    let (tx, accepted) = tokio::sync::oneshot::channel();
    previous.spawn(async move {
        let conn = old.accept().await.unwrap().await.unwrap();
        let _ = tx.send(());
        // Hold the connection (and the endpoint) until the runtime dies.
        std::future::pending::<()>().await;
        drop((conn, old));
    });
    let client = net::endpoint(&NodeKey::generate(), LOOPBACK.parse().unwrap(), &[]).unwrap();
    let conn = net::connect(&client, addr, key.node_id(), ALPN_COORD)
        .await
        .unwrap();
    accepted.await.unwrap();
    previous.shutdown_background();
    // The dead process's socket is closed once its runtime has dropped the driver.
    let t0 = std::time::Instant::now();
    let new = loop {
        match net::endpoint(&key, addr, &[ALPN_COORD]) {
            Ok(ep) => break ep,
            Err(e) if t0.elapsed() < PATIENCE => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the old port stays taken: {e}"),
        }
    };
    // Traffic on the old connection now reaches the new process.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(b"anyone there?").await;
    let why = tokio::time::timeout(PATIENCE, conn.closed())
        .await
        .expect("the connection ends");
    assert!(
        matches!(why, quinn::ConnectionError::Reset),
        "the restarted node's stateless reset ends the connection, not the idle timeout: {why:?}"
    );
    drop(new);
}
