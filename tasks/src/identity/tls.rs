//! Pinned-key TLS for QUIC (filled in by the identity work).
