//! The crate's layering, checked: each top-level module of `src/` uses only modules of the layers
//! before its own (the order `src/lib.rs` documents), so dependencies point one way and no import
//! cycle can come back unnoticed. A new top-level module must be given a layer here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. A module may use modules of earlier layers only (and itself).
const LAYERS: &[&[&str]] = &[
    &["types", "sharded", "identity"],
    &["config", "keys", "sim"],
    &["metrics"],
    &["load"],
    &["store", "profiles"],
    &["providers"],
    &["net"],
    &["http"],
    &["node"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/net/head.rs` → `net`); None for the
/// crate roots.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.trim_end_matches(".rs").to_string();
    (first != "lib" && first != "main").then_some(first)
}

/// Every `crate::<module>` named in code (comment lines, doc links included, are skipped).
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" // ").next().unwrap_or(code);
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
        // `use crate::{a, b::c}` groups.
        if let Some(i) = code.find("crate::{") {
            for part in code[i + "crate::{".len()..].split([',', '}']) {
                let name: String =
                    part.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn modules_depend_only_on_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer_of: BTreeMap<&str, usize> =
        LAYERS.iter().enumerate().flat_map(|(i, l)| l.iter().map(move |m| (*m, i))).collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let Some(module) = top_module(&src, f) else { continue };
        seen.insert(module.clone());
        let Some(&mine) = layer_of.get(module.as_str()) else {
            problems.push(format!("{}: module `{module}` has no layer in tests/layout.rs", f.display()));
            continue;
        };
        for used in uses(&std::fs::read_to_string(f).unwrap()) {
            if used == module {
                continue;
            }
            match layer_of.get(used.as_str()) {
                Some(&theirs) if theirs < mine => {}
                Some(_) => problems.push(format!(
                    "{}: `{module}` (layer {mine}) uses `crate::{used}` (layer {}), which is not below it",
                    f.display(),
                    layer_of[used.as_str()]
                )),
                None => problems.push(format!("{}: uses unknown module `crate::{used}`", f.display())),
            }
        }
    }
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
    // The check must have looked at the real tree, not an empty or moved one.
    for m in ["net", "load", "providers", "store", "node"] {
        assert!(seen.contains(m), "no files found for module `{m}` under {}", src.display());
    }
}

#[test]
fn the_checker_sees_uses_in_code_but_not_in_comments() {
    let text = "use crate::{config::Config, load};\n//! see [`crate::node`]\nlet x = crate::store::now_ms(); // crate::net\n";
    let got: Vec<String> = uses(text).into_iter().collect();
    assert_eq!(got, ["config", "load", "store"]);
}
