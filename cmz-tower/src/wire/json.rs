//! A JSON writer for the bodies the busiest routes send, byte for byte what
//! `serde_json::to_vec` writes, with less work per key and per string.
//!
//! serde_json escapes every struct key as it writes it and checks a string one byte at a
//! time; on `POST /convo_turn` that was about 8,000 instructions of a 79,000-instruction
//! turn. This writer checks eight bytes at a time and writes a key, its quotes and its
//! colon in one copy. It covers what the API's bodies are made of (structs, sequences,
//! string-keyed maps, strings, integers, booleans, options, unit variants); for anything
//! else (a float, bytes, a map with non-string keys, a value whose `Serialize` fails) the
//! caller starts again with serde_json, so the output is always serde_json's.

use std::fmt::Display;

use serde::ser::{self, Serialize};

/// `value` as compact JSON, exactly as `serde_json::to_vec` writes it, into a buffer that
/// starts with room for `capacity` bytes.
pub(crate) fn to_vec<T: Serialize + ?Sized>(
    value: &T,
    capacity: usize,
) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(capacity);
    if write(value, &mut out).is_ok() {
        return Ok(out);
    }
    out.clear();
    serde_json::to_writer(&mut out, value)?;
    Ok(out)
}

/// `value` appended to `out` by this writer alone; on `Err`, `out` holds a partial value.
fn write<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result {
    value.serialize(&mut Writer { out })
}

/// Why this writer stopped; either way the caller falls back to serde_json.
#[derive(Debug)]
pub(crate) struct Unsupported;

impl Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not written by the fast JSON writer")
    }
}

impl std::error::Error for Unsupported {}

impl ser::Error for Unsupported {
    fn custom<M: Display>(_message: M) -> Self {
        Unsupported
    }
}

type Result<T = ()> = std::result::Result<T, Unsupported>;

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

/// `text` as a JSON string, quotes included, escaped as serde_json escapes.
fn write_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if any_to_escape(bytes) {
        write_escaped(out, bytes);
    } else {
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

/// The rare case: a text with a control character, `"` or `\`.
#[cold]
#[inline(never)]
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if needs_escape(byte) {
            out.extend_from_slice(&bytes[start..at]);
            write_escape(out, byte);
            start = at + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Whether any byte needs escaping, eight bytes at a time (a text of eight or more bytes
/// ends with one overlapping word rather than a byte loop).
fn any_to_escape(bytes: &[u8]) -> bool {
    if bytes.len() < 8 {
        return bytes.iter().any(|&b| needs_escape(b));
    }
    let mut chunks = bytes.chunks_exact(8);
    if chunks.by_ref().any(|chunk| word_needs_escape(word(chunk))) {
        return true;
    }
    !chunks.remainder().is_empty() && word_needs_escape(word(&bytes[bytes.len() - 8..]))
}

fn word(chunk: &[u8]) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(chunk);
    u64::from_le_bytes(word)
}

/// Whether any of a word's eight bytes is below 0x20, `"` or `\`: the high bit of a lane
/// is set where the subtraction wrapped, and masked off for bytes of 0x80 and above.
/// Borrows can only spread from a lane that is itself a match, so there are no false
/// answers either way.
fn word_needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20);
    let quote = (word ^ (ONES * u64::from(b'"'))).wrapping_sub(ONES);
    let backslash = (word ^ (ONES * u64::from(b'\\'))).wrapping_sub(ONES);
    (below_space | quote | backslash) & !word & HIGHS != 0
}

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

fn write_escape(out: &mut Vec<u8>, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let short = match byte {
        b'"' => b'"',
        b'\\' => b'\\',
        0x08 => b'b',
        0x0c => b'f',
        b'\n' => b'n',
        b'\r' => b'r',
        b'\t' => b't',
        _ => {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]);
            return;
        }
    };
    out.extend_from_slice(&[b'\\', short]);
}

/// `{"variant":`, how serde_json opens an enum variant that carries data.
fn write_variant_key(out: &mut Vec<u8>, variant: &str) {
    out.push(b'{');
    write_str(out, variant);
    out.push(b':');
}

fn write_integer(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// The serializer's integer methods, each written in decimal.
macro_rules! integers {
    ($($method:ident: $type:ty,)*) => {
        $(fn $method(self, v: $type) -> Result {
            write_integer(self.out, v);
            Ok(())
        })*
    };
}

/// Key serializer methods for what this writer leaves to serde_json (which quotes some of
/// these as keys and refuses the others).
macro_rules! unsupported {
    ($($method:ident: $type:ty,)*) => {
        $(fn $method(self, _v: $type) -> Result {
            Err(Unsupported)
        })*
    };
}

/// What both serializers write the same way, as a value and as a map key: a string, a
/// unit variant as its name, a newtype struct as what it wraps.
macro_rules! text_forms {
    () => {
        fn serialize_str(self, v: &str) -> Result {
            write_str(self.out, v);
            Ok(())
        }
        fn serialize_unit_variant(
            self,
            _name: &'static str,
            _index: u32,
            variant: &'static str,
        ) -> Result {
            write_str(self.out, variant);
            Ok(())
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _name: &'static str,
            value: &T,
        ) -> Result {
            value.serialize(self)
        }
    };
}

impl<'a, 'b> ser::Serializer for &'a mut Writer<'b> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = Compound<'a, 'b>;
    type SerializeTuple = Compound<'a, 'b>;
    type SerializeTupleStruct = Compound<'a, 'b>;
    type SerializeTupleVariant = Compound<'a, 'b>;
    type SerializeMap = Compound<'a, 'b>;
    type SerializeStruct = Compound<'a, 'b>;
    type SerializeStructVariant = Compound<'a, 'b>;

    fn serialize_bool(self, v: bool) -> Result {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    integers!(
        serialize_i8: i8,
        serialize_i16: i16,
        serialize_i32: i32,
        serialize_i64: i64,
        serialize_i128: i128,
        serialize_u8: u8,
        serialize_u16: u16,
        serialize_u32: u32,
        serialize_u64: u64,
        serialize_u128: u128,
    );
    // Floats (shortest round-trip digits, `null` when not finite) and bytes are left to
    // serde_json.
    fn serialize_f32(self, _v: f32) -> Result {
        Err(Unsupported)
    }
    fn serialize_f64(self, _v: f64) -> Result {
        Err(Unsupported)
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result {
        Err(Unsupported)
    }
    fn serialize_char(self, v: char) -> Result {
        write_str(self.out, v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    text_forms!();
    fn serialize_none(self) -> Result {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result {
        self.serialize_unit()
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result {
        write_variant_key(self.out, variant);
        value.serialize(&mut *self)?;
        self.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Compound<'a, 'b>> {
        self.out.push(b'[');
        Ok(Compound::new(self, b"]"))
    }
    fn serialize_tuple(self, len: usize) -> Result<Compound<'a, 'b>> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Compound<'a, 'b>> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'b>> {
        write_variant_key(self.out, variant);
        self.out.push(b'[');
        Ok(Compound::new(self, b"]}"))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'a, 'b>> {
        self.out.push(b'{');
        Ok(Compound::new(self, b"}"))
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Compound<'a, 'b>> {
        self.serialize_map(None)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'b>> {
        write_variant_key(self.out, variant);
        self.out.push(b'{');
        Ok(Compound::new(self, b"}}"))
    }
}

/// An array or object being written: whether the next element is the first, and what
/// closes it.
struct Compound<'a, 'b> {
    writer: &'a mut Writer<'b>,
    first: bool,
    close: &'static [u8],
}

impl<'a, 'b> Compound<'a, 'b> {
    fn new(writer: &'a mut Writer<'b>, close: &'static [u8]) -> Self {
        Self {
            writer,
            first: true,
            close,
        }
    }

    /// The comma before every element but the first.
    fn comma(&mut self) {
        if !std::mem::take(&mut self.first) {
            self.writer.out.push(b',');
        }
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.comma();
        value.serialize(&mut *self.writer)
    }

    /// `"key":value`.
    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result {
        self.comma();
        write_str(self.writer.out, key);
        self.writer.out.push(b':');
        value.serialize(&mut *self.writer)
    }

    fn close(self) -> Result {
        self.writer.out.extend_from_slice(self.close);
        Ok(())
    }
}

/// An array's serde trait: each element through [`Compound::element`].
macro_rules! array {
    ($trait:ident, $method:ident) => {
        impl ser::$trait for Compound<'_, '_> {
            type Ok = ();
            type Error = Unsupported;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
                self.element(value)
            }
            fn end(self) -> Result {
                self.close()
            }
        }
    };
}

array!(SerializeSeq, serialize_element);
array!(SerializeTuple, serialize_element);
array!(SerializeTupleStruct, serialize_field);
array!(SerializeTupleVariant, serialize_field);

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result {
        self.comma();
        key.serialize(KeyWriter {
            out: self.writer.out,
        })?;
        self.writer.out.push(b':');
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        value.serialize(&mut *self.writer)
    }
    fn end(self) -> Result {
        self.close()
    }
}

/// An object's serde trait for named fields: each through [`Compound::field`].
macro_rules! object {
    ($trait:ident) => {
        impl ser::$trait for Compound<'_, '_> {
            type Ok = ();
            type Error = Unsupported;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result {
                self.field(key, value)
            }
            fn end(self) -> Result {
                self.close()
            }
        }
    };
}

object!(SerializeStruct);
object!(SerializeStructVariant);

/// A map key: a string (or a unit variant, written as its name). serde_json also accepts
/// numbers, booleans and chars as keys and quotes them; those are left to it.
struct KeyWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl ser::Serializer for KeyWriter<'_> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = ser::Impossible<(), Unsupported>;
    type SerializeTuple = ser::Impossible<(), Unsupported>;
    type SerializeTupleStruct = ser::Impossible<(), Unsupported>;
    type SerializeTupleVariant = ser::Impossible<(), Unsupported>;
    type SerializeMap = ser::Impossible<(), Unsupported>;
    type SerializeStruct = ser::Impossible<(), Unsupported>;
    type SerializeStructVariant = ser::Impossible<(), Unsupported>;

    text_forms!();
    unsupported!(
        serialize_bool: bool,
        serialize_i8: i8,
        serialize_i16: i16,
        serialize_i32: i32,
        serialize_i64: i64,
        serialize_u8: u8,
        serialize_u16: u16,
        serialize_u32: u32,
        serialize_u64: u64,
        serialize_f32: f32,
        serialize_f64: f64,
        serialize_char: char,
        serialize_bytes: &[u8],
    );
    fn serialize_none(self) -> Result {
        Err(Unsupported)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result {
        Err(Unsupported)
    }
    fn serialize_unit(self) -> Result {
        Err(Unsupported)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result {
        Err(Unsupported)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result {
        Err(Unsupported)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq> {
        Err(Unsupported)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple> {
        Err(Unsupported)
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        Err(Unsupported)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        Err(Unsupported)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap> {
        Err(Unsupported)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeStruct> {
        Err(Unsupported)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant> {
        Err(Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;
    use serde_json::json;

    use super::*;

    fn same_as_serde_json<T: Serialize + ?Sized>(value: &T) {
        let ours = to_vec(value, 0).unwrap();
        let theirs = serde_json::to_vec(value).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
    }

    /// Every byte value alone and at every offset of a word, in every string position.
    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for byte in 0..=0x7f_u8 {
            let c = char::from(byte);
            for prefix in 0..17 {
                let text: String = "a".repeat(prefix) + &c.to_string() + "bc\u{e9}";
                same_as_serde_json(&text);
                same_as_serde_json(&c);
            }
        }
        for text in [
            "",
            "\"",
            "\\\\\"\"",
            "emoji \u{1f43e} and \u{2028} \u{7f} \u{80} \u{ffff}",
            "a long line with \"quotes\" and a\ttab and\r\nlines, over several words",
            "\u{1}\u{2}\u{1f}\u{0}",
        ] {
            same_as_serde_json(text);
        }
        // Pseudo-random texts over a small alphabet full of the bytes that matter.
        let alphabet = [
            'a',
            '"',
            '\\',
            '\n',
            '\u{1}',
            '\u{1f}',
            ' ',
            '\u{e9}',
            '\u{1f43e}',
            '\u{7f}',
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..3000 {
            let mut text = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for i in 0..(seed % 40) {
                text.push(alphabet[((seed >> (i % 50)) % alphabet.len() as u64) as usize]);
            }
            same_as_serde_json(&text);
        }
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Sample<'a> {
        text: &'a str,
        count: u64,
        negative: i32,
        flag: bool,
        absent: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        skipped: Option<u32>,
        list: Vec<Choice>,
        nested: Nested,
        unit: (),
        tuple: (u8, &'a str),
        empty: Vec<u8>,
        empty_struct: Empty,
        map: BTreeMap<String, Vec<Option<i64>>>,
        #[serde(flatten)]
        flattened: Nested,
    }

    #[derive(Serialize)]
    struct Empty {}

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Nested {
        inner_value: char,
        wrapped: Wrapper,
    }

    #[derive(Serialize)]
    struct Wrapper(u128);

    #[derive(Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Choice {
        Plain,
        Newtype(i8),
        Tuple(u16, bool),
        Struct { a: u8, b: Option<&'static str> },
    }

    #[test]
    fn the_api_s_shapes_are_written_as_serde_json_writes_them() {
        let sample = Sample {
            text: "Cora says \"hi\"\n",
            count: u64::MAX,
            negative: i32::MIN,
            flag: false,
            absent: None,
            skipped: None,
            list: vec![
                Choice::Plain,
                Choice::Newtype(-3),
                Choice::Tuple(7, true),
                Choice::Struct { a: 1, b: Some("x") },
                Choice::Struct { a: 2, b: None },
            ],
            nested: Nested {
                inner_value: '\u{9}',
                wrapped: Wrapper(u128::MAX),
            },
            unit: (),
            tuple: (0, "t"),
            empty: vec![],
            empty_struct: Empty {},
            map: BTreeMap::from([
                ("k\"ey".to_owned(), vec![Some(-1), None]),
                (String::new(), vec![]),
            ]),
            flattened: Nested {
                inner_value: 'z',
                wrapped: Wrapper(0),
            },
        };
        let value = json!({"a": [1, -2, "b", null, true, {"c": {}}], "d": "e\u{e9}\n"});
        same_as_serde_json(&sample);
        same_as_serde_json(&value);
        // Written by this writer, not by the fallback.
        assert!(write(&sample, &mut Vec::new()).is_ok());
        assert!(write(&value, &mut Vec::new()).is_ok());
    }

    /// What this writer leaves to serde_json still comes out as serde_json writes it.
    #[test]
    fn floats_bytes_and_other_keys_fall_back_to_serde_json() {
        same_as_serde_json(&json!({"a": 1.5, "b": [0.1, 1e300, -0.0]}));
        same_as_serde_json(&BTreeMap::from([(1_u32, "one"), (2, "two")]));
        same_as_serde_json(&BTreeMap::from([(true, 1)]));
        same_as_serde_json(&serde_bytes_like());
        same_as_serde_json(&vec![f32::NAN]);
        assert!(write(&json!([1.5]), &mut Vec::new()).is_err());
        assert!(write(&BTreeMap::from([(1_u32, "one")]), &mut Vec::new()).is_err());
        // A value that fails is still serde_json's failure.
        let failing = BTreeMap::from([(vec![1_u8], 1)]);
        assert!(to_vec(&failing, 0).is_err());
        assert!(serde_json::to_vec(&failing).is_err());
    }

    fn serde_bytes_like() -> impl Serialize {
        struct Bytes;
        impl Serialize for Bytes {
            fn serialize<S: ser::Serializer>(
                &self,
                serializer: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                serializer.serialize_bytes(b"\x00ab")
            }
        }
        Bytes
    }
}
