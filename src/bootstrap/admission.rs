//! Admission of connections that have not finished their handshake: the rule the store and
//! the transports' link listeners share, so that strangers cannot keep a rank out nor take
//! every thread and descriptor of the process that listens.
//!
//! Connections still in their handshake have a budget of their own ([`Admission::new`];
//! [`PRE_AUTH_CONNECTIONS`] where both use it) and a deadline to finish it. A listener
//! enters each connection it accepts ([`Admission::enter`]); when that takes the budget
//! past its size, the oldest connection that has not even sent a hello of this job (else
//! the oldest) is shed: its socket is shut down, which ends its handshake at once, and the
//! listener logs it as a refusal. An idle or slow stranger therefore goes before a rank
//! whose hello arrived, and a rank that is shed connects again. A connection leaves the
//! budget once the handshake has authenticated it, before the connector hears the verdict
//! ([`Ticket::leave`]), so an admitted connection is never shed.
//!
//! ```text
//! accept -> enter (shed the oldest without a hello when past the budget)
//!        -> handshake within the deadline, the hello flagged as it arrives
//!        -> leave (authenticated) -> verdict      | was_shed? (failed: shed or refused)
//! ```

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::auth::Refusal;

/// Connections in their handshake at once, for the store and for each link listener; one
/// more sheds the oldest.
pub const PRE_AUTH_CONNECTIONS: usize = 64;

/// The budget of one listener's connections that are still in their handshake. Clones
/// share it.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: usize,
    timeout: Duration,
    /// Oldest first.
    waiting: Mutex<VecDeque<Waiting>>,
    next_id: AtomicU64,
}

/// A connection in its handshake: a handle to shed it, and whether its hello has arrived.
struct Waiting {
    id: u64,
    stream: TcpStream,
    hello: Arc<AtomicBool>,
}

impl Inner {
    fn waiting(&self) -> MutexGuard<'_, VecDeque<Waiting>> {
        // A list of handles: a poisoned lock holds nothing inconsistent.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `id` out of the budget; whether it was still in it (not shed).
    fn remove(&self, id: u64) -> bool {
        let mut w = self.waiting();
        match w.iter().position(|c| c.id == id) {
            Some(at) => {
                w.remove(at);
                true
            }
            None => false,
        }
    }
}

/// A connection shed to make room, for the listener's refusal log.
#[derive(Debug)]
pub struct Shed {
    who: String,
    capacity: usize,
}

impl fmt::Display for Shed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shed {}: {} connections were already in their handshake",
            self.who, self.capacity
        )
    }
}

/// One accepted connection's place in the budget, held by whoever runs its handshake.
/// Dropping it takes the connection out of the budget.
pub struct Ticket {
    inner: Arc<Inner>,
    id: u64,
    hello: Arc<AtomicBool>,
    until: Option<Instant>,
    /// Once the connection is out of the budget: whether it left on its own (`true`) or
    /// had been shed (`false`).
    settled: Cell<Option<bool>>,
}

impl Admission {
    /// A budget of `capacity` connections (at least one), each given `timeout` from its
    /// entry to finish its handshake.
    pub fn new(capacity: usize, timeout: Duration) -> Admission {
        Admission {
            inner: Arc::new(Inner {
                capacity: capacity.max(1),
                timeout,
                waiting: Mutex::new(VecDeque::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// How many connections may be in their handshake at once.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Enters a connection just accepted. Returns its ticket, and the connection shed to
    /// make room if the budget was full (which may be this one: it has sent nothing yet,
    /// so it goes when every older one has sent a hello). Fails only when the socket
    /// cannot be duplicated (out of descriptors).
    pub fn enter(&self, stream: &TcpStream) -> io::Result<(Ticket, Option<Shed>)> {
        let handle = stream.try_clone()?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let hello = Arc::new(AtomicBool::new(false));
        let victim = {
            let mut w = self.inner.waiting();
            w.push_back(Waiting {
                id,
                stream: handle,
                hello: hello.clone(),
            });
            if w.len() > self.inner.capacity {
                // The oldest that has not sent a hello of this job, else the oldest.
                let at = w
                    .iter()
                    .position(|c| !c.hello.load(Ordering::Relaxed))
                    .unwrap_or(0);
                w.remove(at)
            } else {
                None
            }
        };
        let shed = victim.map(|v| {
            let who = v
                .stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "<unknown>".into());
            let _ = v.stream.shutdown(Shutdown::Both);
            Shed {
                who,
                capacity: self.inner.capacity,
            }
        });
        let ticket = Ticket {
            inner: self.inner.clone(),
            id,
            hello,
            until: Instant::now().checked_add(self.inner.timeout),
            settled: Cell::new(None),
        };
        Ok((ticket, shed))
    }

    /// Connections in their handshake now.
    pub fn in_handshake(&self) -> usize {
        self.inner.waiting().len()
    }

    /// Sheds every connection still in its handshake, when the listener needs no more;
    /// returns how many there were. Their tickets then say they were shed.
    pub fn shed_all(&self) -> usize {
        let all = std::mem::take(&mut *self.inner.waiting());
        for c in &all {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        all.len()
    }
}

impl Ticket {
    /// Set once a hello of this job has arrived: pass it to
    /// [`JobAuth::accept_handshake_with`](super::auth::JobAuth::accept_handshake_with).
    pub fn hello_seen(&self) -> &AtomicBool {
        &self.hello
    }

    /// Time left to finish the handshake (zero once the deadline has passed).
    pub fn remaining(&self) -> Duration {
        self.until.map_or(Duration::MAX, |u| {
            u.saturating_duration_since(Instant::now())
        })
    }

    /// Whether the connection was shed (it may be shed at any moment until it leaves).
    pub fn is_shed(&self) -> bool {
        match self.settled.get() {
            Some(left) => !left,
            None => !self.inner.waiting().iter().any(|c| c.id == self.id),
        }
    }

    fn settle(&self) -> bool {
        match self.settled.get() {
            Some(left) => left,
            None => {
                let left = self.inner.remove(self.id);
                self.settled.set(Some(left));
                left
            }
        }
    }

    /// Takes the connection out of the budget once its handshake has authenticated the
    /// connector, before the verdict; from then on it cannot be shed. Refuses as
    /// [`Refusal::Busy`] when it was shed first (the connector may try again).
    pub fn leave(&self) -> std::result::Result<(), Refusal> {
        if self.settle() {
            Ok(())
        } else {
            Err(Refusal::Busy)
        }
    }

    /// After a failed handshake: takes the connection out of the budget if it is still
    /// in, and says whether it had been shed (the listener counted and logged it then, so
    /// its failure is no news).
    pub fn was_shed(&self) -> bool {
        !self.settle()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// `n` accepted connections (server side) and their client ends.
    fn conns(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let clients: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let servers = (0..n).map(|_| l.accept().unwrap().0).collect();
        (servers, clients)
    }

    /// Whether the client end sees its connection closed by the listener.
    fn closed(c: &mut TcpStream) -> bool {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        matches!(c.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn a_full_budget_sheds_the_oldest_without_a_hello() {
        let a = Admission::new(3, Duration::from_secs(5));
        let (servers, mut clients) = conns(5);
        let mut tickets = Vec::new();
        for s in &servers[..3] {
            let (t, shed) = a.enter(s).unwrap();
            assert!(shed.is_none());
            tickets.push(t);
        }
        // The oldest has sent its hello; the second has not: it goes first.
        tickets[0].hello_seen().store(true, Ordering::Relaxed);
        let (t3, shed) = a.enter(&servers[3]).unwrap();
        let shed = shed.unwrap().to_string();
        let who = clients[1].local_addr().unwrap();
        assert_eq!(
            shed,
            format!("shed {who}: 3 connections were already in their handshake")
        );
        assert!(closed(&mut clients[1]));
        assert!(tickets[1].is_shed() && tickets[1].was_shed());
        assert_eq!(tickets[1].leave(), Err(Refusal::Busy));
        assert_eq!(a.in_handshake(), 3);
        // Every one has sent a hello but the newcomer: the newcomer goes.
        tickets[2].hello_seen().store(true, Ordering::Relaxed);
        t3.hello_seen().store(true, Ordering::Relaxed);
        let (t4, shed) = a.enter(&servers[4]).unwrap();
        let who = clients[4].local_addr().unwrap();
        assert!(shed
            .unwrap()
            .to_string()
            .starts_with(&format!("shed {who}: ")));
        assert!(t4.is_shed());
        assert!(!tickets[0].is_shed() && !t3.is_shed());
        assert_eq!(a.in_handshake(), 3);
    }

    #[test]
    fn a_connection_that_left_is_never_shed() {
        let a = Admission::new(1, Duration::from_secs(5));
        let (servers, mut clients) = conns(2);
        let (t0, _) = a.enter(&servers[0]).unwrap();
        assert_eq!(t0.leave(), Ok(()));
        assert_eq!(a.in_handshake(), 0);
        let (t1, shed) = a.enter(&servers[1]).unwrap();
        assert!(shed.is_none());
        assert!(!t0.was_shed() && !t0.is_shed());
        // A failed handshake that was not shed leaves on its own, and says so once.
        assert!(!t1.was_shed());
        assert!(!t1.was_shed());
        assert_eq!(a.in_handshake(), 0);
        // Nothing shut the admitted connection down.
        clients[0]
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        assert!(clients[0].read(&mut [0u8; 1]).is_err());
    }

    #[test]
    fn dropped_tickets_leave_and_shed_all_ends_the_rest() {
        let a = Admission::new(4, Duration::from_millis(200));
        let (servers, mut clients) = conns(3);
        let (t0, _) = a.enter(&servers[0]).unwrap();
        let (t1, _) = a.enter(&servers[1]).unwrap();
        let (t2, _) = a.enter(&servers[2]).unwrap();
        assert!(t0.remaining() <= Duration::from_millis(200));
        drop(t0);
        assert_eq!(a.in_handshake(), 2);
        assert_eq!(a.shed_all(), 2);
        assert_eq!(a.in_handshake(), 0);
        assert!(closed(&mut clients[1]) && closed(&mut clients[2]));
        assert!(t1.was_shed() && t2.is_shed());
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t2.remaining(), Duration::ZERO);
    }
}
