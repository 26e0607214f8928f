//! The tokenizer: just enough of the JS/TS/Glimmer lexical grammar to never read the inside
//! of a comment, a string, a template literal, a regex or a `<template>` block as code.

/// What the statement matcher sees. Comments and whitespace are dropped; everything whose
/// contents must never be read as code is [`Token::Opaque`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Token<'a> {
    /// An identifier or keyword (including private names such as `#x`).
    Word(&'a str),
    /// A quoted string literal, with its simple escapes decoded.
    Str(String),
    /// Any other single character.
    Punct(char),
    /// A number, regex literal, template literal or Glimmer `<template>` block.
    Opaque,
}

/// Keywords after which an expression (and so a regex literal or a `<template>`) may start.
const KEYWORDS_BEFORE_EXPRESSION: [&str; 17] = [
    "return",
    "typeof",
    "instanceof",
    "in",
    "of",
    "new",
    "delete",
    "void",
    "throw",
    "case",
    "do",
    "else",
    "yield",
    "await",
    "export",
    "default",
    "extends",
];

/// How deeply `${…}` may nest inside template literals before the lexer stops descending.
/// This bounds recursion on adversarial input; real code never comes close.
const MAX_TEMPLATE_DEPTH: usize = 32;

pub(super) fn tokenize(source: &str) -> Vec<Token<'_>> {
    let mut lexer = Lexer::new(source);
    // About one token per eight bytes of typical source: one allocation instead of a dozen.
    let mut tokens = Vec::with_capacity(source.len() / 8);
    while let Some(token) = lexer.next_token() {
        tokens.push(token);
    }
    tokens
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    /// Whether a `/` here would start a regex (and a `<template` a Glimmer block) rather than
    /// being an operator; decided by the previous token.
    expression_may_start: bool,
    /// Current `${…}` nesting inside template literals.
    template_depth: usize,
    /// Where regex literals starting on the current line end (see [`RegexEnds`]).
    regex_ends: Option<RegexEnds>,
}

/// Where a regex literal whose body starts at each byte of a line would end: the closing `/`
/// outside a character class and not escaped, or none before the line ends. Computed for the
/// rest of a line in one backward pass the first time a `/` on it might start a regex, so a
/// line with many `/` is read a bounded number of times instead of once per `/`.
#[derive(Debug)]
struct RegexEnds {
    /// The first body position covered.
    start: usize,
    /// The line's end (its `\n` or `\r`, or the end of the source).
    line_end: usize,
    /// For each position from `start` to `line_end` inclusive: the closing `/` when the scan
    /// starts there outside a character class.
    outside: Vec<Option<usize>>,
}

impl RegexEnds {
    fn new(src: &[u8], start: usize) -> RegexEnds {
        let line_end = src[start.min(src.len())..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
            .map_or(src.len(), |n| start + n);
        let len = line_end.saturating_sub(start);
        // outside[i] / inside[i]: scanning from start + i, outside or inside a class.
        let mut outside = vec![None; len + 2];
        let mut inside = vec![None; len + 2];
        for i in (0..len).rev() {
            let escaped_next = |table: &Vec<Option<usize>>| {
                // An escape must be followed by a character on this line.
                if i + 1 < len { table[i + 2] } else { None }
            };
            outside[i] = match src[start + i] {
                b'/' => Some(start + i),
                b'\\' => escaped_next(&outside),
                b'[' => inside[i + 1],
                _ => outside[i + 1],
            };
            inside[i] = match src[start + i] {
                b']' => outside[i + 1],
                b'\\' => escaped_next(&inside),
                _ => inside[i + 1],
            };
        }
        outside.truncate(len + 1);
        RegexEnds { start, line_end, outside }
    }

    /// The closing `/` of a regex whose body starts at `body` (on this line, at or after
    /// `start`).
    fn from(&self, body: usize) -> Option<usize> {
        self.outside.get(body - self.start).copied().flatten()
    }
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        let mut lexer =
            Lexer { src, pos: 0, expression_may_start: true, template_depth: 0, regex_ends: None };
        lexer.eat('\u{feff}');
        // A hashbang line is only allowed at the very start.
        if lexer.rest().starts_with("#!") {
            lexer.skip_line();
        }
        lexer
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.rest().chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn skip_line(&mut self) {
        self.pos = self.rest().find('\n').map_or(self.src.len(), |n| self.pos + n);
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        self.skip_trivia();
        let c = self.peek()?;
        let token = match c {
            '\'' | '"' => Token::Str(self.string(c)),
            '`' => {
                self.template_literal();
                Token::Opaque
            }
            '/' if self.expression_may_start && self.regex() => Token::Opaque,
            '<' if self.expression_may_start && self.glimmer_template() => Token::Opaque,
            c if is_word_start(c) => Token::Word(self.word()),
            c if c.is_ascii_digit() => {
                self.number();
                Token::Opaque
            }
            c => {
                self.bump();
                Token::Punct(c)
            }
        };
        self.expression_may_start = match &token {
            Token::Word(word) => KEYWORDS_BEFORE_EXPRESSION.contains(word),
            Token::Punct(')' | ']') => false,
            // `}` usually closes a block in module code, after which a statement (possibly a
            // regex literal) starts; an object literal divided by something is far rarer.
            Token::Punct(_) => true,
            Token::Str(_) | Token::Opaque => false,
        };
        Some(token)
    }

    fn skip_trivia(&mut self) {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() || c == '\u{feff}' => {
                    self.bump();
                }
                Some('/') if self.peek_second() == Some('/') => self.skip_line(),
                Some('/') if self.peek_second() == Some('*') => {
                    self.pos = self.rest()[2..]
                        .find("*/")
                        .map_or(self.src.len(), |n| self.pos + 2 + n + 2);
                }
                _ => return,
            }
        }
    }

    /// A quoted string starting at the opening `quote`. An unterminated string ends at the end
    /// of its line (a raw newline is not allowed in one), which keeps a stray quote from
    /// swallowing the rest of the file.
    fn string(&mut self, quote: char) -> String {
        self.bump();
        let mut value = String::new();
        loop {
            match self.peek() {
                None | Some('\n' | '\r') => return value,
                Some(c) if c == quote => {
                    self.bump();
                    return value;
                }
                Some('\\') => {
                    self.bump();
                    match self.bump() {
                        None => return value,
                        // Line continuations contribute nothing.
                        Some('\n') => {}
                        Some('\r') => {
                            self.eat('\n');
                        }
                        Some(escaped @ ('\\' | '\'' | '"')) => value.push(escaped),
                        Some(other) => {
                            value.push('\\');
                            value.push(other);
                        }
                    }
                }
                Some(c) => {
                    self.bump();
                    value.push(c);
                }
            }
        }
    }

    /// A template literal starting at its backtick, including any `${…}` code inside it.
    fn template_literal(&mut self) {
        self.bump();
        loop {
            match self.bump() {
                None | Some('`') => return,
                Some('\\') => {
                    self.bump();
                }
                Some('$') if self.template_depth < MAX_TEMPLATE_DEPTH && self.eat('{') => {
                    self.template_depth += 1;
                    self.skip_substitution();
                    self.template_depth -= 1;
                }
                Some(_) => {}
            }
        }
    }

    /// The code of a `${…}` substitution, up to its closing brace. Its tokens are lexed (so
    /// strings and nested templates inside it are respected) and then dropped: nothing in a
    /// substitution can be a static import or export.
    fn skip_substitution(&mut self) {
        self.expression_may_start = true;
        let mut depth = 1usize;
        while let Some(token) = self.next_token() {
            match token {
                Token::Punct('{') => depth += 1,
                Token::Punct('}') => {
                    depth -= 1;
                    if depth == 0 {
                        return;
                    }
                }
                _ => {}
            }
        }
    }

    /// A regex literal at `/`, if one ends on this line; otherwise nothing is consumed and the
    /// `/` is left to be read as an operator.
    fn regex(&mut self) -> bool {
        let body = self.pos + 1;
        let ends = match &self.regex_ends {
            Some(ends) if body >= ends.start && body <= ends.line_end => ends,
            _ => self.regex_ends.insert(RegexEnds::new(self.src.as_bytes(), body)),
        };
        let Some(end) = ends.from(body) else { return false };
        self.pos = end + 1;
        // Flags.
        while self.peek().is_some_and(is_word_part) {
            self.bump();
        }
        true
    }

    /// A Glimmer `<template>…</template>` block at `<`, if this is one. Nested `<template>`
    /// elements are balanced; an unterminated block runs to the end of the source.
    fn glimmer_template(&mut self) -> bool {
        const OPEN: &str = "<template";
        const CLOSE: &str = "</template";
        let tag_ends = |s: &str, tag: &str| {
            s.strip_prefix(tag)
                .and_then(|after| after.chars().next())
                .is_some_and(|c| c == '>' || c.is_whitespace())
        };
        if !tag_ends(self.rest(), OPEN) {
            return false;
        }
        let mut depth = 0usize;
        let mut offset = 0;
        let rest = self.rest();
        while let Some(n) = rest[offset..].find('<') {
            let at = offset + n;
            let here = &rest[at..];
            if tag_ends(here, OPEN) {
                depth += 1;
            } else if tag_ends(here, CLOSE) {
                depth -= 1;
                if depth == 0 {
                    let end = here.find('>').map_or(rest.len(), |gt| at + gt + 1);
                    self.pos += end;
                    return true;
                }
            }
            offset = at + 1;
        }
        self.pos = self.src.len();
        true
    }

    fn word(&mut self) -> &'a str {
        let start = self.pos;
        self.bump();
        while self.peek().is_some_and(is_word_part) {
            self.bump();
        }
        &self.src[start..self.pos]
    }

    /// A numeric literal; its exact extent does not matter as long as it is not a word.
    fn number(&mut self) {
        while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            self.bump();
        }
    }
}

fn is_word_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$' || c == '#'
}

fn is_word_part(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The regex scan as a plain loop from one start (what [`RegexEnds`] answers for every
    /// start at once).
    fn naive_regex_end(src: &str, body: usize) -> Option<usize> {
        let mut in_class = false;
        let mut chars = src[body..].char_indices();
        while let Some((offset, c)) = chars.next() {
            match c {
                '\n' | '\r' => return None,
                '\\' => match chars.next() {
                    None | Some((_, '\n' | '\r')) => return None,
                    Some(_) => {}
                },
                '[' => in_class = true,
                ']' => in_class = false,
                '/' if !in_class => return Some(body + offset),
                _ => {}
            }
        }
        None
    }

    proptest::proptest! {
        #[test]
        fn regex_ends_agree_with_a_scan_from_each_start(line in "[/\\\\\\[\\]aé\n]{0,40}") {
            let mut cache: Option<RegexEnds> = None;
            for body in 0..=line.len() {
                if !line.is_char_boundary(body) {
                    continue;
                }
                let ends = match &cache {
                    Some(ends) if body >= ends.start && body <= ends.line_end => ends,
                    _ => cache.insert(RegexEnds::new(line.as_bytes(), body)),
                };
                proptest::prop_assert_eq!(ends.from(body), naive_regex_end(&line, body), "{:?} from {}", line, body);
            }
        }
    }
}
