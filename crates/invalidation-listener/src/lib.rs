#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod event;
mod listener;
mod options;

pub use event::{ListenerEvent, ListenerStats};
pub use listener::PgInvalidationListener;
pub use options::ListenerOptions;

pub use adapter_pg::{
    GuardLog, INVALIDATION_CHANNEL, Invalidation, InvalidationSink, LogPosition, LogRead, PgConfig,
    PgError, PopulateSink, parse_payload,
};
