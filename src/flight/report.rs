//! One report from the ranks' flight dumps: who stopped first, in which collective,
//! who waits for whom, and what each rank was last doing.
//!
//! Pure: the launcher (or whoever collects the dumps) passes every rank's dump, or
//! `None` for a rank that sent none, and what it knows of each rank's process
//! ([`Fate`]). The culprit is found in this order, the first rule that names one wins:
//!
//! 1. a rank whose process was killed by a signal or stopped (SIGSTOP, a debugger), or,
//!    on another host, is gone or does not answer: the others cannot be the cause of
//!    that;
//! 2. a rank that called another collective than the others at the same sequence
//!    number (the minority; on a tie, the higher ranks);
//! 3. the end of the wait-for graph: follow "rank r waits on peer p" from every rank
//!    that waits until a rank that waits on nobody; the end most waits lead to. That
//!    rank is in an earlier collective, in compute (not in any collective), or silent;
//! 4. the rank most errors point at.
//!
//! Each wait carries the phase of its schedule it was in, so the report says where in
//! the collective each waiting rank is, and the culprit's phase: its own when it waits
//! in a named phase itself, else the earliest phase (schedule order) in which a rank
//! waits on it directly — for a stopped rank, the step of the algorithm it holds up.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A remembered collective's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum CallState {
    /// Started, not returned.
    Running = 1,
    /// Returned successfully.
    Done = 2,
    /// Returned an error.
    Failed = 3,
}

impl CallState {
    pub(crate) fn from_u8(v: u8) -> CallState {
        match v {
            2 => CallState::Done,
            3 => CallState::Failed,
            _ => CallState::Running,
        }
    }
}

/// One collective as a rank remembers it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallRecord {
    /// `all_reduce`, ...
    pub op: String,
    /// Its sequence number.
    pub seq: u64,
    /// Elements.
    pub count: u64,
    /// Running, done or failed.
    pub state: CallState,
    /// Unix ms.
    pub started_ms: u64,
    /// Unix ms, once it returned.
    pub ended_ms: Option<u64>,
    /// The peer it last waited on (recorded after 50 ms without progress).
    pub waiting_on: Option<usize>,
    /// What for ("to send data").
    pub what: Option<String>,
    /// Since when that wait had seen no progress (Unix ms).
    pub waiting_since_ms: Option<u64>,
    /// The phase of its schedule that wait was in ("inter-node all-reduce"); none
    /// outside a named phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// One rank's dump.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankState {
    /// The rank.
    pub rank: usize,
    /// Ranks of its communicator.
    pub world_size: usize,
    /// Its process.
    pub pid: u32,
    /// Its host.
    pub host: String,
    /// `HETCCL_JOB_ID`.
    pub job_id: Option<String>,
    /// Why the dump was taken: "error", "SIGUSR1".
    pub why: String,
    /// When (Unix ms).
    pub taken_ms: u64,
    /// When it last left a collective (Unix ms).
    pub last_left_ms: Option<u64>,
    /// Its last collective's error.
    pub error: Option<String>,
    /// The rank that error points at.
    pub culprit: Option<usize>,
    /// Its last collectives, oldest first.
    pub calls: Vec<CallRecord>,
}

/// What the collector knows of a rank's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Nothing beyond its dump (or the lack of one).
    Unknown,
    /// Running.
    Running,
    /// Stopped by a signal (SIGSTOP, SIGTSTP) or a debugger.
    Stopped,
    /// Exited with this status.
    Exited(i32),
    /// Killed by this signal, not by the collector.
    Killed(i32),
    /// Its process is gone (killed or exited; the collector is not its parent).
    Gone,
    /// On another host, it took the connection but never answered: stopped (SIGSTOP,
    /// a debugger) or hung.
    Silent,
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGINT => "SIGINT",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        _ => "signal",
    }
}

impl RankState {
    /// Its last collective, when it is one of those it runs now or failed in.
    fn current(&self) -> Option<&CallRecord> {
        self.calls.last().filter(|c| c.state != CallState::Done)
    }
}

/// One line on what `s` was doing at `now` (Unix ms).
pub fn describe_rank(s: &RankState, now: u64) -> String {
    let Some(last) = s.calls.last() else {
        return "has not run any collective".into();
    };
    let name = format!("{} #{}", last.op, last.seq);
    let wait = match (last.waiting_on, &last.what, last.waiting_since_ms) {
        (Some(p), what, Some(since)) => format!(
            ", waiting for rank {p}{} for {}",
            what.as_deref().map(|w| format!(" {w}")).unwrap_or_default(),
            secs(last.ended_ms.unwrap_or(now).saturating_sub(since))
        ),
        _ => String::new(),
    };
    let wait = match (&wait, last.state, &last.phase) {
        (w, CallState::Running | CallState::Failed, Some(ph)) if !w.is_empty() => {
            format!("{w}, in the {ph}")
        }
        _ => wait,
    };
    match last.state {
        CallState::Running => format!(
            "in {name} for {}{wait}",
            secs(now.saturating_sub(last.started_ms))
        ),
        CallState::Failed => format!(
            "failed in {name}{wait}{}",
            s.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
        CallState::Done => format!(
            "in compute for {}, not in any collective (last: {name}, finished)",
            secs(now.saturating_sub(s.last_left_ms.or(last.ended_ms).unwrap_or(now)))
        ),
    }
}

/// The report's findings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The rank that stopped first, as the rules of this module find it.
    pub culprit: Option<usize>,
    /// The collective it holds the others up in ("all_reduce #1").
    pub collective: Option<String>,
    /// What the culprit did, to follow "rank R " ("is stopped (SIGSTOP ...)").
    pub why: String,
    /// The phase of the collective the culprit holds the others up in, and whose
    /// view that is ("its own wait", "where rank 3 waits on it").
    pub phase: Option<(String, String)>,
    /// The whole text, one line per finding and per rank.
    pub text: String,
}

/// Builds the report of `world_size` ranks from their dumps (`None`: sent none) and
/// fates, at `now` (Unix ms). `title` says what asked for it.
pub fn build(title: &str, states: &[Option<RankState>], fates: &[Fate], now: u64) -> Report {
    let n = states.len();
    let fate = |r: usize| fates.get(r).copied().unwrap_or(Fate::Unknown);
    // Who waits on whom, and in which collective.
    let mut edges: BTreeMap<usize, (usize, &CallRecord)> = BTreeMap::new();
    for s in states.iter().flatten() {
        if let Some(c) = s.current() {
            if let Some(p) = c.waiting_on.filter(|&p| p < n && p != s.rank) {
                edges.insert(s.rank, (p, c));
            }
        }
    }
    // The collective the others are in: the most common current call among the ranks
    // that have one.
    let mut calls: BTreeMap<(u64, &str), Vec<usize>> = BTreeMap::new();
    for s in states.iter().flatten() {
        if let Some(c) = s.current() {
            calls
                .entry((c.seq, c.op.as_str()))
                .or_default()
                .push(s.rank);
        }
    }
    // Counted among the ranks held up in theirs (failed, or waiting on a peer) when there
    // are any: a rank caught finishing the collective before is not held up by anyone.
    let mut held: BTreeMap<(u64, &str), Vec<usize>> = BTreeMap::new();
    for s in states.iter().flatten() {
        if let Some(c) = s
            .current()
            .filter(|c| c.state == CallState::Failed || c.waiting_on.is_some())
        {
            held.entry((c.seq, c.op.as_str())).or_default().push(s.rank);
        }
    }
    let common = if held.is_empty() { &calls } else { &held }
        .iter()
        .max_by_key(|(k, v)| (v.len(), std::cmp::Reverse(k.0)))
        .map(|(k, v)| (k.0, k.1.to_string(), v.clone()));
    let common_name = common.as_ref().map(|(seq, op, _)| format!("{op} #{seq}"));

    let mut why = String::new();
    let mut culprit = None;
    // 1. Killed or stopped.
    for r in 0..n {
        match fate(r) {
            Fate::Killed(sig) => {
                why = format!("was killed by signal {sig} ({})", signal_name(sig));
                culprit = Some(r);
            }
            Fate::Stopped => {
                why = "is stopped (SIGSTOP or a debugger) and cannot answer".into();
                culprit = Some(r);
            }
            Fate::Gone if states.get(r).is_none_or(Option::is_none) => {
                why = "is gone: its process ended (killed?) without a word".into();
                culprit = Some(r);
            }
            Fate::Silent if states.get(r).is_none_or(Option::is_none) => {
                why =
                    "does not answer from its host: stopped (SIGSTOP or a debugger) or hung".into();
                culprit = Some(r);
            }
            _ => continue,
        }
        break;
    }
    // 2. Another collective at the same sequence number.
    if culprit.is_none() {
        let mut by_seq: BTreeMap<u64, BTreeMap<&str, Vec<usize>>> = BTreeMap::new();
        for ((seq, op), ranks) in &calls {
            by_seq.entry(*seq).or_default().insert(op, ranks.clone());
        }
        if let Some(ops) = by_seq.values().find(|o| o.len() > 1) {
            let mut v: Vec<(&&str, &Vec<usize>)> = ops.iter().collect();
            // Majority first; on a tie the group with the lowest rank.
            v.sort_by_key(|(_, r)| (std::cmp::Reverse(r.len()), r[0]));
            let (maj_op, maj) = v[0];
            let (odd_op, odd) = v[v.len() - 1];
            let seq = states
                .iter()
                .flatten()
                .find(|s| s.rank == odd[0])
                .and_then(|s| s.current())
                .map_or(0, |c| c.seq);
            why = format!(
                "called {odd_op} #{seq} where {} called {maj_op} #{seq}",
                ranks_phrase(maj)
            );
            culprit = Some(odd[0]);
        }
    }
    // 3. The end of the wait-for graph most waits lead to.
    if culprit.is_none() && !edges.is_empty() {
        let mut ends: BTreeMap<usize, usize> = BTreeMap::new();
        for &start in edges.keys() {
            let mut r = start;
            let mut steps = 0;
            while let Some((p, _)) = edges.get(&r) {
                r = *p;
                steps += 1;
                if steps > n {
                    break;
                }
            }
            if steps <= n {
                *ends.entry(r).or_default() += 1;
            }
        }
        if let Some((&r, _)) = ends
            .iter()
            .max_by_key(|(r, k)| (**k, std::cmp::Reverse(**r)))
        {
            culprit = Some(r);
            why = match states.get(r).and_then(Option::as_ref) {
                Some(s) => describe_rank(s, now),
                None => match fate(r) {
                    Fate::Exited(c) => format!("exited with status {c}"),
                    _ => "sent no state (not answering)".into(),
                },
            };
        } else {
            why = "the waits form a cycle".into();
        }
    }
    // 4. The rank the errors point at.
    if culprit.is_none() {
        let mut votes: BTreeMap<usize, usize> = BTreeMap::new();
        for s in states.iter().flatten() {
            if let Some(c) = s.culprit.filter(|&c| c != s.rank) {
                *votes.entry(c).or_default() += 1;
            }
        }
        if let Some((&r, _)) = votes
            .iter()
            .max_by_key(|(r, k)| (**k, std::cmp::Reverse(**r)))
        {
            culprit = Some(r);
            why = "is the rank the others' errors name".into();
        }
    }
    // The culprit's own collective if it is in one; else the one the others wait in.
    let collective = culprit.and_then(|r| {
        states
            .get(r)
            .and_then(Option::as_ref)
            .and_then(|s| s.current())
            .filter(|c| {
                common
                    .as_ref()
                    .is_none_or(|(seq, _, ranks)| c.seq == *seq || ranks.len() == 1)
            })
            .map(|c| format!("{} #{}", c.op, c.seq))
            .or_else(|| common_name.clone())
    });

    let phase = culprit.and_then(|r| culprit_phase(r, states, &edges));

    let mut text = String::new();
    let _ = writeln!(text, "hetccl hang report ({title}), {n} ranks:");
    match (culprit, &collective) {
        (Some(r), Some(c)) => {
            let _ = writeln!(text, "  culprit: rank {r} in {c}: rank {r} {why}");
        }
        (Some(r), None) => {
            let _ = writeln!(text, "  culprit: rank {r}: rank {r} {why}");
        }
        (None, _) if why.is_empty() => {
            let _ = writeln!(text, "  culprit: none found (no rank waits on another)");
        }
        (None, _) => {
            let _ = writeln!(text, "  culprit: none found ({why})");
        }
    }
    if let Some((ph, whose)) = &phase {
        let _ = writeln!(text, "  culprit's phase: {ph} ({whose})");
    }
    if !edges.is_empty() {
        let graph: Vec<String> = edges
            .iter()
            .map(|(r, (p, c))| {
                format!(
                    "{r} -> {p} ({} #{}{}{})",
                    c.op,
                    c.seq,
                    c.phase
                        .as_deref()
                        .map(|ph| format!(", {ph}"))
                        .unwrap_or_default(),
                    c.what
                        .as_deref()
                        .map(|w| format!(", {w}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        let _ = writeln!(text, "  waits for: {}", graph.join("; "));
    }
    for r in 0..n {
        let line = match (states.get(r).and_then(Option::as_ref), fate(r)) {
            (Some(s), _) => describe_rank(s, now),
            (None, Fate::Killed(sig)) => {
                format!("no state: killed by signal {sig} ({})", signal_name(sig))
            }
            (None, Fate::Stopped) => "no state: its process is stopped".into(),
            (None, Fate::Gone) => "no state: its process is gone".into(),
            (None, Fate::Silent) => "no state: it does not answer from its host".into(),
            (None, Fate::Exited(c)) => format!("no state: exited with status {c}"),
            (None, _) => "no state: did not answer".into(),
        };
        let _ = writeln!(text, "  rank {r}: {line}");
    }
    Report {
        culprit,
        collective,
        why,
        phase,
        text,
    }
}

/// The phase the culprit `r` holds the others up in: its own, when it waits in a
/// named phase itself; else (stopped, gone, in compute, silent) the earliest phase, in
/// schedule order, in which a rank waits on it directly, with the ranks that do.
fn culprit_phase(
    r: usize,
    states: &[Option<RankState>],
    edges: &BTreeMap<usize, (usize, &CallRecord)>,
) -> Option<(String, String)> {
    let own = states
        .get(r)
        .and_then(Option::as_ref)
        .and_then(|s| s.current())
        .and_then(|c| c.phase.clone());
    if let Some(ph) = own {
        return Some((ph, "its own wait".into()));
    }
    let order = |ph: &str| {
        crate::algorithm::Phase::ALL
            .iter()
            .position(|p| p.name() == ph)
            .unwrap_or(usize::MAX)
    };
    let mut by_phase: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
    for (&w, (p, c)) in edges {
        if let (true, Some(ph)) = (*p == r, c.phase.as_deref()) {
            by_phase.entry((order(ph), ph)).or_default().push(w);
        }
    }
    let ((_, ph), waiters) = by_phase.into_iter().next()?;
    let verb = if waiters.len() == 1 { "waits" } else { "wait" };
    Some((
        ph.to_string(),
        format!("where {} {verb} on it", ranks_phrase(&waiters)),
    ))
}

/// "rank 0", "ranks 0, 2, 3".
fn ranks_phrase(ranks: &[usize]) -> String {
    match ranks {
        [r] => format!("rank {r}"),
        _ => {
            let v: Vec<String> = ranks.iter().map(usize::to_string).collect();
            format!("ranks {}", v.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(op: &str, seq: u64, state: CallState, waiting_on: Option<usize>) -> CallRecord {
        CallRecord {
            op: op.into(),
            seq,
            count: 1000,
            state,
            started_ms: 10_000,
            ended_ms: (state != CallState::Running).then_some(12_000),
            waiting_on,
            what: waiting_on.map(|_| "to send data".to_string()),
            waiting_since_ms: waiting_on.map(|_| 10_050),
            phase: None,
        }
    }

    fn rank(r: usize, calls: Vec<CallRecord>) -> Option<RankState> {
        Some(RankState {
            rank: r,
            world_size: 4,
            pid: 100 + r as u32,
            host: "h".into(),
            job_id: None,
            why: "error".into(),
            taken_ms: 13_000,
            last_left_ms: Some(9_000),
            error: None,
            culprit: None,
            calls,
        })
    }

    fn first(seq: u64) -> CallRecord {
        call("all_reduce", seq, CallState::Done, None)
    }

    #[test]
    fn a_rank_in_compute_at_the_end_of_the_waits_is_named() {
        let states = vec![
            rank(
                0,
                vec![first(0), call("all_reduce", 1, CallState::Failed, Some(3))],
            ),
            rank(
                1,
                vec![first(0), call("all_reduce", 1, CallState::Failed, Some(0))],
            ),
            rank(
                2,
                vec![first(0), call("all_reduce", 1, CallState::Running, Some(1))],
            ),
            rank(3, vec![first(0)]),
        ];
        let r = build("test", &states, &[Fate::Running; 4], 49_000);
        assert_eq!(r.culprit, Some(3));
        assert_eq!(r.collective.as_deref(), Some("all_reduce #1"));
        assert!(
            r.text.contains(
                "culprit: rank 3 in all_reduce #1: rank 3 in compute for 40.0 s, not in any \
                 collective (last: all_reduce #0, finished)"
            ),
            "{}",
            r.text
        );
        assert!(
            r.text
                .contains("waits for: 0 -> 3 (all_reduce #1, to send data); 1 -> 0"),
            "{}",
            r.text
        );
        assert!(
            r.text.contains(
                "rank 2: in all_reduce #1 for 39.0 s, waiting for rank 1 to send data for 39.0 s"
            ),
            "{}",
            r.text
        );
    }

    #[test]
    fn a_killed_or_stopped_rank_comes_first_and_its_collective_is_the_waiters() {
        let states = vec![
            rank(
                0,
                vec![first(0), call("all_reduce", 1, CallState::Failed, Some(1))],
            ),
            None,
            rank(
                2,
                vec![first(0), call("all_reduce", 1, CallState::Failed, Some(1))],
            ),
        ];
        let fates = [Fate::Exited(1), Fate::Killed(9), Fate::Running];
        let r = build("test", &states, &fates, 13_000);
        assert_eq!(r.culprit, Some(1));
        assert!(
            r.text.contains(
                "culprit: rank 1 in all_reduce #1: rank 1 was killed by signal 9 (SIGKILL)"
            ),
            "{}",
            r.text
        );
        assert!(
            r.text.contains("rank 1: no state: killed by signal 9"),
            "{}",
            r.text
        );
        let fates = [Fate::Exited(1), Fate::Stopped, Fate::Running];
        let r = build("test", &states, &fates, 13_000);
        assert_eq!(r.culprit, Some(1));
        assert!(r.text.contains("rank 1 is stopped"), "{}", r.text);
        // On another host: silent, with no state.
        let fates = [Fate::Running, Fate::Silent, Fate::Running];
        let r = build("test", &states, &fates, 13_000);
        assert_eq!(r.culprit, Some(1));
        assert!(
            r.text.contains(
                "culprit: rank 1 in all_reduce #1: rank 1 does not answer from its host: \
                 stopped (SIGSTOP or a debugger) or hung"
            ),
            "{}",
            r.text
        );
        assert!(
            r.text
                .contains("rank 1: no state: it does not answer from its host"),
            "{}",
            r.text
        );
    }

    #[test]
    fn the_collective_is_the_one_ranks_are_held_up_in() {
        // Rank 2 was killed after all_reduce #0; rank 0 failed in #1; ranks 1 and 3 were
        // caught still finishing #0, waiting on nobody.
        let states = vec![
            rank(
                0,
                vec![first(0), call("all_reduce", 1, CallState::Failed, Some(2))],
            ),
            rank(1, vec![call("all_reduce", 0, CallState::Running, None)]),
            None,
            rank(3, vec![call("all_reduce", 0, CallState::Running, None)]),
        ];
        let fates = [Fate::Running, Fate::Running, Fate::Gone, Fate::Running];
        let r = build("test", &states, &fates, 13_000);
        assert_eq!(r.culprit, Some(2));
        assert!(
            r.text
                .contains("culprit: rank 2 in all_reduce #1: rank 2 is gone"),
            "{}",
            r.text
        );
    }

    #[test]
    fn a_silent_rank_that_answered_before_is_not_named_for_its_silence() {
        // Rank 2 answered (it failed, waiting on rank 1) and is silent now: the waits
        // still lead to rank 1.
        let states = vec![
            rank(
                0,
                vec![first(0), call("all_reduce", 1, CallState::Failed, Some(1))],
            ),
            rank(1, vec![first(0)]),
            rank(
                2,
                vec![first(0), call("all_reduce", 1, CallState::Failed, Some(1))],
            ),
        ];
        let fates = [Fate::Running, Fate::Running, Fate::Silent];
        let r = build("test", &states, &fates, 13_000);
        assert_eq!(r.culprit, Some(1), "{}", r.text);
    }

    #[test]
    fn the_minority_collective_is_named() {
        let states = vec![
            rank(
                0,
                vec![first(0), call("all_reduce", 1, CallState::Failed, None)],
            ),
            rank(
                1,
                vec![first(0), call("broadcast", 1, CallState::Failed, None)],
            ),
            rank(
                2,
                vec![first(0), call("all_reduce", 1, CallState::Failed, None)],
            ),
            rank(
                3,
                vec![first(0), call("all_reduce", 1, CallState::Failed, None)],
            ),
        ];
        let r = build("test", &states, &[Fate::Exited(1); 4], 13_000);
        assert_eq!(r.culprit, Some(1));
        assert_eq!(r.collective.as_deref(), Some("broadcast #1"));
        assert!(
            r.text
                .contains("rank 1 called broadcast #1 where ranks 0, 2, 3 called all_reduce #1"),
            "{}",
            r.text
        );
    }

    #[test]
    fn without_waits_the_errors_vote() {
        let mut a = rank(0, vec![call("all_reduce", 4, CallState::Failed, None)]);
        a.as_mut().unwrap().culprit = Some(2);
        let mut b = rank(1, vec![call("all_reduce", 4, CallState::Failed, None)]);
        b.as_mut().unwrap().culprit = Some(2);
        let r = build("test", &[a, b, None], &[Fate::Unknown; 3], 13_000);
        assert_eq!(r.culprit, Some(2));
        assert_eq!(r.collective.as_deref(), Some("all_reduce #4"));
        assert!(
            r.text.contains("rank 2: no state: did not answer"),
            "{}",
            r.text
        );
    }

    #[test]
    fn dumps_round_trip_through_json() {
        let s = rank(
            1,
            vec![first(0), call("all_gather", 1, CallState::Running, Some(0))],
        )
        .unwrap();
        let back: RankState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    fn phased(state: CallState, peer: usize, phase: &str) -> CallRecord {
        CallRecord {
            phase: Some(phase.into()),
            ..call("all_reduce", 1, state, Some(peer))
        }
    }

    /// A 2x2 hierarchical all-reduce whose rank 2 is stopped before #1: its node-mate
    /// waits on it in the intra-node reduce-scatter, rank 0 in the inter-node ring, and
    /// rank 1 on rank 3 there; the culprit's phase is the earliest one it is awaited in.
    #[test]
    fn the_phases_of_a_stopped_culprit_and_of_each_waiting_rank_are_named() {
        let states = vec![
            rank(
                0,
                vec![
                    first(0),
                    phased(CallState::Failed, 2, "inter-node all-reduce"),
                ],
            ),
            rank(
                1,
                vec![
                    first(0),
                    phased(CallState::Failed, 3, "inter-node all-reduce"),
                ],
            ),
            None,
            rank(
                3,
                vec![
                    first(0),
                    phased(CallState::Running, 2, "intra-node reduce-scatter"),
                ],
            ),
        ];
        let fates = [Fate::Running, Fate::Running, Fate::Stopped, Fate::Running];
        let r = build("t", &states, &fates, 13_000);
        assert_eq!(r.culprit, Some(2));
        assert_eq!(
            r.phase,
            Some((
                "intra-node reduce-scatter".to_string(),
                "where rank 3 waits on it".to_string()
            ))
        );
        let lines: Vec<&str> = r.text.lines().collect();
        assert_eq!(
            lines[1..4],
            [
                "  culprit: rank 2 in all_reduce #1: rank 2 is stopped (SIGSTOP or a debugger) \
                 and cannot answer",
                "  culprit's phase: intra-node reduce-scatter (where rank 3 waits on it)",
                "  waits for: 0 -> 2 (all_reduce #1, inter-node all-reduce, to send data); \
                 1 -> 3 (all_reduce #1, inter-node all-reduce, to send data); \
                 3 -> 2 (all_reduce #1, intra-node reduce-scatter, to send data)",
            ],
            "{}",
            r.text
        );
        assert!(
            r.text.contains(
                "  rank 3: in all_reduce #1 for 3.0 s, waiting for rank 2 to send data for \
                 3.0 s, in the intra-node reduce-scatter\n"
            ),
            "{}",
            r.text
        );
        assert!(
            r.text.contains(
                "  rank 0: failed in all_reduce #1, waiting for rank 2 to send data for 1.9 s, \
                 in the inter-node all-reduce\n"
            ),
            "{}",
            r.text
        );
    }

    /// A culprit that waits in a phase itself is placed by its own record, and two ranks
    /// waiting on a stopped one in the same phase are both named.
    #[test]
    fn a_culprit_with_a_phase_of_its_own_is_placed_by_it() {
        let states = vec![
            rank(
                0,
                vec![first(0), phased(CallState::Running, 1, "all-gather")],
            ),
            rank(
                1,
                vec![first(0), phased(CallState::Running, 2, "reduce-scatter")],
            ),
            rank(2, vec![first(0)]),
        ];
        let r = build("t", &states, &[Fate::Running; 3], 13_000);
        assert_eq!(r.culprit, Some(2));
        assert_eq!(
            r.phase,
            Some(("reduce-scatter".into(), "where rank 1 waits on it".into()))
        );
        let states = vec![
            rank(
                0,
                vec![
                    first(0),
                    phased(CallState::Running, 2, "inter-node all-reduce"),
                ],
            ),
            rank(
                1,
                vec![
                    first(0),
                    phased(CallState::Running, 2, "inter-node all-reduce"),
                ],
            ),
            rank(
                2,
                vec![
                    first(0),
                    phased(CallState::Running, 3, "intra-node all-gather"),
                ],
            ),
            rank(
                3,
                vec![first(0), call("all_reduce", 1, CallState::Running, None)],
            ),
        ];
        let r = build("t", &states, &[Fate::Running; 4], 13_000);
        assert_eq!(r.culprit, Some(3));
        assert_eq!(
            r.phase,
            Some((
                "intra-node all-gather".into(),
                "where rank 2 waits on it".into()
            ))
        );
        // Rank 2 dumped (SIGUSR1) before it was stopped: its own record places it.
        let fates = [Fate::Running, Fate::Running, Fate::Stopped, Fate::Running];
        let r = build("t", &states, &fates, 13_000);
        assert_eq!(r.culprit, Some(2));
        assert_eq!(
            r.phase,
            Some(("intra-node all-gather".into(), "its own wait".into()))
        );
    }
}
