//! The dependency rule, checked: `ARCHITECTURE.md`'s "Layers" table puts every top-level
//! module of `src/` in one layer; a module may use modules of its own layer or below, never
//! above, and no two modules may use each other, directly or through others. The edges are
//! the `crate::` paths in each module's code (comments and unit tests aside), in the manner
//! of rust-analyzer's tidy tests: a test that reads the source, so the rule cannot drift
//! from the map. The same reading keeps each file of `src/` within 600 lines and each
//! function within 100 (unit tests aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The layers from `ARCHITECTURE.md`, lowest first: the backticked names in the second
/// column of each row of the table under `## Layers`.
fn layers() -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("\n## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Layers` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter(|l| l.starts_with('|') && !l.contains("---"))
        .skip(1) // the header row
        .map(|row| {
            let modules = row.split('|').nth(2).unwrap_or_default();
            modules
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// The top-level modules of the library and the files of each (a file, or a folder).
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let src = root().join("src");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let files = if path.is_dir() {
            rust_files(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            vec![path]
        } else {
            continue;
        };
        out.insert(name, files);
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Whether a file holds unit tests only: `tests.rs`, or `<topic>_tests.rs` beside it.
fn is_test_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == "tests.rs" || n.ends_with("_tests.rs"))
}

/// A file's code without its comments and without its unit tests (a test file, or a
/// `#[cfg(test)]` item that is a module): tests may reach anywhere.
fn code(path: &Path) -> String {
    if is_test_file(path) {
        return String::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        if line.starts_with("#[cfg(test)]") {
            let next = lines.get(i + 1).map_or("", |l| l.trim());
            if next.starts_with("mod ") && next.ends_with(';') {
                // `mod tests;`: its file is skipped as a whole.
                i += 2;
                continue;
            }
            if next.starts_with("mod ") && lines[i].len() == line.len() {
                // An inline test module at the top level: last in the file here.
                break;
            }
        }
        let code = match line.find("//") {
            Some(0) => "",
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
        i += 1;
    }
    out
}

/// The top-level modules named by `crate::` paths in `code`, including grouped imports
/// (`use crate::{a, b::c};`).
fn uses(code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start && depth == 1 => {
                        found.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| known.contains(m));
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(name, files)| {
            let mut used = BTreeSet::new();
            for f in files {
                used.extend(uses(&code(f), &known));
            }
            used.remove(name);
            (name.clone(), used)
        })
        .collect()
}

/// Every cycle's modules, one strongly connected component (of two or more) each.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Reachability by a walk from each module; small graph, clarity over speed.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for m in graph.keys() {
        if done.contains(m) || !reaches[m].contains(m) {
            continue;
        }
        let component: Vec<String> = graph
            .keys()
            .filter(|o| reaches[m].contains(*o) && reaches[*o].contains(m))
            .cloned()
            .collect();
        done.extend(component.iter().cloned());
        out.push(component);
    }
    out
}

#[test]
fn every_module_is_in_one_layer_and_uses_only_its_layer_and_below() {
    let layers = layers();
    assert!(
        layers.len() >= 3,
        "ARCHITECTURE.md's Layers table: {layers:?}"
    );
    let graph = graph();
    let mut layer_of = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        for m in layer {
            assert!(
                layer_of.insert(m.clone(), i).is_none(),
                "`{m}` is in two layers of ARCHITECTURE.md"
            );
        }
    }
    let mut problems = Vec::new();
    for m in graph.keys() {
        if !layer_of.contains_key(m) {
            problems.push(format!(
                "src/{m} is in no layer: add it to ARCHITECTURE.md's Layers table"
            ));
        }
    }
    for m in layer_of.keys() {
        if !graph.contains_key(m) {
            problems.push(format!(
                "ARCHITECTURE.md's Layers table names `{m}`, which is not a module of src/"
            ));
        }
    }
    for (m, used) in &graph {
        for u in used {
            if let (Some(a), Some(b)) = (layer_of.get(m), layer_of.get(u)) {
                if b > a {
                    problems.push(format!(
                        "`{m}` (layer {a}) uses `{u}` (layer {b}): an upward edge"
                    ));
                }
            }
        }
    }
    for c in cycles(&graph) {
        problems.push(format!("a cycle through {}", c.join(", ")));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker itself: it sees grouped imports and full paths, ignores comments and unit
/// tests, and finds a cycle and an upward edge when there is one.
#[test]
fn the_checker_sees_edges_and_cycles() {
    let known: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
    let text = "use crate::{a::X, b};\nlet x = crate::c::f();\nuse crate::Token;\n";
    assert_eq!(uses(text, &known), ["a", "b", "c"].map(String::from).into());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.rs");
    std::fs::write(
        &file,
        "use crate::a;\n// crate::b in a comment\nfn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::d;\n}\n",
    )
    .unwrap();
    assert_eq!(uses(&code(&file), &known), ["a"].map(String::from).into());
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, u)| (m.into(), u.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
    // Today's graph is read at all: the library has modules and edges.
    let real = graph();
    assert!(real.len() > 10 && real.values().map(BTreeSet::len).sum::<usize>() > 20);
}

/// A file's lines before its unit tests (a top-level `#[cfg(test)] mod … {`); none for a
/// test file.
fn lines_before_tests(path: &Path) -> Vec<String> {
    if is_test_file(path) {
        return Vec::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0] == "#[cfg(test)]" && w[1].starts_with("mod ") && w[1].ends_with('{'))
        .unwrap_or(lines.len());
    lines[..end].iter().map(|l| l.to_string()).collect()
}

/// The functions in `lines` longer than `limit` lines, as `name (n lines)`: a function runs
/// from its `fn` line to the first line after it that closes at the same indentation
/// (rustfmt's layout, which `cargo fmt --check` enforces).
fn long_functions(lines: &[String], limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        let indent = line.len() - body.len();
        let Some(at) = body.find("fn ") else { continue };
        let head = &body[..at];
        let is_item = head.split_whitespace().all(|w| {
            ["pub", "async", "const", "unsafe", "extern"].contains(&w) || w.starts_with("pub(")
        });
        if !is_item || body.ends_with(';') {
            continue;
        }
        let close = " ".repeat(indent) + "}";
        let Some(len) = lines[i..]
            .iter()
            .position(|l| l == &close || l.starts_with(&(close.clone() + " ")))
        else {
            continue;
        };
        if len + 1 > limit {
            let name: String = body[at + 3..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(format!("{name} ({} lines)", len + 1));
        }
    }
    out
}

/// Each file of `src/` is at most 600 lines and each function at most 100, unit tests
/// aside: a concern that outgrows them is two concerns.
#[test]
fn no_file_over_600_lines_and_no_function_over_100() {
    let mut files = rust_files(&root().join("src"));
    files.sort();
    let mut too_long = Vec::new();
    for path in files {
        let lines = lines_before_tests(&path);
        let name = path.strip_prefix(root()).unwrap().display().to_string();
        if lines.len() > 600 {
            too_long.push(format!("{name}: {} lines", lines.len()));
        }
        for f in long_functions(&lines, 100) {
            too_long.push(format!("{name}: fn {f}"));
        }
    }
    assert!(too_long.is_empty(), "too long:\n{}", too_long.join("\n"));
}

#[test]
fn the_length_check_sees_a_long_function() {
    let mut lines = vec![
        "impl X {".to_string(),
        "    pub(crate) async fn long(&self) {".into(),
    ];
    lines.extend((0..99).map(|i| format!("        let _{i} = {i};")));
    lines.push("    }".into());
    lines.push("    fn short() {}".into());
    lines.push("}".into());
    assert_eq!(
        long_functions(&lines, 100),
        vec!["long (101 lines)".to_string()]
    );
    assert!(long_functions(&lines, 101).is_empty());
}
