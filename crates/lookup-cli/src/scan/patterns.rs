//! The statement matcher: a pattern match over the lexer's tokens for `import … from '…'`,
//! `import '…'`, `export … from '…'` and the exporting declarations, with the jump tables that
//! keep each forward search linear.

use std::collections::HashSet;

use super::lexer::Token;
use super::{Export, ExportKind, ModuleScan};

/// What the statement matcher has found so far, with the sets that de-duplicate it and the
/// jump tables of the token stream.
#[derive(Debug, Default)]
pub(super) struct Found<'t> {
    pub(super) scan: ModuleScan,
    /// Borrowed from the tokens: de-duplicating allocates nothing.
    pub(super) export_names: HashSet<&'t str>,
    pub(super) import_specifiers: HashSet<&'t str>,
    pub(super) jumps: Jumps,
}

/// Forward searches over the tokens, answered in one pass each. Indexes are `u32` (a module
/// read is capped far below 4 G tokens) to keep the tables small next to the tokens.
#[derive(Debug, Default)]
pub(super) struct Jumps {
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

    pub(super) fn new(tokens: &[Token<'_>]) -> Jumps {
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
pub(super) fn parse_import<'t>(
    tokens: &'t [Token<'_>],
    at: usize,
    out: &mut Found<'t>,
) -> Option<usize> {
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
pub(super) fn parse_export<'t>(
    tokens: &'t [Token<'_>],
    at: usize,
    out: &mut Found<'t>,
) -> Option<usize> {
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
