//! What hetccl's tests share, so that they check results without a shipped binary:
//!
//! | module | what |
//! | --- | --- |
//! | [`world`], [`on_all`] | communicators of one process joined by in-memory links, one thread per rank (feature `world`, on by default) |
//! | [`ranks`] | ranks as processes: starting them with torchrun's variables, collecting what they print under a deadline, this test executable as a rank, binaries of other packages of the workspace |
//! | [`oracle`] | the closed form of every collective: each rank's input and the expected result for every element type and reduction |
//! | [`check`] | the checks of `hetccl-check` (every collective, a mixed sequence, a soak, determinism and compression), run by that tool and by a test's own executable as each rank |
//! | [`timed`] | the runtime's schedules played against a clock on a cluster of nodes (links, NICs, switch): each rank's finish time |
//! | [`skip`] | how a test that cannot run here says so, for `scripts/test.sh` to count |
//! | [`Scratch`] | a test's own temporary directory, removed when the test passes |
//!
//! A multi-process test of the library starts its own test executable as every rank,
//! running one ignored entry test that does a rank's part:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! /// One rank of the tests below (they start it with the arguments of the checks).
//! #[test]
//! #[ignore = "a rank of the tests below, started by them"]
//! fn check_rank() {
//!     hetccl_testkit::check::rank_main();
//! }
//!
//! #[test]
//! fn every_collective_on_three_ranks() {
//!     hetccl_testkit::check::launch(3, &["--counts", "0,7"], &[], Duration::from_secs(60), "n=3");
//! }
//! ```

pub mod check;
pub mod oracle;
pub mod ranks;
mod scratch;
pub mod timed;

#[path = "../../src/test_skip.rs"]
mod test_skip;

pub use scratch::Scratch;
pub use test_skip::skip;

#[cfg(feature = "world")]
pub use hetccl::communicator::testing::{on_all, world};
