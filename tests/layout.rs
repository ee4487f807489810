//! The architecture's rules, checked on the source: no import cycle between
//! the top-level modules of `src/`, and no source file over 1,000 lines
//! before its tests. (Reads the crate's own files, found from the manifest
//! directory the compiler records; no environment is read at run time.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn is_test_file(p: &Path) -> bool {
    let name = p.file_name().unwrap().to_string_lossy();
    name.ends_with("_tests.rs") || name == "tests.rs"
}

/// The code before the first `#[cfg(test)]`, without comment lines.
fn code(p: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(p).expect("source");
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .map(str::to_string)
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_source_file_is_over_1000_lines_before_its_tests() {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|p| !is_test_file(p))
        .map(|p| (p, code(p).len()))
        .filter(|(_, n)| *n > 1000)
        .map(|(p, n)| format!("{} ({n} lines)", p.display()))
        .collect();
    assert!(long.is_empty(), "split by concern: {long:?}");
}

#[test]
fn the_top_level_modules_import_no_cycle() {
    let root = src();
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in files.iter().filter(|p| !is_test_file(p)) {
        let rel = p.strip_prefix(&root).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let entry = deps.entry(top.clone()).or_default();
        for line in code(p) {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for part in line.split("crate::").skip(1) {
                let m: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !m.is_empty() && m != top {
                    entry.insert(m);
                }
            }
        }
    }
    // A module that reaches itself through its imports is in a cycle.
    let mut cycles = Vec::new();
    for start in deps.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&String> = deps[start].iter().collect();
        while let Some(m) = stack.pop() {
            if m == start {
                cycles.push(start.clone());
                break;
            }
            if seen.insert(m.clone()) {
                if let Some(next) = deps.get(m) {
                    stack.extend(next.iter());
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules in an import cycle: {cycles:?}; imports: {deps:#?}"
    );
}
