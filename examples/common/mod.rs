//! Positional arguments of the examples, each with its default: `common::size(1, 1 <<
//! 20)` reads the first argument as a byte count (`64K`, `1M`), `common::number(2, 8)`
//! the second as a plain number. Not every example uses both.
#![allow(dead_code)]

/// The `i`-th argument as a byte count, or `default` when it is absent or unreadable.
pub fn size(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|s| hetccl::config::parse_size(&s))
        .unwrap_or(default)
}

/// The `i`-th argument as a number, or `default` when it is absent or unreadable.
pub fn number<T: std::str::FromStr>(i: usize, default: T) -> T {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
