//! Splitting a communicator, as NCCL's `ncclCommSplit` does: the ranks that pass the
//! same colour form a new communicator, numbered by key and then by their rank here.
//!
//! Two all-gathers over the parent: every rank's colour and key; then, from the first
//! member of each new group (its rank 0), where that group's store will listen and the
//! new job's id. Each member derives the new job's key from the parent's
//! ([`JobAuth::derive_key`](crate::bootstrap::auth::JobAuth::derive_key)), so no secret
//! crosses the wire, and the group then starts as a job of its own: its own store,
//! topology, links and progress thread, independent of the parent from then on.

use super::Communicator;
use crate::bootstrap::auth::random_hex;
use crate::config::Config;
use crate::error::{Error, Result};

const OP: &str = "Communicator::split";

/// Bytes of a group's start record: status, store port, job id, text length, text (the
/// store's host, or why the group cannot start).
const RECORD: usize = 128;
const ID_HEX: usize = 16;
const TEXT_AT: usize = 4 + ID_HEX;
const TEXT_MAX: usize = RECORD - TEXT_AT;

const STATUS_READY: u8 = 1;
const STATUS_FAILED: u8 = 2;

impl Communicator {
    /// Splits this communicator. Every rank calls it (it is a collective of this
    /// communicator); the ranks that pass the same `color` get a new communicator of
    /// their own, ranked by `key` and, for equal keys, by their rank here. A rank that
    /// passes `None` takes part and gets `None`.
    ///
    /// The new communicators take this one's settings (a topology file describes this
    /// one's ranks, so theirs is discovered; a trace goes to files of their own; the
    /// process stays where this one's start placed it), and
    /// are independent of it: either may be dropped first. The new job's key is derived
    /// from this one's, never sent.
    pub fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Communicator>> {
        // Every rank of a communicator built from parts lacks the key alike, so all of
        // them stop here before any exchange.
        let auth = self.auth.as_ref().ok_or_else(|| {
            Error::invalid(
                OP,
                "this communicator was built from parts and holds no job key to derive the \
                 new one's from",
            )
        })?;
        let mine = [color.map_or(-1, i64::from), i64::from(key)];
        let mut table = vec![0i64; 2 * self.world_size];
        self.all_gather(&mine, &mut table)?;
        let members = members_of(&table, color);

        let mut record = [0u8; RECORD];
        if members.first() == Some(&self.rank) {
            record = match self.prepare_store(&members) {
                Ok((host, port, job_id)) => encode(STATUS_READY, port, &job_id, &host),
                Err(e) => encode(STATUS_FAILED, 0, "", &e.to_string()),
            };
        }
        let mut records = vec![0u8; RECORD * self.world_size];
        self.all_gather(&record, &mut records)?;

        let Some(&first) = members.first() else {
            return Ok(None);
        };
        let start = &records[first * RECORD..(first + 1) * RECORD];
        let (host, port, job_id) = decode(start).map_err(|why| {
            Error::invalid(
                OP,
                format!("rank {first}, the first of colour {color:?}, cannot start it: {why}"),
            )
        })?;
        let rank = members
            .iter()
            .position(|&r| r == self.rank)
            .ok_or_else(|| Error::invalid(OP, "this rank is missing from its own colour"))?;
        let mut cfg = child_config(&self.cfg, rank, members.len(), host, port, &job_id);
        cfg.job_key = Some(auth.derive_key(&job_id));
        Communicator::init(cfg).map(Some)
    }

    /// Where the group of `members` (this rank first) will find its store, and its job id.
    fn prepare_store(&self, members: &[usize]) -> Result<(String, u16, String)> {
        let node = self.topo.node_of[self.rank];
        let host = if members.iter().all(|&r| self.topo.node_of[r] == node) {
            "127.0.0.1".to_string()
        } else {
            crate::transport::tcp::store_host(&self.cfg)?
        };
        if host.len() > TEXT_MAX {
            return Err(Error::invalid(
                OP,
                format!("the store's host {host:?} is longer than {TEXT_MAX} bytes"),
            ));
        }
        let port = crate::bootstrap::port::free_store_port()?;
        Ok((host, port, random_hex(ID_HEX / 2)))
    }
}

/// The parent ranks that passed `color`, in their new order: by key, then by rank.
fn members_of(table: &[i64], color: Option<u32>) -> Vec<usize> {
    let Some(c) = color else {
        return Vec::new();
    };
    let mut members: Vec<(i64, usize)> = table
        .chunks_exact(2)
        .enumerate()
        .filter(|(_, ck)| ck[0] == i64::from(c))
        .map(|(r, ck)| (ck[1], r))
        .collect();
    members.sort_unstable();
    members.into_iter().map(|(_, r)| r).collect()
}

fn encode(status: u8, port: u16, job_id: &str, text: &str) -> [u8; RECORD] {
    let mut b = [0u8; RECORD];
    b[0] = status;
    b[1..3].copy_from_slice(&port.to_be_bytes());
    let id = &job_id.as_bytes()[..job_id.len().min(ID_HEX)];
    b[4..4 + id.len()].copy_from_slice(id);
    // A reason longer than the record is cut at a character boundary.
    let mut n = text.len().min(TEXT_MAX);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    b[3] = n as u8;
    b[TEXT_AT..TEXT_AT + n].copy_from_slice(&text.as_bytes()[..n]);
    b
}

/// A group's start record: `(host, port, job id)`, or why its first rank cannot start it.
fn decode(b: &[u8]) -> std::result::Result<(String, u16, String), String> {
    let n = usize::from(b[3]).min(TEXT_MAX);
    let text = String::from_utf8_lossy(&b[TEXT_AT..TEXT_AT + n]).into_owned();
    match b[0] {
        STATUS_READY => {
            let port = u16::from_be_bytes([b[1], b[2]]);
            let job_id = String::from_utf8_lossy(&b[4..4 + ID_HEX]).into_owned();
            Ok((text, port, format!("split-{job_id}")))
        }
        STATUS_FAILED => Err(text),
        s => Err(format!("its start record has status {s}")),
    }
}

/// `parent`'s settings for rank `rank` of `size` in a job whose store is at
/// `host:port`: as a job started from a `hetcclUniqueId`, whatever launched the parent.
fn child_config(
    parent: &Config,
    rank: usize,
    size: usize,
    host: String,
    port: u16,
    job_id: &str,
) -> Config {
    let mut cfg = parent.clone();
    cfg.join_store(host, port, job_id.to_string(), rank, size, "split");
    // The launcher's host count, job name and store belong to the parent's job.
    cfg.launch.nodes = None;
    cfg.launch.job_identity = None;
    cfg.launch.agent_store = false;
    // A topology file or dump describes the parent's ranks.
    cfg.topo_file = None;
    cfg.topo_dump_file = None;
    cfg.trace = parent.trace.as_deref().map(|p| trace_pattern(p, job_id));
    // The parent placed this process among its host's ranks; the new job's numbering
    // would move it again.
    cfg.spread = false;
    cfg
}

/// The new job's trace files beside the parent's: `trace-%r.json` becomes
/// `trace-%r.<job id>.json`.
fn trace_pattern(parent: &str, job_id: &str) -> String {
    match parent.strip_suffix(".json") {
        Some(stem) => format!("{stem}.{job_id}.json"),
        None => format!("{parent}.{job_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InitMethod;

    #[test]
    fn members_are_ordered_by_key_then_rank() {
        // Ranks 0..6: (colour, key).
        let table = [0, 5, 1, 0, 0, 5, -1, 0, 0, -3, 1, 0];
        assert_eq!(members_of(&table, Some(0)), vec![4, 0, 2]);
        assert_eq!(members_of(&table, Some(1)), vec![1, 5]);
        assert_eq!(members_of(&table, Some(7)), Vec::<usize>::new());
        assert_eq!(members_of(&table, None), Vec::<usize>::new());
    }

    #[test]
    fn a_start_record_round_trips_and_a_failure_is_named() {
        let r = encode(STATUS_READY, 40123, "00ff00ff00ff00ff", "10.0.0.7");
        assert_eq!(
            decode(&r),
            Ok((
                "10.0.0.7".to_string(),
                40123,
                "split-00ff00ff00ff00ff".to_string()
            ))
        );
        let long = format!("no address: {}é", "x".repeat(200));
        let f = encode(STATUS_FAILED, 0, "", &long);
        let why = decode(&f).unwrap_err();
        assert!(long.starts_with(&why), "{why}");
        assert_eq!(why.len(), TEXT_MAX);
        assert_eq!(
            decode(&[0u8; RECORD]),
            Err("its start record has status 0".to_string())
        );
    }

    #[test]
    fn the_new_job_has_its_own_store_identity_and_trace_files() {
        let mut parent = Config::from_env_with(&[
            ("HETCCL_TRACE".into(), "/tmp/t-%r.json".into()),
            ("HETCCL_TOPO_FILE".into(), "/tmp/topo.json".into()),
        ])
        .unwrap();
        parent.launch.rank = Some(5);
        parent.launch.world_size = Some(8);
        parent.launch.local_rank = Some(1);
        parent.launch.source = "openmpi";
        parent.launch.job_identity = Some("ompi-1".into());
        parent.spread = true;
        let c = child_config(&parent, 1, 3, "127.0.0.1".into(), 4242, "split-ab");
        assert_eq!(c.init, InitMethod::Env);
        assert_eq!(
            (c.launch.rank, c.launch.world_size, c.launch.local_rank),
            (Some(1), Some(3), None)
        );
        assert_eq!(
            (c.launch.master_addr.as_deref(), c.launch.master_port),
            (Some("127.0.0.1"), Some(4242))
        );
        assert_eq!(c.launch.source, "split");
        assert_eq!(c.launch.job_identity, None);
        assert_eq!(c.job_id.as_deref(), Some("split-ab"));
        assert_eq!(c.topo_file, None);
        assert_eq!(c.trace.as_deref(), Some("/tmp/t-%r.split-ab.json"));
        assert_eq!(c.timeout, parent.timeout);
        assert!(!c.spread);
        assert_eq!(trace_pattern("/tmp/t-%r", "j"), "/tmp/t-%r.j");
    }
}
