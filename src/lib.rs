//! hetccl: collective communication for data-parallel training on heterogeneous clusters.
//!
//! The crate is layered as `docs/DESIGN.md` describes; dependencies point down only:
//!
//! ```text
//!  capi             extern "C" wrappers
//!  DeviceComm       device collectives over the host communicator (`device`, feature `cuda`)
//!  communicator     the user-facing object: collectives, async handles
//!  algorithm        ring, tree, hierarchical schedules (pure data) + one executor
//!  compression      fp16/bf16 wire formats       reduce: element math
//!  transport        point-to-point links: shm, tcp
//!  topology         who is where
//!  bootstrap        who am I: rank/world, all-gather of small blobs, job key
//!  device           driver calls, CUDA context, streams, kernels, launchers (feature `cuda`)
//!  config, error    typed settings read once from HETCCL_* env; one Error enum
//!  flight           the flight recorder: each rank's last collectives, dumps, the hang report
//!  log              writers for log lines and messages that never fail on a closed stream
//!  observe          per-communicator counters and the timeline trace (HETCCL_TRACE)
//! ```
//!
//! The crate is the library alone. The BERT trainer (`hetccl-bert`) is the package in
//! `trainer/`, a user of the public API like any other; the command-line tools (the
//! `hetccl run` launcher, hetccl-perf, hetccl-check, ...) are the package in `tools/`;
//! the test kit shared by the tests is `testkit/`.
#![warn(missing_docs)]

pub mod algorithm;
pub mod bootstrap;
pub mod capi;
pub mod communicator;
pub mod compression;
pub mod config;
pub mod device;
pub mod dtype;
pub mod error;
pub mod flight;
pub mod log;
pub mod memcopy;
pub mod observe;
pub mod reduce;
pub mod topology;
pub mod transport;

#[cfg(test)]
pub(crate) mod test_skip;

pub use communicator::{Communicator, SharedBuf};
pub use config::Config;
pub use dtype::{DataType, Element, ReduceOp};
pub use error::{Error, Result};
