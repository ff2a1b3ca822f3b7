//! hetccl's command-line tools, each a binary of this package:
//!
//! | binary | what |
//! | --- | --- |
//! | `hetccl` | `hetccl run -n N -- PROGRAM`: starts N local ranks ([`launcher`]) and prints one hang report from their flight dumps ([`hang`]); `hetccl trace merge OUT FILES...`: every rank's trace on one timeline ([`trace_merge`]) |
//! | `hetccl doctor` | run as a job (`hetccl run -n N -- hetccl doctor`): a preflight of limits, /dev/shm, interface, links, clocks ([`doctor`]) |
//! | `hetccl simulate` | a training step on a described cluster, per strategy, from the runtime's schedules played against a clock ([`simulate`]) |
//! | `hetccl-perf` | nccl-tests style bandwidth table of every collective |
//! | `hetccl-check` | every collective, element type and reduction against its closed form, faults on purpose, soaks (the checks are hetccl-testkit's) |
//! | `hetccl-gpu-check` | the device collectives, checked (feature `cuda`) |
//! | `hetccl-kernel-bench` | the CUDA kernels against memcpy (feature `cuda`) |
//!
//! They use the library only through its public API, as any program would; the ranks
//! they start find the launcher's watch socket through `HETCCL_LAUNCHER_FD`, which the
//! library watches.
#![warn(missing_docs)]

pub mod doctor;
pub mod hang;
pub mod launcher;
pub mod simulate;
pub mod trace_merge;
