//! BERT's WordPiece tokenizer (uncased).
//!
//! Two stages, as in the original BERT:
//! 1. basic tokenizer: drop control characters, map whitespace to spaces, put spaces around
//!    CJK ideographs, split on whitespace, lower-case, strip accents (NFD, then drop
//!    non-spacing marks), split every punctuation character off as its own word;
//! 2. WordPiece: greedy longest-match-first over the vocabulary, continuation pieces
//!    prefixed with `##`; a word longer than 100 characters, or one with a piece that is
//!    not in the vocabulary, becomes `[UNK]`.
//!
//! Ids are line numbers (from 0) of the vocabulary file.

use std::collections::HashMap;
use std::path::Path;

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

use super::files::DataFile;
use crate::error::{Error, Result};

/// `[PAD]`
pub const PAD_ID: u32 = 0;
/// `[UNK]`
pub const UNK_ID: u32 = 100;
/// `[CLS]`, first token of every sequence.
pub const CLS_ID: u32 = 101;
/// `[SEP]`, last token of every sequence.
pub const SEP_ID: u32 = 102;
/// `[MASK]`
pub const MASK_ID: u32 = 103;

/// Largest vocabulary file read (bytes): BERT's is 230 kB, the largest multilingual
/// vocabularies (250k entries) a few MB.
pub const VOCAB_MAX_BYTES: u64 = 64 << 20;

/// Words longer than this many characters become `[UNK]`.
pub const MAX_WORD_CHARS: usize = 100;

/// A WordPiece vocabulary and the two-stage tokenizer over it.
#[derive(Clone, Debug)]
pub struct WordPiece {
    ids: HashMap<String, u32>,
    tokens: Vec<String>,
    first_regular: u32,
}

impl WordPiece {
    /// Reads a vocabulary file of at most [`VOCAB_MAX_BYTES`]: one token per line,
    /// id = line number - 1.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_data(&DataFile::from(path))
    }

    /// The vocabulary of a file or the built-in one; errors say where a file's name came
    /// from.
    pub fn from_data(src: &DataFile) -> Result<Self> {
        let text = src.read_text("vocabulary", VOCAB_MAX_BYTES)?;
        Self::from_vocab(&text)
            .map_err(|e| Error::invalid("WordPiece::from_file", format!("{src}: {e}")))
    }

    /// Builds the tokenizer from the text of a vocabulary file.
    ///
    /// The special tokens must sit at BERT's ids (`[PAD]`=0, `[UNK]`=100, `[CLS]`=101,
    /// `[SEP]`=102, `[MASK]`=103): the trainer relies on them.
    pub fn from_vocab(text: &str) -> Result<Self> {
        let tokens: Vec<String> = text.lines().map(|l| l.to_string()).collect();
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            // First occurrence wins, like BERT's loader.
            ids.entry(t.clone()).or_insert(i as u32);
        }
        for (name, want) in [
            ("[PAD]", PAD_ID),
            ("[UNK]", UNK_ID),
            ("[CLS]", CLS_ID),
            ("[SEP]", SEP_ID),
            ("[MASK]", MASK_ID),
        ] {
            let got = tokens.get(want as usize).map(String::as_str);
            if got != Some(name) {
                return Err(Error::invalid(
                    "WordPiece::from_vocab",
                    format!("expected {name} at id {want}, found {got:?}"),
                ));
            }
        }
        // Ordinary tokens start after the special and `[unusedN]` entries; random
        // replacement tokens for masking are drawn from there on.
        let first_regular = tokens
            .iter()
            .position(|t| !(t.starts_with('[') && t.ends_with(']')))
            .unwrap_or(tokens.len()) as u32;
        Ok(WordPiece {
            ids,
            tokens,
            first_regular,
        })
    }

    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The first id that is neither special nor `[unusedN]` (999 for BERT's vocabulary).
    pub fn first_regular_id(&self) -> u32 {
        self.first_regular
    }

    /// Id of a vocabulary entry.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Vocabulary entry of an id.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Tokenizes `text` into ids (no `[CLS]`/`[SEP]` added).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut probe = String::new();
        for word in basic_tokenize(text) {
            self.wordpiece(&word, &mut probe, &mut out);
        }
        out
    }

    /// Joins ids back into text, gluing `##` pieces to the previous piece.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut s = String::new();
        for &id in ids {
            let t = self.token(id).unwrap_or("[UNK]");
            match t.strip_prefix("##") {
                Some(rest) => s.push_str(rest),
                None => {
                    if !s.is_empty() {
                        s.push(' ');
                    }
                    s.push_str(t);
                }
            }
        }
        s
    }

    /// Greedy longest-match-first split of one basic token, appended to `out`.
    fn wordpiece(&self, word: &str, probe: &mut String, out: &mut Vec<u32>) {
        // Byte offset of every character boundary, end included.
        let bounds: Vec<usize> = word
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(word.len()))
            .collect();
        let nchars = bounds.len() - 1;
        if nchars > MAX_WORD_CHARS {
            out.push(UNK_ID);
            return;
        }
        let mark = out.len();
        let mut start = 0;
        while start < nchars {
            let mut found = None;
            let mut end = nchars;
            while end > start {
                probe.clear();
                if start > 0 {
                    probe.push_str("##");
                }
                probe.push_str(&word[bounds[start]..bounds[end]]);
                if let Some(&id) = self.ids.get(probe.as_str()) {
                    found = Some(id);
                    break;
                }
                end -= 1;
            }
            match found {
                Some(id) => {
                    out.push(id);
                    start = end;
                }
                None => {
                    out.truncate(mark);
                    out.push(UNK_ID);
                    return;
                }
            }
        }
    }
}

/// BERT's basic tokenizer (uncased): the words WordPiece then splits.
pub fn basic_tokenize(text: &str) -> Vec<String> {
    // Clean: drop NUL, U+FFFD and control characters; whitespace becomes a space; CJK
    // ideographs become words of their own.
    let mut cleaned = String::with_capacity(text.len());
    for ch in text.chars() {
        if ch == '\0' || ch == '\u{fffd}' || is_control(ch) {
            continue;
        }
        if is_whitespace(ch) {
            cleaned.push(' ');
        } else if is_cjk(ch) {
            cleaned.push(' ');
            cleaned.push(ch);
            cleaned.push(' ');
        } else {
            cleaned.push(ch);
        }
    }
    let mut words = Vec::new();
    for token in cleaned.split(' ').filter(|t| !t.is_empty()) {
        let lowered = token.to_lowercase();
        let stripped: String = lowered
            .nfd()
            .filter(|c| c.general_category() != GeneralCategory::NonspacingMark)
            .collect();
        // Split punctuation off: every punctuation character is a word by itself.
        let mut cur = String::new();
        for ch in stripped.chars() {
            if is_punctuation(ch) {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                words.push(ch.to_string());
            } else {
                cur.push(ch);
            }
        }
        if !cur.is_empty() {
            words.push(cur);
        }
    }
    words
}

fn is_whitespace(ch: char) -> bool {
    matches!(ch, ' ' | '\t' | '\n' | '\r')
        || ch.general_category() == GeneralCategory::SpaceSeparator
}

fn is_control(ch: char) -> bool {
    if matches!(ch, '\t' | '\n' | '\r') {
        return false;
    }
    ch.general_category_group() == GeneralCategoryGroup::Other
}

/// ASCII non-alphanumerics count as punctuation even where Unicode calls them symbols
/// (`$`, `+`, `^`, `` ` ``), as in BERT.
fn is_punctuation(ch: char) -> bool {
    let cp = ch as u32;
    (33..=47).contains(&cp)
        || (58..=64).contains(&cp)
        || (91..=96).contains(&cp)
        || (123..=126).contains(&cp)
        || ch.general_category_group() == GeneralCategoryGroup::Punctuation
}

/// The CJK Unified Ideographs blocks (not Hiragana, Katakana or Hangul, which are written
/// with spaces).
fn is_cjk(ch: char) -> bool {
    matches!(ch as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> WordPiece {
        // ids 0..=103 must hold the special tokens; fill the gap with [unusedN].
        let mut lines: Vec<String> = (0..104).map(|i| format!("[unused{i}]")).collect();
        lines[0] = "[PAD]".into();
        lines[100] = "[UNK]".into();
        lines[101] = "[CLS]".into();
        lines[102] = "[SEP]".into();
        lines[103] = "[MASK]".into();
        for t in [
            "un", "##aff", "##able", "runn", "##ing", ",", "!", "a", "##b", "直",
        ] {
            lines.push(t.into());
        }
        WordPiece::from_vocab(&lines.join("\n")).unwrap()
    }

    #[test]
    fn basic_tokenizer_splits_like_bert() {
        assert_eq!(
            basic_tokenize(" \tHeLLo!how  \n Are yoU?  "),
            ["hello", "!", "how", "are", "you", "?"]
        );
        assert_eq!(basic_tokenize("Café naïve"), ["cafe", "naive"]);
        assert_eq!(basic_tokenize("ah博推zz"), ["ah", "博", "推", "zz"]);
        assert_eq!(basic_tokenize("a$b^c"), ["a", "$", "b", "^", "c"]);
        assert_eq!(basic_tokenize("x\u{0}y\u{200b}z"), ["xyz"]);
    }

    #[test]
    fn wordpiece_greedy_longest_match() {
        let wp = small();
        assert_eq!(wp.first_regular_id(), 104);
        // unaffable → un ##aff ##able (the classic example of the BERT paper's code).
        assert_eq!(wp.encode("unaffable"), [104, 105, 106]);
        assert_eq!(
            wp.encode("running, unable!"),
            [107, 108, 109, 104, 106, 110]
        );
        // "unx": "un" matches, "##x" does not: the whole word is [UNK].
        assert_eq!(wp.encode("unx a"), [UNK_ID, 111]);
        assert_eq!(wp.encode("ab"), [111, 112]);
        assert_eq!(wp.encode("直"), [113]);
        let long = "a".to_string() + &"b".repeat(MAX_WORD_CHARS);
        assert_eq!(wp.encode(&long), [UNK_ID]);
        let ok = "a".to_string() + &"b".repeat(MAX_WORD_CHARS - 1);
        assert_eq!(wp.encode(&ok).len(), MAX_WORD_CHARS);
        assert_eq!(wp.decode(&[104, 105, 106, 110]), "unaffable !");
    }

    #[test]
    fn special_tokens_must_be_in_place() {
        let err = WordPiece::from_vocab("[PAD]\nfoo").unwrap_err();
        assert!(
            err.to_string().contains("expected [UNK] at id 100"),
            "{err}"
        );
    }
}
