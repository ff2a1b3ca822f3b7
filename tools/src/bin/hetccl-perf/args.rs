//! Command line of `hetccl-perf` (nccl-tests' flag names) and the pure arithmetic
//! behind its table: which sizes to run, how a size becomes buffer lengths, and the
//! bus-bandwidth factors.

use hetccl::config::{parse_size, AlgoChoice};
use hetccl::dtype::CollectiveOp;
use hetccl::{DataType, ReduceOp};

/// Everything the command line sets.
#[derive(Clone, Debug, PartialEq)]
pub struct Args {
    /// `-b`: smallest size in bytes.
    pub min_bytes: usize,
    /// `-e`: largest size in bytes.
    pub max_bytes: usize,
    /// `-f`: each size is the previous one times this.
    pub factor: usize,
    /// `-n`: timed iterations per size.
    pub iters: usize,
    /// `-w`: untimed iterations before the timed ones.
    pub warmup: usize,
    /// `-c`: 1 checks every result, 0 skips the check.
    pub check: bool,
    /// `-o`: reduction.
    pub op: ReduceOp,
    /// `-d`: element type.
    pub dtype: DataType,
    /// `-g`: collective.
    pub coll: CollectiveOp,
    /// `-r`: root of broadcast and reduce.
    pub root: usize,
    /// `-a`: algorithm (`None`: whatever `HETCCL_ALGO` says).
    pub algo: Option<AlgoChoice>,
    /// `--json`: also write the table here (rank 0).
    pub json: Option<String>,
    /// `--shared`: buffers from `Communicator::alloc_shared` (direct shared-memory path).
    pub shared: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            min_bytes: 8,
            max_bytes: 32 << 20,
            factor: 2,
            iters: 20,
            warmup: 5,
            check: true,
            op: ReduceOp::Sum,
            dtype: DataType::F32,
            coll: CollectiveOp::AllReduce,
            root: 0,
            algo: None,
            json: None,
            shared: false,
        }
    }
}

/// What `parse` found: a run to do, or a request for the usage text.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// Run with these arguments.
    Run(Args),
    /// `-h`/`--help`.
    Help,
}

/// Usage text.
pub const USAGE: &str = "\
usage: hetccl-perf [-b MINBYTES] [-e MAXBYTES] [-f FACTOR] [-n ITERS] [-w WARMUP] [-c 0|1]
                   [-o sum|prod|min|max|avg] [-d f32|f64|f16|bf16|i8|u8|i32|u32|i64|u64]
                   [-g all_reduce|reduce_scatter|all_gather|broadcast|reduce] [-r ROOT]
                   [-a auto|ring|tree|hier|doubling|halving] [--json FILE] [--shared]
--shared puts the buffers in memory from alloc_shared (ranks of a host read each other's).
Sizes take K, M, G suffixes (binary). Start one process per rank, e.g.
  hetccl run -n 2 -- hetccl-perf -b 8 -e 256M -f 4";

/// Parses a collective name (nccl-tests' binary names without `_perf` work too).
pub fn parse_collective(s: &str) -> Option<CollectiveOp> {
    Some(match s.to_ascii_lowercase().replace('-', "_").as_str() {
        "all_reduce" | "allreduce" => CollectiveOp::AllReduce,
        "reduce_scatter" | "reducescatter" => CollectiveOp::ReduceScatter,
        "all_gather" | "allgather" => CollectiveOp::AllGather,
        "broadcast" | "bcast" => CollectiveOp::Broadcast,
        "reduce" => CollectiveOp::Reduce,
        _ => return None,
    })
}

/// Parses an algorithm name as `HETCCL_ALGO` spells it.
pub fn parse_algo(s: &str) -> Option<AlgoChoice> {
    let s = s.to_ascii_lowercase();
    AlgoChoice::ALL.into_iter().find(|a| a.name() == s)
}

fn number(flag: &str, v: &str) -> Result<usize, String> {
    v.trim()
        .parse::<usize>()
        .map_err(|_| format!("{flag}: expected a whole number, got {v:?}"))
}

fn bytes(flag: &str, v: &str) -> Result<usize, String> {
    parse_size(v)
        .ok_or_else(|| format!("{flag}: expected a size like 8, 64K, 16M or 1G, got {v:?}"))
}

/// Parses the arguments after the program name. Accepts `-b 8`, `-b8`, `--minbytes 8`
/// and `--minbytes=8`.
pub fn parse<I: IntoIterator<Item = String>>(argv: I) -> Result<Parsed, String> {
    let mut a = Args::default();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Parsed::Help);
        }
        // Split "--name=value" and "-bVALUE" into flag and inline value.
        let (flag, inline): (String, Option<String>) = if let Some(long) = arg.strip_prefix("--") {
            match long.split_once('=') {
                Some((k, v)) => (format!("--{k}"), Some(v.to_string())),
                None => (arg.clone(), None),
            }
        } else if arg.starts_with('-') && arg.len() > 2 {
            (arg[..2].to_string(), Some(arg[2..].to_string()))
        } else {
            (arg.clone(), None)
        };
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "-b" | "--minbytes" => a.min_bytes = bytes(&flag, &value()?)?,
            "-e" | "--maxbytes" => a.max_bytes = bytes(&flag, &value()?)?,
            "-f" | "--stepfactor" => a.factor = number(&flag, &value()?)?,
            "-n" | "--iters" => a.iters = number(&flag, &value()?)?,
            "-w" | "--warmup_iters" => a.warmup = number(&flag, &value()?)?,
            "-c" | "--check" => {
                a.check = match value()?.as_str() {
                    "0" => false,
                    "1" => true,
                    v => return Err(format!("{flag}: expected 0 or 1, got {v:?}")),
                }
            }
            "-o" | "--op" => {
                let v = value()?;
                a.op = ReduceOp::parse(&v).ok_or_else(|| {
                    format!("{flag}: unknown reduction {v:?} (sum, prod, min, max, avg)")
                })?;
            }
            "-d" | "--datatype" => {
                let v = value()?;
                a.dtype = DataType::parse(&v).ok_or_else(|| {
                    format!("{flag}: unknown type {v:?} (f32, f64, f16, bf16, i8, u8, i32, u32, i64, u64)")
                })?;
            }
            "-g" | "--collective" => {
                let v = value()?;
                a.coll = parse_collective(&v).ok_or_else(|| {
                    format!("{flag}: unknown collective {v:?} (all_reduce, reduce_scatter, all_gather, broadcast, reduce)")
                })?;
            }
            "-r" | "--root" => a.root = number(&flag, &value()?)?,
            "-a" | "--algo" => {
                let v = value()?;
                a.algo = Some(parse_algo(&v).ok_or_else(|| {
                    format!("{flag}: unknown algorithm {v:?} (auto, ring, tree, hier, doubling, halving)")
                })?);
            }
            "--json" => a.json = Some(value()?),
            "--shared" => a.shared = true,
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if a.min_bytes == 0 {
        return Err("-b: the smallest size must be at least 1 byte".into());
    }
    if a.min_bytes > a.max_bytes {
        return Err(format!(
            "-b {} is larger than -e {}",
            a.min_bytes, a.max_bytes
        ));
    }
    if a.factor < 2 && a.min_bytes != a.max_bytes {
        return Err(format!("-f must be at least 2 (got {})", a.factor));
    }
    if a.iters == 0 {
        return Err("-n must be at least 1".into());
    }
    Ok(Parsed::Run(a))
}

/// Sizes `min, min*f, min*f^2, ...` up to and including `max`.
pub fn size_list(min: usize, max: usize, factor: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut s = min;
    while s <= max {
        out.push(s);
        if factor < 2 {
            break;
        }
        match s.checked_mul(factor) {
            Some(next) => s = next,
            None => break,
        }
    }
    out
}

/// How one table row's size maps onto buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Bytes the row reports (the whole vector: all `n` blocks for reduce_scatter and
    /// all_gather), a multiple of the element size (and of `n` elements where blocks are).
    pub bytes: usize,
    /// Elements in `bytes`.
    pub count: usize,
    /// Elements of each rank's send buffer.
    pub send: usize,
    /// Elements of each rank's receive buffer.
    pub recv: usize,
}

/// Rounds `size` down to what `coll` over `n` ranks of `elem`-byte elements can move;
/// `None` when that leaves nothing.
pub fn shape(coll: CollectiveOp, size: usize, elem: usize, n: usize) -> Option<Shape> {
    let count = size / elem;
    let (count, send, recv) = match coll {
        CollectiveOp::ReduceScatter => {
            let block = count / n;
            (block * n, block * n, block)
        }
        CollectiveOp::AllGather => {
            let block = count / n;
            (block * n, block, block * n)
        }
        _ => (count, count, count),
    };
    (count > 0).then_some(Shape {
        bytes: count * elem,
        count,
        send,
        recv,
    })
}

/// The table's rows: `size_list` shaped, without the sizes too small for one element
/// per rank.
pub fn rows(a: &Args, n: usize) -> Vec<Shape> {
    size_list(a.min_bytes, a.max_bytes, a.factor)
        .into_iter()
        .filter_map(|s| shape(a.coll, s, a.dtype.size(), n))
        .collect()
}

/// nccl-tests' bus-bandwidth factor: bytes each rank's busiest link carries per byte of
/// `algbw`, so busbw is comparable to a link's speed whatever the rank count.
pub fn busbw_factor(coll: CollectiveOp, n: usize) -> f64 {
    let n = n as f64;
    match coll {
        CollectiveOp::AllReduce => 2.0 * (n - 1.0) / n,
        CollectiveOp::ReduceScatter | CollectiveOp::AllGather => (n - 1.0) / n,
        _ => 1.0,
    }
}

/// (algbw, busbw) in GB/s (10^9 bytes/s) for `bytes` moved in `time_us`.
pub fn bandwidths(coll: CollectiveOp, n: usize, bytes: usize, time_us: f64) -> (f64, f64) {
    if time_us <= 0.0 {
        return (0.0, 0.0);
    }
    let algbw = bytes as f64 / (time_us * 1e3);
    (algbw, algbw * busbw_factor(coll, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Parsed, String> {
        parse(s.split_whitespace().map(String::from))
    }

    fn run(s: &str) -> Args {
        match args(s) {
            Ok(Parsed::Run(a)) => a,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn flags_with_suffixes_and_all_spellings() {
        let a = run("-b 8 -e 64K -f 8 -n 7 -w2 -c 0 -o max -d bf16 -g all_gather -r 1 -a ring --json=/tmp/x.json");
        assert_eq!(a.min_bytes, 8);
        assert_eq!(a.max_bytes, 65536);
        assert_eq!(a.factor, 8);
        assert_eq!(a.iters, 7);
        assert_eq!(a.warmup, 2);
        assert!(!a.check);
        assert_eq!(a.op, ReduceOp::Max);
        assert_eq!(a.dtype, DataType::Bf16);
        assert_eq!(a.coll, CollectiveOp::AllGather);
        assert_eq!(a.root, 1);
        assert_eq!(a.algo, Some(AlgoChoice::Ring));
        assert_eq!(a.json.as_deref(), Some("/tmp/x.json"));
        let a = run("--minbytes=1M --maxbytes 1G -d float -g allreduce -a hier");
        assert_eq!((a.min_bytes, a.max_bytes), (1 << 20, 1 << 30));
        assert_eq!(a.dtype, DataType::F32);
        assert_eq!(a.algo, Some(AlgoChoice::Hier));
        assert_eq!(args("-h"), Ok(Parsed::Help));
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        assert_eq!(
            args("-b 8X").unwrap_err(),
            "-b: expected a size like 8, 64K, 16M or 1G, got \"8X\""
        );
        assert_eq!(args("-c 2").unwrap_err(), "-c: expected 0 or 1, got \"2\"");
        assert_eq!(
            args("-b 1M -e 1K").unwrap_err(),
            "-b 1048576 is larger than -e 1024"
        );
        assert_eq!(args("-f 1").unwrap_err(), "-f must be at least 2 (got 1)");
        assert_eq!(args("-n").unwrap_err(), "-n needs a value");
        assert!(args("-a fastest")
            .unwrap_err()
            .starts_with("-a: unknown algorithm \"fastest\""));
        assert!(args("--bogus 1")
            .unwrap_err()
            .starts_with("unknown flag --bogus"));
    }

    #[test]
    fn sizes_stop_at_max_inclusive() {
        assert_eq!(size_list(8, 65536, 8), vec![8, 64, 512, 4096, 32768]);
        assert_eq!(size_list(4, 256 << 20, 4).len(), 14); // 4 B .. 256 MiB
        assert_eq!(size_list(4, 256 << 20, 4).last(), Some(&(256 << 20)));
        assert_eq!(size_list(100, 100, 1), vec![100]);
        assert_eq!(size_list(1 << 62, usize::MAX, 4), vec![1 << 62]);
    }

    #[test]
    fn shapes_round_to_whole_blocks() {
        // all_reduce: 10 bytes of f32 is 2 elements
        let s = shape(CollectiveOp::AllReduce, 10, 4, 3).unwrap();
        assert_eq!((s.bytes, s.count, s.send, s.recv), (8, 2, 2, 2));
        // reduce_scatter over 3 ranks: 100 B = 25 f32 -> 8 per block, 24 in all
        let s = shape(CollectiveOp::ReduceScatter, 100, 4, 3).unwrap();
        assert_eq!((s.bytes, s.count, s.send, s.recv), (96, 24, 24, 8));
        let s = shape(CollectiveOp::AllGather, 100, 4, 3).unwrap();
        assert_eq!((s.bytes, s.count, s.send, s.recv), (96, 24, 8, 24));
        assert_eq!(shape(CollectiveOp::AllGather, 8, 4, 4), None);
        assert_eq!(shape(CollectiveOp::Broadcast, 2, 4, 4), None);
    }

    #[test]
    fn rows_skip_sizes_below_one_element_per_rank() {
        let a = run("-b 1 -e 64 -f 2 -g all_gather");
        // 1,2,4 B: no whole f32 per rank on 2 ranks; 8 B = 1 per rank; then 16, 32, 64
        let got: Vec<usize> = rows(&a, 2).iter().map(|s| s.bytes).collect();
        assert_eq!(got, vec![8, 16, 32, 64]);
        let a = run("-b 8 -e 64K -f 8");
        assert_eq!(rows(&a, 2).len(), 5);
        // 26 B of f64 over 3 ranks: 3 elements, one block each
        let a = run("-b 13 -e 26 -f 2 -g reduce_scatter -d f64");
        let got: Vec<(usize, usize)> = rows(&a, 3).iter().map(|s| (s.bytes, s.recv)).collect();
        assert_eq!(got, vec![(24, 1)]);
    }

    #[test]
    fn busbw_factors_match_nccl_tests() {
        assert_eq!(busbw_factor(CollectiveOp::AllReduce, 2), 1.0);
        assert_eq!(busbw_factor(CollectiveOp::AllReduce, 4), 1.5);
        assert_eq!(busbw_factor(CollectiveOp::ReduceScatter, 4), 0.75);
        assert_eq!(busbw_factor(CollectiveOp::AllGather, 8), 0.875);
        assert_eq!(busbw_factor(CollectiveOp::Broadcast, 8), 1.0);
        assert_eq!(busbw_factor(CollectiveOp::Reduce, 3), 1.0);
        assert_eq!(busbw_factor(CollectiveOp::AllReduce, 1), 0.0);
        // 1 MB in 500 us on 4 ranks: 2 GB/s algorithm, 3 GB/s bus
        assert_eq!(
            bandwidths(CollectiveOp::AllReduce, 4, 1_000_000, 500.0),
            (2.0, 3.0)
        );
        assert_eq!(
            bandwidths(CollectiveOp::AllReduce, 4, 1_000_000, 0.0),
            (0.0, 0.0)
        );
    }
}
