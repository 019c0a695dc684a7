//! Reading and editing the Databricks config file without disturbing it.
//!
//! Invariant: [`set_values`] changes only the value of the keys it is given inside one
//! profile (adding the profile or the keys when missing); every other byte of the file stays
//! identical: other profiles, comments, ordering, spacing, CRLF line ends, a missing final
//! newline.
//!
//! Written by hand on purpose: the INI crates either rewrite the file (rust-ini,
//! configparser, ini-doc) or keep raw lines but drop line terminators and know only `=`
//! (ini-roundtrip). The readers we must agree with are Python's `configparser` (the Python
//! SDK) and `gopkg.in/ini.v1` (Go SDK, CLI), so the grammar below follows configparser:
//! `=` and `:` both separate, keys are case-insensitive, `#`/`;` start a full-line comment,
//! an indented line after a key continues its value, an inline ` ; text` is part of the value,
//! `[DEFAULT]` supplies values to every profile, and a duplicate section or key is an error.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IniError {
    #[error("line {line}: section [{section}] appears twice (Databricks SDKs refuse such a file)")]
    DuplicateSection { line: usize, section: String },
    #[error("line {line}: key {key:?} appears twice in [{section}] (Databricks SDKs refuse such a file)")]
    DuplicateKey {
        line: usize,
        section: String,
        key: String,
    },
    #[error("line {line}: a key outside any [section]")]
    KeyOutsideSection { line: usize },
    #[error("a value for {key:?} must be one non-empty line without surrounding spaces")]
    BadValue { key: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Blank,
    Comment,
    Section(String),
    /// `key_end`: byte offset where the key ends; `value_start`: where the value starts.
    Entry {
        key: String,
        value_start: usize,
    },
    Continuation,
}

#[derive(Debug, Clone)]
struct Line<'a> {
    /// The line without its terminator.
    text: &'a str,
    /// `"\n"`, `"\r\n"` or `""` (last line without a newline).
    eol: &'a str,
    kind: Kind,
}

fn split_lines(doc: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = doc;
    while !rest.is_empty() {
        match rest.find('\n') {
            Some(i) => {
                let (line, tail) = rest.split_at(i + 1);
                let (text, eol) = match line.strip_suffix("\r\n") {
                    Some(t) => (t, "\r\n"),
                    None => (&line[..line.len() - 1], "\n"),
                };
                out.push((text, eol));
                rest = tail;
            }
            None => {
                out.push((rest, ""));
                rest = "";
            }
        }
    }
    out
}

fn parse(doc: &str) -> Result<Vec<Line<'_>>, IniError> {
    let mut lines = Vec::new();
    let mut sections: Vec<String> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    let mut in_entry = false;
    for (n, (text, eol)) in split_lines(doc).into_iter().enumerate() {
        let trimmed = text.trim();
        let indented = text.starts_with([' ', '\t']);
        let kind = if trimmed.is_empty() {
            in_entry = false;
            Kind::Blank
        } else if trimmed.starts_with('#') || trimmed.starts_with(';') {
            Kind::Comment
        } else if indented && in_entry {
            Kind::Continuation
        } else if trimmed.starts_with('[') && trimmed.ends_with(']') && trimmed.len() > 2 {
            let name = trimmed[1..trimmed.len() - 1].to_string();
            if sections.contains(&name) {
                return Err(IniError::DuplicateSection {
                    line: n + 1,
                    section: name,
                });
            }
            sections.push(name.clone());
            keys.clear();
            in_entry = false;
            Kind::Section(name)
        } else {
            let Some(section) = sections.last() else {
                return Err(IniError::KeyOutsideSection { line: n + 1 });
            };
            let sep = text.find(['=', ':']);
            let (key, value_start) = match sep {
                Some(i) => {
                    let after = &text[i + 1..];
                    let ws = after.len() - after.trim_start().len();
                    (text[..i].trim().to_ascii_lowercase(), i + 1 + ws)
                }
                None => (trimmed.to_ascii_lowercase(), text.len()),
            };
            if keys.contains(&key) {
                return Err(IniError::DuplicateKey {
                    line: n + 1,
                    section: section.clone(),
                    key,
                });
            }
            keys.push(key.clone());
            in_entry = true;
            Kind::Entry { key, value_start }
        };
        lines.push(Line { text, eol, kind });
    }
    Ok(lines)
}

fn value_of(line: &Line<'_>) -> Option<String> {
    match &line.kind {
        Kind::Entry { value_start, .. } => Some(line.text[*value_start..].trim().to_string()),
        _ => None,
    }
}

/// The value of `key` in `profile` as a Databricks SDK would read it (falling back to
/// `[DEFAULT]`, as configparser does). `Ok(None)` when absent or empty.
pub fn get_value(doc: &str, profile: &str, key: &str) -> Result<Option<String>, IniError> {
    let lines = parse(doc)?;
    let find = |section: &str| -> Option<String> {
        let mut current: Option<&str> = None;
        for line in &lines {
            match &line.kind {
                Kind::Section(name) => current = Some(name),
                Kind::Entry { key: k, .. } if current == Some(section) && k == key => {
                    return value_of(line)
                }
                _ => {}
            }
        }
        None
    };
    let value = find(profile).or_else(|| {
        if profile != "DEFAULT" {
            find("DEFAULT")
        } else {
            None
        }
    });
    Ok(value.filter(|v| !v.is_empty()))
}

/// Validates the file as the SDKs would (duplicates are errors).
pub fn validate(doc: &str) -> Result<(), IniError> {
    parse(doc).map(|_| ())
}

/// Sets `key = value` for each pair inside `[profile]`, keeping every other byte.
/// Existing keys keep their spelling and spacing; only the value text changes.
pub fn set_values(doc: &str, profile: &str, pairs: &[(&str, &str)]) -> Result<String, IniError> {
    for (key, value) in pairs {
        if value.is_empty() || value.trim() != *value || value.contains(['\n', '\r']) {
            return Err(IniError::BadValue {
                key: key.to_string(),
            });
        }
    }
    let lines = parse(doc)?;
    let eol_style = lines
        .iter()
        .map(|l| l.eol)
        .find(|e| !e.is_empty())
        .unwrap_or("\n");

    let section_start = lines
        .iter()
        .position(|l| l.kind == Kind::Section(profile.to_string()));
    let Some(start) = section_start else {
        let mut out = String::with_capacity(doc.len() + 64);
        out.push_str(doc);
        if !doc.is_empty() {
            if !doc.ends_with('\n') {
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
        return Ok(out);
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| matches!(l.kind, Kind::Section(_)))
        .map(|p| start + 1 + p)
        .unwrap_or(lines.len());

    let mut replaced: Vec<Option<String>> = vec![None; lines.len()];
    let mut drop_line = vec![false; lines.len()];
    let mut missing: Vec<(&str, &str)> = Vec::new();
    for (key, value) in pairs {
        let found = (start + 1..end)
            .find(|&i| matches!(&lines[i].kind, Kind::Entry { key: k, .. } if k == key));
        match found {
            Some(i) => {
                let Kind::Entry { value_start, .. } = lines[i].kind else {
                    continue;
                };
                let text = lines[i].text;
                let old_value = &text[value_start..];
                let trailing_ws = &old_value[old_value.trim_end().len()..];
                // "key" alone (no separator) becomes "key = value".
                let prefix = if value_start == text.len() && !text.contains(['=', ':']) {
                    format!("{} = ", text.trim_end())
                } else {
                    text[..value_start].to_string()
                };
                replaced[i] = Some(format!("{prefix}{value}{trailing_ws}"));
                let mut j = i + 1;
                while j < end && lines[j].kind == Kind::Continuation {
                    drop_line[j] = true;
                    j += 1;
                }
            }
            None => missing.push((key, value)),
        }
    }
    // New keys go after the section's last entry (or its header), before trailing blanks and comments.
    let insert_after = (start..end)
        .rev()
        .find(|&i| {
            matches!(
                lines[i].kind,
                Kind::Entry { .. } | Kind::Continuation | Kind::Section(_)
            )
        })
        .unwrap_or(start);

    let mut out = String::with_capacity(doc.len() + 64);
    for (i, line) in lines.iter().enumerate() {
        if drop_line[i] {
            continue;
        }
        match &replaced[i] {
            Some(text) => out.push_str(text),
            None => out.push_str(line.text),
        }
        if i == insert_after && !missing.is_empty() {
            out.push_str(if line.eol.is_empty() {
                eol_style
            } else {
                line.eol
            });
            for (n, (key, value)) in missing.iter().enumerate() {
                out.push_str(&format!("{key} = {value}"));
                let last = n + 1 == missing.len();
                out.push_str(if last { line.eol } else { eol_style });
            }
            continue;
        }
        out.push_str(line.eol);
    }
    Ok(out)
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

    #[test]
    fn keeps_crlf_spacing_colon_and_missing_final_newline() {
        let doc = "[DEFAULT]\r\nhost : https://a\r\nToken   :   old   \r\n[x]\r\nk=v";
        let out = set_values(doc, "DEFAULT", &[("token", "new")]).unwrap();
        assert_eq!(
            out,
            "[DEFAULT]\r\nhost : https://a\r\nToken   :   new   \r\n[x]\r\nk=v"
        );
        let out = set_values(doc, "x", &[("token", "t2")]).unwrap();
        assert_eq!(
            out,
            "[DEFAULT]\r\nhost : https://a\r\nToken   :   old   \r\n[x]\r\nk=v\r\ntoken = t2"
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
            "[a]\nx = 1\ntoken = t\n\n# trailing comment\n[b]\n"
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
    fn default_section_supplies_values() {
        let doc = "[DEFAULT]\ntoken = base\n[p]\nhost = h\n";
        assert_eq!(
            get_value(doc, "p", "token").unwrap().as_deref(),
            Some("base")
        );
        assert_eq!(
            get_value(doc, "missing", "token").unwrap().as_deref(),
            Some("base")
        );
        assert_eq!(get_value("[p]\n", "p", "token").unwrap(), None);
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
            if let Some(old) = parse(&doc).unwrap().iter().scan(None::<String>, |cur, l| {
                if let Kind::Section(n) = &l.kind { *cur = Some(n.clone()); }
                Some((cur.clone(), l.clone()))
            }).find(|(cur, l)| cur.as_deref() == Some(profile.as_str()) && matches!(&l.kind, Kind::Entry{key, ..} if key == "token")).and_then(|(_, l)| value_of(&l)) {
                if !old.is_empty() && !doc.contains("\n ") && !doc.contains("\n\t") {
                    let back = set_values(&out, &profile, &[("token", &old)]).unwrap();
                    prop_assert_eq!(back, doc);
                }
            }
        }
    }
}
