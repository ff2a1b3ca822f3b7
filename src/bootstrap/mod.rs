//! Who am I, and where are my peers.
//!
//! A [`Bootstrap`] knows this process's rank and the world size, and can all-gather
//! small blobs (listening addresses, host names) among all ranks. Implementations:
//! a TCP store served by rank 0 (`env://`, torchrun's variables), a rendezvous
//! directory on a shared filesystem (`file://`), and MPI (feature `mpi`).
//! Every TCP connection, here and in the transports, opens with [`auth`]'s handshake.

pub mod auth;

use crate::error::Result;

/// Rank identity plus a way to exchange small blobs with every other rank.
pub trait Bootstrap: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank contributes `data`; returns all contributions in rank order.
    /// Collective: every rank must call it, in the same order.
    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Returns when every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
}
