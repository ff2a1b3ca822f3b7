//! The corpus, its train/validation split, and masked-LM samples.
//!
//! The corpus is tokenized once and split by token count: the first 90% trains, the last
//! 10% validates. Both are cut into non-overlapping windows of `T-2` tokens, each framed
//! as `[CLS] window [SEP]`.
//!
//! Training sample `g` (a global counter: step `s`, index `i` in the global batch of `N`
//! gives `g = s·N + i`) is window `perm_e[g mod W]` of epoch `e = g div W`, where `perm_e`
//! is a Fisher–Yates shuffle keyed by (seed, e). Its masks are keyed by (seed, g): masks
//! change from epoch to epoch (dynamic masking) but never with the rank that reads the
//! sample, the number of ranks, or a restart.
//!
//! Masking (BERT): each non-special position is chosen with probability 15%; a chosen
//! position becomes `[MASK]` (80%), a random regular token (10%), or stays (10%), and is
//! predicted. A sample where no position was chosen gets one chosen position, so every
//! sample contributes to the loss.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::files::{human_bytes, open_limited, shown, too_large, DataFile};
use super::model::Batch;
use super::rng::{self, Stream};
use super::tokenizer::{WordPiece, CLS_ID, MASK_ID, SEP_ID};
use crate::error::{Error, Result};

/// Probability that a position is predicted.
pub const MASK_PROB: f64 = 0.15;

/// A tokenized corpus split into train and validation tokens.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// First 90% of the tokens.
    pub train: Vec<u32>,
    /// Last 10% of the tokens.
    pub val: Vec<u32>,
    /// sha256 (hex) of all token ids, to tell corpora apart in checkpoints.
    pub digest: String,
}

/// Largest corpus read (bytes). Its token ids take about as much memory again (one 4-byte
/// id per ~4 bytes of English), and tokenizing 4 GiB takes minutes at every start; a
/// larger corpus wants a pre-tokenized format, which this trainer does not have.
pub const CORPUS_MAX_BYTES: u64 = 4 << 30;

/// Longest stretch of a corpus without a space, tab or line break (bytes). The corpus is
/// read and tokenized in pieces cut at such characters (which end a word, so the tokens
/// are those of the whole text); a longer run is not text (`/dev/zero`, a binary file).
pub const CORPUS_MAX_RUN_BYTES: usize = 1 << 20;

/// Bytes read at a time while tokenizing a corpus.
const CORPUS_PIECE_BYTES: usize = 1 << 20;

impl Corpus {
    /// Reads and tokenizes a UTF-8 text file of at most [`CORPUS_MAX_BYTES`].
    pub fn load(path: &Path, tok: &WordPiece) -> Result<Corpus> {
        Self::read_limited(path, tok, CORPUS_MAX_BYTES)
    }

    /// The corpus of a file or the built-in one; errors say where a file's name came from.
    pub fn from_data(src: &DataFile, tok: &WordPiece) -> Result<Corpus> {
        match src {
            DataFile::Builtin { text, .. } => Ok(Corpus::from_tokens(tok.encode(text))),
            DataFile::Path { path, .. } => {
                Self::read_limited(path, tok, CORPUS_MAX_BYTES).map_err(|e| src.context(e))
            }
        }
    }

    /// Reads and tokenizes at most `limit` bytes of `path`, piece by piece: memory holds the
    /// token ids and one piece of text, not the whole file.
    pub fn read_limited(path: &Path, tok: &WordPiece, limit: u64) -> Result<Corpus> {
        let r = open_limited(path, "corpus", limit)?;
        let tokens = tokenize_pieces(r, tok, CORPUS_PIECE_BYTES, CORPUS_MAX_RUN_BYTES).map_err(
            |e| match e {
                PieceError::Io(e) => {
                    Error::io(format!("reading corpus {}", shown(path).display()), e)
                }
                PieceError::TooLong(at) => Error::invalid(
                    "Corpus::load",
                    format!(
                        "corpus {}: more than {} without a space, tab or line break at byte \
                         {at}: not text",
                        shown(path).display(),
                        human_bytes(CORPUS_MAX_RUN_BYTES as u128)
                    ),
                ),
                PieceError::NotUtf8(at) => Error::invalid(
                    "Corpus::load",
                    format!(
                        "corpus {} is not UTF-8 text (invalid byte at offset {at})",
                        shown(path).display()
                    ),
                ),
            },
        )?;
        match tokens {
            Some(t) => Ok(Corpus::from_tokens(t)),
            None => Err(too_large("corpus", path, None, limit)),
        }
    }

    /// Splits a token stream 90/10.
    pub fn from_tokens(tokens: Vec<u32>) -> Corpus {
        let mut h = Sha256::new();
        for t in &tokens {
            h.update(t.to_le_bytes());
        }
        let digest = h
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let cut = tokens.len() * 9 / 10;
        let val = tokens[cut..].to_vec();
        let mut train = tokens;
        train.truncate(cut);
        Corpus { train, val, digest }
    }
}

enum PieceError {
    Io(std::io::Error),
    /// A run without whitespace longer than allowed, starting at this byte.
    TooLong(u64),
    /// Invalid UTF-8 at this byte.
    NotUtf8(u64),
}

/// Tokenizes the text `r` yields, `piece` bytes at a time, each piece cut after its last
/// ASCII space, tab or line break (BERT's basic tokenizer splits words there, so the ids
/// equal those of the whole text). `None` when `r` is a `Take` that ran out: the
/// caller's limit was passed (its reader stops one byte after it).
fn tokenize_pieces(
    mut r: std::io::Take<impl Read>,
    tok: &WordPiece,
    piece: usize,
    max_run: usize,
) -> std::result::Result<Option<Vec<u32>>, PieceError> {
    let limit = r.limit().saturating_sub(1);
    let mut tokens = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    // Offset in the file of pending[0].
    let mut offset = 0u64;
    let mut total = 0u64;
    let mut buf = vec![0u8; piece.max(1)];
    let encode = |text: &[u8], at: u64, tokens: &mut Vec<u32>| {
        let s = std::str::from_utf8(text)
            .map_err(|e| PieceError::NotUtf8(at + e.valid_up_to() as u64))?;
        tokens.extend(tok.encode(s));
        Ok(())
    };
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PieceError::Io(e)),
        };
        total += n as u64;
        if total > limit {
            return Ok(None);
        }
        pending.extend_from_slice(&buf[..n]);
        match pending
            .iter()
            .rposition(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            Some(cut) => {
                encode(&pending[..=cut], offset, &mut tokens)?;
                offset += cut as u64 + 1;
                pending.drain(..=cut);
            }
            None if pending.len() > max_run => return Err(PieceError::TooLong(offset)),
            None => {}
        }
    }
    encode(&pending, offset, &mut tokens)?;
    Ok(Some(tokens))
}

/// One masked sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// `[CLS] tokens [SEP]` after masking (T).
    pub input_ids: Vec<u32>,
    /// Predicted positions, ascending, within the sequence.
    pub positions: Vec<usize>,
    /// Original ids at those positions.
    pub targets: Vec<u32>,
}

/// Builds masked samples from a corpus, deterministically from (seed, sample index).
#[derive(Clone, Debug)]
pub struct Sampler {
    corpus: std::sync::Arc<Corpus>,
    seq_len: usize,
    seed: u64,
    vocab_size: u32,
    first_regular: u32,
    /// (epoch, window order) of the last epoch used.
    perm: Option<(u64, Vec<u32>)>,
}

impl Sampler {
    /// A sampler of sequences of `seq_len` tokens (≥ 3: `[CLS]`, one token, `[SEP]`).
    pub fn new(
        corpus: std::sync::Arc<Corpus>,
        seq_len: usize,
        seed: u64,
        tok: &WordPiece,
    ) -> Result<Sampler> {
        if seq_len < 3 {
            return Err(Error::invalid(
                "Sampler::new",
                format!("seq_len {seq_len} < 3"),
            ));
        }
        let s = Sampler {
            corpus,
            seq_len,
            seed,
            vocab_size: tok.vocab_size() as u32,
            first_regular: tok.first_regular_id(),
            perm: None,
        };
        if s.train_windows() == 0 || s.val_windows() == 0 {
            return Err(Error::invalid(
                "Sampler::new",
                format!(
                    "corpus too small for seq_len {seq_len}: {} train / {} validation tokens",
                    s.corpus.train.len(),
                    s.corpus.val.len()
                ),
            ));
        }
        if s.first_regular >= s.vocab_size {
            return Err(Error::invalid(
                "Sampler::new",
                "vocabulary has no regular tokens",
            ));
        }
        Ok(s)
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of training windows (one epoch).
    pub fn train_windows(&self) -> usize {
        self.corpus.train.len() / (self.seq_len - 2)
    }

    /// Number of validation windows.
    pub fn val_windows(&self) -> usize {
        self.corpus.val.len() / (self.seq_len - 2)
    }

    /// Window order of epoch `e`: Fisher–Yates keyed by (seed, e).
    fn window_of(&mut self, g: u64) -> usize {
        let w = self.train_windows() as u64;
        let (epoch, k) = (g / w, g % w);
        if self.perm.as_ref().map(|p| p.0) != Some(epoch) {
            let mut order: Vec<u32> = (0..w as u32).collect();
            for i in (1..w).rev() {
                let j = rng::below(self.seed, Stream::Shuffle, epoch, i, i + 1);
                order.swap(i as usize, j as usize);
            }
            self.perm = Some((epoch, order));
        }
        self.perm.as_ref().map_or(0, |p| p.1[k as usize] as usize)
    }

    /// Training sample number `g` (global over ranks and steps).
    pub fn train_sample(&mut self, g: u64) -> Sample {
        let win = self.window_of(g);
        let n = self.seq_len - 2;
        let corpus = self.corpus.clone();
        let tokens = &corpus.train[win * n..][..n];
        self.mask(
            tokens,
            g,
            [Stream::MaskSelect, Stream::MaskKind, Stream::MaskToken],
        )
    }

    /// The loss of a model that knows only word frequencies: the mean cross-entropy of the
    /// masked targets of validation samples `0..val_samples` (those an evaluation
    /// predicts) under the token frequencies of the training windows. Counts get ½ added
    /// over the whole vocabulary, so an id the training text never has costs a finite
    /// amount, as it does a trained model.
    pub fn unigram_loss(&self, val_samples: usize) -> f64 {
        let n = self.seq_len - 2;
        let mut counts = vec![0.5f64; self.vocab_size as usize];
        for &t in &self.corpus.train[..self.train_windows() * n] {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1.0;
            }
        }
        let total: f64 = counts.iter().sum();
        let (mut sum, mut masked) = (0.0, 0usize);
        for i in 0..val_samples.max(1) as u64 {
            for &t in &self.val_sample(i).targets {
                let c = counts.get(t as usize).copied().unwrap_or(0.5);
                sum -= (c / total).ln();
                masked += 1;
            }
        }
        sum / masked.max(1) as f64
    }

    /// Validation sample number `i` (window `i mod val_windows`), with fixed masks.
    pub fn val_sample(&self, i: u64) -> Sample {
        let n = self.seq_len - 2;
        let win = (i % self.val_windows() as u64) as usize;
        let tokens = &self.corpus.val[win * n..][..n];
        self.mask(
            tokens,
            i,
            [Stream::ValSelect, Stream::ValKind, Stream::ValToken],
        )
    }

    fn mask(&self, tokens: &[u32], key: u64, streams: [Stream; 3]) -> Sample {
        let [select, kind, token] = streams;
        let t = self.seq_len;
        let mut input_ids = Vec::with_capacity(t);
        input_ids.push(CLS_ID);
        input_ids.extend_from_slice(tokens);
        input_ids.push(SEP_ID);
        let mut positions: Vec<usize> = (1..t - 1)
            .filter(|&p| rng::uniform(self.seed, select, key, p as u64) < MASK_PROB)
            .collect();
        if positions.is_empty() {
            positions
                .push(1 + rng::below(self.seed, select, key, u64::MAX, (t - 2) as u64) as usize);
        }
        let targets: Vec<u32> = positions.iter().map(|&p| input_ids[p]).collect();
        for &p in &positions {
            let u = rng::uniform(self.seed, kind, key, p as u64);
            if u < 0.8 {
                input_ids[p] = MASK_ID;
            } else if u < 0.9 {
                let span = (self.vocab_size - self.first_regular) as u64;
                input_ids[p] =
                    self.first_regular + rng::below(self.seed, token, key, p as u64, span) as u32;
            }
        }
        Sample {
            input_ids,
            positions,
            targets,
        }
    }
}

/// Stacks samples into a [`Batch`] (token types all 0).
pub fn make_batch(samples: &[Sample], seq_len: usize) -> Batch {
    let mut b = Batch {
        batch: samples.len(),
        seq_len,
        ..Batch::default()
    };
    for (i, s) in samples.iter().enumerate() {
        b.input_ids.extend_from_slice(&s.input_ids);
        b.masked_positions
            .extend(s.positions.iter().map(|&p| i * seq_len + p));
        b.masked_targets.extend_from_slice(&s.targets);
    }
    b.token_types = vec![0; b.input_ids.len()];
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn vocab() -> WordPiece {
        let mut lines: Vec<String> = (0..104).map(|i| format!("[unused{i}]")).collect();
        for (i, s) in [
            (0, "[PAD]"),
            (100, "[UNK]"),
            (101, "[CLS]"),
            (102, "[SEP]"),
            (103, "[MASK]"),
        ] {
            lines[i] = s.into();
        }
        lines.extend((0..400).map(|i| format!("w{i}")));
        WordPiece::from_vocab(&lines.join("\n")).unwrap()
    }

    fn sampler(seed: u64) -> Sampler {
        let tokens: Vec<u32> = (0..10_000).map(|i| 104 + (i * 7 % 400) as u32).collect();
        Sampler::new(Arc::new(Corpus::from_tokens(tokens)), 34, seed, &vocab()).unwrap()
    }

    fn take(bytes: &[u8]) -> std::io::Take<&[u8]> {
        bytes.take(u64::MAX)
    }

    #[test]
    fn pieces_make_the_tokens_of_the_whole_text() {
        let tok = WordPiece::from_vocab(crate::files::BUILTIN_VOCAB).unwrap();
        let text = &crate::files::BUILTIN_CORPUS[..60_000];
        let whole = tok.encode(text);
        // Pieces far smaller than a line, cut mid-word and mid-character.
        for piece in [1, 7, 4096] {
            let got = tokenize_pieces(take(text.as_bytes()), &tok, piece, 1 << 10);
            assert!(matches!(&got, Ok(Some(t)) if *t == whole), "piece {piece}");
        }
        let accents = "Café\u{a0}naïve\n\tdéjà vu";
        let got = tokenize_pieces(take(accents.as_bytes()), &tok, 3, 64);
        assert!(matches!(&got, Ok(Some(t)) if *t == tok.encode(accents)));
    }

    #[test]
    fn pieces_refuse_long_runs_bad_utf8_and_too_much() {
        let tok = vocab();
        let run = [b"w1 w2\n".as_slice(), &[b'x'; 100]].concat();
        assert!(matches!(
            tokenize_pieces(take(&run), &tok, 16, 64),
            Err(PieceError::TooLong(6))
        ));
        assert!(matches!(
            tokenize_pieces(take(b"w1 w2 \xff w3"), &tok, 4, 64),
            Err(PieceError::NotUtf8(6))
        ));
        // A Take of limit + 1 bytes: exactly the limit passes, one more is too much.
        let ten = b"w1 w2 w3 w";
        assert!(matches!(
            tokenize_pieces(ten.take(11), &tok, 4, 64),
            Ok(Some(_))
        ));
        assert!(matches!(
            tokenize_pieces(ten.take(10), &tok, 4, 64),
            Ok(None)
        ));
    }

    #[test]
    fn corpus_files_are_bounded() {
        let tok = vocab();
        let err = Corpus::load(Path::new("/dev/zero"), &tok).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid argument to Corpus::load: corpus /dev/zero: more than 1 MiB without a \
             space, tab or line break at byte 0: not text"
        );
        let err = Corpus::read_limited(Path::new("/dev/zero"), &tok, 1000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reading corpus /dev/zero: larger than the 1000 bytes limit for a corpus"
        );
        // A sparse file one byte past the limit is refused before a byte is read.
        let dir = std::env::temp_dir().join(format!("hetccl-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.txt");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(CORPUS_MAX_BYTES + 1)
            .unwrap();
        let err = Corpus::load(&big, &tok).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "reading corpus {}: 4294967297 bytes (4.0 GiB), more than the 4 GiB limit for \
                 a corpus",
                big.display()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn split_is_ninety_ten() {
        let c = Corpus::from_tokens((0..1000).collect());
        assert_eq!(c.train.len(), 900);
        assert_eq!(c.val, (900..1000).collect::<Vec<u32>>());
        assert_eq!(c.digest.len(), 64);
    }

    #[test]
    fn samples_are_framed_and_masked_at_the_bert_rates() {
        let mut s = sampler(1);
        assert_eq!(s.train_windows(), 9000 / 32);
        let (mut chosen, mut masked, mut kept, mut total) = (0, 0, 0, 0);
        for g in 0..2000 {
            let smp = s.train_sample(g);
            assert_eq!(smp.input_ids.len(), 34);
            assert_eq!((smp.input_ids[0], smp.input_ids[33]), (CLS_ID, SEP_ID));
            assert!(!smp.positions.is_empty());
            assert!(smp.positions.iter().all(|&p| (1..33).contains(&p)));
            for (&p, &t) in smp.positions.iter().zip(&smp.targets) {
                let now = smp.input_ids[p];
                masked += (now == MASK_ID) as usize;
                kept += (now == t) as usize;
                assert!(now == MASK_ID || now >= 104, "special token {now} injected");
            }
            chosen += smp.positions.len();
            total += 32;
        }
        let rate = chosen as f64 / total as f64;
        assert!((rate - 0.15).abs() < 0.01, "mask rate {rate}");
        let mrate = masked as f64 / chosen as f64;
        assert!((mrate - 0.8).abs() < 0.02, "[MASK] share {mrate}");
        // kept = 10% kept + random replacements that hit the same token (1/400 of 10%).
        let krate = kept as f64 / chosen as f64;
        assert!((krate - 0.1).abs() < 0.015, "kept share {krate}");
    }

    #[test]
    fn a_sample_depends_only_on_seed_and_index() {
        let (mut a, mut b) = (sampler(5), sampler(5));
        let w = a.train_windows() as u64;
        // Read in different orders (different epochs cached in between): same samples.
        let x = a.train_sample(3);
        let _ = b.train_sample(w + 10);
        assert_eq!(b.train_sample(3), x);
        assert_ne!(sampler(6).train_sample(3), x);
        // One epoch visits every window once.
        let mut seen: Vec<usize> = (0..w).map(|g| a.window_of(g)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..w as usize).collect::<Vec<_>>());
        assert_eq!(a.val_sample(7), b.val_sample(7));
    }

    #[test]
    fn batch_positions_are_flat() {
        let mut s = sampler(2);
        let samples = [s.train_sample(0), s.train_sample(1)];
        let b = make_batch(&samples, 34);
        assert_eq!(b.input_ids.len(), 68);
        let n0 = samples[0].positions.len();
        assert_eq!(b.masked_positions[n0], 34 + samples[1].positions[0]);
        assert_eq!(b.masked_targets.len(), n0 + samples[1].positions.len());
    }
}
