#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod adapter;
mod error;
mod rows;
mod schema;

#[cfg(test)]
mod tests;

pub use adapter::SqliteAdapter;
pub use error::SqliteError;
