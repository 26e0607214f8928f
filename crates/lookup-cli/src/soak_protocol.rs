//! The soak protocol: what `cargo xtask soak` (the orchestrator) and `deflookup soak-worker`
//! (its workers) must agree on about the realm they share.
//!
//! - The modules are `m0.gts` … `m{M-1}.gts` ([`module_file`]); module `mI` exports the class
//!   `MI` ([`class_name`]) and may be named without its extension ([`module_name`]).
//! - Each carries a version line `// version: N` ([`version_line`]): the orchestrator writes
//!   them at 1 ([`module_sources`]), a worker's edit raises it ([`with_version`]), the CLI's
//!   file prerenderer records it in every definition, and the audit compares the recorded
//!   version with the file's ([`source_version`]).
//!
//! This file is one module of both sides: `lookup-cli` declares it as `mod soak_protocol`, and
//! xtask, which must not depend on the library crates, includes the same file with
//! `#[path = "…/crates/lookup-cli/src/soak_protocol.rs"]`. So it holds only std and
//! `fastrand` code, and each side uses its part of it.

/// Modules that import nothing (`m0` … `m3`), in the graph of [`module_sources`].
const LEAVES: u64 = 4;

/// The seed of [`module_sources`]: every run gets the same graph.
const GRAPH_SEED: u64 = 0x5eed_50a4_c0ff_ee01;

/// The file of module `index`: `m{index}.gts`.
pub(crate) fn module_file(index: u64) -> String {
    format!("{}.gts", module_name(index))
}

/// Module `index` without its extension: `m{index}`.
pub(crate) fn module_name(index: u64) -> String {
    format!("m{index}")
}

/// The class module `index` exports: `M{index}`.
pub(crate) fn class_name(index: u64) -> String {
    format!("M{index}")
}

/// The version line for `version`: `// version: N`.
pub(crate) fn version_line(version: u64) -> String {
    format!("// version: {version}")
}

/// The `N` of the first line that is exactly a line comment `// version: N` (spaces around
/// the parts allowed), if any. Anything else on the line, or an `N` that is not a `u64`,
/// makes it an ordinary comment.
pub(crate) fn source_version(source: &str) -> Option<u64> {
    source.lines().find_map(|line| {
        let comment = line.trim().strip_prefix("//")?;
        let number = comment.trim_start().strip_prefix("version:")?;
        number.trim().parse().ok()
    })
}

/// `source` with its first version line replaced by the one for `version` (or such a line
/// added on top when it has none).
#[allow(dead_code)] // the worker's part: the orchestrator never edits a module
pub(crate) fn with_version(source: &str, version: u64) -> String {
    let line = version_line(version);
    let mut replaced = false;
    let mut out = String::with_capacity(source.len() + 8);
    for original in source.lines() {
        if !replaced && source_version(original).is_some() {
            out.push_str(&line);
            replaced = true;
        } else {
            out.push_str(original);
        }
        out.push('\n');
    }
    if replaced { out } else { format!("{line}\n{out}") }
}

/// The module graph: (file name, source) of modules `0..count`, each at version 1. The first
/// [`LEAVES`] import nothing and are imported by many (fan-in); the others form chains of three
/// (`a ← b ← c`, each importing the one before it), the head of a chain importing one or two
/// of the leaves and its tail one more leaf, and sometimes the head too (so one to three
/// imports each). Specifiers are relative, alternately with and without the extension.
/// Deterministic (a fixed seed).
///
/// The graph is kept shallow on purpose: an edit of a leaf invalidates the chains that
/// import it, an edit elsewhere at most three modules. A deep graph (one long chain)
/// turns nearly every edit into an invalidation of everything, so rows, stale ones included,
/// live for milliseconds and the audits see little.
#[allow(dead_code)] // the orchestrator's part: the worker never generates the graph
pub(crate) fn module_sources(count: u64) -> Vec<(String, String)> {
    let mut rng = fastrand::Rng::with_seed(GRAPH_SEED);
    (0..count)
        .map(|i| {
            let mut imports: Vec<u64> = Vec::new();
            if i >= LEAVES {
                let leaf = |rng: &mut fastrand::Rng| rng.u64(..LEAVES.min(i));
                match (i - LEAVES) % 3 {
                    0 => {
                        imports.push(leaf(&mut rng));
                        if rng.bool() {
                            let second = leaf(&mut rng);
                            if !imports.contains(&second) {
                                imports.push(second);
                            }
                        }
                    }
                    position => {
                        imports.push(i - 1);
                        if position == 2 {
                            imports.push(leaf(&mut rng));
                            if rng.bool() {
                                imports.push(i - 2);
                            }
                        }
                    }
                }
            }
            let mut source = format!("{}\n", version_line(1));
            for j in &imports {
                let specifier = if j % 2 == 0 { module_file(*j) } else { module_name(*j) };
                source
                    .push_str(&format!("import {{ {} }} from './{specifier}';\n", class_name(*j)));
            }
            let class = class_name(i);
            match imports.first() {
                Some(base) => source.push_str(&format!(
                    "export class {class} extends {} {{}}\n",
                    class_name(*base)
                )),
                None => source.push_str(&format!("export class {class} {{}}\n")),
            }
            (module_file(i), source)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_line_comment_is_a_version() {
        assert_eq!(source_version("// version: 3\n"), Some(3));
        assert_eq!(source_version("  //version:4  \r\nexport class A {}"), Some(4));
        assert_eq!(
            source_version("import x from './a';\n  //version:  1754000000123456 \n"),
            Some(1_754_000_000_123_456)
        );
        assert_eq!(
            source_version("export class A {}\n// version: 18446744073709551615"),
            Some(u64::MAX)
        );
        // The first well-formed line wins; malformed ones are ordinary comments.
        assert_eq!(source_version("// version: x\n// version: 5\n// version: 6\n"), Some(5));
        assert_eq!(source_version("// version: -1\n"), None);
        assert_eq!(source_version("// version: 18446744073709551616\n"), None);
        assert_eq!(source_version("// version: 3 (draft)\n"), None);
        assert_eq!(source_version("/* version: 3 */\n"), None);
        assert_eq!(source_version("const a = 1; // version: 3\n"), None);
        assert_eq!(source_version("// the version: 3\n"), None);
        assert_eq!(source_version(""), None);
        assert_eq!(source_version(&version_line(u64::MAX)), Some(u64::MAX), "round trip");
    }

    #[test]
    fn an_edit_replaces_the_version_line_and_keeps_the_rest() {
        let source = "// version: 1\nimport { M0 } from './m0';\nexport class M1 extends M0 {}\n";
        assert_eq!(
            with_version(source, 42),
            "// version: 42\nimport { M0 } from './m0';\nexport class M1 extends M0 {}\n"
        );
        assert_eq!(with_version("export class A {}\n", 7), "// version: 7\nexport class A {}\n");
        let malformed = "// version: x\n// version: 3\n";
        assert_eq!(with_version(malformed, 4), "// version: x\n// version: 4\n");
    }

    #[test]
    fn the_graph_has_leaves_chains_and_fan_in() {
        let sources = module_sources(40);
        assert_eq!(sources.len(), 40);
        let imports = |source: &str| source.matches("import ").count();
        assert!(sources[..4].iter().all(|(_, source)| imports(source) == 0));
        assert!(sources[4..].iter().all(|(_, source)| (1..=3).contains(&imports(source))));
        assert!(sources[5].1.contains("from './m4.gts'"), "odd modules continue a chain");
        let consumers_of_m0 = sources.iter().filter(|(_, s)| s.contains("'./m0.gts'")).count();
        assert!(consumers_of_m0 >= 4, "m0 has many consumers: {consumers_of_m0}");
        for (i, (name, source)) in sources.iter().enumerate() {
            assert_eq!(name, &format!("m{i}.gts"));
            assert_eq!(source_version(source), Some(1));
            assert!(source.contains(&format!("export class M{i} ")), "{source}");
        }
        assert_eq!(sources, module_sources(40), "deterministic");
    }
}
