//! The config file as the Python SDK reads it: a differential test with Python's
//! `configparser.ConfigParser()` (what `databricks-sdk` uses) as the oracle.
//!
//! Generated files (CRLF and lone CR, a BOM, tabs and odd white space, `:`/`=`, case
//! variants, comments everywhere, continuation values with blank lines, indented keys and
//! headers, comments after headers, repeated `[DEFAULT]`, stray lines, missing profiles) are
//! read by configparser and by our `ini` module, then edited by us as a rotation edits them.
//! Per file: either both refuse it, or both read the same token and host in every profile,
//! and after our edit configparser reads the same values everywhere except the target
//! profile's token (and its host, when we added one), and the only lines that changed are the
//! token's (and the added host's). The seed is random per run and printed on failure; set
//! `PAT_INI_SEED` to replay one.

use pat_rotator::ini;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::process::Command;

const CASES: usize = 1500;
const NAMES: [&str; 7] = [
    "DEFAULT",
    "prod",
    "dev",
    "Dev",
    "ci",
    "sandbox_1",
    "__settings__",
];
const TARGETS: [&str; 5] = ["DEFAULT", "prod", "dev", "ci", "missing"];
const HOST: &str = "https://adb-1.azuredatabricks.net";

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn gen_doc(rng: &mut StdRng) -> String {
    let eols = ["\n", "\n", "\n", "\r\n", "\r\n", "\r"];
    let eol = *pick(rng, &eols);
    let indents = ["", "", "", " ", "\t", "  ", "    ", "\u{c}", "\u{a0}"];
    let mut out = String::new();
    if rng.random_bool(0.03) {
        out.push('\u{feff}');
    }
    if rng.random_bool(0.2) {
        out.push_str(&format!(
            "# databricks config{eol};second comment{eol}{eol}"
        ));
    }
    if rng.random_bool(0.02) {
        out.push_str(&format!("orphan = before any section{eol}"));
    }
    let sections = rng.random_range(1..=5);
    for _ in 0..sections {
        let name = *pick(rng, &NAMES);
        let header_indent = if rng.random_bool(0.1) {
            *pick(rng, &indents)
        } else {
            ""
        };
        let after = *pick(
            rng,
            &[
                "",
                "",
                "",
                "  # prod",
                " ; main workspace",
                "\t;x",
                " [x]",
                "  ",
            ],
        );
        out.push_str(&format!("{header_indent}[{name}]{after}{eol}"));
        let mut keys = vec![
            "host",
            "token",
            "Token",
            "TOKEN",
            "cluster_id",
            "auth_type",
            "jobs-api-version",
        ];
        let entries = rng.random_range(0..=4);
        for _ in 0..entries {
            if keys.is_empty() {
                break;
            }
            let key = keys.remove(rng.random_range(0..keys.len()));
            if key.eq_ignore_ascii_case("token") {
                keys.retain(|k| !k.eq_ignore_ascii_case("token"));
            }
            let indent = if rng.random_bool(0.2) {
                *pick(rng, &indents)
            } else {
                ""
            };
            let sep = *pick(rng, &["=", " = ", ":", " : ", "  =\t", "= ", " :"]);
            let value = match key.to_ascii_lowercase().as_str() {
                "token" => match rng.random_range(0..6) {
                    0 => String::new(),
                    1 => format!("dapi{:08x} ; note", rng.random::<u32>()),
                    _ => format!(
                        "dapi{:08x}{}",
                        rng.random::<u32>(),
                        pick(rng, &["", "  ", "\t"])
                    ),
                },
                "host" => HOST.to_string(),
                _ => pick(
                    rng,
                    &[
                        "abc",
                        "x ; inline text",
                        "2.1",
                        "value with spaces  ",
                        "é",
                        "a=b:c",
                    ],
                )
                .to_string(),
            };
            out.push_str(&format!("{indent}{key}{sep}{value}{eol}"));
            // A continuation, perhaps after blank or comment lines, perhaps indented too little
            // to continue (then it is a key of its own, or a stray line).
            if rng.random_bool(0.25) {
                for _ in 0..rng.random_range(0..=2) {
                    let fillers = [eol, "  ", "# inside"];
                    let filler = fillers[rng.random_range(0..fillers.len())];
                    out.push_str(filler);
                    if !out.ends_with(eol) {
                        out.push_str(eol);
                    }
                }
                let cont_indent = *pick(rng, &["  ", "\t", " \t", "      ", indent]);
                let text = *pick(
                    rng,
                    &[
                        "continued line",
                        "dapiCONT",
                        "[prod]",
                        "k = v",
                        "; not a comment?",
                    ],
                );
                out.push_str(&format!("{cont_indent}{text}{eol}"));
            }
            if rng.random_bool(0.15) {
                let ci = *pick(rng, &["", "  ", "\t"]);
                out.push_str(&format!("{ci}{} note{eol}", pick(rng, &["#", ";"])));
            }
            if rng.random_bool(0.1) {
                out.push_str(eol);
            }
        }
        if rng.random_bool(0.04) {
            out.push_str(&format!(
                "{}{eol}",
                pick(
                    rng,
                    &["just some words", "= orphan value", "    line two", "[]"]
                )
            ));
        }
        if rng.random_bool(0.4) {
            out.push_str(eol);
        }
    }
    if rng.random_bool(0.25) {
        while out.ends_with(['\n', '\r']) {
            out.pop();
        }
    }
    out
}

/// Reads every file of a directory with configparser as the SDK does (`ConfigParser()`,
/// `read(path)`), printing per file either the error class or the sections and defaults.
const ORACLE: &str = r#"
import configparser, json, os, sys
out = {}
for name in sorted(os.listdir(sys.argv[1])):
    cp = configparser.ConfigParser()
    try:
        cp.read(os.path.join(sys.argv[1], name), encoding="utf-8")
    except configparser.Error as e:
        out[name] = {"error": type(e).__name__}
        continue
    out[name] = {"sections": {s: dict(v) for s, v in cp._sections.items()}, "defaults": dict(cp.defaults())}
print(json.dumps(out))
"#;

fn python() -> String {
    std::env::var("PAT_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A profile's key as configparser's reading gives it to the SDK (empty reads as absent).
fn py_value(read: &serde_json::Value, profile: &str, key: &str) -> Option<String> {
    let section = if profile == "DEFAULT" {
        &read["defaults"]
    } else {
        &read["sections"][profile]
    };
    section[key]
        .as_str()
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// All values configparser read, as (section, key) -> value, for comparing two readings.
fn all_values(read: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    if let Some(d) = read["defaults"].as_object() {
        for (k, v) in d {
            out.push(("DEFAULT".into(), k.clone(), v.as_str().unwrap_or("").into()));
        }
    }
    if let Some(sections) = read["sections"].as_object() {
        for (s, kv) in sections {
            out.push((s.clone(), String::new(), String::new()));
            for (k, v) in kv.as_object().into_iter().flatten() {
                out.push((s.clone(), k.clone(), v.as_str().unwrap_or("").into()));
            }
        }
    }
    out.sort();
    out
}

/// Lines removed from `a` and lines added in `b` (longest common subsequence of lines).
fn line_diff<'a>(a: &[&'a str], b: &[&'a str]) -> (Vec<&'a str>, Vec<&'a str>) {
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            added.push(b[j]);
            j += 1;
        } else {
            removed.push(a[i]);
            i += 1;
        }
    }
    (removed, added)
}

fn lines_of(doc: &str) -> Vec<&str> {
    doc.split_inclusive(['\n', '\r'])
        .map(|l| l.trim_end_matches(['\n', '\r']))
        .filter(|l| !l.is_empty())
        .collect()
}

struct Case {
    doc: String,
    target: &'static str,
    new_token: String,
    edited: Result<String, ini::IniError>,
    added_host: bool,
}

impl Case {
    /// Case `i`: `doc` with a new token written into `target` by our editor.
    fn new(i: usize, doc: String, target: &'static str) -> Case {
        let new_token = format!("dapinew{i:05}");
        let (edited, added_host) = edit(&doc, target, &new_token);
        Case {
            doc,
            target,
            new_token,
            edited,
            added_host,
        }
    }
}

/// Our edit, as a rotation makes it: the token, and the host when the profile has none.
fn edit(doc: &str, target: &str, new_token: &str) -> (Result<String, ini::IniError>, bool) {
    let has_host = match ini::get_value(doc, target, "host") {
        Ok(h) => h.is_some(),
        Err(e) => return (Err(e), false),
    };
    let mut pairs = Vec::new();
    if !has_host {
        pairs.push(("host", HOST));
    }
    pairs.push(("token", new_token));
    (ini::set_values(doc, target, &pairs), !has_host)
}

fn run_oracle(dir: &std::path::Path) -> serde_json::Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(ORACLE)
        .arg(dir)
        .output()
        .expect("python3 is on the machine image");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `count` generated files, each with a target profile and our edit, from `seed`.
fn gen_cases(seed: u64, count: usize) -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let doc = gen_doc(&mut rng);
            let target: &'static str = TARGETS[rng.random_range(0..TARGETS.len())];
            Case::new(i, doc, target)
        })
        .collect()
}

/// A directory with each case's file (`NNNNN-a`) and our edit of it (`NNNNN-b`).
fn write_cases(cases: &[Case]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, c) in cases.iter().enumerate() {
        std::fs::write(dir.path().join(format!("{i:05}-a")), &c.doc).unwrap();
        if let Ok(e) = &c.edited {
            std::fs::write(dir.path().join(format!("{i:05}-b")), e).unwrap();
        }
    }
    dir
}

fn check(cases: &[Case], seed: &str) -> usize {
    let dir = write_cases(cases);
    let seen = run_oracle(dir.path());
    let mut accepted = 0;
    for (i, c) in cases.iter().enumerate() {
        let ctx = || {
            format!(
                "{seed}, case #{i}, target [{}], file:\n{:?}",
                c.target, c.doc
            )
        };
        let original = &seen[format!("{i:05}-a")];
        let py_refuses = original.get("error").is_some();
        let we_refuse = ini::validate(&c.doc).is_err();
        assert_eq!(
            we_refuse,
            py_refuses,
            "configparser {}; ours {:?}; {}",
            original,
            ini::validate(&c.doc),
            ctx()
        );
        if py_refuses {
            assert!(
                c.edited.is_err(),
                "we edited a file the SDK refuses; {}",
                ctx()
            );
            continue;
        }
        accepted += 1;
        for p in NAMES.iter().chain(["missing"].iter()) {
            for key in ["token", "host"] {
                assert_eq!(
                    ini::get_value(&c.doc, p, key).unwrap(),
                    py_value(original, p, key),
                    "reading {key} of [{p}]; {}",
                    ctx()
                );
            }
        }
        // A file the SDKs' parsers split differently is read, never edited (the three-reader
        // test below shows why).
        if let Err(e @ ini::IniError::ReadersDisagree { .. }) = &c.edited {
            assert!(e.to_string().starts_with("line "), "{e}");
            continue;
        }
        let edited = c
            .edited
            .as_ref()
            .unwrap_or_else(|e| panic!("{e}; {}", ctx()));
        let after = &seen[format!("{i:05}-b")];
        assert!(
            after.get("error").is_none(),
            "the SDK refuses our edit {after}:\n{edited:?}\n{}",
            ctx()
        );
        assert_eq!(
            py_value(after, c.target, "token"),
            Some(c.new_token.clone()),
            "{edited:?}\n{}",
            ctx()
        );
        assert_eq!(
            py_value(after, c.target, "host").as_deref(),
            Some(HOST)
                .filter(|_| c.added_host)
                .or(py_value(original, c.target, "host").as_deref()),
            "{}",
            ctx()
        );
        // Every other value is untouched.
        let target_section = c.target.to_string();
        let strip = |v: Vec<(String, String, String)>| -> Vec<(String, String, String)> {
            v.into_iter()
                .filter(|(s, k, _)| {
                    !(s == &target_section
                        && (k == "token" || (k == "host" && c.added_host) || k.is_empty()))
                })
                .collect()
        };
        assert_eq!(
            strip(all_values(original)),
            strip(all_values(after)),
            "other values changed:\n{edited:?}\n{}",
            ctx()
        );
        // And only the token's lines (and an added host line) changed.
        let (removed, added) = line_diff(&lines_of(&c.doc), &lines_of(edited));
        for line in &added {
            let t = line.trim();
            let (key, value) = t.split_once(['=', ':']).unwrap_or((t, ""));
            let (key, value) = (key.trim().to_lowercase(), value.trim());
            let ours = (key == "token" && value == c.new_token)
                || (c.added_host && key == "host" && value == HOST)
                || t == format!("[{}]", c.target);
            assert!(
                ours,
                "added line {line:?} is not ours:\n{edited:?}\n{}",
                ctx()
            );
        }
        for line in &removed {
            let t = line.trim_start().to_lowercase();
            let token_line = t.starts_with("token");
            let continuation = line.starts_with(|ch: char| ch.is_whitespace());
            assert!(
                token_line || continuation,
                "removed line {line:?} was not the token's:\n{edited:?}\n{}",
                ctx()
            );
        }
    }
    accepted
}

#[test]
fn our_reading_and_editing_agree_with_python_configparser() {
    let seed: u64 = std::env::var("PAT_INI_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let label = format!("seed {seed} (replay with PAT_INI_SEED={seed})");
    println!("differential configparser test: {CASES} cases, {label}");
    let cases = gen_cases(seed, CASES);
    let accepted = check(&cases, &label);
    println!(
        "{accepted} of {CASES} files accepted by both, {} refused by both",
        CASES - accepted
    );
    assert!(
        accepted > CASES / 3,
        "the generator makes too few valid files to test editing"
    );
    assert!(
        accepted < CASES,
        "the generator never makes a file the SDK refuses"
    );
}

/// The reproducers from the issue, as fixed cases (`P` = a port in the originals).
#[test]
fn the_reported_reproducers() {
    let host_p = "http://127.0.0.1:8080";
    let docs: Vec<(String, &'static str)> = vec![
        (format!("[dev]\n\thost={host_p}\n\ttoken:dapiX\n"), "dev"),
        ("[dev]  # prod\nhost = h\ntoken = dapiX\n".into(), "dev"),
        ("[prod] ; main workspace\ntoken = dapiX\n".into(), "prod"),
        ("[DEFAULT]\t;x\ntoken = dapiX\n".into(), "DEFAULT"),
        (
            format!("[ci]\r\nhost={host_p}\r\n\r\n      token = dapiX\r\n"),
            "ci",
        ),
        ("[DEFAULT]\ntoken = \n\n \tdapiX\n".into(), "DEFAULT"),
        (
            "[DEFAULT]\nhost = h\n[DEFAULT]\ntoken = dapiX\n".into(),
            "DEFAULT",
        ),
        ("[DEFAULT]\r\n\t[prod]\r\n".into(), "DEFAULT"),
        ("[dev]\n= orphan value\n".into(), "dev"),
        ("[dev]\njust some words\n".into(), "dev"),
        ("[sandbox_1]\r\n    line two\r\n".into(), "sandbox_1"),
    ];
    let cases: Vec<Case> = docs
        .into_iter()
        .enumerate()
        .map(|(i, (doc, target))| Case::new(i, doc, target))
        .collect();
    let accepted = check(&cases, "fixed reproducers");
    assert_eq!(
        accepted, 8,
        "the first eight are valid, the last three refused"
    );
}

/// How one reader (the Go SDK's loader, the JS SDK's) read each file: per file, an error or
/// each profile's keys as the SDK resolves them.
fn run_reader(command: &[String], dir: &std::path::Path) -> serde_json::Value {
    let out = Command::new(&command[0])
        .args(&command[1..])
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A profile's keys as a reader resolved them (`None`: the file has no such profile).
fn profile_of<'a>(read: &'a serde_json::Value, profile: &str) -> Option<&'a serde_json::Value> {
    read["profiles"].get(profile)
}

/// What one reader's view of a case says, against configparser's.
#[derive(Default)]
struct ReaderTally {
    refused_before: usize,
    disagreed: usize,
    example: Option<String>,
}

/// One file, three readers, one answer: each generated file and our edit of it are read by
/// configparser (the Python SDK), the Go SDK's own loader and the JS SDK's own loader. Where
/// configparser accepts a file, each other reader that accepts it too must accept our edit,
/// see every other profile exactly as before, and see the new token in the target profile,
/// unless it already read that profile's token differently from configparser (a file the
/// readers disagree on: then its view of the token must not change, never worse). Run by
/// `scripts/test.sh` once the SDKs are installed: `PAT_GO_INI_READER` (the built
/// `tests/go/inireader`) and `PAT_JS_INI_READER` (node, `tests/sdk/ini_reader.js` and the
/// SDK's node_modules, space separated); `PAT_INI_CASES` and `PAT_INI_SEEDS` run longer.
#[test]
#[ignore = "needs the Go and JS SDKs: run by scripts/test.sh"]
fn three_readers_see_only_the_target_token_change() {
    let env = |name: &str| std::env::var(name).ok();
    let go: Vec<String> = vec![env("PAT_GO_INI_READER").expect("PAT_GO_INI_READER")];
    let js: Vec<String> = env("PAT_JS_INI_READER")
        .expect("PAT_JS_INI_READER")
        .split(' ')
        .map(str::to_string)
        .collect();
    let cases_per_seed: usize = env("PAT_INI_CASES")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let seeds: Vec<u64> = match env("PAT_INI_SEED").and_then(|s| s.parse().ok()) {
        Some(one) => vec![one],
        None => (0..env("PAT_INI_SEEDS")
            .and_then(|s| s.parse().ok())
            .unwrap_or(3))
            .map(|_| rand::random())
            .collect(),
    };
    let mut tallies = [ReaderTally::default(), ReaderTally::default()];
    let mut files = 0;
    for seed in &seeds {
        let label = format!("seed {seed} (replay with PAT_INI_SEED={seed})");
        let cases = gen_cases(*seed, cases_per_seed);
        let dir = write_cases(&cases);
        files += 2 * cases.len();
        let python = run_oracle(dir.path());
        let readers = [
            ("go", run_reader(&go, dir.path())),
            ("js", run_reader(&js, dir.path())),
        ];
        for (i, c) in cases.iter().enumerate() {
            let Ok(edited) = &c.edited else { continue };
            let (a, b) = (format!("{i:05}-a"), format!("{i:05}-b"));
            let py_token = py_value(&python[&a], c.target, "token");
            for ((name, read), tally) in readers.iter().zip(tallies.iter_mut()) {
                let ctx = || {
                    format!(
                        "{name} reader, {label}, case #{i}, target [{}]\nbefore: {:?}\nafter: {edited:?}\n{name} read before: {}\nafter: {}",
                        c.target, c.doc, read[&a], read[&b]
                    )
                };
                if read[&a].get("error").is_some() {
                    tally.refused_before += 1;
                    continue;
                }
                assert!(
                    read[&b].get("error").is_none(),
                    "our edit made the file unreadable: {}",
                    ctx()
                );
                let names: std::collections::BTreeSet<&String> = [&read[&a], &read[&b]]
                    .iter()
                    .filter_map(|r| r["profiles"].as_object())
                    .flat_map(|p| p.keys())
                    .collect();
                for p in names.into_iter().filter(|p| p.as_str() != c.target) {
                    assert_eq!(
                        profile_of(&read[&a], p),
                        profile_of(&read[&b], p),
                        "profile [{p}] changed: {}",
                        ctx()
                    );
                }
                let token = |r: &serde_json::Value| {
                    profile_of(r, c.target).and_then(|p| p["token"].as_str().map(str::to_string))
                };
                let (before, after) = (token(&read[&a]), token(&read[&b]));
                // Whether the profile is there at all (DEFAULT: whether it holds any key; Go's
                // ini always has one, empty).
                let py_has = match c.target {
                    "DEFAULT" => python[&a]["defaults"]
                        .as_object()
                        .is_some_and(|d| !d.is_empty()),
                    t => ini::sections(&c.doc).is_ok_and(|s| s.iter().any(|s| s == t)),
                };
                let has = profile_of(&read[&a], c.target).is_some_and(|p| {
                    c.target != "DEFAULT" || p.as_object().is_some_and(|o| !o.is_empty())
                });
                if before == py_token && has == py_has {
                    assert_eq!(after.as_deref(), Some(c.new_token.as_str()), "{}", ctx());
                } else {
                    tally.disagreed += 1;
                    tally.example.get_or_insert_with(ctx);
                    // Never worse: unchanged, or now the token written.
                    assert!(
                        after == before || after.as_deref() == Some(c.new_token.as_str()),
                        "a reader that disagreed now reads another token: {}",
                        ctx()
                    );
                }
            }
        }
    }
    for ((name, _), t) in [("go", ()), ("js", ())].iter().zip(&tallies) {
        println!(
            "{name}: {} files read; refused {} originals configparser accepted; read the target's token otherwise than configparser in {}",
            files, t.refused_before, t.disagreed
        );
        if let Some(e) = &t.example {
            println!("first disagreement:\n{e}");
        }
    }
}
