//! The deterministic wasmtime sandbox.
