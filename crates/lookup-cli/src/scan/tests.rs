//! The scanner's tests, through [`scan`](super::scan).

use super::*;

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
        [export("default", ExportKind::Default, None), export("after", ExportKind::Const, None)]
    );
}

#[test]
fn superclass_forms() {
    assert_eq!(
        names("export class A<T extends X = () => void> extends Component<Sig<T>> implements I {}"),
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
    let source =
        "const ok = a <template && b > c;\nlet xs: Array<template> = [];\nimport y from './yes';";
    assert_eq!(imports(source), ["./yes"]);
}

#[test]
fn private_names_and_properties_named_like_keywords() {
    let source = "class P { #export = 1; #import() {} }\nfoo.export.bar;\nimport y from './yes';";
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
