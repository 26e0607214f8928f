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

mod lexer;
mod patterns;
#[cfg(test)]
mod tests;

use lexer::{Token, tokenize};
use patterns::{Found, Jumps, parse_export, parse_import};

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
