//! Async QUIC helpers shared by the coordinator and the worker (feature `net`).
