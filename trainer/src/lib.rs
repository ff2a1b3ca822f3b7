//! A minimal BERT masked-LM pretrainer on the CPU, data-parallel over hetccl.
//!
//! Written to be read, like llm.c: every operation has a hand-written forward and backward
//! ([`ops`]), all parameters live in one flat vector with per-tensor views ([`model`]), and
//! the training loop ([`train()`]) uses hetccl only through the small [`sync::GradSync`]
//! trait, as any framework would use a communicator.
//!
//! It is a package of its own, like any user of the library: its plotting, command-line,
//! tokenizer and BLAS dependencies stay out of `libhetccl`. A plain `cargo build
//! --release` at the top of the repository builds it with the library and the tools;
//! run from there:
//!
//! ```text
//! # two local ranks, bert-tiny on tinyshakespeare (a few minutes on two cores)
//! cargo build --release
//! target/release/hetccl run -n 2 -- target/release/hetccl-bert --config configs/bert-tiny.toml
//! # the same two ranks as threads of one process (no communicator)
//! cargo run --release --bin hetccl-bert -- --config configs/bert-tiny.toml --sim-ranks 2
//! # continue an interrupted run exactly where it stopped
//! cargo run --release --bin hetccl-bert -- --resume runs/hetccl-bert.ckpt
//! # a heterogeneous pair: rank 1 three times slower from step 50, batch shares by measured
//! # speed, re-split when they drift
//! cargo run --release --bin hetccl-bert -- --config configs/bert-tiny.toml --sim-ranks 2 \
//!     --slow-ranks 1 --slowdown 3 --slowdown-from 50 --balance auto
//! ```
//!
//! Outputs go to `runs/` (relative to the working directory): `metrics.jsonl` (one JSON
//! object per step and per evaluation; a resumed run cuts it back to its step first),
//! `loss.png` (train and validation loss), `hetccl-bert.ckpt` (latest checkpoint) and
//! `hetccl-bert.ckpt.prev` (the one before it).
//!
//! | module | what |
//! | --- | --- |
//! | [`ops`] | `*_forward` / `*_backward` for embeddings, layernorm, matmul, attention, GELU, softmax + cross-entropy |
//! | [`model`] | shapes, flat parameter layout, the model's forward and bucketed backward |
//! | [`tokenizer`] | BERT's basic tokenizer + WordPiece over a vocabulary file |
//! | [`data`] | corpus split, deterministic sample order and masking |
//! | [`rng`] | counter-based random numbers (no state to save) |
//! | [`optim`] | AdamW, warm-up + linear decay, global-norm clipping |
//! | `gpu` | (feature `cuda`) the GPU twins of the ops' and the optimizer's kernels |
//! | [`balance`] | batch shares proportional to rank speed |
//! | [`sync`] | what training needs from a communicator; one-process and thread-group versions |
//! | [`hf`] | Hugging Face `BertForMaskedLM` directories: export, and a start from one |
//! | [`checkpoint`] | atomic, checksummed, world-size independent checkpoints |
//! | [`config`] | settings: defaults, TOML file, flags; value ranges and the memory check |
//! | [`files`] | bounded reads; where a corpus or vocabulary comes from (the defaults are built in) |
//! | [`train`](mod@train) | the loop, logs, metrics |
//! | [`plot`] | loss curves PNG |
//! | [`cli`] | the `hetccl-bert` command line |
//! | [`error`] | the trainer's [`Error`]: its own failures, and the communicator's wrapped |
#![warn(missing_docs)]

pub mod balance;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod files;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod gpu_blas;
#[cfg(feature = "cuda")]
pub mod gpu_model;
pub mod hf;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod sync;
pub mod tokenizer;
pub mod train;

pub use config::{Balance, RunOptions, Settings, TrainConfig};
pub use error::{Error, Result};
pub use files::{DataFile, Origin};
pub use model::{Batch, LossStats, Model, ModelConfig, ParamLayout};
pub use sync::{BucketSink, CompressedSync, GradBuf, GradSync, NoSync, SingleProcess, ThreadGroup};
pub use tokenizer::WordPiece;
pub use train::{train, train_threads, with_threads, EvalRecord, StepRecord, TrainReport};
