//! The reference docs stay in step with the shipped examples: every key that
//! `proxy.toml.example` and `keys.toml.example` show (set or commented out) has a row in
//! docs/configuration.md, and every row names a key the examples show.

use std::collections::BTreeSet;
use std::path::Path;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `section.key` for every key of a TOML example, commented-out ones included. A
/// sub-table (`[headers.set]`, `[auth.jwt]`) counts as a key of its table, and its own keys are
/// `auth.jwt.issuer`.
fn example_keys(text: &str, default_section: &str) -> BTreeSet<String> {
    let mut section = default_section.to_string();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(name) = line
            .strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .filter(|n| {
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_lowercase() || "_.[".contains(c))
            })
        {
            let name = name.trim_start_matches('[');
            if let Some((table, sub)) = name.split_once('.') {
                // A sub-table is a key of its table, and a section of its own keys.
                keys.insert(format!("{table}.{sub}"));
            }
            section = name.to_string();
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            keys.insert(format!("{section}.{key}"));
        }
    }
    keys
}

/// `section.key` for every table row of docs/configuration.md, by the `## [section]` (or
/// `## The keys file`) heading above it.
fn documented_keys(doc: &str) -> BTreeSet<String> {
    let mut section = None;
    let mut keys = BTreeSet::new();
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = if h == "The keys file" {
                Some("keys".to_string())
            } else {
                // `## [mcp]`, and `## [[mcp.grants]]` for an array of tables.
                h.strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .map(|h| h.trim_matches(['[', ']']).to_string())
            };
            continue;
        }
        let (Some(section), Some(row)) = (&section, line.strip_prefix("| `")) else {
            continue;
        };
        if let Some(key) = row.split('`').next() {
            keys.insert(format!("{section}.{key}"));
        }
    }
    keys
}

#[test]
fn every_example_key_is_documented_and_every_documented_key_is_in_an_example() {
    let mut shown = example_keys(&read("proxy.toml.example"), "");
    shown.extend(example_keys(&read("keys.toml.example"), "keys"));
    // Tables of tables: `[[keys]]` is a heading, not a key.
    shown.retain(|k| !k.ends_with('.') && !k.starts_with('.'));
    let documented = documented_keys(&read("docs/configuration.md"));
    assert!(documented.len() > 50, "too few rows found: {documented:?}");
    let undocumented: Vec<_> = shown.difference(&documented).collect();
    let unshown: Vec<_> = documented.difference(&shown).collect();
    assert!(
        undocumented.is_empty() && unshown.is_empty(),
        "in an example but not in docs/configuration.md: {undocumented:?}; \
         in docs/configuration.md but in no example: {unshown:?}"
    );
}
