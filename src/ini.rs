//! Reading and editing the Databricks config file exactly as the Python SDK reads it.
//!
//! Invariant: [`set_values`] changes only the lines of the keys it is given inside one
//! profile (the key's own line, and the continuation lines of its old value), or adds the
//! keys or the profile when missing; every other byte stays identical: other profiles,
//! comments, ordering, spacing, CRLF line ends, a missing final newline. A file the SDK would
//! refuse is refused here too, and never edited.
//!
//! Written by hand on purpose: the INI crates either rewrite the file (rust-ini,
//! configparser, ini-doc) or keep raw lines but drop line terminators and know only `=`
//! (ini-roundtrip); none implements configparser's indentation rules. The grammar is Python
//! 3's `configparser.ConfigParser()` with its defaults (`RawConfigParser._read` in
//! `Lib/configparser.py`), which is what `databricks-sdk` uses:
//!
//! - Lines end at `\n`, `\r\n` or a lone `\r` (Python's universal newlines). "Whitespace" is
//!   Python's `str.isspace` (Unicode white space plus `\x1c`-`\x1f`), for stripping and for
//!   a line's indentation (the index of its first non-space character).
//! - A line whose stripped text starts with `#` or `;` is a comment wherever it is, even
//!   inside a value; it neither ends nor extends the value. There are no inline comments:
//!   ` ; text` after a value is part of the value.
//! - A blank line inside a value belongs to it (`empty_lines_in_values`), so an indented
//!   line after blank lines still continues the value; trailing blank lines are dropped.
//! - A line indented deeper than the line that started the current key continues that key's
//!   value. Right after a section header there is no current key, so an indented line there
//!   is a key (or a header) of its own.
//! - Otherwise a line is a section header if its stripped text starts with `[` and has a `]`
//!   after at least one character: the name runs to the *last* `]`, and anything after it
//!   (`[dev]  # prod`) is ignored. Names are case-sensitive; `[DEFAULT]` is the defaults
//!   section, and repeating it merges the blocks.
//! - Otherwise it is `key <= or :> value`: the key runs to the first `=` or `:`, is stripped
//!   and lower-cased; a line without either, or with an empty key, makes the file invalid.
//! - A key before any section header, a repeated named section, or a repeated key within a
//!   section (across repeated `[DEFAULT]` blocks too) makes the file invalid.
//! - A named profile does not inherit `[DEFAULT]`'s keys: the SDK reads a profile from
//!   `ConfigParser._sections`, not through configparser's fallback.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IniError {
    #[error(
        "line {line}: section [{section}] appears twice (the Databricks SDK refuses such a file)"
    )]
    DuplicateSection { line: usize, section: String },
    #[error("line {line}: key {key:?} appears twice in [{section}] (the Databricks SDK refuses such a file)")]
    DuplicateKey {
        line: usize,
        section: String,
        key: String,
    },
    #[error("line {line}: text before the first [section] header")]
    KeyOutsideSection { line: usize },
    #[error("line {line}: neither a [section], a `key = value` line, a comment nor an indented continuation")]
    NotAnEntry { line: usize },
    #[error("a value for {key:?} must be one non-empty line without surrounding spaces")]
    BadValue { key: String },
    /// The SDKs' parsers read the file differently, so an edit for one could change another
    /// profile for another (ARCHITECTURE.md, "One file, three readers").
    #[error("line {line}: {why}; the Python, Go and JavaScript SDKs read this file differently, so pat-rotator will not edit it: fix that line")]
    ReadersDisagree { line: usize, why: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Nothing but white space.
    Blank,
    Comment,
    Section(String),
    /// `value_start`: byte offset in the line where the value begins.
    Entry {
        key: String,
        value_start: usize,
    },
    /// Continues the value of the entry on line `entry` (an index into the lines).
    Continuation {
        entry: usize,
    },
}

#[derive(Debug, Clone)]
struct Line<'a> {
    /// The line without its terminator.
    text: &'a str,
    /// `"\n"`, `"\r\n"`, `"\r"` or `""` (last line without a newline).
    eol: &'a str,
    kind: Kind,
}

/// Python's `str.isspace`: Unicode white space plus the four information separators.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// The index (in characters, as Python counts) of the first non-space character.
fn indent_of(text: &str) -> usize {
    text.chars().take_while(|c| is_py_space(*c)).count()
}

/// The leading white space of a line, as written.
fn indent_text(text: &str) -> &str {
    &text[..text.len() - text.trim_start_matches(is_py_space).len()]
}

fn split_lines(doc: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = doc;
    while !rest.is_empty() {
        match rest.find(['\n', '\r']) {
            Some(i) => {
                let eol_len = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                out.push((&rest[..i], &rest[i..i + eol_len]));
                rest = &rest[i + eol_len..];
            }
            None => {
                out.push((rest, ""));
                rest = "";
            }
        }
    }
    out
}

/// The section name if `stripped` is a header line (`SECTCRE = \[(?P<header>.+)\]`, matched
/// at the start: the name runs to the last `]`).
fn header_name(stripped: &str) -> Option<&str> {
    let inner = stripped.strip_prefix('[')?;
    let close = inner.rfind(']')?;
    (close > 0).then(|| &inner[..close])
}

fn parse(doc: &str) -> Result<Vec<Line<'_>>, IniError> {
    let mut lines: Vec<Line<'_>> = Vec::new();
    let mut seen_sections: Vec<String> = Vec::new();
    let mut seen_keys: Vec<(String, String)> = Vec::new();
    let mut section: Option<String> = None;
    // The line index of the key whose value is open, and the indentation of the line that
    // started the current key or section.
    let mut open_entry: Option<usize> = None;
    let mut indent_level = 0usize;
    for (n, (text, eol)) in split_lines(doc).into_iter().enumerate() {
        let stripped = py_strip(text);
        let kind = if stripped.starts_with(['#', ';']) {
            Kind::Comment
        } else if stripped.is_empty() {
            Kind::Blank
        } else if let (Some(entry), true) = (open_entry, indent_of(text) > indent_level) {
            Kind::Continuation { entry }
        } else {
            indent_level = indent_of(text);
            if let Some(name) = header_name(stripped) {
                if name != "DEFAULT" {
                    if seen_sections.iter().any(|s| s == name) {
                        return Err(IniError::DuplicateSection {
                            line: n + 1,
                            section: name.to_string(),
                        });
                    }
                    seen_sections.push(name.to_string());
                }
                section = Some(name.to_string());
                open_entry = None;
                Kind::Section(name.to_string())
            } else {
                let Some(current) = section.as_ref() else {
                    return Err(IniError::KeyOutsideSection { line: n + 1 });
                };
                // OPTCRE: the key runs to the first delimiter.
                let Some(sep) = text.find(['=', ':']) else {
                    return Err(IniError::NotAnEntry { line: n + 1 });
                };
                let key = py_strip(&text[..sep]).to_lowercase();
                if key.is_empty() {
                    return Err(IniError::NotAnEntry { line: n + 1 });
                }
                if seen_keys.iter().any(|(s, k)| s == current && *k == key) {
                    return Err(IniError::DuplicateKey {
                        line: n + 1,
                        section: current.clone(),
                        key,
                    });
                }
                seen_keys.push((current.clone(), key.clone()));
                let after = &text[sep + 1..];
                let value_start =
                    sep + 1 + (after.len() - after.trim_start_matches(is_py_space).len());
                open_entry = Some(lines.len());
                Kind::Entry { key, value_start }
            }
        };
        lines.push(Line { text, eol, kind });
    }
    Ok(lines)
}

/// The value of the entry on line `entry`, joined as configparser joins it: the first line's
/// value, then one line per blank line and continuation line, trailing white space dropped.
fn value_at(lines: &[Line<'_>], entry: usize) -> String {
    let Kind::Entry { value_start, .. } = lines[entry].kind else {
        return String::new();
    };
    let mut parts = vec![py_strip(&lines[entry].text[value_start..])];
    for line in &lines[entry + 1..] {
        match line.kind {
            Kind::Continuation { entry: e } if e == entry => parts.push(py_strip(line.text)),
            Kind::Blank => parts.push(""),
            Kind::Comment => {}
            _ => break,
        }
    }
    parts.join("\n").trim_end_matches(is_py_space).to_string()
}

/// The line index of `key` in `profile` (any of its blocks), if present.
fn find_entry(lines: &[Line<'_>], profile: &str, key: &str) -> Option<usize> {
    let mut current: Option<&str> = None;
    lines
        .iter()
        .enumerate()
        .find_map(|(i, line)| match &line.kind {
            Kind::Section(name) => {
                current = Some(name);
                None
            }
            Kind::Entry { key: k, .. } if current == Some(profile) && k == key => Some(i),
            _ => None,
        })
}

/// The value of `key` in `profile` as the Databricks SDK reads it (the profile's own keys
/// only: a named profile does not inherit `[DEFAULT]`). `Ok(None)` when absent or empty.
pub fn get_value(doc: &str, profile: &str, key: &str) -> Result<Option<String>, IniError> {
    let lines = parse(doc)?;
    Ok(find_entry(&lines, profile, key)
        .map(|i| value_at(&lines, i))
        .filter(|v| !v.is_empty()))
}

/// Validates the file as the SDK would (duplicates and stray lines are errors).
/// The section headers of `doc` as configparser reads them, in order (`DEFAULT` included).
pub fn sections(doc: &str) -> Result<Vec<String>, IniError> {
    Ok(parse(doc)?
        .into_iter()
        .filter_map(|l| match l.kind {
            Kind::Section(name) => Some(name),
            _ => None,
        })
        .collect())
}

pub fn validate(doc: &str) -> Result<(), IniError> {
    parse(doc).map(|_| ())
}

/// Sets `key = value` for each pair inside `[profile]`, keeping every other byte.
/// Existing keys keep their spelling and spacing; only the value text changes, and the old
/// value's continuation lines go. Missing keys are added right after the profile's header,
/// indented like the line that follows it, so that no following line changes meaning (an
/// indented line after a new key would otherwise become part of its value).
pub fn set_values(doc: &str, profile: &str, pairs: &[(&str, &str)]) -> Result<String, IniError> {
    for (key, value) in pairs {
        check_value(key, value)?;
    }
    let lines = parse(doc)?;
    readers_agree(&lines)?;
    let eol_style = lines
        .iter()
        .map(|l| l.eol)
        .find(|e| !e.is_empty())
        .unwrap_or("\n");

    let Some(header) = lines
        .iter()
        .position(|l| l.kind == Kind::Section(profile.to_string()))
    else {
        let ends_open = lines.last().is_some_and(|l| l.eol.is_empty());
        return Ok(append_section(doc, ends_open, eol_style, profile, pairs));
    };

    let mut replaced: Vec<Option<String>> = vec![None; lines.len()];
    let mut drop_line = vec![false; lines.len()];
    let mut missing: Vec<(&str, &str)> = Vec::new();
    for (key, value) in pairs {
        match find_entry(&lines, profile, key) {
            Some(i) => {
                let Kind::Entry { value_start, .. } = lines[i].kind else {
                    continue;
                };
                let text = lines[i].text;
                let old_value = &text[value_start..];
                let trailing_ws = &old_value[old_value.trim_end_matches(is_py_space).len()..];
                let mut prefix = text[..value_start].to_string();
                // Go's and JS's parsers read a key as spelled (`Token` is no token to them)
                // and JS knows no `:` delimiter: the key is written as the SDKs name it, with
                // `=`, indentation and spacing kept.
                let at = indent_text(text).len();
                if let Some(d) = text[at..].find(['=', ':']) {
                    prefix.replace_range(at + d..at + d + 1, "=");
                    let spelled = text[at..at + d].trim_end_matches(is_py_space).len();
                    prefix.replace_range(at..at + spelled, key);
                }
                // `token =` with no value gets `token = new`, not `token =new`.
                if py_strip(old_value).is_empty() && !prefix.ends_with(is_py_space) {
                    prefix.push(' ');
                }
                replaced[i] = Some(format!("{prefix}{value}{trailing_ws}"));
                for (j, line) in lines.iter().enumerate().skip(i + 1) {
                    if line.kind == (Kind::Continuation { entry: i }) {
                        drop_line[j] = true;
                    }
                }
            }
            None => missing.push((key, value)),
        }
    }
    // The line after the header decides the indentation of added keys: it must not be
    // deeper than theirs, or it would continue their value.
    let indent = lines[header + 1..]
        .iter()
        .find(|l| matches!(l.kind, Kind::Entry { .. } | Kind::Section(_)))
        .map(|l| indent_text(l.text))
        .unwrap_or("");

    let mut out = String::with_capacity(doc.len() + 64);
    for (i, line) in lines.iter().enumerate() {
        if drop_line[i] {
            continue;
        }
        match &replaced[i] {
            Some(text) => out.push_str(text),
            None => out.push_str(line.text),
        }
        if i == header && !missing.is_empty() {
            let eol = if line.eol.is_empty() {
                eol_style
            } else {
                line.eol
            };
            out.push_str(eol);
            for (n, (key, value)) in missing.iter().enumerate() {
                out.push_str(&format!("{indent}{key} = {value}"));
                let last = n + 1 == missing.len();
                out.push_str(if last { line.eol } else { eol });
            }
            continue;
        }
        out.push_str(line.eol);
    }
    Ok(out)
}

/// A value the SDK would read back exactly as written: not empty, no surrounding
/// whitespace (configparser strips it), no line break (a continuation), no leading comment
/// character.
/// Refuses a file the three SDK parsers split into profiles differently, found by the
/// differential test with the Go and JS SDKs' own loaders: there, writing a line where
/// configparser places it can change another profile for the other readers.
/// - A line ending in a lone CR: Go's `ini.v1` ends lines at LF only, so the file is one
///   line to it (configparser and the JS `ini` package split at CR too).
/// - An indented `[name]` under a value: configparser reads it as part of that value, Go and
///   JS as the header of profile `name`, so the lines below belong to different profiles.
fn readers_agree(lines: &[Line<'_>]) -> Result<(), IniError> {
    for (n, line) in lines.iter().enumerate() {
        if line.eol == "\r" {
            return Err(IniError::ReadersDisagree {
                line: n + 1,
                why: "the line ends with a lone carriage return, which the Go SDK does not take for a line end",
            });
        }
        if let Kind::Section(_) = line.kind {
            // The JS `ini` package takes `[name]` with nothing before or after it for a
            // header; indented, or with a comment after it, the lines below stay in the
            // profile above.
            if line.text.starts_with(is_py_space) {
                return Err(IniError::ReadersDisagree {
                    line: n + 1,
                    why: "an indented [section] header: the JavaScript SDK does not take the line for a header",
                });
            }
            let stripped = py_strip(line.text);
            let bare = stripped.ends_with(']') && !stripped[1..stripped.len() - 1].contains(']');
            if !bare {
                return Err(IniError::ReadersDisagree {
                    line: n + 1,
                    why: "text after a [section] header (a comment?): the JavaScript SDK does not take the line for a header",
                });
            }
        }
        let header_like = header_name(py_strip(line.text)).is_some();
        if header_like && matches!(line.kind, Kind::Continuation { .. }) {
            return Err(IniError::ReadersDisagree {
                line: n + 1,
                why: "an indented [section] header under a value: Python reads it as part of the value, Go and JavaScript as a new profile",
            });
        }
    }
    Ok(())
}

fn check_value(key: &str, value: &str) -> Result<(), IniError> {
    if value.is_empty()
        || py_strip(value) != value
        || value.contains(['\n', '\r'])
        || value.starts_with(['#', ';'])
    {
        return Err(IniError::BadValue {
            key: key.to_string(),
        });
    }
    Ok(())
}

/// The document with a new `[profile]` section holding `pairs` at its end, after a blank
/// line (and the line break a last line without one needs), in the file's own line endings.
fn append_section(
    doc: &str,
    ends_open: bool,
    eol_style: &str,
    profile: &str,
    pairs: &[(&str, &str)],
) -> String {
    let mut out = String::with_capacity(doc.len() + 64);
    out.push_str(doc);
    if !doc.is_empty() {
        if ends_open {
            out.push_str(eol_style);
        }
        out.push_str(eol_style);
    }
    out.push('[');
    out.push_str(profile);
    out.push(']');
    out.push_str(eol_style);
    for (key, value) in pairs {
        out.push_str(&format!("{key} = {value}{eol_style}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn replaces_only_the_token_value() {
        let doc = "; my settings\n[DEFAULT]\nhost = https://a\ntoken = old\n\n[other]\nhost=https://b\ntoken=keep\n";
        let out = set_values(doc, "DEFAULT", &[("token", "new")]).unwrap();
        assert_eq!(out, doc.replace("token = old", "token = new"));
        assert_eq!(
            get_value(&out, "DEFAULT", "token").unwrap().as_deref(),
            Some("new")
        );
        assert_eq!(
            get_value(&out, "other", "token").unwrap().as_deref(),
            Some("keep")
        );
    }

    /// Line ends, spacing and a missing final newline are kept; the key is written as the
    /// SDKs name it, with `=` (`Token` is no token to the Go and JS parsers, nor `:` to JS).
    #[test]
    fn keeps_crlf_spacing_colon_and_missing_final_newline() {
        let doc = "[DEFAULT]\r\nhost : https://a\r\nToken   :   old   \r\n[x]\r\nk=v";
        let out = set_values(doc, "DEFAULT", &[("token", "new")]).unwrap();
        assert_eq!(
            out,
            "[DEFAULT]\r\nhost : https://a\r\ntoken   =   new   \r\n[x]\r\nk=v"
        );
        let out = set_values(doc, "x", &[("token", "t2")]).unwrap();
        assert_eq!(
            out,
            "[DEFAULT]\r\nhost : https://a\r\nToken   :   old   \r\n[x]\r\ntoken = t2\r\nk=v"
        );
    }

    #[test]
    fn adds_missing_profile_and_keys() {
        assert_eq!(
            set_values("", "DEFAULT", &[("host", "h"), ("token", "t")]).unwrap(),
            "[DEFAULT]\nhost = h\ntoken = t\n"
        );
        let doc = "[a]\nx = 1\n";
        assert_eq!(
            set_values(doc, "b", &[("token", "t")]).unwrap(),
            "[a]\nx = 1\n\n[b]\ntoken = t\n"
        );
        let doc = "[a]\nx = 1\n\n# trailing comment\n[b]\n";
        assert_eq!(
            set_values(doc, "a", &[("token", "t")]).unwrap(),
            "[a]\ntoken = t\nx = 1\n\n# trailing comment\n[b]\n"
        );
        assert_eq!(
            set_values("[a]", "a", &[("token", "t")]).unwrap(),
            "[a]\ntoken = t"
        );
    }

    #[test]
    fn inline_semicolon_is_part_of_the_value_like_configparser() {
        assert_eq!(
            get_value("[DEFAULT]\ntoken = abc ; note\n", "DEFAULT", "token")
                .unwrap()
                .as_deref(),
            Some("abc ; note")
        );
    }

    #[test]
    fn a_named_profile_does_not_inherit_default_like_the_sdk() {
        let doc = "[DEFAULT]\ntoken = base\nhost = h0\n[p]\nhost = h\n";
        assert_eq!(get_value(doc, "p", "token").unwrap(), None);
        assert_eq!(get_value(doc, "missing", "token").unwrap(), None);
        assert_eq!(
            get_value(doc, "DEFAULT", "token").unwrap().as_deref(),
            Some("base")
        );
        // So writing [p]'s token adds its own host when it has none.
        let out = set_values(
            "[DEFAULT]\nhost = h0\n[p]\n",
            "p",
            &[("host", "h1"), ("token", "t")],
        )
        .unwrap();
        assert_eq!(out, "[DEFAULT]\nhost = h0\n[p]\nhost = h1\ntoken = t\n");
    }

    #[test]
    fn continuation_lines_of_the_old_value_are_replaced() {
        let doc = "[DEFAULT]\ntoken = a\n  b\nhost = h\n";
        assert_eq!(
            set_values(doc, "DEFAULT", &[("token", "n")]).unwrap(),
            "[DEFAULT]\ntoken = n\nhost = h\n"
        );
    }

    #[test]
    fn duplicates_are_refused_like_the_sdk_does() {
        assert!(matches!(
            parse("[a]\n[a]\n"),
            Err(IniError::DuplicateSection { .. })
        ));
        // Repeated [DEFAULT] blocks merge, as in configparser, but not their keys.
        assert!(parse("[DEFAULT]\nhost = h\n[DEFAULT]\ntoken = t\n").is_ok());
        assert!(matches!(
            parse("[DEFAULT]\ntoken = 1\n[DEFAULT]\ntoken = 2\n"),
            Err(IniError::DuplicateKey { .. })
        ));
        assert!(matches!(
            parse("[a]\ntoken=1\nTOKEN=2\n"),
            Err(IniError::DuplicateKey { .. })
        ));
        assert!(matches!(
            parse("token=1\n"),
            Err(IniError::KeyOutsideSection { line: 1 })
        ));
        assert!(set_values("[a]\n", "a", &[("token", "two\nlines")]).is_err());
        assert!(set_values("[a]\n", "a", &[("token", "")]).is_err());
    }

    /// Files the three SDK parsers split into profiles differently are read but not edited,
    /// with the line named: found by the three-reader differential (tests/ini_configparser.rs).
    #[test]
    fn a_file_the_sdk_parsers_read_differently_is_not_edited() {
        let refused = [
            // Go's ini ends lines at LF only: one line to it.
            ("[DEFAULT]\rtoken = a\r[prod]\rtoken = b\r", 1),
            // configparser: part of cluster_id's value; Go and JS: the header of [prod], so
            // the token line below is [prod]'s to them and [dev]'s to Python.
            ("[dev]\ncluster_id = x\n    [prod]\ntoken = old\n", 3),
            // JS: no header, the token below stays in [dev].
            ("[dev]\ntoken = d\n[ci] ; build\ntoken = old\n", 3),
        ];
        for (doc, line) in refused {
            match set_values(doc, "dev", &[("token", "new")]) {
                Err(IniError::ReadersDisagree { line: l, .. }) => assert_eq!(l, line, "{doc:?}"),
                other => panic!("{doc:?}: {other:?}"),
            }
            assert!(validate(doc).is_ok(), "still read: {doc:?}");
        }
    }

    #[test]
    fn settings_section_is_left_alone() {
        let doc = "[__settings__]\ndefault_profile = p\n\n[p]\ntoken = old\n";
        let out = set_values(doc, "p", &[("token", "new")]).unwrap();
        assert_eq!(
            out,
            "[__settings__]\ndefault_profile = p\n\n[p]\ntoken = new\n"
        );
    }

    fn line_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[#;] ?[a-z =:]{0,12}".prop_map(|s| s),
            "[a-z_]{1,8}[ ]{0,2}[=:][ ]{0,2}[a-zA-Z0-9:/._ ;-]{0,16}".prop_map(|s| s),
        ]
    }

    fn doc_strategy() -> impl Strategy<Value = String> {
        let section = (
            "[a-zA-Z_]{1,8}",
            prop::collection::vec(line_strategy(), 0..6),
        );
        (
            prop::collection::vec(section, 1..5),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(sections, crlf, final_nl)| {
                let eol = if crlf { "\r\n" } else { "\n" };
                let mut seen = std::collections::HashSet::new();
                let mut out = String::new();
                for (name, lines) in sections {
                    if !seen.insert(name.clone()) {
                        continue;
                    }
                    out.push_str(&format!("[{name}]{eol}"));
                    let mut keys = std::collections::HashSet::new();
                    for l in lines {
                        let key = l
                            .split(['=', ':'])
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_ascii_lowercase();
                        if l.contains(['=', ':']) && !l.starts_with(['#', ';']) && !keys.insert(key)
                        {
                            continue;
                        }
                        out.push_str(&l);
                        out.push_str(eol);
                    }
                }
                if !final_nl {
                    while out.ends_with(['\n', '\r']) {
                        out.pop();
                    }
                }
                out
            })
    }

    /// Everything outside the edited profile, as raw text.
    fn outside(doc: &str, profile: &str) -> Vec<String> {
        let lines = parse(doc).unwrap();
        // A last line without a newline gets one when something is appended after it.
        let style = lines
            .iter()
            .map(|l| l.eol)
            .find(|e| !e.is_empty())
            .unwrap_or("\n");
        let mut current = None;
        let mut out = Vec::new();
        for l in lines {
            if let Kind::Section(name) = &l.kind {
                current = Some(name.clone());
            }
            if current.as_deref() != Some(profile) {
                out.push(format!(
                    "{}{}",
                    l.text,
                    if l.eol.is_empty() { style } else { l.eol }
                ));
            }
        }
        // A new profile is appended after one separating blank line: not a change to what precedes it.
        while out.last().is_some_and(|l| l.trim().is_empty()) {
            out.pop();
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn edit_keeps_every_other_section_byte_identical(doc in doc_strategy(), pick in 0usize..6, value in "[a-zA-Z0-9]{1,40}") {
            prop_assume!(parse(&doc).is_ok());
            let names: Vec<String> = parse(&doc).unwrap().iter().filter_map(|l| match &l.kind { Kind::Section(n) => Some(n.clone()), _ => None }).collect();
            let profile = names.get(pick).cloned().unwrap_or_else(|| "NEWPROFILE".to_string());
            let out = set_values(&doc, &profile, &[("token", &value)]).unwrap();
            prop_assert_eq!(get_value(&out, &profile, "token").unwrap(), Some(value.clone()));
            prop_assert_eq!(outside(&doc, &profile), outside(&out, &profile));
            // Editing back to the old value (when there was one) restores the file exactly.
            if let Some(old) = get_value(&doc, &profile, "token").unwrap() {
                if !doc.contains("\n ") && !doc.contains("\n\t") && !old.contains('\n') {
                    let back = set_values(&out, &profile, &[("token", &old)]).unwrap();
                    prop_assert_eq!(back, doc);
                }
            }
        }
    }
}
