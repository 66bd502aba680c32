//! Personal details in children's messages: found, and replaced by typed placeholders
//! before a message is stored, sent to the model or a moderator, or summarized.
//!
//! What is caught (each becomes a placeholder):
//!
//! | kind | placeholder | how it is found |
//! | --- | --- | --- |
//! | email address | `[email]` | the address pattern |
//! | phone number | `[phone]` | digit runs of 7 to 15 digits that libphonenumber's metadata (the `phonenumber` crate) accepts as a valid number of the deployment's region (or an international one), and any digits after "my (mom's / dad's / phone) number is" |
//! | street address | `[address]` | a house number, one to three name words and a street type ("123 Maple Street", "4 Elm Ct Apt 2"), and what follows "I live at", "my address is", "my house is at" |
//! | personal link | `[link]` | URLs on social and personal sites (Instagram, TikTok, YouTube, Roblox, …) or with a profile-like path (`/@sam`, `/~sam`, `/user/…`); other links are kept |
//! | name | `[name]` | the name after "my name is", "call me", "I'm called", "my (mom's / brother's / teacher's …) name is" (a pet's name is not personal and is kept) |
//! | school | `[school]` | what follows "my school is", and "I go to / attend … School / Elementary / Academy" |
//!
//! Ordinary zoo questions pass unchanged (checked on a fixture of everyday questions,
//! `tests/privacy_fixtures.txt`): ages ("I am 7"), speeds ("70 mph"), sums ("what is 555
//! times 2?"), years, counts, pets' names and cities. Not caught: a name said without an
//! introduction ("tell Sam hi"), numbers too short to be valid (a 7-digit local number
//! without "my number is"), addresses without a street type or introduction. Ordinary
//! sentences passed on purpose: "I go to school", "my school is fun", "call me back
//! later", "my dad's name is funny", "I live at home", "our house is on a hill", "my
//! number is 123".
//!
//! Known false positives (ordinary text taken out anyway, kept in the fixture as `fp` lines
//! so this list stays true): a number before a street-type word ("we saw 5 tigers way up
//! high" → `[address]`, "2 eagles circle the lake"), an introduced place of three words or
//! more ("I live at the zoo too!"), and any link to a video or social site, a public one
//! too ("youtube.com/@natgeo", a YouTube video).
//!
//! ```
//! use cmz_core::privacy::{PiiKind, Redactor};
//!
//! let redactor = Redactor::default(); // region US
//! let out = redactor.redact("my name is Sam Lee and my mom's number is 206-555-0142");
//! assert_eq!(out.text, "my name is [name] and my mom's number is [phone]");
//! assert_eq!(out.kinds, [PiiKind::Name, PiiKind::Phone]);
//! assert!(redactor.redact("can you run 70 mph? I am 7").kinds.is_empty());
//! ```

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;

use crate::error::{Error, Result};

/// A kind of personal detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum PiiKind {
    /// An email address.
    Email,
    /// A phone number.
    Phone,
    /// A street address.
    Address,
    /// A link to a personal page or profile.
    Link,
    /// A person's name, from a self-introduction.
    Name,
    /// A school's name.
    School,
}

impl PiiKind {
    /// The kind's name (`email`, `phone`, `address`, `link`, `name`, `school`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Phone => "phone",
            Self::Address => "address",
            Self::Link => "link",
            Self::Name => "name",
            Self::School => "school",
        }
    }

    /// The text that replaces it (`[phone]`, …).
    pub fn placeholder(self) -> &'static str {
        match self {
            Self::Email => "[email]",
            Self::Phone => "[phone]",
            Self::Address => "[address]",
            Self::Link => "[link]",
            Self::Name => "[name]",
            Self::School => "[school]",
        }
    }
}

/// What a deployment does with personal details in a child's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum RedactionMode {
    /// Replace them with placeholders; the model is asked to remind the child kindly not
    /// to share such things (the default).
    #[default]
    Redact,
    /// Replace them, and answer with an in-character reminder instead of calling the model.
    Block,
    /// Keep messages as they are.
    Off,
}

impl FromStr for RedactionMode {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "redact" | "" => Ok(Self::Redact),
            "block" => Ok(Self::Block),
            "off" => Ok(Self::Off),
            other => Err(Error::validation(
                "personalDetails",
                format!("must be redact, block or off, got {other:?}"),
            )),
        }
    }
}

/// A text with its personal details replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted<'a> {
    /// The text with placeholders (borrowed when nothing was found).
    pub text: Cow<'a, str>,
    /// The kinds found, each once, in the order of their first appearance.
    pub kinds: Vec<PiiKind>,
}

/// Finds personal details; cheap to clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redactor {
    region: phonenumber::country::Id,
}

impl Default for Redactor {
    /// The United States (the zoo's region).
    fn default() -> Self {
        Self {
            region: phonenumber::country::Id::US,
        }
    }
}

fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("a valid built-in pattern")
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    regex(r"(?i)\b[a-z0-9][a-z0-9._%+-]*@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b")
});
static URL: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r#"(?i)\b(?:https?://[^\s<>"']+|www\.[^\s<>"']+|[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|edu|io|me|us|co|tv|app|gg|ly|be)/[^\s<>"']+)"#,
    )
});
static PHONE: LazyLock<Regex> =
    LazyLock::new(|| regex(r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d[\d\s.-]{4,16}\d"));
static PHONE_INTRO: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"(?i)\b(?:my|our|(?:mom|mum|mommy|mother|dad|daddy|father|grandma|grandpa|parents)'?s)\s+(?:(?:phone|cell|mobile|home|telephone)\s+)?(?:number|phone)\s+is[ \t]+(\+?\(?\d[\d\s().-]{1,18}\d)",
    )
});
static ADDRESS: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"(?i)\b\d{1,6}\s+((?:[a-z][a-z'.-]*\s+){1,3})(?:street|st|avenue|ave|road|rd|lane|ln|drive|dr|boulevard|blvd|way|court|ct|place|pl|circle|cir|terrace|highway|hwy|parkway|pkwy|trail)\b\.?(?:,?[ \t]*(?:apt|apartment|unit|suite|#)\.?[ \t]*[a-z0-9-]+)?",
    )
});
static ADDRESS_INTRO: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"(?i)\b(?:(?:i|we)\s+live\s+at|my\s+(?:home\s+)?address\s+is|(?:my|our)\s+house\s+is\s+(?:at|on))[ \t]+([^.!?,;\n]{2,80}?)\s*(?:[.!?,;\n]|\s+and\s|\s+but\s|$)",
    )
});
static NAME_INTRO: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"(?i)\b(?:my\s+(?:full\s+|real\s+|last\s+)?name\s+is|my\s+name's|i'?m\s+called|i\s+am\s+called|call\s+me|my\s+nickname\s+is|(?:my|our)\s+(?:best\s+friend|friend|brother|sister|mom|mum|mommy|mother|dad|daddy|father|teacher|cousin|grandma|grandpa|grandmother|grandfather|aunt|uncle)'?s\s+name\s+is)[ \t]+([a-z][a-z'-]{0,30})([ \t]+[a-z][a-z'-]{0,30})?",
    )
});
static SCHOOL_INTRO: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"(?i)\b(?:my\s+school\s+is(?:\s+called|\s+named)?|my\s+school's\s+name\s+is)[ \t]+([^.!?,\n]{2,60}?)\s*(?:[.!?,\n]|$)|\b(?:i|we)\s+(?:go\s+to|attend)[ \t]+((?:[a-z0-9'.-]+[ \t]+){0,4}?(?:school|elementary|academy|kindergarten|preschool|montessori)\b)",
    )
});

/// Words that never start a name or sit inside a street name.
const FUNCTION_WORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "not", "on", "in", "at", "to", "of", "for", "from", "by",
    "with", "is", "are", "was", "were", "my", "your", "his", "her", "our", "their", "it", "this",
    "that", "secret", "maybe", "please", "what", "when", "if", "so", "but", "too",
];

fn is_function_word(word: &str) -> bool {
    any_of(FUNCTION_WORDS, word)
}

/// Words that follow "call me" or "…'s name is" in ordinary sentences ("call me back
/// later", "my dad's name is funny"), never a name.
const NOT_NAMES: &[&str] = &[
    "back",
    "later",
    "tomorrow",
    "now",
    "soon",
    "again",
    "anytime",
    "sometime",
    "today",
    "tonight",
    "funny",
    "long",
    "cool",
    "weird",
    "silly",
    "hard",
    "easy",
    "short",
    "nice",
    "pretty",
    "same",
    "also",
    "really",
    "very",
    "like",
    "kind",
    "crazy",
    "special",
    "different",
];

/// What follows "my school is" in ordinary sentences ("my school is fun"), never a school.
const NOT_SCHOOLS: &[&str] = &[
    "fun", "cool", "big", "small", "nice", "boring", "great", "awesome", "far", "close", "near",
    "closed", "open", "hard", "easy", "new", "old", "good", "bad", "the", "best", "worst",
    "really", "very", "so", "out", "over", "done", "huge", "little",
];

/// Words before "school" that name a kind of school, not one school ("middle school").
const SCHOOL_KINDS: &[&str] = &[
    "a", "the", "my", "our", "summer", "art", "swim", "swimming", "dance", "music", "sunday",
    "night", "high", "middle", "primary", "public", "private", "big", "new", "this", "that", "day",
    "home", "pre", "grade",
];

fn any_of(list: &[&str], word: &str) -> bool {
    list.iter().any(|w| w.eq_ignore_ascii_case(word))
}

/// "I live at home", "our house is on a hill", "my address is a secret": a place that is no
/// address (no digit, and home, or two words at most starting with an article).
fn is_no_address(place: &str) -> bool {
    if place.bytes().any(|b| b.is_ascii_digit()) {
        return false;
    }
    let words: Vec<&str> = place.split_whitespace().collect();
    match words.first() {
        Some(first) if first.eq_ignore_ascii_case("home") => true,
        Some(first) => words.len() <= 2 && any_of(&["a", "an", "the"], first),
        None => true,
    }
}

/// Sites whose links point at a person (a profile, a channel, a chat).
const PERSONAL_SITES: &[&str] = &[
    "instagram.",
    "tiktok.",
    "youtube.",
    "youtu.be",
    "facebook.",
    "fb.",
    "twitter.",
    "x.com",
    "snapchat.",
    "roblox.",
    "discord.",
    "twitch.",
    "github.",
    "linkedin.",
    "pinterest.",
    "reddit.",
    "threads.",
    "bsky.",
    "wa.me",
    "t.me",
    "whatsapp.",
    "telegram.",
    "minecraft.",
    "spotify.",
    "venmo.",
    "cash.app",
    "paypal.",
];

fn is_personal_link(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    let without_scheme = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .unwrap_or(&lower);
    let (host, path) = without_scheme
        .split_once('/')
        .unwrap_or((without_scheme, ""));
    let path = path.trim_end_matches(['/', '.', ',', '!', '?', ')']);
    if path.is_empty() {
        return false;
    }
    PERSONAL_SITES.iter().any(|site| host.contains(site))
        || path.starts_with('@')
        || path.starts_with('~')
        || path.contains("/@")
        || ["user/", "users/", "u/", "profile", "people/", "member"]
            .iter()
            .any(|p| path.starts_with(p))
}

/// Whether `text` is one of the placeholders.
fn is_placeholder(text: &str) -> bool {
    [
        PiiKind::Email,
        PiiKind::Phone,
        PiiKind::Address,
        PiiKind::Link,
        PiiKind::Name,
        PiiKind::School,
    ]
    .iter()
    .any(|k| k.placeholder() == text)
}

impl Redactor {
    /// A redactor for phone numbers of `region` (an ISO 3166 code such as `US` or `GB`).
    pub fn for_region(region: &str) -> Result<Self> {
        let region = phonenumber::country::Id::from_str(&region.trim().to_ascii_uppercase())
            .map_err(|_| {
                Error::validation(
                    "phoneRegion",
                    format!("{region:?} is not a region code such as US or GB"),
                )
            })?;
        Ok(Self { region })
    }

    /// Whether `candidate` is a phone number of this region or an international one.
    fn is_phone(&self, candidate: &str) -> bool {
        let digits = candidate.bytes().filter(u8::is_ascii_digit).count();
        if !(7..=15).contains(&digits) {
            return false;
        }
        phonenumber::parse(Some(self.region), candidate)
            .is_ok_and(|number| phonenumber::is_valid(&number))
    }

    /// The length of the longest prefix of a digit run that is a phone number, ending at a
    /// digit before a separator (a run may carry more digits than the number: "call
    /// 206 555 0142 7 times").
    fn phone_prefix(&self, run: &str) -> Option<usize> {
        let run = run.trim_end_matches(['.', '-', ' ']);
        let mut ends: Vec<usize> = run
            .char_indices()
            .filter(|&(i, c)| {
                c.is_ascii_digit()
                    && run[i + 1..]
                        .chars()
                        .next()
                        .is_none_or(|next| !next.is_ascii_digit())
            })
            .map(|(i, _)| i + 1)
            .collect();
        ends.reverse();
        ends.into_iter().find(|&end| self.is_phone(&run[..end]))
    }

    /// The spans of personal details in `text`, each with its kind.
    fn spans(&self, text: &str) -> Vec<(usize, usize, PiiKind)> {
        self.spans_with(text, Clues::of(text))
    }

    /// [`Self::spans`], running only the patterns `clues` leaves possible.
    fn spans_with(&self, text: &str, clues: Clues) -> Vec<(usize, usize, PiiKind)> {
        let mut spans = Vec::new();
        if clues.at {
            for m in EMAIL.find_iter(text) {
                spans.push((m.start(), m.end(), PiiKind::Email));
            }
        }
        if clues.dot_or_colon {
            self.links(text, &mut spans);
        }
        if clues.digit {
            self.numbers(text, &mut spans);
        }
        if clues.address_words {
            for c in ADDRESS_INTRO.captures_iter(text) {
                if let Some(place) = c.get(1).filter(|p| !is_no_address(p.as_str())) {
                    spans.push((place.start(), place.end(), PiiKind::Address));
                }
            }
        }
        if clues.name_words {
            names(text, &mut spans);
        }
        if clues.school_words {
            schools(text, &mut spans);
        }
        // What an introduction names may already be a placeholder (redacting twice).
        spans.retain(|&(start, end, _)| !is_placeholder(text[start..end].trim()));
        spans.sort_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
        spans
    }

    /// Personal links.
    fn links(&self, text: &str, spans: &mut Vec<(usize, usize, PiiKind)>) {
        for m in URL.find_iter(text) {
            let trimmed = m
                .as_str()
                .trim_end_matches(['.', ',', '!', '?', ')', ';', ':']);
            if is_personal_link(trimmed) {
                spans.push((m.start(), m.start() + trimmed.len(), PiiKind::Link));
            }
        }
    }

    /// Phone numbers and street addresses: the patterns that need a digit.
    fn numbers(&self, text: &str, spans: &mut Vec<(usize, usize, PiiKind)>) {
        for c in PHONE_INTRO.captures_iter(text) {
            // "my number is 123": too few digits for any phone number.
            if let Some(number) = c
                .get(1)
                .filter(|n| n.as_str().bytes().filter(u8::is_ascii_digit).count() >= 7)
            {
                spans.push((number.start(), number.end(), PiiKind::Phone));
            }
        }
        for m in PHONE.find_iter(text) {
            if let Some(len) = self.phone_prefix(m.as_str()) {
                spans.push((m.start(), m.start() + len, PiiKind::Phone));
            }
        }
        for c in ADDRESS.captures_iter(text) {
            let words = c.get(1).map_or("", |w| w.as_str());
            if !words.split_whitespace().any(is_function_word) {
                let whole = c.get(0).expect("the whole match");
                spans.push((whole.start(), whole.end(), PiiKind::Address));
            }
        }
    }

    /// `text` with its personal details replaced by placeholders.
    pub fn redact<'a>(&self, text: &'a str) -> Redacted<'a> {
        let spans = self.spans(text);
        if spans.is_empty() {
            return Redacted {
                text: Cow::Borrowed(text),
                kinds: Vec::new(),
            };
        }
        let mut out = String::with_capacity(text.len());
        let mut kinds: Vec<PiiKind> = Vec::new();
        let mut at = 0;
        let mut spans = spans.into_iter().peekable();
        while let Some((start, mut end, kind)) = spans.next() {
            // Details that overlap are replaced together: nothing of either survives.
            let mut cluster = vec![kind];
            while let Some(&(next_start, next_end, next_kind)) = spans.peek() {
                if next_start >= end {
                    break;
                }
                end = end.max(next_end);
                if !cluster.contains(&next_kind) {
                    cluster.push(next_kind);
                }
                spans.next();
            }
            out.push_str(&text[at..start]);
            for kind in cluster {
                out.push_str(kind.placeholder());
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
            at = end;
        }
        out.push_str(&text[at..]);
        Redacted {
            text: Cow::Owned(out),
            kinds,
        }
    }
}

/// Names after an introduction.
fn names(text: &str, spans: &mut Vec<(usize, usize, PiiKind)>) {
    for c in NAME_INTRO.captures_iter(text) {
        let Some(first) = c.get(1) else { continue };
        if is_function_word(first.as_str()) || any_of(NOT_NAMES, first.as_str()) {
            continue;
        }
        // A second word is part of the name when it is written like one ("Sam Lee").
        let end = match c.get(2) {
            Some(second)
                if second
                    .as_str()
                    .trim_start()
                    .starts_with(|ch: char| ch.is_uppercase())
                    && !is_function_word(second.as_str().trim()) =>
            {
                second.end()
            }
            _ => first.end(),
        };
        spans.push((first.start(), end, PiiKind::Name));
    }
}

/// Schools after an introduction.
fn schools(text: &str, spans: &mut Vec<(usize, usize, PiiKind)>) {
    for c in SCHOOL_INTRO.captures_iter(text) {
        let named = match (c.get(1), c.get(2)) {
            // "my school is fun": not a name.
            (Some(school), _) => Some(school).filter(|s| {
                !s.as_str()
                    .split_whitespace()
                    .all(|w| any_of(NOT_SCHOOLS, w))
            }),
            // "I go to school", "we go to middle school": a kind, not one school.
            (None, Some(school)) => Some(school).filter(|s| {
                let words: Vec<&str> = s.as_str().split_whitespace().collect();
                words.len() > 1
                    && !words[..words.len() - 1]
                        .iter()
                        .all(|w| any_of(SCHOOL_KINDS, w))
            }),
            (None, None) => None,
        };
        if let Some(school) = named {
            spans.push((school.start(), school.end(), PiiKind::School));
        }
    }
}

/// What a text holds that each pattern needs: a pattern whose characters or words are
/// absent cannot match, and is not run (most messages hold no digit, `@` or introduction).
#[derive(Debug, Clone, Copy)]
struct Clues {
    at: bool,
    dot_or_colon: bool,
    digit: bool,
    address_words: bool,
    name_words: bool,
    school_words: bool,
}

impl Clues {
    /// Every pattern runs.
    #[cfg(test)]
    const ALL: Self = Self {
        at: true,
        dot_or_colon: true,
        digit: true,
        address_words: true,
        name_words: true,
        school_words: true,
    };

    fn of(text: &str) -> Self {
        // One pass, no copy: this runs on every message.
        let (mut at, mut dot_or_colon, mut digit, mut words) = (false, false, false, 0u8);
        let mut ascii = true;
        let bytes = text.as_bytes();
        for (i, &byte) in bytes.iter().enumerate() {
            match byte {
                b'@' => at = true,
                b'.' | b':' => dot_or_colon = true,
                b'0'..=b'9' => digit = true,
                _ if byte.is_ascii_alphabetic() && words != ALL_WORD_CLUES => {
                    let lower = byte.to_ascii_lowercase();
                    if CLUE_FIRST_LETTERS >> (lower - b'a') & 1 == 0 {
                        continue;
                    }
                    for &(word, clue) in &CLUE_WORDS {
                        if word[0] == lower
                            && bytes
                                .get(i..i + word.len())
                                .is_some_and(|w| w.eq_ignore_ascii_case(word))
                        {
                            words |= clue;
                        }
                    }
                }
                _ if !byte.is_ascii() => ascii = false,
                _ => {}
            }
        }
        // Case-insensitive patterns match some letters outside ASCII too (the Kelvin sign
        // for `k`, the long s for `s`): the word clues only rule a pattern out in ASCII.
        if !ascii {
            words = ALL_WORD_CLUES;
            digit = text.chars().any(char::is_numeric);
        }
        Self {
            at,
            dot_or_colon,
            digit,
            address_words: words & ADDRESS_WORDS != 0,
            name_words: words & NAME_WORDS != 0,
            school_words: words & SCHOOL_WORDS != 0,
        }
    }
}

const ADDRESS_WORDS: u8 = 1;
const NAME_WORDS: u8 = 2;
const SCHOOL_WORDS: u8 = 4;
const ALL_WORD_CLUES: u8 = ADDRESS_WORDS | NAME_WORDS | SCHOOL_WORDS;

/// Bit `n` is set when a clue word starts with the `n`th letter: most letters start none,
/// and skip the comparisons.
const CLUE_FIRST_LETTERS: u32 = {
    let mut bits = 0;
    let mut i = 0;
    while i < CLUE_WORDS.len() {
        bits |= 1 << (CLUE_WORDS[i].0[0] - b'a');
        i += 1;
    }
    bits
};

/// The words (lowercase) without one of which a word pattern cannot match, anywhere in a
/// text and in any case, and the clue each sets.
static CLUE_WORDS: [(&[u8], u8); 8] = [
    (b"live", ADDRESS_WORDS),
    (b"address", ADDRESS_WORDS),
    (b"house", ADDRESS_WORDS),
    (b"name", NAME_WORDS),
    (b"call", NAME_WORDS),
    (b"school", SCHOOL_WORDS),
    (b"go", SCHOOL_WORDS),
    (b"attend", SCHOOL_WORDS),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture: `ok <text>` must pass unchanged; `pii <kinds> | <text>` must be caught
    /// with exactly those kinds.
    const FIXTURES: &str = include_str!("../tests/privacy_fixtures.txt");

    #[test]
    fn the_fixture_table() {
        let redactor = Redactor::default();
        let mut failures = Vec::new();
        for line in FIXTURES.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(text) = line.strip_prefix("ok ") {
                let out = redactor.redact(text);
                if !out.kinds.is_empty() {
                    failures.push(format!("wrongly caught: {text:?} -> {:?}", out.text));
                }
            } else if let Some(rest) = line
                .strip_prefix("pii ")
                .or_else(|| line.strip_prefix("fp "))
            {
                let (kinds, text) = rest.split_once(" | ").expect("pii <kinds> | <text>");
                let out = redactor.redact(text);
                let found: Vec<&str> = out.kinds.iter().map(|k| k.as_str()).collect();
                let wanted: Vec<&str> = kinds.split(',').collect();
                if found != wanted {
                    failures.push(format!(
                        "{text:?}: wanted {wanted:?}, found {found:?} -> {:?}",
                        out.text
                    ));
                }
                for kind in &out.kinds {
                    assert!(out.text.contains(kind.placeholder()));
                }
                let again = redactor.redact(&out.text);
                if !again.kinds.is_empty() {
                    failures.push(format!(
                        "not idempotent: {:?} -> {:?}",
                        out.text, again.text
                    ));
                }
            } else {
                panic!("fixture line {line:?}");
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// An address's unit ("Apt 4", "# 2") is on the address's own line: a `#` at the end of
    /// a line does not take the first word of the next (found by the fuzzer).
    #[test]
    fn an_address_unit_stops_at_the_end_of_its_line() {
        let redactor = Redactor::default();
        for (text, kept) in [
            (
                "I saw 2 lionse roadionse road# \nwrite to me",
                "\nwrite to me",
            ),
            ("we live near 12 Oak Road, apt\n4 lions", "\n4 lions"),
        ] {
            let out = redactor.redact(text);
            assert_eq!(out.kinds, vec![PiiKind::Address], "{text:?}");
            assert!(out.text.ends_with(kept), "{text:?} -> {:?}", out.text);
        }
        let out = redactor.redact("my house: 12 Oak Road, Apt 4B, near the zoo");
        assert_eq!(out.text, "my house: [address], near the zoo");
    }

    #[test]
    fn the_clues_never_skip_a_pattern_that_would_match() {
        let redactor = Redactor::default();
        let mut texts: Vec<String> = FIXTURES
            .lines()
            .map(|line| line.rsplit(" | ").next().unwrap_or(line))
            .map(|line| line.strip_prefix("ok ").unwrap_or(line).to_owned())
            .collect();
        // Letters outside ASCII that case-insensitive patterns read as ASCII ones, digits
        // outside ASCII, and the clues' own edges.
        texts.extend(
            [
                "my \u{17f}chool is Oak Hill",
                "\u{212a}ids call me Sam",
                "my number is \u{663}\u{664}\u{665} 555 0100",
                "\u{bd}",
                "ME AT SAM@EXAMPLE.COM",
                "HTTPS://INSTAGRAM.COM/SAM",
                "I LIVE AT 12 OAK STREET",
                "We Go To Oak Hill Elementary School",
                "CALL ME SAM",
            ]
            .map(str::to_owned),
        );
        for text in &texts {
            assert_eq!(
                redactor.spans(text),
                redactor.spans_with(text, Clues::ALL),
                "{text:?}"
            );
        }
        let skipped = Clues::of("What do cougars eat?");
        assert!(!skipped.at && !skipped.digit && !skipped.name_words && !skipped.school_words);
        // A clue word found in any case, at either end of the text, and beside others.
        let found = Clues::of("LiVe.. near my HOUSE; nAmE@attenD: 7 go");
        assert!(found.at && found.dot_or_colon && found.digit);
        assert!(found.address_words && found.name_words && found.school_words);
        assert!(!Clues::of("liv").address_words && Clues::of("xgo").school_words);
    }

    #[test]
    fn modes_and_regions() {
        assert_eq!(
            "BLOCK".parse::<RedactionMode>().unwrap(),
            RedactionMode::Block
        );
        assert_eq!("".parse::<RedactionMode>().unwrap(), RedactionMode::Redact);
        assert_eq!(
            "maybe".parse::<RedactionMode>().unwrap_err().code(),
            "validation_error"
        );
        assert!(Redactor::for_region("XX").is_err());
        let gb = Redactor::for_region("gb").unwrap();
        assert_eq!(gb.redact("ring 020 7946 0018").text, "ring [phone]");
        // A UK number is not a US one, unless written internationally.
        let us = Redactor::default();
        assert!(us.redact("ring 020 7946 0018").kinds.is_empty());
        assert_eq!(us.redact("ring +44 20 7946 0018").kinds, [PiiKind::Phone]);
        let nothing = us.redact("lions sleep 20 hours");
        assert!(matches!(nothing.text, Cow::Borrowed(_)));
        // Details that overlap go together (found by fuzzing: the email's start was in the
        // phone number, and its end survived).
        let out = us.redact("1 2 3 4 5 999997wdia.org---88kid.one@example.org/s");
        assert_eq!(out.text, "[phone][email]/s");
        assert_eq!(out.kinds, [PiiKind::Phone, PiiKind::Email]);
    }
}
