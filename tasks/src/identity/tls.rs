//! Pinned-key TLS for QUIC: a node's certificate is self-signed with its ed25519 node key,
//! and a node's identity is that certificate's public key, never a name or a CA.
//!
//! - The accepting side ([`server_config`]) requires a client certificate and accepts any
//!   self-signed ed25519 certificate: volunteers may join, and their identity is their key.
//! - The connecting side ([`client_config`]) pins the node id it expects (from a ticket or
//!   a peer list) and refuses any other key with [`TlsError::WrongKey`].
//!
//! In both directions the TLS 1.3 `CertificateVerify` signature is checked against the
//! certificate's key, which proves the peer holds the secret key of the node id it presents.
//! Hostnames, SNI and validity dates are ignored: they mean nothing for a pinned key.
//! Session resumption and 0-RTT are off, so every connection runs the full handshake and
//! the peer's certificate is always checked.

use std::sync::Arc;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{Signature, VerifyingKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::oid_registry::OID_SIG_ED25519;

use super::{NodeId, NodeKey};

/// The subject alternative name in every node certificate. It carries no meaning (the key is
/// the identity) but some tools insist on one.
pub const CERT_NAME: &str = "peergrid";

/// Why a TLS config could not be built or a peer certificate was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TlsError {
    #[error("cannot make a certificate from the node key: {0}")]
    Certificate(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
    #[error("peer certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("peer certificate's key is not ed25519 (algorithm {oid}): peergrid nodes are identified by ed25519 keys")]
    NotEd25519 { oid: String },
    #[error("peer certificate is not self-signed by its own ed25519 key")]
    NotSelfSigned,
    #[error("wrong key: expected node {expected} but the peer presented node {presented}")]
    WrongKey { expected: NodeId, presented: NodeId },
}

impl TlsError {
    /// Recover a [`TlsError::WrongKey`] from the text of a handshake failure. QUIC stacks
    /// carry a TLS verifier's error only as text (quinn's `TransportError::reason`); this
    /// reads back what `WrongKey`'s `Display` wrote, so the two live side by side.
    pub fn wrong_key_from_reason(reason: &str) -> Option<TlsError> {
        const EXPECTED: &str = "wrong key: expected node ";
        const PRESENTED: &str = " but the peer presented node ";
        let rest = &reason[reason.find(EXPECTED)? + EXPECTED.len()..];
        let expected: NodeId = rest.get(..64)?.parse().ok()?;
        let presented: NodeId = rest
            .get(64..)?
            .strip_prefix(PRESENTED)?
            .get(..64)?
            .parse()
            .ok()?;
        Some(TlsError::WrongKey {
            expected,
            presented,
        })
    }
}

/// The node id a certificate presents: its ed25519 subject public key.
///
/// Only extracts; it does not check the self-signature or any handshake signature.
pub fn node_id_from_cert(cert: &CertificateDer<'_>) -> Result<NodeId, TlsError> {
    let parsed = parse(cert)?;
    node_id_of(&parsed)
}

fn parse<'a>(
    cert: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, TlsError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(TlsError::BadCertificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(parsed)
}

fn node_id_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<NodeId, TlsError> {
    let spki = cert.public_key();
    if spki.algorithm.algorithm != OID_SIG_ED25519 {
        return Err(TlsError::NotEd25519 {
            oid: spki.algorithm.algorithm.to_id_string(),
        });
    }
    let key: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| {
            TlsError::BadCertificate(format!(
                "ed25519 public key is {} bytes, expected 32",
                spki.subject_public_key.data.len()
            ))
        })?;
    Ok(NodeId(key))
}

/// Check that a peer certificate is ed25519, self-signed by its own key, and return that key.
fn verify_peer_cert(cert: &CertificateDer<'_>) -> Result<NodeId, TlsError> {
    let parsed = parse(cert)?;
    let id = node_id_of(&parsed)?;
    if parsed.signature_algorithm.algorithm != OID_SIG_ED25519 {
        return Err(TlsError::NotSelfSigned);
    }
    let key = VerifyingKey::from_bytes(id.as_bytes()).map_err(|_| TlsError::NotSelfSigned)?;
    let sig =
        Signature::from_slice(&parsed.signature_value.data).map_err(|_| TlsError::NotSelfSigned)?;
    key.verify_strict(parsed.tbs_certificate.as_ref(), &sig)
        .map_err(|_| TlsError::NotSelfSigned)?;
    Ok(id)
}

/// A node's self-signed certificate and its key in PKCS#8 DER.
pub fn self_signed_cert(
    key: &NodeKey,
) -> Result<(CertificateDer<'static>, PrivatePkcs8KeyDer<'static>), TlsError> {
    let pkcs8 = key
        .signing_key()
        .to_pkcs8_der()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let pkcs8 = PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec());
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()])
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CERT_NAME);
    let cert = params
        .self_signed(&pair)
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    Ok((cert.der().clone(), pkcs8))
}

/// The ring provider, the only one peergrid uses (so no process-wide default is needed).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A node's TLS identity: its certificate and signing key, built once and shared by every
/// config made from it (an endpoint makes a client config per outgoing connection).
#[derive(Debug, Clone)]
pub struct Identity {
    node_id: NodeId,
    certified: Arc<CertifiedKey>,
    provider: Arc<CryptoProvider>,
}

impl Identity {
    pub fn new(key: &NodeKey) -> Result<Identity, TlsError> {
        let (cert, pkcs8) = self_signed_cert(key)?;
        let provider = provider();
        let certified = CertifiedKey::from_der(vec![cert], PrivateKeyDer::Pkcs8(pkcs8), &provider)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        Ok(Identity {
            node_id: key.node_id(),
            certified: Arc::new(certified),
            provider,
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// See [`server_config`].
    pub fn server_config(&self, alpns: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = Arc::new(AnyNodeClient {
            algs: self.provider.signature_verification_algorithms,
        });
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(self.certified.clone())));
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        config.max_early_data_size = 0;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(config)
    }

    /// See [`client_config`].
    pub fn client_config(
        &self,
        expected: NodeId,
        alpns: &[&[u8]],
    ) -> Result<rustls::ClientConfig, TlsError> {
        let verifier = Arc::new(PinnedServer {
            expected,
            algs: self.provider.signature_verification_algorithms,
        });
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.certified.clone())));
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        config.resumption = rustls::client::Resumption::disabled();
        config.enable_early_data = false;
        // The server name means nothing here; do not put it on the wire.
        config.enable_sni = false;
        Ok(config)
    }
}

/// TLS 1.3 server config for `key`: presents the node's certificate, offers `alpns`,
/// requires a client certificate and accepts any self-signed ed25519 one.
pub fn server_config(key: &NodeKey, alpns: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
    Identity::new(key)?.server_config(alpns)
}

/// TLS 1.3 client config for `key`: presents the node's certificate as client auth, offers
/// `alpns`, and accepts the server only if its key is `expected`.
pub fn client_config(
    key: &NodeKey,
    expected: NodeId,
    alpns: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    Identity::new(key)?.client_config(expected, alpns)
}

fn refuse(e: TlsError) -> rustls::Error {
    let cert_error = match e {
        TlsError::BadCertificate(_) => CertificateError::BadEncoding,
        TlsError::NotSelfSigned => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(Refusal(other)))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

/// rustls shows `CertificateError::Other` with `{:?}`; this makes that show our one-line
/// message, which is also what reaches the QUIC layer as the handshake failure's reason.
struct Refusal(TlsError);

impl std::fmt::Debug for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn no_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not supported: peergrid speaks TLS 1.3 only".into())
}

/// Accepts a server only if it presents the pinned key.
#[derive(Debug)]
struct PinnedServer {
    expected: NodeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = verify_peer_cert(end_entity).map_err(refuse)?;
        if presented != self.expected {
            return Err(refuse(TlsError::WrongKey {
                expected: self.expected,
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Accepts any client that presents a self-signed ed25519 certificate.
#[derive(Debug)]
struct AnyNodeClient {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyNodeClient {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer_cert(end_entity).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_presents_the_node_key_and_is_self_signed() {
        let key = NodeKey::generate();
        let (cert, _) = self_signed_cert(&key).unwrap();
        assert_eq!(node_id_from_cert(&cert).unwrap(), key.node_id());
        assert_eq!(verify_peer_cert(&cert).unwrap(), key.node_id());
        // The same key always yields the same identity.
        let (again, _) = self_signed_cert(&key).unwrap();
        assert_eq!(node_id_from_cert(&again).unwrap(), key.node_id());
    }

    #[test]
    fn non_ed25519_certificate_is_refused() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        assert!(matches!(
            node_id_from_cert(cert.der()),
            Err(TlsError::NotEd25519 { .. })
        ));
    }

    #[test]
    fn tampered_certificate_fails_the_self_signature() {
        let key = NodeKey::generate();
        let (cert, _) = self_signed_cert(&key).unwrap();
        let mut bytes = cert.as_ref().to_vec();
        // Flip a bit inside the CN "peergrid" (within the signed TBS part).
        let at = bytes.windows(8).position(|w| w == b"peergrid").unwrap();
        bytes[at] ^= 0x20;
        let tampered = CertificateDer::from(bytes);
        assert_eq!(verify_peer_cert(&tampered), Err(TlsError::NotSelfSigned));
        assert!(node_id_from_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }

    #[test]
    fn wrong_key_message_names_both_ids_and_reads_back() {
        let expected = NodeKey::generate().node_id();
        let presented = NodeKey::generate().node_id();
        let e = TlsError::WrongKey {
            expected,
            presented,
        };
        let text = refuse(e.clone()).to_string();
        assert!(
            text.contains(&expected.to_string()) && text.contains(&presented.to_string()),
            "{text}"
        );
        assert_eq!(TlsError::wrong_key_from_reason(&text), Some(e));
        assert_eq!(
            TlsError::wrong_key_from_reason("invalid peer certificate: BadSignature"),
            None
        );
    }

    /// Run a TLS 1.3 handshake in memory; the error says which side refused.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(rustls::ClientConnection, rustls::ServerConnection), (&'static str, rustls::Error)>
    {
        let name = ServerName::try_from(CERT_NAME).unwrap();
        let mut c =
            rustls::ClientConnection::new(Arc::new(client), name).map_err(|e| ("client", e))?;
        let mut s = rustls::ServerConnection::new(Arc::new(server)).map_err(|e| ("server", e))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().map_err(|e| ("server", e))?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().map_err(|e| ("client", e))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish")
    }

    fn peer_id(certs: Option<&[CertificateDer<'static>]>) -> NodeId {
        node_id_from_cert(&certs.expect("peer presented a certificate")[0]).unwrap()
    }

    #[test]
    fn pinned_handshake_succeeds_and_each_side_learns_the_others_key() {
        let (server, client) = (NodeKey::generate(), NodeKey::generate());
        let (c, s) = handshake(
            client_config(&client, server.node_id(), &[b"a/1"]).unwrap(),
            server_config(&server, &[b"b/1", b"a/1"]).unwrap(),
        )
        .unwrap();
        assert_eq!(peer_id(c.peer_certificates()), server.node_id());
        assert_eq!(peer_id(s.peer_certificates()), client.node_id());
        assert_eq!(c.alpn_protocol(), Some(&b"a/1"[..]));
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    }

    #[test]
    fn client_pinning_another_key_refuses_the_server() {
        let (server, client) = (NodeKey::generate(), NodeKey::generate());
        let pinned = NodeKey::generate().node_id();
        let (side, err) = handshake(
            client_config(&client, pinned, &[b"a/1"]).unwrap(),
            server_config(&server, &[b"a/1"]).unwrap(),
        )
        .unwrap_err();
        assert_eq!(side, "client");
        let text = err.to_string();
        assert_eq!(
            TlsError::wrong_key_from_reason(&text),
            Some(TlsError::WrongKey {
                expected: pinned,
                presented: server.node_id()
            }),
            "{text}"
        );
    }

    /// A client config that trusts the pinned server but presents `auth` (or nothing).
    fn client_with_auth(
        server: NodeId,
        auth: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> rustls::ClientConfig {
        let provider = provider();
        let verifier = Arc::new(PinnedServer {
            expected: server,
            algs: provider.signature_verification_algorithms,
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match auth {
            Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"a/1".to_vec()];
        config
    }

    #[test]
    fn server_requires_a_client_certificate() {
        let server = NodeKey::generate();
        let (side, err) = handshake(
            client_with_auth(server.node_id(), None),
            server_config(&server, &[b"a/1"]).unwrap(),
        )
        .unwrap_err();
        assert_eq!(
            (side, err),
            ("server", rustls::Error::NoCertificatesPresented)
        );
    }

    #[test]
    fn server_refuses_a_non_ed25519_client_certificate() {
        let server = NodeKey::generate();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()])
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.serialize_der()));
        let result = handshake(
            client_with_auth(server.node_id(), Some((cert.der().clone(), key))),
            server_config(&server, &[b"a/1"]).unwrap(),
        );
        assert!(
            result.is_err(),
            "an ECDSA client identity must not be accepted"
        );
    }

    #[test]
    fn configs_build_for_tls13_only() {
        let key = NodeKey::generate();
        let s = server_config(&key, &[b"peergrid/coord/1"]).unwrap();
        assert_eq!(s.alpn_protocols, vec![b"peergrid/coord/1".to_vec()]);
        let c = client_config(&key, NodeKey::generate().node_id(), &[b"peergrid/blob/1"]).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"peergrid/blob/1".to_vec()]);
        assert!(rustls::ClientConnection::new(
            Arc::new(c),
            ServerName::try_from("peergrid").unwrap()
        )
        .is_ok());
    }
}
