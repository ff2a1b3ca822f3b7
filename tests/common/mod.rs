//! Helpers for the multi-process tests: the test kit's (ranks as processes, skips).
#![allow(unused_imports)]

pub use hetccl_testkit::ranks::*;
pub use hetccl_testkit::skip;
