//! The HTTP layer: the data router ([`api`] for ingest, [`read_api`] for
//! reads), the admin router ([`admin_api`], with [`quarantine_api`]), their
//! OpenAPI documents ([`openapi`]), query and path parsing ([`params`]), the
//! one error → status mapping ([`error`]) and each listener's connection
//! handling ([`serve`]).
//!
//! The only layer that knows axum and hyper (besides `server`, which wires
//! the listeners).

pub mod admin_api;
pub mod api;
pub mod error;
pub mod openapi;
pub mod params;
pub mod quarantine_api;
pub mod read_api;
pub mod serve;
