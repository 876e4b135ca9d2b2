//! `fill`: every data page filled whole with content of a known kind, one page rewritten whole
//! per operation: the guest for measuring what compressing the page stream buys and costs.
//!
//! Arguments: `content` (`text`, the default: words of a small vocabulary drawn with a skewed
//! choice, separated by spaces and now and then a newline, and log lines' fixed starts among
//! them, as prose in a log reads; `random`:
//! pseudo-random bytes, which nothing compresses), `check_every` (default: as many operations
//! as pages), `rate`, `seed`. Unknown keys are refused.
//!
//! A page holds its tag and index (word 0), its version (word 1, also kept in a version table)
//! and 510 words of content generated from the seed, the page and the version, so a full check
//! regenerates and compares every word of every page: a zeroed, stale, misplaced or torn page
//! shows. Generating a page costs about as much as writing it: the text is built from tokens
//! of at most eight bytes, eight choices from each SplitMix64 draw.

use super::{PAGE_WORDS, Runner, WorkloadError, load, rewrite_at_random, store};
use crate::{
    Platform,
    args::Args,
    rng::{SplitMix64, mix},
};

const TAG: u64 = 7 << 40;
const KEYS: [&str; 4] = ["content", "check_every", "rate", "seed"];
/// Words at the start of a page that are not content: its id and its version.
const HEADER: usize = 2;

/// What a page is filled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Text-like bytes, log lines of words: lz4 shrinks them about 3x, zstd 4-5x.
    Text,
    /// Pseudo-random bytes: incompressible.
    Random,
}

impl Content {
    fn parse<'a>(args: &Args<'a>) -> Result<Self, WorkloadError<'a>> {
        Ok(match args.choice("content", &["text", "random"], "text")? {
            "random" => Self::Random,
            _ => Self::Text,
        })
    }
}

/// The vocabulary, most frequent first: each token with its separator, at most 8 bytes.
/// Tokens ending in a newline make lines of about 17 words.
const WORDS: [&str; 64] = [
    "the ", "of ", "and ", "ok.\n", "to ", "a ", "done.\n", "in ", "is ", "that ", "for ", "it ",
    "was ", "on ", "with ", "as ", "INFO ", "be ", "at ", "by ", "this ", "from ", "request ",
    "or ", "have ", "an ", "they ", "which ", "one ", "you ", "were ", "all ", "served ", "we ",
    "when ", "there ", "can ", "said ", "WARN ", "each ", "about ", "how ", "up ", "out ", "them ",
    "then ", "she ", "many ", "some ", "so ", "these ", "would ", "other ", "into ", "has ",
    "more ", "her ", "two ", "like ", "him ", "see ", "time ", "could ", "again.\n",
];

/// Log lines' fixed starts: one in 16 choices starts a line with one of them, which repeats
/// long runs of bytes as a log does (lz4 then shrinks the text about 3x, zstd 4-5x; words
/// alone, which repeat in runs of a word or two, gave lz4 2x).
const LINES: [&str; 8] = [
    "\n2026-03-17 12:00 INFO  http: GET /api/v1/items ",
    "\n2026-03-17 12:00 INFO  http: POST /api/orders ",
    "\n2026-03-17 12:01 WARN  pool: connection reset ",
    "\n2026-03-17 12:01 INFO  cache: hit ratio above ",
    "\n2026-03-17 12:02 ERROR db: query timed out in ",
    "\n2026-03-17 12:02 INFO  worker: job finished, ",
    "\n2026-03-17 12:03 DEBUG sched: next run due in ",
    "\n2026-03-17 12:03 INFO  auth: session renewed: ",
];
/// Chunks of 8 bytes a line start is cut into.
const LINE_CHUNKS: usize = 6;

/// Bytes `start..start + 8` of `text` (fewer at its end), little-endian in a word, and how
/// many.
const fn pack(text: &str, start: usize) -> (u64, u32) {
    let bytes = text.as_bytes();
    let mut packed = 0u64;
    let mut i = 0;
    while i < 8 && start + i < bytes.len() {
        packed |= (bytes[start + i] as u64) << (8 * i);
        i += 1;
    }
    (packed, i as u32)
}

const TOKENS: [(u64, u32); 64] = {
    let mut tokens = [(0u64, 0u32); 64];
    let mut i = 0;
    while i < 64 {
        assert!(WORDS[i].len() <= 8, "a token fits a word");
        tokens[i] = pack(WORDS[i], 0);
        i += 1;
    }
    tokens
};

/// Each line start in chunks; a chunk past its end is empty and adds nothing.
const LINE_TOKENS: [[(u64, u32); LINE_CHUNKS]; 8] = {
    let mut lines = [[(0u64, 0u32); LINE_CHUNKS]; 8];
    let mut i = 0;
    while i < 8 {
        assert!(
            LINES[i].len() <= 8 * LINE_CHUNKS,
            "a line start fits its chunks"
        );
        let mut c = 0;
        while c < LINE_CHUNKS {
            lines[i][c] = pack(LINES[i], 8 * c);
            c += 1;
        }
        i += 1;
    }
    lines
};

/// The text of one page, a word at a time.
struct Text {
    rng: SplitMix64,
    /// Eight choices, one per byte, used from the low end.
    choices: u64,
    left: u32,
    /// The line start being written and its next chunk (`LINE_CHUNKS`: none).
    line: usize,
    chunk: usize,
    /// Bytes made but not yet handed out, from the low end; `fill` bits of them.
    pending: u128,
    fill: u32,
}

impl Text {
    fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            choices: 0,
            left: 0,
            line: 0,
            chunk: LINE_CHUNKS,
            pending: 0,
            fill: 0,
        }
    }

    /// The next token: a chunk of the line start under way, or a word.
    #[inline]
    fn next_token(&mut self) -> (u64, u32) {
        if self.chunk < LINE_CHUNKS {
            let token = LINE_TOKENS[self.line & 7][self.chunk];
            self.chunk += 1;
            return token;
        }
        if self.left == 0 {
            self.choices = self.rng.next_u64();
            self.left = 8;
        }
        let b = (self.choices & 0xff) as u32;
        self.choices >>= 8;
        self.left -= 1;
        if b < 16 {
            self.line = b as usize & 7;
            self.chunk = 1;
            return LINE_TOKENS[self.line][0];
        }
        // b²/1024 picks word k for about 16/√k of the 256 byte values: the first words are
        // chosen most, as a language's commonest words are.
        TOKENS[((b * b) >> 10) as usize & 63]
    }

    #[inline]
    fn next_word(&mut self) -> u64 {
        while self.fill < 64 {
            let (bytes, len) = self.next_token();
            self.pending |= u128::from(bytes) << self.fill;
            self.fill += 8 * len;
        }
        let word = self.pending as u64;
        self.pending >>= 64;
        self.fill -= 64;
        word
    }
}

/// The content of one page at one version, a word at a time.
enum Words {
    Text(Text),
    Random(SplitMix64),
}

impl Words {
    fn new(content: Content, seed: u64, id: u64, version: u64) -> Self {
        let seed = mix(seed ^ id.rotate_left(24) ^ version.rotate_left(48));
        match content {
            Content::Text => Self::Text(Text::new(seed)),
            Content::Random => Self::Random(SplitMix64::new(seed)),
        }
    }

    #[inline]
    fn next_word(&mut self) -> u64 {
        match self {
            Self::Text(text) => text.next_word(),
            Self::Random(rng) => rng.next_u64(),
        }
    }
}

/// How to fill and check pages: the content and the seed it is generated from.
#[derive(Clone, Copy, Debug)]
pub struct Filler {
    pub content: Content,
    pub seed: u64,
}

impl Filler {
    /// Writes page `page` whole at `version` and records the version.
    pub fn write(&self, data: &mut [u64], versions: &mut [u64], page: usize, version: u64) {
        let base = page * PAGE_WORDS;
        let id = TAG | page as u64;
        store(data, base, id);
        store(data, base + 1, version);
        let mut words = Words::new(self.content, self.seed, id, version);
        for w in HEADER..PAGE_WORDS {
            store(data, base + w, words.next_word());
        }
        store(versions, page, version);
    }

    /// Checks every word of page `page` against its recorded version; returns the first
    /// mismatching word's index.
    pub fn check(&self, data: &[u64], versions: &[u64], page: usize) -> Result<(), usize> {
        let base = page * PAGE_WORDS;
        let id = TAG | page as u64;
        let version = load(versions, page);
        if load(data, base) != id {
            return Err(0);
        }
        if load(data, base + 1) != version {
            return Err(1);
        }
        let mut words = Words::new(self.content, self.seed, id, version);
        for w in HEADER..PAGE_WORDS {
            if load(data, base + w) != words.next_word() {
                return Err(w);
            }
        }
        Ok(())
    }
}

pub fn run<'a, P: Platform>(
    args: &Args<'a>,
    mem: &mut [u64],
    seed: u64,
    runner: &mut Runner<'_, P>,
) -> Result<(), WorkloadError<'a>> {
    if let Some(key) = args.unknown_key(&KEYS) {
        return Err(WorkloadError::UnknownArg(key));
    }
    let filler = Filler {
        content: Content::parse(args)?,
        seed,
    };
    rewrite_at_random(
        args,
        mem,
        seed,
        runner,
        |data, versions, page, version| filler.write(data, versions, page, version),
        |data, versions, page| filler.check(data, versions, page),
    )
}
