//! The Peergrid coordinator: publishes task manifests, hands out replicas, compares result
//! digests, keeps accepted outputs and credit. It never runs tasks.
//!
//! # Layout
//! - [`core`]: the deterministic scheduling core (no I/O, `now` passed in): jobs, tasks,
//!   replicas, workers; [`core::scheduler`], [`core::validator`], [`core::trust`].
//! - [`store`]: durable state behind the [`store::Store`] trait; SQLite implementation
//!   ([`store::SqliteStore`]) with schema migrations.
//! - [`server`]: the QUIC service: [`server::Coordinator::start`] / [`server::serve`]; the
//!   [`server::engine`] thread (core + store, group commit), worker [`server::session`]s,
//!   [`server::submit`] requests, blob seeding.
//! - [`client`]: the submitter library ([`client::Client`]).
//! - [`cli`]: `submit`, `status`, `results`, `demo` subcommands.
//! - [`config`]: `serve --config FILE` (scheduler and trust policy, TOML).
//! - [`ha`]: several coordinators on one PostgreSQL database, one leading (lease, fencing,
//!   the deployment's ticket, token and blobs).

pub mod cli;
pub mod client;
pub mod config;
pub mod core;
pub mod ha;
pub mod server;
pub mod store;
