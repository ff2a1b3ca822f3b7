//! The user-facing communicator.

/// A group of ranks that run collectives together.
pub struct Communicator {}
