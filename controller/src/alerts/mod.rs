//! Alert sinks with a durable outbox.
//!
//! The store writes an [`Alert`] for every incident transition in the
//! transition's own transaction; the [`dispatch::Dispatcher`] fans each one
//! out to the sinks its severity is routed to (one outbox row per sink) and
//! delivers every row at least once, retrying with exponential back-off (and
//! the sink's `Retry-After`) while the sink is down, across controller
//! restarts. Sinks de-duplicate by key where they can: PagerDuty by
//! `dedup_key` (the incident id), Alertmanager by label set, webhooks by the
//! `Idempotency-Key` header (`<incident>:<transition>`).

pub mod alert;
pub mod config;
pub mod dispatch;
pub mod render;
pub mod sink;

pub use alert::{Alert, Transition};
pub use config::{AlertsConfig, ConfigError, Sink, SinkKind};
pub use dispatch::Dispatcher;
