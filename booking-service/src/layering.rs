//! The import rule, checked: `store/` and `domain/` import only each other,
//! never what sits above them (the transport, the jobs, the metrics, the
//! wiring), so the layers cannot form a circle again without this test
//! failing. memory-service runs this same file (`#[path]` in its lib.rs).

use std::{fs, path::Path};

/// The only modules `store/` and `domain/` may name with `crate::`.
const BELOW: &[&str] = &["domain", "store"];

/// The first path segment of every `crate::…` import or path in `source`,
/// `use crate::{a::b, c}` giving `a` and `c`.
fn crate_modules(source: &str) -> Vec<String> {
    let compact: String = source.split_whitespace().collect();
    let mut modules = Vec::new();
    for (at, _) in compact.match_indices("crate::") {
        let rest = &compact[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut segment_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => segment_start = true,
                    _ if segment_start => {
                        segment_start = false;
                        modules.push(identifier(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            modules.push(identifier(rest));
        }
    }
    modules
}

fn identifier(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// `(file, module)` for every upward import under `dir`.
fn upward_imports(dir: &Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(upward_imports(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let source = fs::read_to_string(&path).unwrap_or_default();
            for module in crate_modules(&source) {
                if !BELOW.contains(&module.as_str()) {
                    found.push((path.display().to_string(), module));
                }
            }
        }
    }
    found
}

#[test]
fn store_and_domain_import_nothing_above_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for layer in ["store", "domain"] {
        let upward = upward_imports(&src.join(layer));
        assert!(upward.is_empty(), "{layer}/ imports upward: {upward:?}");
    }
}

#[test]
fn grouped_and_plain_imports_are_both_seen() {
    let source =
        "use crate::{\n    domain::x,\n    jobs::{A, B},\n};\nfn f() { crate::metrics::g(); }";
    assert_eq!(crate_modules(source), ["domain", "jobs", "metrics"]);
}
