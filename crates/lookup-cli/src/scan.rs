//! A small, hand-written scanner that finds the exports and static imports of a JS/TS/Glimmer
//! module (`.gts`, `.gjs`, `.ts`, `.js`) without parsing it.
//!
//! The file prerenderer needs just two facts about a module: which names it exports (they
//! become definitions) and which modules it imports (they become dependencies). A real parser
//! would be a heavy dependency for that, so this is a tokenizer that knows enough of the
//! lexical grammar to never mistake the inside of a comment, a string, a template literal, a
//! regular expression or a Glimmer `<template>` block for code, followed by a pattern match
//! over the tokens for `import … from '…'`, `import '…'`, `export … from '…'` and the
//! exporting declarations.
//!
//! # What it understands
//!
//! - `export class N`, `export abstract class N`, with `extends X` or `extends A.B` (recorded
//!   as written, TypeScript type parameters and arguments skipped);
//! - `export function N`, `export async function N`, `export function* N`;
//! - `export const|let|var N` (the first binding only: `export const a = 1, b = 2` yields `a`);
//! - `export default …`, recorded under the name `default` (with the superclass when it is a
//!   class);
//! - `export declare …` is read as the declaration without `declare`;
//! - specifiers of `import … from '…'` (any clause, over any number of lines, including
//!   `import type`), bare `import '…'`, `export * from '…'`, `export * as ns from '…'`,
//!   `export { a } from '…'` and `export type { A } from '…'`, in either quote style.
//!
//! Exports are listed in order of appearance and de-duplicated by name (so TypeScript overload
//! signatures give one export); imports are in order and de-duplicated.
//!
//! # What it does not understand
//!
//! - Local export lists without `from` (`export { a, b }`, `export { a as default }`): they
//!   export nothing as far as the scanner is concerned.
//! - Destructuring exports (`export const { a, b } = …`, `export const [a] = …`) and every
//!   binding after the first in one declaration.
//! - TypeScript-only forms: `export type X = …`, `export interface`, `export enum`,
//!   `export const enum`, `export namespace`/`module`, `export =`, `export as namespace`,
//!   `export import A = …` and `import x = require('…')` are all ignored. Type-only imports
//!   (`import type …`) are reported like any other import: the scanner does not know that
//!   they are erased at runtime.
//! - A superclass that is not a (dotted) name — `extends Mixin(Base)`, `extends (expr)` —
//!   gives `extends: None`.
//! - Specifiers that are not plain string literals (template literals, concatenations) are not
//!   imports; escape sequences in specifiers other than `\\`, `\'`, `\"` and line
//!   continuations are kept as written (`\u0041` stays `\u0041`).
//! - Dynamic `import(…)` and `import.meta` are deliberately not imports.
//! - Nesting is not tracked: an `import … from` or `export` written inside a block (say a
//!   TypeScript `declare module 'x' { … }`) is reported as if it were at the top level.
//! - Regular expression versus division is decided from the previous token (the classic
//!   heuristic); a `/` after `}` is read as starting a regex. A misreading is confined to one
//!   line, because a regex literal (like a quoted string) cannot span lines.
//! - Glimmer `<template>` blocks are skipped wholesale, and are recognised only where an
//!   expression or a class member may start. A `</template>` inside a Handlebars comment ends
//!   the block early.
//! - JSX, HTML-like comments (`<!--`) and Unicode escapes in identifiers.

use std::collections::HashSet;

/// What [`scan`] found in one module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleScan {
    /// Exported names, in order of appearance, de-duplicated by name.
    pub exports: Vec<Export>,
    /// Static import and re-export specifiers exactly as written, in order, de-duplicated.
    pub imports: Vec<String>,
}

/// One exported name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The exported name; `default` for a default export.
    pub name: String,
    /// What kind of declaration exports it.
    pub kind: ExportKind,
    /// The superclass as written (`CardDef`, `Base.Foo`) when the export is a class whose
    /// superclass is a plain or dotted name.
    pub extends: Option<String>,
}

/// The declaration an [`Export`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// `export class N`.
    Class,
    /// `export function N` (also `async` and generator functions).
    Function,
    /// `export const N`.
    Const,
    /// `export let N`.
    Let,
    /// `export var N`.
    Var,
    /// `export default …`.
    Default,
}

impl ExportKind {
    /// The lower-case name used in definition documents (`"class"`, `"function"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ExportKind::Class => "class",
            ExportKind::Function => "function",
            ExportKind::Const => "const",
            ExportKind::Let => "let",
            ExportKind::Var => "var",
            ExportKind::Default => "default",
        }
    }
}

/// Scans a module's source for its exports and static imports. Never fails: text it cannot
/// make sense of is skipped (see the module documentation for what that covers).
///
/// Linear in the size of the source: the lexer reads each byte a bounded number of times,
/// every forward search a statement needs (the end of an import clause or of a brace list,
/// the `>` closing type parameters) is answered from a table built in one pass, and names
/// and specifiers are de-duplicated through hash sets.
pub fn scan(source: &str) -> ModuleScan {
    let tokens = tokenize(source);
    let mut out = Found { jumps: Jumps::new(&tokens), ..Found::default() };
    let mut i = 0;
    while i < tokens.len() {
        // `x.import` and `x.export` are property accesses, not statements.
        let after_dot = i > 0 && tokens[i - 1] == Token::Punct('.');
        let parsed = match tokens[i] {
            Token::Word("import") if !after_dot => parse_import(&tokens, i + 1, &mut out),
            Token::Word("export") if !after_dot => parse_export(&tokens, i + 1, &mut out),
            _ => None,
        };
        i = parsed.unwrap_or(i + 1);
    }
    out.scan
}

/// What the statement matcher has found so far, with the sets that de-duplicate it and the
/// jump tables of the token stream.
#[derive(Debug, Default)]
struct Found<'t> {
    scan: ModuleScan,
    /// Borrowed from the tokens: de-duplicating allocates nothing.
    export_names: HashSet<&'t str>,
    import_specifiers: HashSet<&'t str>,
    jumps: Jumps,
}

/// Forward searches over the tokens, answered in one pass each. Indexes are `u32` (a module
/// read is capped far below 4 G tokens) to keep the tables small next to the tokens.
#[derive(Debug, Default)]
struct Jumps {
    /// For each index, the first index at or after it where an import clause stops: a
    /// `from` followed by a string, or a token that cannot be part of a clause.
    clause_stop: Vec<u32>,
    /// For each index, the first index at or after it that cannot be part of a brace list
    /// (`}` included).
    list_stop: Vec<u32>,
    /// For each `<`, the index after the `>` that balances it; [`Jumps::NONE`] if none.
    angle_close: Vec<u32>,
}

impl Jumps {
    const NONE: u32 = u32::MAX;

    fn new(tokens: &[Token<'_>]) -> Jumps {
        let n = tokens.len();
        let index = |k: usize| u32::try_from(k).unwrap_or(Self::NONE);
        let mut clause_stop = vec![index(n); n + 1];
        let mut list_stop = vec![index(n); n + 1];
        for k in (0..n).rev() {
            let from_str = tokens[k] == Token::Word("from")
                && matches!(tokens.get(k + 1), Some(Token::Str(_)));
            let clause = matches!(tokens[k], Token::Word(_) | Token::Punct(',' | '*' | '{' | '}'));
            clause_stop[k] = if from_str || !clause { index(k) } else { clause_stop[k + 1] };
            let listed = matches!(tokens[k], Token::Word(_) | Token::Str(_) | Token::Punct(','));
            list_stop[k] = if listed { list_stop[k + 1] } else { index(k) };
        }
        let mut angle_close = vec![Self::NONE; n];
        let mut open = Vec::new();
        for (k, token) in tokens.iter().enumerate() {
            match token {
                Token::Punct('<') => open.push(k),
                // A `>` right after `=` belongs to an arrow (`<T extends () => void>`).
                Token::Punct('>') if k == 0 || tokens[k - 1] != Token::Punct('=') => {
                    if let Some(start) = open.pop() {
                        angle_close[start] = index(k + 1);
                    }
                }
                _ => {}
            }
        }
        Jumps { clause_stop, list_stop, angle_close }
    }

    fn clause_stop(&self, at: usize) -> Option<usize> {
        self.clause_stop.get(at).map(|k| *k as usize)
    }

    fn list_stop(&self, at: usize) -> Option<usize> {
        self.list_stop.get(at).map(|k| *k as usize)
    }

    fn angle_close(&self, at: usize) -> Option<usize> {
        self.angle_close.get(at).filter(|k| **k != Self::NONE).map(|k| *k as usize)
    }
}

/// Parses what follows `import` at `at`. Returns the index after the statement when it was a
/// static import; `None` for anything else (`import(`, `import.meta`, `import x = …`).
fn parse_import<'t>(tokens: &'t [Token<'_>], at: usize, out: &mut Found<'t>) -> Option<usize> {
    if let Some(Token::Str(specifier)) = tokens.get(at) {
        push_import(out, specifier);
        return Some(at + 1);
    }
    // An import clause is made only of names, `,`, `*` and braces; anything else (`(`, `.`,
    // `=`, `:`) means this `import` is not a static import statement. (`from` may itself be
    // an imported binding name, `import from from '…'`: only a `from` before a string ends
    // the clause.)
    let k = out.jumps.clause_stop(at)?;
    match (tokens.get(k)?, tokens.get(k + 1)) {
        (Token::Word("from"), Some(Token::Str(specifier))) => {
            push_import(out, specifier);
            Some(k + 2)
        }
        _ => None,
    }
}

/// Parses what follows `export` at `at`, recording exports and re-export specifiers. Returns
/// the index to continue scanning from, or `None` when nothing was recognised.
fn parse_export<'t>(tokens: &'t [Token<'_>], at: usize, out: &mut Found<'t>) -> Option<usize> {
    let mut k = at;
    if tokens.get(k) == Some(&Token::Word("declare")) {
        k += 1;
    }
    match tokens.get(k)? {
        Token::Word("default") => {
            let mut c = k + 1;
            if tokens.get(c) == Some(&Token::Word("abstract")) {
                c += 1;
            }
            let extends = if tokens.get(c) == Some(&Token::Word("class")) {
                // The name of a default-exported class is optional.
                let mut h = c + 1;
                if let Some(Token::Word(name)) = tokens.get(h)
                    && *name != "extends"
                    && *name != "implements"
                {
                    h += 1;
                }
                heritage(tokens, &out.jumps, h)
            } else {
                None
            };
            push_export(out, "default", ExportKind::Default, extends);
            // Only `default` is consumed: the declaration that follows is scanned as usual.
            Some(k + 1)
        }
        Token::Word("abstract") if tokens.get(k + 1) == Some(&Token::Word("class")) => {
            export_class(tokens, k + 2, out)
        }
        Token::Word("class") => export_class(tokens, k + 1, out),
        Token::Word("async") if tokens.get(k + 1) == Some(&Token::Word("function")) => {
            export_function(tokens, k + 2, out)
        }
        Token::Word("function") => export_function(tokens, k + 1, out),
        Token::Word(keyword @ ("const" | "let" | "var")) => {
            let kind = match *keyword {
                "const" => ExportKind::Const,
                "let" => ExportKind::Let,
                _ => ExportKind::Var,
            };
            match tokens.get(k + 1)? {
                // `export const enum E` is a TypeScript enum, not a binding named `enum`.
                Token::Word("enum") => None,
                Token::Word(name) => {
                    push_export(out, name, kind, None);
                    Some(k + 2)
                }
                // Destructuring patterns are not understood (see the module documentation).
                _ => None,
            }
        }
        // `export type { A } from '…'` and `export type * from '…'` are re-exports; any other
        // `export type` is a type alias and exports nothing at runtime.
        Token::Word("type") if matches!(tokens.get(k + 1), Some(Token::Punct('{' | '*'))) => {
            re_export(tokens, k + 1, out)
        }
        Token::Punct('{' | '*') => re_export(tokens, k, out),
        _ => None,
    }
}

/// `export class` after the `class` keyword: the name, then the optional superclass.
fn export_class<'t>(tokens: &'t [Token<'_>], at: usize, out: &mut Found<'t>) -> Option<usize> {
    let Some(Token::Word(name)) = tokens.get(at) else { return None };
    if matches!(*name, "extends" | "implements") {
        return None;
    }
    let extends = heritage(tokens, &out.jumps, at + 1);
    push_export(out, name, ExportKind::Class, extends);
    Some(at + 1)
}

/// `export function` after the `function` keyword: an optional `*`, then the name.
fn export_function<'t>(tokens: &'t [Token<'_>], at: usize, out: &mut Found<'t>) -> Option<usize> {
    let at = if tokens.get(at) == Some(&Token::Punct('*')) { at + 1 } else { at };
    let Some(Token::Word(name)) = tokens.get(at) else { return None };
    push_export(out, name, ExportKind::Function, None);
    Some(at + 1)
}

/// `export * …` or `export { … }` starting at `at` (the `*` or `{`): records the specifier
/// when the statement ends in `from '…'`. A local list without `from` records nothing.
fn re_export<'t>(tokens: &'t [Token<'_>], at: usize, out: &mut Found<'t>) -> Option<usize> {
    let mut k = at;
    match tokens.get(k)? {
        Token::Punct('*') => {
            k += 1;
            if tokens.get(k) == Some(&Token::Word("as")) {
                // `export * as ns` or, since ES2022, `export * as "string name"`.
                k += 2;
            }
        }
        Token::Punct('{') => {
            k = out.jumps.list_stop(k + 1)?;
            if tokens.get(k)? != &Token::Punct('}') {
                return None;
            }
            k += 1;
        }
        _ => return None,
    }
    match (tokens.get(k), tokens.get(k + 1)) {
        (Some(Token::Word("from")), Some(Token::Str(specifier))) => {
            push_import(out, specifier);
            Some(k + 2)
        }
        _ => Some(k),
    }
}

/// The superclass of a class declaration whose name (if any) ends just before `at`: skips
/// TypeScript type parameters, then reads `extends A` or `extends A.B.C`. A superclass that is
/// a call or any other expression gives `None`.
fn heritage(tokens: &[Token<'_>], jumps: &Jumps, at: usize) -> Option<String> {
    let mut k = skip_type_parameters(tokens, jumps, at);
    if tokens.get(k) != Some(&Token::Word("extends")) {
        return None;
    }
    k += 1;
    let Some(Token::Word(first)) = tokens.get(k) else { return None };
    let mut path = (*first).to_owned();
    k += 1;
    while let (Some(Token::Punct('.')), Some(Token::Word(part))) =
        (tokens.get(k), tokens.get(k + 1))
    {
        path.push('.');
        path.push_str(part);
        k += 2;
    }
    // `extends Mixin(Base)`: the superclass is whatever the call returns, which we cannot name.
    if tokens.get(k) == Some(&Token::Punct('(')) {
        return None;
    }
    Some(path)
}

/// Skips a balanced `<…>` at `at`, if there is one. A `>` right after `=` belongs to an arrow
/// (`<T extends () => void>`) and does not close anything.
fn skip_type_parameters(tokens: &[Token<'_>], jumps: &Jumps, at: usize) -> usize {
    if tokens.get(at) != Some(&Token::Punct('<')) {
        return at;
    }
    jumps.angle_close(at).unwrap_or(at)
}

fn push_import<'t>(out: &mut Found<'t>, specifier: &'t str) {
    if out.import_specifiers.insert(specifier) {
        out.scan.imports.push(specifier.to_owned());
    }
}

fn push_export<'t>(out: &mut Found<'t>, name: &'t str, kind: ExportKind, extends: Option<String>) {
    if out.export_names.insert(name) {
        out.scan.exports.push(Export { name: name.to_owned(), kind, extends });
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// What the statement matcher sees. Comments and whitespace are dropped; everything whose
/// contents must never be read as code is [`Token::Opaque`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'a> {
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

fn tokenize(source: &str) -> Vec<Token<'_>> {
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

    #[test]
    fn inputs_that_were_quadratic_scan_in_one_pass() {
        // Each of these took time quadratic in its size before the scan became linear (a
        // search per export, per import, per `/` and per `<`); at these sizes that would be
        // minutes in a debug build, so the whole check is bounded and a regression fails
        // instead of stalling. The timings are in `cargo xtask bench` (`scan_*`).
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            quadratic_inputs();
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("every input scanned within 60 s (a panic above is reported as well)");
    }

    fn quadratic_inputs() {
        for n in [2_000usize, 4_000] {
            let exports: String = (0..n).map(|i| format!("export const e{i} = 1;\n")).collect();
            assert_eq!(scan(&exports).exports.len(), n);
            let imports: String = (0..n).map(|i| format!("import x{i} from './m{i}';\n")).collect();
            assert_eq!(scan(&imports).imports.len(), n);
        }
        // A long line of divisions that are never regexes, and unclosed type parameters.
        let slashes = format!("let a = 1{}\nexport class Last {{}}\n", " / 2".repeat(50_000));
        assert_eq!(names(&slashes), [export("Last", ExportKind::Class, None)]);
        let angles = "export class A<T {}\n".repeat(20_000);
        assert_eq!(scan(&angles).exports.len(), 1, "one name, de-duplicated");
    }

    fn imports(source: &str) -> Vec<String> {
        scan(source).imports
    }

    fn names(source: &str) -> Vec<(String, ExportKind, Option<String>)> {
        scan(source).exports.into_iter().map(|e| (e.name, e.kind, e.extends)).collect()
    }

    fn export(
        name: &str,
        kind: ExportKind,
        extends: Option<&str>,
    ) -> (String, ExportKind, Option<String>) {
        (name.to_owned(), kind, extends.map(str::to_owned))
    }

    #[test]
    fn a_typical_card_module() {
        let source = r#"
import { contains, field, CardDef, Component } from 'https://cardstack.com/base/card-api';
import StringField from "https://cardstack.com/base/string";
import { Pet } from './pet';

export class Person extends CardDef {
  static displayName = 'Person';
  @field firstName = contains(StringField);
  static isolated = class Isolated extends Component<typeof this> {
    <template>
      <h1>Don't import x from './in-template'</h1>
      <@fields.firstName />
    </template>
  };
}
"#;
        let found = scan(source);
        assert_eq!(
            found.imports,
            ["https://cardstack.com/base/card-api", "https://cardstack.com/base/string", "./pet"]
        );
        assert_eq!(
            found.exports,
            [Export {
                name: "Person".into(),
                kind: ExportKind::Class,
                extends: Some("CardDef".into())
            }]
        );
    }

    #[test]
    fn every_export_declaration_kind() {
        let source = "
export class A {}
export class B extends Base.Foo {}
export abstract class C extends D {}
export function f() {}
export async function g() {}
export function* h() {}
export async function *i() {}
export const one = 1, two = 2;
export let l;
export var v = 3;
export declare const declared: number;
";
        assert_eq!(
            names(source),
            [
                export("A", ExportKind::Class, None),
                export("B", ExportKind::Class, Some("Base.Foo")),
                export("C", ExportKind::Class, Some("D")),
                export("f", ExportKind::Function, None),
                export("g", ExportKind::Function, None),
                export("h", ExportKind::Function, None),
                export("i", ExportKind::Function, None),
                export("one", ExportKind::Const, None),
                export("l", ExportKind::Let, None),
                export("v", ExportKind::Var, None),
                export("declared", ExportKind::Const, None),
            ]
        );
    }

    #[test]
    fn default_exports() {
        assert_eq!(
            names("export default class Person extends CardDef {}"),
            [export("default", ExportKind::Default, Some("CardDef"))]
        );
        assert_eq!(
            names("export default class extends Base.Card {}"),
            [export("default", ExportKind::Default, Some("Base.Card"))]
        );
        assert_eq!(
            names("export default class Plain {}"),
            [export("default", ExportKind::Default, None)]
        );
        assert_eq!(
            names("export default function () {}"),
            [export("default", ExportKind::Default, None)]
        );
        assert_eq!(names("export default 42;"), [export("default", ExportKind::Default, None)]);
        assert_eq!(
            names("export default <template>Hello, it's me</template>\nexport const after = 1;"),
            [
                export("default", ExportKind::Default, None),
                export("after", ExportKind::Const, None)
            ]
        );
    }

    #[test]
    fn superclass_forms() {
        assert_eq!(
            names(
                "export class A<T extends X = () => void> extends Component<Sig<T>> implements I {}"
            ),
            [export("A", ExportKind::Class, Some("Component"))]
        );
        assert_eq!(
            names("export class A extends Mixin(Base) {}"),
            [export("A", ExportKind::Class, None)]
        );
        assert_eq!(names("export class A extends (x) {}"), [export("A", ExportKind::Class, None)]);
        assert_eq!(
            names("export class A extends a.b.c {}"),
            [export("A", ExportKind::Class, Some("a.b.c"))]
        );
    }

    #[test]
    fn exports_are_deduplicated_in_order() {
        let source = "
export function over(a: string): void;
export function over(a: number): void;
export function over(a: unknown) {}
export const z = 1;
export default z;
";
        assert_eq!(
            names(source),
            [
                export("over", ExportKind::Function, None),
                export("z", ExportKind::Const, None),
                export("default", ExportKind::Default, None),
            ]
        );
    }

    #[test]
    fn what_is_deliberately_not_an_export() {
        let source = "
const a = 1, b = 2;
export { a, b as c };
export { a as default };
export const { d, e } = obj;
export const [f] = arr;
export type T = string;
export interface I {}
export enum E { X }
export const enum CE { Y }
export namespace N {}
export = thing;
";
        assert!(names(source).is_empty());
        assert_eq!(imports(source), Vec::<String>::new());
    }

    #[test]
    fn import_forms() {
        let source = r#"
import def from './default';
import * as ns from "./namespace";
import def2, { a, b as c } from './mixed';
import def3, * as ns2 from './mixed-ns';
import {
  one,
  two,
} from "./multi-line";
import type { T } from './types';
import { type U, value } from './inline-type';
import './side-effect';
import "./side-effect-double";
import data from './data.json' with { type: 'json' };
import from from './from-named';
"#;
        assert_eq!(
            imports(source),
            [
                "./default",
                "./namespace",
                "./mixed",
                "./mixed-ns",
                "./multi-line",
                "./types",
                "./inline-type",
                "./side-effect",
                "./side-effect-double",
                "./data.json",
                "./from-named",
            ]
        );
    }

    #[test]
    fn re_exports_are_imports() {
        let source = r#"
export * from './all';
export * as ns from "./ns";
export { a, b as c } from './some';
export {
  x,
  y as default,
} from "./multi";
export type { T } from './types';
export { "string name" as s } from './strings';
"#;
        assert_eq!(imports(source), ["./all", "./ns", "./some", "./multi", "./types", "./strings"]);
        assert!(names(source).is_empty());
    }

    #[test]
    fn imports_are_deduplicated_in_order() {
        let source =
            "import a from './b';\nimport './a';\nimport { c } from './b';\nexport * from './a';";
        assert_eq!(imports(source), ["./b", "./a"]);
    }

    #[test]
    fn dynamic_imports_and_import_meta_are_not_imports() {
        let source = "
const lazy = await import('./lazy');
const url = new URL('./asset.png', import.meta.url);
import.meta.hot?.accept();
obj.import('./method');
const o = { import: './key', export: 1 };
class K { import() {} export = 2; }
import real from './real';
";
        assert_eq!(imports(source), ["./real"]);
        assert!(names(source).is_empty());
    }

    #[test]
    fn comments_are_skipped() {
        let source = "
// import a from './line-comment';
/* import b from './block-comment';
   export const hidden = 1; */
/**
 * export class Doc {}
 */
import c from './real'; // import d from './trailing'
export /* inline */ const shown = 1;
";
        assert_eq!(imports(source), ["./real"]);
        assert_eq!(names(source), [export("shown", ExportKind::Const, None)]);
    }

    #[test]
    fn string_contents_are_not_code() {
        let source = r#"
const s = "import x from './no'";
const t = 'export const no = 1; import "./no2"';
const escaped = 'it\'s import y from "./no3"';
const dq = "say \"import z from './no4'\"";
import real from './yes';
"#;
        assert_eq!(imports(source), ["./yes"]);
        assert!(names(source).is_empty());
    }

    #[test]
    fn template_literals_are_not_code() {
        let source = r#"
const a = `import x from './no'`;
const b = `line one
export const no = 1;
import y from "./no2"`;
const c = `${`nested ${"import z from './no3'"}`} and ${ { k: '}' }.k } import w from './no4'`;
const d = `\` import v from './no5'`;
import real from './yes';
export const after = `${1}`;
"#;
        assert_eq!(imports(source), ["./yes"]);
        assert_eq!(names(source), [export("after", ExportKind::Const, None)]);
    }

    #[test]
    fn regex_literals_are_not_code() {
        let source = r#"
const quote = /'/g; import one from './one';
const klass = /[/'"]/; import two from './two';
const slash = /\/'/; import three from './three';
function f() { return /"/.test(x); } import four from './four';
const ratio = a / b; import five from './five'; const r2 = (c) / d;
import real from './yes';
"#;
        // Each import shares its line with a regex or a division, so a misread would lose it.
        assert_eq!(imports(source), ["./one", "./two", "./three", "./four", "./five", "./yes"]);
        assert!(names(source).is_empty());
    }

    #[test]
    fn a_misread_division_is_confined_to_its_line() {
        // After `}` a `/` is taken as a regex; with no closing `/` on the line it falls back to
        // division, and the next line is scanned normally.
        let source = "const x = ({} / 2);\nimport real from './yes';";
        assert_eq!(imports(source), ["./yes"]);
    }

    #[test]
    fn an_unterminated_string_ends_at_its_line() {
        let source = "const broken = 'oops;\nimport real from './yes';";
        assert_eq!(imports(source), ["./yes"]);
    }

    #[test]
    fn glimmer_templates_are_skipped() {
        let source = r#"
import Component from '@glimmer/component';
export default class Greeting extends Component {
  <template>
    {{! it's here: import no from './no' }}
    <p class="x">You're "welcome" `friend`</p>
    <template>nested element</template>
    export const notReal = 1;
  </template>
}
export const Inline = <template>I'm inline</template>;
import after from './after';
"#;
        assert_eq!(imports(source), ["@glimmer/component", "./after"]);
        assert_eq!(
            names(source),
            [
                export("default", ExportKind::Default, Some("Component")),
                export("Inline", ExportKind::Const, None),
            ]
        );
    }

    #[test]
    fn less_than_in_expressions_is_not_a_template() {
        let source = "const ok = a <template && b > c;\nlet xs: Array<template> = [];\nimport y from './yes';";
        assert_eq!(imports(source), ["./yes"]);
    }

    #[test]
    fn private_names_and_properties_named_like_keywords() {
        let source =
            "class P { #export = 1; #import() {} }\nfoo.export.bar;\nimport y from './yes';";
        assert_eq!(imports(source), ["./yes"]);
        assert!(names(source).is_empty());
    }

    #[test]
    fn hashbang_bom_and_unicode() {
        let source =
            "\u{feff}#!/usr/bin/env node\nimport ünï from './ünï-codé';\nexport const café = '☕';";
        assert_eq!(imports(source), ["./ünï-codé"]);
        assert_eq!(names(source), [export("café", ExportKind::Const, None)]);
    }

    #[test]
    fn specifier_escapes() {
        assert_eq!(imports(r#"import a from './it\'s';"#), ["./it's"]);
        assert_eq!(imports(r"import a from './\u0041';"), [r"./\u0041"]);
        assert_eq!(imports("import a from './con\\\ntinued';"), ["./continued"]);
    }

    #[test]
    fn template_literal_specifiers_are_not_understood() {
        assert_eq!(imports("import a from `./tpl`;"), Vec::<String>::new());
    }

    #[test]
    fn truncated_and_garbage_input_does_not_panic() {
        for source in [
            "",
            "import",
            "import {",
            "import { a } from",
            "export",
            "export class",
            "export class A extends",
            "export class A<",
            "export default class",
            "export *",
            "export { a",
            "`${",
            "`${ {",
            "/* never closed",
            "'never closed",
            "/[never closed",
            "<template> never closed import a from './x'",
            "</template>",
            "export function",
            "export const",
            "\u{feff}",
            "#!",
        ] {
            let _ = scan(source);
        }
        let deep = "`${".repeat(10_000);
        let _ = scan(&deep);
    }

    #[test]
    fn kinds_have_document_names() {
        let all = [
            (ExportKind::Class, "class"),
            (ExportKind::Function, "function"),
            (ExportKind::Const, "const"),
            (ExportKind::Let, "let"),
            (ExportKind::Var, "var"),
            (ExportKind::Default, "default"),
        ];
        for (kind, name) in all {
            assert_eq!(kind.as_str(), name);
        }
    }
}
