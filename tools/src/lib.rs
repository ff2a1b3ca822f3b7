//! hetccl's command-line tools, each a binary of this package:
//!
//! | binary | what |
//! | --- | --- |
//! | `hetccl` | `hetccl run -n N -- PROGRAM`: starts N local ranks ([`launcher`]) and prints one hang report from their flight dumps ([`hang`]) |
//! | `hetccl doctor` | run as a job (`hetccl run -n N -- hetccl doctor`): a preflight of limits, /dev/shm, interface, links, clocks ([`doctor`]) |
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
