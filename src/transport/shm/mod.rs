//! Memory shared by the ranks of one host, below the collectives: segments, the
//! liveness of the processes that map them, and the shm link.
//!
//! | file | holds |
//! | --- | --- |
//! | [`segment`] | making, sizing, mapping and removing segments (memfd or `/dev/shm`) |
//! | `liveness` | whether a peer's process still runs; the states a side of a shared page is in |
//! | `link` | [`ShmLink`]: two rings in one segment, a [`crate::transport::Link`] |
//!
//! The shared buffers and the collectives that read them in place are above, in
//! `communicator::shared`.

mod link;
pub(crate) mod liveness;
pub mod segment;
mod stores;

pub use link::{segment_name, ShmGeometry, ShmLink};
