//! WordPiece over BERT's uncased vocabulary. Every expected id was looked up by hand in
//! data/bert-base-uncased-vocab.txt (`grep -n -x -F TOKEN`, id = line - 1).

use std::path::Path;

use hetccl_trainer::tokenizer::{WordPiece, CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID};

fn vocab() -> WordPiece {
    WordPiece::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/bert-base-uncased-vocab.txt"),
    )
    .unwrap()
}

#[test]
fn special_tokens_and_size() {
    let wp = vocab();
    assert_eq!(wp.vocab_size(), 30522);
    assert_eq!(wp.id("[PAD]"), Some(PAD_ID));
    assert_eq!(wp.id("[UNK]"), Some(UNK_ID));
    assert_eq!(wp.id("[CLS]"), Some(CLS_ID));
    assert_eq!(wp.id("[SEP]"), Some(SEP_ID));
    assert_eq!(wp.id("[MASK]"), Some(MASK_ID));
    // line 1000 is "!", the first entry after [unused993]
    assert_eq!(wp.first_regular_id(), 999);
}

#[test]
fn sentences_match_hand_lookups() {
    let wp = vocab();
    // hello: line 7593, world: line 2089
    assert_eq!(wp.encode("hello world"), [7592, 2088]);
    assert_eq!(wp.encode("Hello, World!"), [7592, 1010, 2088, 999]);
    // to 2001, be 2023, "," 1011, or 2031, not 2026, ":" 1026, that 2009, is 2004,
    // the 1997, question 3161, "." 1013
    assert_eq!(
        wp.encode("To be, or not to be: that is the question."),
        [2000, 2022, 1010, 2030, 2025, 2000, 2022, 1024, 2008, 2003, 1996, 3160, 1012]
    );
    // romeo 12391, and 1999, juliet 13708, thou 15224, art 2397, "?" 1030
    assert_eq!(
        wp.encode("ROMEO and Juliet: thou art?"),
        [12390, 1998, 13707, 1024, 15223, 2396, 1029]
    );
    // accents stripped: cafe 7669, naive 15744
    assert_eq!(wp.encode("Café naïve"), [7668, 15743]);
    // shakespeare 8102, "'" 1006, s 1056
    assert_eq!(wp.encode("Shakespeare's"), [8101, 1005, 1055]);
}

#[test]
fn words_split_into_pieces() {
    let wp = vocab();
    // word 2774, ##piece 11199
    assert_eq!(wp.encode("WordPiece"), [2773, 11198]);
    // het 21771, ##ero 10625, ##gen 6915, ##eous 14770 (no longer prefix of any piece is
    // in the vocabulary: checked with grep for each)
    assert_eq!(wp.encode("heterogeneous"), [21770, 10624, 6914, 14769]);
    assert_eq!(wp.decode(&[21770, 10624, 6914, 14769]), "heterogeneous");
    // a 101-character word is [UNK]
    assert_eq!(wp.encode(&"a".repeat(101)), [UNK_ID]);
}

#[test]
fn the_built_in_vocabulary_is_the_file() {
    use hetccl_trainer::files::BUILTIN_VOCAB;
    let file = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/bert-base-uncased-vocab.txt"),
    )
    .unwrap();
    assert_eq!(BUILTIN_VOCAB, file);
    let wp = WordPiece::from_data(&hetccl_trainer::DataFile::builtin_vocab()).unwrap();
    assert_eq!(wp.vocab_size(), 30522);
}

#[test]
fn vocabulary_reads_are_bounded() {
    use hetccl_trainer::tokenizer::VOCAB_MAX_BYTES;
    assert_eq!(
        WordPiece::from_file(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string(),
        "reading vocabulary /dev/zero: larger than the 64 MiB limit for a vocabulary"
    );
    let dir = std::env::temp_dir().join(format!("hetccl-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("big.txt");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(VOCAB_MAX_BYTES + 1)
        .unwrap();
    assert_eq!(
        WordPiece::from_file(&big).unwrap_err().to_string(),
        format!(
            "reading vocabulary {}: 67108865 bytes (64.0 MiB), more than the 64 MiB limit for a \
             vocabulary",
            big.display()
        )
    );
    std::fs::write(&big, b"[PAD]\n\xff\n").unwrap();
    assert_eq!(
        WordPiece::from_file(&big).unwrap_err().to_string(),
        format!(
            "invalid argument to DataFile::read_text: vocabulary {} is not UTF-8 text (invalid \
             byte at offset 6)",
            big.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}
