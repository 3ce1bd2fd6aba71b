//! CER/WER alignment counts against hand-computed cases and an exhaustive alignment search, and
//! the character tokenizer.

use speechcache::finetune::metrics::{
    align, cer, cer_without_spaces, char_tokens, wer, ErrorCounts,
};
use speechcache::finetune::tokenizer::{Tokenizer, TokenizerError, UNK_TEXT};

fn counts(sub: usize, del: usize, ins: usize, ref_len: usize) -> ErrorCounts {
    ErrorCounts {
        sub,
        del,
        ins,
        ref_len,
    }
}

// ---------- metrics: hand-computed ----------

#[test]
fn hand_computed_word_alignments() {
    assert_eq!(wer("a b c d", "a b c d"), counts(0, 0, 0, 4));
    assert_eq!(wer("a b c d", "a x c d"), counts(1, 0, 0, 4));
    assert_eq!(wer("a b c", "a c"), counts(0, 1, 0, 3));
    assert_eq!(wer("a c", "a b c"), counts(0, 0, 1, 2));
    // sat -> sit substituted, second "the" deleted.
    let c = wer("the cat sat on the mat", "the  cat sit on mat ");
    assert_eq!(c, counts(1, 1, 0, 6));
    assert_eq!(c.errors(), 2);
    assert_eq!(c.correct(), 4);
    assert!((c.rate() - 2.0 / 6.0).abs() < 1e-12);
}

#[test]
fn hand_computed_character_alignments() {
    // kitten -> sitting: k->s, e->i, +g (distance 3, no alignment with fewer substitutions).
    assert_eq!(
        align(&chars("kitten"), &chars("sitting")),
        counts(2, 0, 1, 6)
    );
    // Mandarin: 很 -> 真, 啊 inserted.
    assert_eq!(cer("今天天气很好", "今天天气真好啊"), counts(1, 0, 1, 6));
    // A swap costs two edits either way; the alignment keeping one character correct wins.
    assert_eq!(align(&chars("ab"), &chars("ba")), counts(0, 1, 1, 2));
    // Word boundaries are tokens for CER ("a cat" is 5 tokens), unless spaces are removed.
    assert_eq!(char_tokens("  a   cat "), vec!['a', ' ', 'c', 'a', 't']);
    assert_eq!(cer("a cat", "acat"), counts(0, 1, 0, 5));
    assert_eq!(cer_without_spaces("a cat", "acat"), counts(0, 0, 0, 4));
    // sclite's weights would report 4 deletions + 4 insertions here; the minimum is 7 substitutions.
    assert_eq!(
        align(&chars("abcdefg"), &chars("zzzzabc")),
        counts(7, 0, 0, 7)
    );
}

#[test]
fn empty_sides() {
    assert_eq!(cer("", ""), counts(0, 0, 0, 0));
    assert_eq!(cer("", "").rate(), 0.0);
    let c = cer("", "abc");
    assert_eq!(c, counts(0, 0, 3, 0));
    assert_eq!(c.rate(), f64::INFINITY);
    let c = wer("one two three", "");
    assert_eq!(c, counts(0, 3, 0, 3));
    assert_eq!(c.rate(), 1.0);
}

#[test]
fn counts_add_up_over_a_test_set() {
    let pairs = [("a b c", "a c"), ("x y", "x y z"), ("p", "q")];
    let total: ErrorCounts = pairs.iter().map(|(r, h)| wer(r, h)).sum();
    assert_eq!(total, counts(1, 1, 1, 6));
    assert!((total.rate() - 0.5).abs() < 1e-12);
}

fn chars(s: &str) -> Vec<char> {
    s.chars().collect()
}

// ---------- metrics: independent references ----------

/// Plain unit-cost Levenshtein distance (what `editdistance.eval` returns).
fn levenshtein(a: &[u8], b: &[u8]) -> usize {
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j - 1] + cost)
                .min(d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1);
        }
    }
    d[a.len()][b.len()]
}

/// Every alignment by recursion: all reachable (sub, del, ins) triples.
fn all_alignments(
    a: &[u8],
    b: &[u8],
    acc: (usize, usize, usize),
    out: &mut Vec<(usize, usize, usize)>,
) {
    match (a.split_first(), b.split_first()) {
        (None, None) => out.push(acc),
        (Some((_, ra)), None) => all_alignments(ra, b, (acc.0, acc.1 + 1, acc.2), out),
        (None, Some((_, rb))) => all_alignments(a, rb, (acc.0, acc.1, acc.2 + 1), out),
        (Some((x, ra)), Some((y, rb))) => {
            let sub = usize::from(x != y);
            all_alignments(ra, rb, (acc.0 + sub, acc.1, acc.2), out);
            all_alignments(ra, b, (acc.0, acc.1 + 1, acc.2), out);
            all_alignments(a, rb, (acc.0, acc.1, acc.2 + 1), out);
        }
    }
}

fn random_string(state: &mut u64, max_len: usize, alphabet: u8) -> Vec<u8> {
    let mut next = || {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    };
    let len = (next() % (max_len as u64 + 1)) as usize;
    (0..len)
        .map(|_| b'a' + (next() % alphabet as u64) as u8)
        .collect()
}

#[test]
fn totals_equal_levenshtein_distance_on_random_strings() {
    let mut state = 0x1234_5678_9abc_def1u64;
    for _ in 0..2000 {
        let r = random_string(&mut state, 30, 4);
        let h = random_string(&mut state, 30, 4);
        let c = align(&r, &h);
        assert_eq!(c.errors(), levenshtein(&r, &h), "{r:?} {h:?}");
        assert_eq!(c.ref_len, r.len());
        assert_eq!(c.correct() + c.sub + c.ins, h.len());
    }
}

#[test]
fn breakdown_is_the_fewest_substitutions_among_minimal_alignments() {
    let mut state = 0x0fed_cba9_8765_4321u64;
    for _ in 0..300 {
        let r = random_string(&mut state, 6, 3);
        let h = random_string(&mut state, 6, 3);
        let mut all = Vec::new();
        all_alignments(&r, &h, (0, 0, 0), &mut all);
        let best = all
            .iter()
            .min_by_key(|(s, d, i)| (s + d + i, *s))
            .copied()
            .unwrap();
        let c = align(&r, &h);
        assert_eq!((c.sub, c.del, c.ins), best, "{r:?} vs {h:?}");
    }
}

// ---------- tokenizer ----------

#[test]
fn builds_sorted_character_units_for_mixed_english_and_mandarin() {
    let texts = ["hello  world", "你好 世界", "Hi\tworld\n"];
    let tok = Tokenizer::build(texts.iter().copied());
    let expected = [
        "<blank>", "<unk>", "<space>", "H", "d", "e", "h", "i", "l", "o", "r", "w", "世", "你",
        "好", "界",
    ];
    assert_eq!(tok.tokens(), expected);
    assert_eq!(tok.len(), 16);
    assert_eq!(Tokenizer::BLANK_ID, 0);
    assert_eq!(Tokenizer::UNK_ID, 1);
    // Building again, in any order, gives the same ids.
    let again = Tokenizer::build(texts.iter().rev().copied());
    assert_eq!(again, tok);
}

#[test]
fn encode_decode_round_trip() {
    let tok = Tokenizer::build(["hello world", "你好 世界"]);
    let (ids, unknown) = tok.encode("  hello\tworld  你好 ");
    assert_eq!(unknown, 0);
    assert_eq!(ids.len(), "hello world 你好".chars().count());
    assert_eq!(ids[5], 2, "<space> is id 2");
    assert_eq!(tok.decode(&ids), "hello world 你好");
    // Blanks are ignored when decoding.
    let mut with_blanks = vec![0];
    for &id in &ids {
        with_blanks.extend([id, 0]);
    }
    assert_eq!(tok.decode(&with_blanks), "hello world 你好");
}

#[test]
fn unknown_characters_map_to_unk_and_are_counted() {
    let tok = Tokenizer::build(["hello world"]);
    let (ids, unknown) = tok.encode("Hello, 世界");
    assert_eq!(unknown, 4); // H , 世 界
    assert_eq!(ids.iter().filter(|&&id| id == Tokenizer::UNK_ID).count(), 4);
    assert_eq!(ids.len(), 9);
    let decoded = tok.decode(&ids);
    assert_eq!(
        decoded,
        format!("{UNK_TEXT}ello{UNK_TEXT} {UNK_TEXT}{UNK_TEXT}")
    );
    assert_eq!(
        tok.decode(&[99]),
        UNK_TEXT.to_string(),
        "ids outside the vocabulary"
    );
}

#[test]
fn save_and_load_tokens_txt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.txt");
    let tok = Tokenizer::build(["abc cab", "中文"]);
    tok.save(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, "<blank>\n<unk>\n<space>\na\nb\nc\n中\n文\n");
    assert_eq!(Tokenizer::load(&path).unwrap(), tok);
}

#[test]
fn loads_an_espnet_char_list_with_sos_eos() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.txt");
    std::fs::write(&path, "<blank>\n<unk>\n<space>\nA\nB\n<sos/eos>\n").unwrap();
    let tok = Tokenizer::load(&path).unwrap();
    assert_eq!(tok.len(), 6);
    assert_eq!(tok.encode("AB A").0, vec![3, 4, 2, 3]);
    assert_eq!(tok.decode(&[3, 5, 4]), "AB");
}

#[test]
fn rejects_malformed_token_lists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.txt");
    for (content, line) in [
        ("<unk>\n<blank>\na\n", 1),
        ("<blank>\n<unk>\nab\n", 3),
        ("<blank>\n<unk>\na\na\n", 4),
        ("<blank>\n<unk>\na\n\n", 4),
    ] {
        std::fs::write(&path, content).unwrap();
        match Tokenizer::load(&path) {
            Err(TokenizerError::Invalid { line: l, .. }) => assert_eq!(l, line, "{content:?}"),
            other => panic!("{content:?}: {other:?}"),
        }
    }
    let missing = dir.path().join("missing.txt");
    let err = Tokenizer::load(&missing).unwrap_err();
    assert!(err.to_string().contains("missing.txt"), "{err}");
}
