//! `mpi` bootstrap (cargo feature `mpi`): rank and world from `MPI_COMM_WORLD`, all_gather
//! of byte blobs as `MPI_Allgather` of the lengths then `MPI_Allgatherv` of the bytes.

use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::{Count, Threading};

use super::Bootstrap;
use crate::error::{Error, Result};

/// Bootstrap through MPI.
pub struct MpiBootstrap {
    /// `None` when the program had initialized MPI itself: then it also finalizes it.
    _universe: Option<Universe>,
    rank: usize,
    world_size: usize,
}

impl MpiBootstrap {
    /// Initializes MPI (unless the program already did) and reads rank and size of
    /// `MPI_COMM_WORLD`. Dropping the bootstrap finalizes MPI if it initialized it.
    pub fn new() -> Result<MpiBootstrap> {
        // Serialized: the bootstrap may be moved to another thread, but is used by one at a time.
        let universe = match mpi::initialize_with_threading(Threading::Serialized) {
            Some((u, provided)) => {
                if provided < Threading::Serialized {
                    tracing::warn!(
                        "MPI provides thread level {provided:?}; keep hetccl's bootstrap on the thread that created it"
                    );
                }
                Some(u)
            }
            None => {
                tracing::info!("MPI was initialized by the program; using its MPI_COMM_WORLD");
                None
            }
        };
        let world = SimpleCommunicator::world();
        let (rank, size) = (world.rank(), world.size());
        let (Ok(rank), Ok(world_size)) = (usize::try_from(rank), usize::try_from(size)) else {
            return Err(Error::Bootstrap(format!(
                "MPI reports rank {rank} of {size}"
            )));
        };
        tracing::info!("rank {rank}/{world_size}: bootstrap through MPI");
        Ok(MpiBootstrap {
            _universe: universe,
            rank,
            world_size,
        })
    }
}

impl Bootstrap for MpiBootstrap {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let world = SimpleCommunicator::world();
        let too_big = |what: &str| {
            Error::Bootstrap(format!(
                "rank {}: MPI all_gather of {what} exceeds MPI's 2 GiB count limit",
                self.rank
            ))
        };
        let len = Count::try_from(data.len()).map_err(|_| too_big("one blob"))?;
        let mut lens: Vec<Count> = vec![0; self.world_size];
        world.all_gather_into(&len, &mut lens[..]);
        let mut displs: Vec<Count> = Vec::with_capacity(self.world_size);
        let mut total: Count = 0;
        for &l in &lens {
            displs.push(total);
            total = total.checked_add(l).ok_or_else(|| too_big("all blobs"))?;
        }
        // An empty Rust slice points at address 1, which OpenMPI reads as MPI_IN_PLACE
        // and refuses: both buffers must point into real memory even when empty.
        let pad = [0u8; 1];
        let send = if data.is_empty() { &pad[..0] } else { data };
        let mut buf = vec![0u8; (total as usize).max(1)];
        {
            let mut part = PartitionMut::new(&mut buf[..], &lens[..], &displs[..]);
            world.all_gather_varcount_into(send, &mut part);
        }
        Ok(displs
            .iter()
            .zip(&lens)
            .map(|(&d, &l)| {
                buf.get(d as usize..(d + l) as usize)
                    .unwrap_or_default()
                    .to_vec()
            })
            .collect())
    }
}
