//! Choosing the port of a store that is bound moments later, by another process.
//!
//! A launcher (or `hetcclGetUniqueId`, or a test) picks rank 0's store port, hands it to
//! every rank, and rank 0 binds it when it starts. Asking the kernel for port 0 and
//! closing the socket would pick from the ephemeral range, the same range every
//! outgoing connection takes its source port from and every `bind(0)` listener is
//! given: on a busy host (a test suite, a node running other jobs) one of those takes
//! the port between the choice and rank 0's bind, and the job fails with "address in
//! use". So the port is chosen below the ephemeral range (`ip_local_port_range`), where
//! the kernel never hands ports out by itself, and checked by binding it on every
//! address. Successive choices in one process walk through the range from a random
//! start, so threads starting jobs at once do not pick the same port.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// How many ports below the ephemeral range the choice spans.
const SPAN: u32 = 8192;
/// The lowest port ever chosen (below it: well-known services).
const LOWEST: u32 = 10_000;
/// Candidates tried before falling back to a kernel-chosen port.
const TRIES: u32 = 64;

/// A TCP port nobody listens on now, outside the kernel's ephemeral range where there is
/// room below it (else a port the kernel picks). Another process could still bind it
/// before the caller does, but neither an outgoing connection nor a `bind(0)` will.
pub fn free_store_port() -> Result<u16> {
    let (lo, hi) = candidate_range(ephemeral_range());
    let candidates = (0..TRIES)
        .take_while(|_| lo < hi)
        .map(|_| (lo + next_offset(hi - lo)) as u16);
    if let Some(port) = first_free(candidates) {
        return Ok(port);
    }
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port for the bootstrap store", e))
}

/// The kernel's ephemeral range, `(first, last)` inclusive; Linux's default when the
/// system will not say.
fn ephemeral_range() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_range(&s))
        .unwrap_or((32768, 60999))
}

fn parse_range(s: &str) -> Option<(u32, u32)> {
    let mut it = s.split_whitespace().map(str::parse::<u32>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) if a <= b && b <= 65535 => Some((a, b)),
        _ => None,
    }
}

/// Ports `[lo, hi)` to choose from: up to [`SPAN`] just below the ephemeral range, not
/// under [`LOWEST`]; else just above it; empty when the range leaves no room.
fn candidate_range((first, last): (u32, u32)) -> (u32, u32) {
    if first >= LOWEST + 1024 {
        (first.saturating_sub(SPAN).max(LOWEST), first)
    } else if last + 1024 <= 65535 {
        (last + 1, (last + 1 + SPAN).min(65536))
    } else {
        (0, 0)
    }
}

/// The next offset into a span: a random start per process, then one port further per
/// call, so concurrent choices in one process differ.
fn next_offset(span: u32) -> u32 {
    static START: OnceLock<u32> = OnceLock::new();
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(rand::random);
    start.wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed)) % span
}

/// The first candidate that binds on every IPv4 address (so no listener holds it).
fn first_free(mut candidates: impl Iterator<Item = u16>) -> Option<u16> {
    candidates.find(|&p| TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_lies_below_the_ephemeral_ports() {
        assert_eq!(candidate_range((32768, 60999)), (24576, 32768));
        assert_eq!(candidate_range((15000, 60999)), (10_000, 15000));
        // No room below: just above instead; no room at all: none.
        assert_eq!(candidate_range((1024, 50000)), (50001, 58193));
        assert_eq!(candidate_range((1024, 65000)), (0, 0));
    }

    #[test]
    fn the_proc_file_parses_or_is_refused() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("1024 70000"), None);
        assert_eq!(parse_range(""), None);
    }

    #[test]
    fn chosen_ports_are_free_distinct_and_outside_the_ephemeral_range() {
        let (first, last) = ephemeral_range();
        let (lo, hi) = candidate_range((first, last));
        let ports: Vec<u16> = (0..20).map(|_| free_store_port().unwrap()).collect();
        for &p in &ports {
            if lo < hi {
                assert!((lo..hi).contains(&u32::from(p)), "{p} not in {lo}..{hi}");
            }
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "{ports:?}");
    }

    #[test]
    fn a_held_port_is_passed_over() {
        let held = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let h = held.local_addr().unwrap().port();
        let free = free_store_port().unwrap();
        assert_eq!(first_free([h, h, free].into_iter()), Some(free));
        assert_eq!(first_free([h].into_iter()), None);
    }
}
