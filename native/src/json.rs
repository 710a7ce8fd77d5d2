//! JSON scanning: the byte ranges of a line's values, checked against JSON's grammar as
//! orjson reads it, without building a value. Anything it cannot vouch for is a `Decline`.

/// The bytes that end a run of plain string content: a quote, a backslash, or a control byte
/// (which JSON allows only escaped).
static STRING_STOPS: [bool; 256] = {
    let mut stops = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        stops[byte] = true;
        byte += 1;
    }
    stops[b'"' as usize] = true;
    stops[b'\\' as usize] = true;
    stops
};

/// A byte range of the chunk.
#[derive(Clone, Copy, Debug, Default)]
pub struct Range {
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueKind {
    Object,
    Array,
    String { escaped: bool },
    Number,
    True,
    False,
    Null,
}

/// A parsed value: its whole text, and for a string the text between the quotes.
#[derive(Clone, Copy, Debug)]
pub struct Value {
    pub kind: ValueKind,
    pub whole: Range,
    pub inner: Range,
}

#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub key: Range,
    pub value: Value,
}

#[derive(Clone, Copy, Debug)]
pub struct Text {
    pub range: Range,
    pub escaped: bool,
}

/// Not on the fast path: the chunk goes to the Python decoder, which says why if it is wrong.
#[derive(Debug)]
pub struct Decline;

pub type Parsed<T> = Result<T, Decline>;

pub struct Parser<'a> {
    pub bytes: &'a [u8],
    pub at: usize,
    depth: u32,
    // Levels of nesting taken (the message itself is level 1): deeper is Python's to reject.
    max_depth: u32,
}

impl<'a> Parser<'a> {
    pub fn new(bytes: &'a [u8], at: usize, max_depth: u32) -> Self {
        Parser {
            bytes,
            at,
            depth: 0,
            max_depth,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    pub fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Parsed<()> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(Decline)
        }
    }

    fn value(&mut self) -> Parsed<Value> {
        let start = self.at;
        let kind = match self.peek().ok_or(Decline)? {
            b'{' => {
                self.object(|parser, _key| parser.value().map(drop))?;
                ValueKind::Object
            }
            b'[' => {
                self.array()?;
                ValueKind::Array
            }
            b'"' => {
                let (inner, escaped) = self.string()?;
                return Ok(Value {
                    kind: ValueKind::String { escaped },
                    whole: Range {
                        start,
                        end: self.at,
                    },
                    inner,
                });
            }
            b't' => {
                self.literal(b"true")?;
                ValueKind::True
            }
            b'f' => {
                self.literal(b"false")?;
                ValueKind::False
            }
            b'n' => {
                self.literal(b"null")?;
                ValueKind::Null
            }
            b'-' | b'0'..=b'9' => {
                self.number()?;
                ValueKind::Number
            }
            _ => return Err(Decline),
        };
        let whole = Range {
            start,
            end: self.at,
        };
        Ok(Value {
            kind,
            whole,
            inner: whole,
        })
    }

    fn literal(&mut self, word: &[u8]) -> Parsed<()> {
        if self.bytes[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(Decline)
        }
    }

    /// A string; returns the span between the quotes and whether it holds escapes. The line is
    /// valid UTF-8 (checked before it is parsed), so only JSON's own rules are checked here.
    fn string(&mut self) -> Parsed<(Range, bool)> {
        self.at += 1;
        let start = self.at;
        let bytes = self.bytes;
        let mut escaped = false;
        loop {
            // Keys and ids are short: a table lookup per byte finds their end before a SIMD
            // search would have started. Longer text goes on with memchr.
            let limit = bytes.len().min(self.at + 24);
            while self.at < limit && !STRING_STOPS[bytes[self.at] as usize] {
                self.at += 1;
            }
            if self.at == limit {
                let found = memchr::memchr2(b'"', b'\\', &bytes[self.at..]).ok_or(Decline)?;
                if bytes[self.at..self.at + found].iter().any(|b| *b < 0x20) {
                    return Err(Decline);
                }
                self.at += found;
            }
            match bytes[self.at] {
                b'"' => {
                    let inner = Range {
                        start,
                        end: self.at,
                    };
                    self.at += 1;
                    return Ok((inner, escaped));
                }
                b'\\' => {}
                _ => return Err(Decline), // a control byte must be escaped
            }
            escaped = true;
            match *bytes.get(self.at + 1).ok_or(Decline)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 2,
                b'u' => {
                    let digits = bytes.get(self.at + 2..self.at + 6).ok_or(Decline)?;
                    if !digits.iter().all(u8::is_ascii_hexdigit) {
                        return Err(Decline);
                    }
                    let code = digits.iter().fold(0u32, |code, digit| {
                        code * 16 + (*digit as char).to_digit(16).unwrap_or(0)
                    });
                    if (0xD800..=0xDFFF).contains(&code) {
                        return Err(Decline); // surrogates: orjson's rules, left to it
                    }
                    self.at += 6;
                }
                _ => return Err(Decline),
            }
        }
    }

    /// JSON's number grammar. A float that parses to infinity is refused by orjson, so it is
    /// left to the Python path; so is an integer outside 64 bits, which orjson reads as a float.
    fn number(&mut self) -> Parsed<()> {
        let start = self.at;
        let bytes = self.bytes;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let digits_start = self.at;
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(Decline),
        }
        let integer_digits = self.at - digits_start;
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return Err(Decline);
            }
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if self.digits() == 0 {
                return Err(Decline);
            }
            float = true;
        }
        if float {
            let text = std::str::from_utf8(&bytes[start..self.at]).map_err(|_| Decline)?;
            let value: f64 = text.parse().map_err(|_| Decline)?;
            if !value.is_finite() {
                return Err(Decline);
            }
        } else if integer_digits >= 19 {
            let text = std::str::from_utf8(&bytes[start..self.at]).map_err(|_| Decline)?;
            if text.parse::<i64>().is_err() && text.parse::<u64>().is_err() {
                return Err(Decline);
            }
        }
        Ok(())
    }

    /// Skips ASCII digits; returns how many.
    fn digits(&mut self) -> usize {
        let start = self.at;
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
        self.at - start
    }

    fn array(&mut self) -> Parsed<()> {
        if self.open(b'[', b']')? {
            return Ok(());
        }
        loop {
            self.skip_whitespace();
            self.value()?;
            if self.next_or_close(b']')? {
                return Ok(());
            }
        }
    }

    /// An object; `member` is given each key and parses its value. Returns the position of the
    /// closing brace.
    fn object(&mut self, mut member: impl FnMut(&mut Self, Range) -> Parsed<()>) -> Parsed<usize> {
        if self.open(b'{', b'}')? {
            return Ok(self.at - 1);
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(Decline);
            }
            let (key, escaped) = self.string()?;
            self.skip_whitespace();
            self.expect(b':')?;
            self.skip_whitespace();
            if escaped {
                // A key spelt with escapes could be any of the protocol's: left to Python.
                return Err(Decline);
            }
            member(self, key)?;
            if self.next_or_close(b'}')? {
                return Ok(self.at - 1);
            }
        }
    }

    /// The opening byte of an array or object, one level deeper; true if it is empty (and so
    /// closed already).
    fn open(&mut self, open: u8, close: u8) -> Parsed<bool> {
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(Decline);
        }
        self.expect(open)?;
        self.skip_whitespace();
        if self.peek() == Some(close) {
            self.at += 1;
            self.depth -= 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// After an element: a comma (false: more follow) or the closing byte (true: done).
    fn next_or_close(&mut self, close: u8) -> Parsed<bool> {
        self.skip_whitespace();
        match self.peek() {
            Some(b',') => {
                self.at += 1;
                Ok(false)
            }
            Some(byte) if byte == close => {
                self.at += 1;
                self.depth -= 1;
                Ok(true)
            }
            _ => Err(Decline),
        }
    }
}

/// The members of the object at the parser's position, appended to `found`.
fn collect_members(parser: &mut Parser, found: &mut Vec<Member>) -> Parsed<usize> {
    parser.object(|parser, key| {
        let value = parser.value()?;
        found.push(Member { key, value });
        Ok(())
    })
}

/// No key twice (the Python path would keep the last value, but this one would check the first).
fn check_unique(bytes: &[u8], members: &[Member]) -> Parsed<()> {
    for (index, member) in members.iter().enumerate() {
        let key = &bytes[member.key.start..member.key.end];
        if members[..index]
            .iter()
            .any(|other| &bytes[other.key.start..other.key.end] == key)
        {
            return Err(Decline);
        }
    }
    Ok(())
}

/// The members of the object that starts at `at`, each key once.
pub fn members_of(bytes: &[u8], at: usize, found: &mut Vec<Member>) -> Parsed<usize> {
    found.clear();
    // Only tags are read this way, parsed (and their depth checked) with the message already.
    let close = collect_members(&mut Parser::new(bytes, at, u32::MAX), found)?;
    check_unique(bytes, found)?;
    Ok(close)
}

/// A message's members, and those of its `data` and `context` objects, in one pass.
pub struct Members {
    pub top: Vec<Member>,
    pub data: Vec<Member>,
    pub context: Vec<Member>,
}

impl Members {
    pub fn new() -> Self {
        Members {
            top: Vec::with_capacity(16),
            data: Vec::with_capacity(16),
            context: Vec::with_capacity(8),
        }
    }

    /// Parse the message object at the parser's position; returns its closing brace.
    pub fn parse(&mut self, parser: &mut Parser) -> Parsed<usize> {
        let Members { top, data, context } = self;
        top.clear();
        data.clear();
        context.clear();
        let close = parser.object(|parser, key| {
            let name = &parser.bytes[key.start..key.end];
            let start = parser.at;
            let value = if parser.peek() == Some(b'{') && (name == b"data" || name == b"context") {
                // A second `data` or `context` would mix into the first: the key check below
                // declines the message then.
                collect_members(
                    parser,
                    if name == b"data" {
                        &mut *data
                    } else {
                        &mut *context
                    },
                )?;
                let whole = Range {
                    start,
                    end: parser.at,
                };
                Value {
                    kind: ValueKind::Object,
                    whole,
                    inner: whole,
                }
            } else {
                parser.value()?
            };
            top.push(Member { key, value });
            Ok(())
        })?;
        check_unique(parser.bytes, top)?;
        check_unique(parser.bytes, data)?;
        check_unique(parser.bytes, context)?;
        Ok(close)
    }
}

pub fn find<'m>(bytes: &[u8], members: &'m [Member], name: &[u8]) -> Option<&'m Value> {
    members
        .iter()
        .find(|m| &bytes[m.key.start..m.key.end] == name)
        .map(|m| &m.value)
}

pub fn text_of(value: &Value) -> Parsed<Text> {
    match value.kind {
        ValueKind::String { escaped } => Ok(Text {
            range: value.inner,
            escaped,
        }),
        _ => Err(Decline),
    }
}

/// A string spelt without escapes (protocol keywords and ids: an escape is left to Python).
pub fn plain_text(value: &Value) -> Parsed<Range> {
    match value.kind {
        ValueKind::String { escaped: false } => Ok(value.inner),
        _ => Err(Decline),
    }
}

pub fn number_of(value: &Value) -> Parsed<Range> {
    if value.kind == ValueKind::Number {
        Ok(value.whole)
    } else {
        Err(Decline)
    }
}

pub fn number_value(bytes: &[u8], span: Range) -> f64 {
    std::str::from_utf8(&bytes[span.start..span.end])
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The decoded text of a JSON string's inside (escapes resolved; surrogates were refused).
fn unescape(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut index = 0;
    while index < raw.len() {
        let next = raw[index..]
            .iter()
            .position(|b| *b == b'\\')
            .map_or(raw.len(), |p| index + p);
        out.push_str(std::str::from_utf8(&raw[index..next]).unwrap_or(""));
        if next == raw.len() {
            break;
        }
        let escape = raw[next + 1];
        index = next + 2;
        match escape {
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'n' => out.push('\n'),
            b'r' => out.push('\r'),
            b't' => out.push('\t'),
            b'u' => {
                let code = std::str::from_utf8(&raw[index..index + 4])
                    .ok()
                    .and_then(|h| u32::from_str_radix(h, 16).ok());
                out.push(code.and_then(char::from_u32).unwrap_or('\u{fffd}'));
                index += 4;
            }
            other => out.push(other as char),
        }
    }
    out
}

pub fn text_string(bytes: &[u8], text: Text) -> String {
    let raw = &bytes[text.range.start..text.range.end];
    if text.escaped {
        unescape(raw)
    } else {
        std::str::from_utf8(raw).unwrap_or("").to_owned()
    }
}

/// A JSON string literal, escaped as orjson escapes.
pub fn push_json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => out.extend_from_slice(format!("\\u{:04x}", byte).as_bytes()),
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}
