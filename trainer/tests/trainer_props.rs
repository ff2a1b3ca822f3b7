//! Property tests of what the trainer reads from outside: checkpoints (random, truncated,
//! bit-flipped, with lying length fields) and settings files (random values for every
//! key). None may panic, none may allocate past a bound set by its input's size, and each
//! refusal names the problem. A damaged newest checkpoint never costs the one before it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use hetccl_testkit::Scratch;
use hetccl_trainer::checkpoint::{self, CheckpointMeta};
use hetccl_trainer::Error;
use hetccl_trainer::Settings;
use proptest::prelude::*;

/// Passes every call to the system allocator and remembers, per thread, the largest
/// block asked for since [`largest_allocation`] last reset it.
struct Watching;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to `System`; `note` neither allocates nor
// unwinds.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// Runs `f`, returning its result and the largest single allocation it made.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|m| m.set(0));
    let r = f();
    (r, LARGEST.with(|m| m.get()))
}

fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("trainer-props-{name}"))
}

fn meta(step: u64, n: usize) -> CheckpointMeta {
    let (cfg, _) = Settings::default().resolve(1).unwrap();
    CheckpointMeta {
        step,
        samples_seen: 16 * step,
        adam_t: step,
        world_size: 1,
        config: cfg,
        corpus_digest: "ab".repeat(32),
        num_params: n,
        splits: Vec::new(),
    }
}

const PARAMS: usize = 40;

/// A valid checkpoint file's bytes (step `step`, 40 parameters).
fn valid(step: u64) -> Vec<u8> {
    let dir = scratch("valid");
    let p = dir.join("c.ckpt");
    let t: Vec<f32> = (0..PARAMS).map(|i| i as f32 * 0.5 + step as f32).collect();
    checkpoint::save(&p, &meta(step, PARAMS), &t, &t, &t).unwrap();
    std::fs::read(&p).unwrap()
}

/// The checks a refusal may name (see `checkpoint::load`).
const REASONS: &[&str] = &[
    "bad magic",
    "truncated",
    "unsupported version",
    "reserved header field",
    "header says",
    "size mismatch",
    "checksum mismatch",
    "metadata unreadable",
    "payload holds",
];

/// Loads `bytes` as a file of known size and as a stream, checking the bound on memory
/// and the error's form; returns the file result.
fn load_both(bytes: &[u8]) -> Result<checkpoint::Checkpoint, String> {
    let name = Path::new("/in-memory/mutated.ckpt");
    // Three tensors reserved for a file whose size proved them there, a 1 MiB read
    // buffer at most, the JSON metadata: all within a few times the input.
    let bound = 4 * bytes.len() + (64 << 10);
    let (sized, a) = largest_allocation(|| checkpoint::from_bytes(name, bytes));
    let (streamed, b) = largest_allocation(|| checkpoint::from_reader(name, bytes));
    assert!(
        a <= bound,
        "{a} bytes allocated for a {}-byte file",
        bytes.len()
    );
    assert!(
        b <= bound,
        "{b} bytes allocated for a {}-byte stream",
        bytes.len()
    );
    let reason = |r: Result<checkpoint::Checkpoint, Error>| match r {
        Ok(c) => Ok(c),
        Err(Error::Checkpoint { path, reason }) => {
            assert_eq!(path, "/in-memory/mutated.ckpt");
            assert!(
                REASONS.iter().any(|p| reason.starts_with(p)),
                "unexpected reason {reason:?}"
            );
            Err(reason)
        }
        Err(other) => panic!("not a checkpoint error: {other}"),
    };
    let (sized, streamed) = (reason(sized), reason(streamed));
    assert_eq!(sized.is_ok(), streamed.is_ok(), "{sized:?} vs {streamed:?}");
    sized
}

#[derive(Clone, Debug)]
enum Damage {
    Truncate(usize),
    Flip(Vec<(usize, u8)>),
    /// A length field (offset 16: metadata, 24: payload) set to this.
    Length(usize, u64),
    Append(Vec<u8>),
    Splice(usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    let lengths = prop_oneof![
        any::<u64>(),
        Just(1u64 << 60),
        Just(u64::MAX),
        (0u64..4096),
        (0u64..40).prop_map(|k| 1u64 << k),
    ];
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        proptest::collection::vec((any::<usize>(), 0u8..8), 1..5).prop_map(Damage::Flip),
        (prop_oneof![Just(16usize), Just(24usize)], lengths)
            .prop_map(|(o, v)| Damage::Length(o, v)),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Append),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..32)
        )
            .prop_map(|(p, b)| Damage::Splice(p, b)),
    ]
}

fn apply(good: &[u8], d: &Damage) -> Vec<u8> {
    let mut b = good.to_vec();
    match d {
        Damage::Truncate(p) => b.truncate(p % b.len()),
        Damage::Flip(bits) => {
            for &(p, bit) in bits {
                let i = p % b.len();
                b[i] ^= 1 << bit;
            }
        }
        Damage::Length(o, v) => b[*o..*o + 8].copy_from_slice(&v.to_le_bytes()),
        Damage::Append(extra) => b.extend_from_slice(extra),
        Damage::Splice(p, bytes) => {
            let i = p % b.len();
            let j = (i + bytes.len()).min(b.len());
            b.splice(i..j, bytes.iter().copied());
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_refused_with_a_named_check(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        magic in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 12 {
            bytes[..8].copy_from_slice(checkpoint::MAGIC);
            bytes[8..12].copy_from_slice(&checkpoint::VERSION.to_le_bytes());
        }
        prop_assert!(load_both(&bytes).is_err());
    }

    #[test]
    fn damaged_checkpoints_are_refused_with_a_named_check(d in damage()) {
        let good = valid(3);
        let bad = apply(&good, &d);
        let r = load_both(&bad);
        if bad == good {
            let c = r.unwrap();
            prop_assert_eq!(c.meta, meta(3, PARAMS));
        } else {
            // Whatever changed, a check caught it (the checksum covers all but the header,
            // whose every field is checked).
            prop_assert!(r.is_err(), "{:?} was accepted", d);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_newest_checkpoint_never_costs_the_previous_one(d in damage()) {
        let dir = scratch("newest");
        let path = dir.join("c.ckpt");
        let prev = checkpoint::previous_path(&path);
        let t = [1.0f32; PARAMS];
        checkpoint::save(&path, &meta(1, PARAMS), &t, &t, &t).unwrap();
        checkpoint::save(&path, &meta(2, PARAMS), &t, &t, &t).unwrap();
        let good_prev = std::fs::read(&prev).unwrap();
        let newest = std::fs::read(&path).unwrap();
        let damaged = apply(&newest, &d);
        std::fs::write(&path, &damaged).unwrap();
        if damaged != newest {
            prop_assert!(checkpoint::load(&path).is_err());
        }
        checkpoint::save(&path, &meta(3, PARAMS), &t, &t, &t).unwrap();
        prop_assert_eq!(checkpoint::load(&path).unwrap().meta.step, 3);
        let kept = checkpoint::load(&prev).unwrap().meta.step;
        if damaged == newest {
            prop_assert_eq!(kept, 2);
        } else {
            prop_assert_eq!(std::fs::read(&prev).unwrap(), good_prev);
        }
        }
}

/// Every key of a settings file, with the kind of value it takes.
const KEYS: &[&str] = &[
    "model",
    "layers",
    "hidden",
    "heads",
    "ffn",
    "vocab_size",
    "max_position",
    "seq_len",
    "batch_size",
    "grad_accum",
    "steps",
    "lr",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "seed",
    "eval_every",
    "val_samples",
    "log_every",
    "checkpoint_every",
    "data",
    "vocab",
    "balance",
    "slowdown",
    "slow_ranks",
    "threads",
    "compress",
    "compress_format",
];

/// A TOML value of any kind, biased toward the edges of each kind.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(2),
            Just(3),
            Just(104),
            Just(1 << 40)
        ]
        .prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        prop_oneof![
            Just("nan"),
            Just("inf"),
            Just("-inf"),
            Just("-0.0"),
            Just("1e-45"),
            Just("1e300"),
            Just("0.5")
        ]
        .prop_map(String::from),
        prop_oneof![
            Just("bert-tiny"),
            Just("bert-base"),
            Just("auto"),
            Just("equal"),
            Just("inter"),
            Just("fp16"),
            Just(""),
            Just("../x")
        ]
        .prop_map(|s| format!("{s:?}")),
        "[a-z0-9 ]{0,8}".prop_map(|s| format!("{s:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        proptest::collection::vec(any::<i32>(), 0..4).prop_map(|v| format!("{v:?}")),
        Just("{ a = 1 }".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn random_settings_are_taken_or_refused_by_name(
        picks in proptest::collection::btree_map(0..KEYS.len(), toml_value(), 1..5),
    ) {
        let text: String = picks.iter().map(|(k, v)| format!("{} = {v}\n", KEYS[*k])).collect();
        let keys: Vec<&str> = picks.keys().map(|k| KEYS[*k]).collect();
        let (outcome, largest) = largest_allocation(|| {
            Settings::from_toml(&text)
                .and_then(|s| s.resolve(1))
                .and_then(|(cfg, run)| {
                    cfg.validate(1)?;
                    // The memory check against a 1 TiB machine: huge shapes are refused
                    // by it, with their need computed without overflow.
                    cfg.check_memory(1, run.local_ranks, 1 << 40)?;
                    Ok(cfg)
                })
        });
        prop_assert!(largest < 1 << 20, "{} bytes allocated for {:?}", largest, text);
        match outcome {
            Ok(cfg) => {
                // Taken: the numbers the trainer needs are sane.
                prop_assert!(cfg.lr.is_finite() && cfg.lr > 0.0);
                prop_assert!(cfg.grad_clip >= 0.0 && cfg.adamw.weight_decay >= 0.0);
                prop_assert!(cfg.seq_len >= 3 && cfg.seq_len <= cfg.model.max_position);
                prop_assert!(cfg.memory_estimate(1).total() <= 1 << 40);
            }
            Err(Error::Config { var, .. }) => {
                // Named by its key; a sequence length may be refused because of the
                // position table it must fit.
                let why = if var == "seq_len" { vec!["seq_len", "max_position"] } else { vec![var.as_str()] };
                prop_assert!(
                    why.iter().any(|w| keys.contains(w)) || (var == "batch_size" && keys.contains(&"grad_accum")),
                    "{} refused for {:?}", var, text
                );
            }
            Err(e) => {
                let msg = e.to_string();
                // TOML's type errors quote the line, key included; shape and memory
                // errors name the settings involved.
                prop_assert!(
                    keys.iter().any(|k| msg.contains(k)),
                    "{:?} does not name a key of {:?}", msg, text
                );
            }
        }
    }
}
