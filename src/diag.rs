//! Diagnostics for operator-edited files: every problem, each as `file:line:col: message`.
//!
//! serde stops at the first error. Operators fixing a config at 3 a.m. want the whole list, so
//! [`parse_toml`] deserializes, records the error, removes the offending entry from the parsed
//! (span-preserving) tree and tries again, until the document deserializes or nothing more can
//! be removed. Spans stay those of the original text, so line numbers stay right.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, Deserializer};
use toml::Spanned;

/// One problem in one file, with its position (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// All the problems found in a set of files. Displays one per line.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl Diagnostics {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Source text of one file, to turn byte spans into `file:line:col`.
pub struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// A diagnostic at byte offset `at` (clamped to the text).
    pub fn at(&self, at: usize, message: impl Into<String>) -> Diagnostic {
        let at = at.min(self.text.len());
        let before = &self.text[..at];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = self.text[line_start..at].chars().count() + 1;
        Diagnostic {
            file: self.path.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }

    /// A diagnostic at the start of a span, or of the file when there is none.
    pub fn span(&self, span: Option<Range<usize>>, message: impl Into<String>) -> Diagnostic {
        self.at(span.map_or(0, |s| s.start), message)
    }
}

/// How many errors one file may report before the rest are summarised.
const MAX_ERRORS: usize = 64;

/// Deserialize `T` from TOML text, collecting every syntax, unknown-key and type error.
///
/// Returns the value with every offending entry left out (when the rest deserializes), so the
/// caller can go on to check meaning, and the errors. `T` should make every field optional (or
/// defaulted) and check required fields itself: a "missing field" error has no useful position.
pub fn parse_toml<T: DeserializeOwned>(src: &Source<'_>) -> (Option<T>, Vec<Diagnostic>) {
    let (root, syntax) = DeTable::parse_recoverable(src.text);
    if !syntax.is_empty() {
        let errors = syntax
            .iter()
            .take(MAX_ERRORS)
            .map(|e| {
                src.span(
                    e.span(),
                    format!("TOML syntax: {}", first_line(e.message())),
                )
            })
            .collect();
        return (None, errors);
    }
    // The usual case, a valid file: deserialize what was parsed, borrowing from the text.
    let mut error = match T::deserialize(Deserializer::from(root)) {
        Ok(v) => return (Some(v), Vec::new()),
        Err(e) => e,
    };
    // Otherwise report every error, not just the first: parse again, then take out each
    // offending entry and try once more.
    let (mut root, _) = DeTable::parse_recoverable(src.text);
    let mut errors = Vec::new();
    loop {
        let span = error.span();
        errors.push(src.span(span.clone(), explain(error.message())));
        let removed = span.is_some_and(|s| remove_at(root.get_mut(), &s));
        if !removed || errors.len() >= MAX_ERRORS {
            sort(&mut errors);
            return (None, errors);
        }
        match T::deserialize(Deserializer::from(root.clone())) {
            Ok(v) => {
                sort(&mut errors);
                return (Some(v), errors);
            }
            Err(e) => error = e,
        }
    }
}

/// In file order, as an operator reads them.
pub fn sort(errors: &mut [Diagnostic]) {
    errors.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s).trim()
}

/// Turn serde's messages into an operator's: suggest the nearest valid key for a typo.
fn explain(message: &str) -> String {
    let message = first_line(message);
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        return match nearest(name, &expected) {
            Some(best) => format!("unknown key `{name}`; did you mean `{best}`?"),
            None if expected.is_empty() => format!("unknown key `{name}`"),
            None => format!(
                "unknown key `{name}`; valid keys here: {}",
                expected.join(", ")
            ),
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        return format!(
            "unknown value `{name}`; expected one of: {}",
            expected
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    message.to_string()
}

/// The candidate closest to `name`, when it is close enough to be a typo.
pub fn nearest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Remove the innermost table entry that the error span points into. Returns false when the
/// span lies outside every entry (nothing more can be learned by retrying).
fn remove_at(table: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    let contains = |outer: Range<usize>| outer.start <= span.start && span.end <= outer.end;
    let hit = table
        .iter()
        .find(|(k, v)| contains(k.span()) || contains(v.span()))
        .map(|(k, _)| k.clone());
    if let Some(key) = hit {
        if let Some(value) = table.get_mut(&key) {
            if value.span() != *span && remove_inside(value, span) {
                return true;
            }
        }
        table.remove(&key);
        return true;
    }
    // A table's span covers only its `[header]`: its entries may hold the span.
    table.iter_mut().any(|(_, v)| remove_inside(v, span))
}

fn remove_inside(value: &mut Spanned<DeValue<'_>>, span: &Range<usize>) -> bool {
    match value.get_mut() {
        DeValue::Table(t) => remove_at(t, span),
        DeValue::Array(items) => items.iter_mut().any(|item| match item.get_mut() {
            DeValue::Table(t) => remove_at(t, span),
            _ => false,
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        a: Option<Inner>,
        list: Option<Vec<Inner>>,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        listen: Option<String>,
        count: Option<u32>,
    }

    fn errors(text: &str) -> Vec<String> {
        let src = Source {
            path: Path::new("t.toml"),
            text,
        };
        let (_, errors) = parse_toml::<Doc>(&src);
        errors.iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn every_error_is_reported_with_its_line() {
        let e = errors("[a]\nlistn = \"x\"\ncount = \"ten\"\n\n[[list]]\nbogus = 1\n[wrong]\n");
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(e[0].starts_with("t.toml:2:1: unknown key `listn`; did you mean `listen`?"));
        assert!(e.iter().any(|l| l.starts_with("t.toml:3:9: ")), "{e:#?}");
        assert!(e
            .iter()
            .any(|l| l.starts_with("t.toml:6:1: unknown key `bogus`")));
        assert!(e
            .iter()
            .any(|l| l.starts_with("t.toml:7:2: unknown key `wrong`")));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = errors("[a]\nlisten = \n");
        assert!(e[0].starts_with("t.toml:2:"), "{e:#?}");
        assert!(e[0].contains("TOML syntax"));
    }

    #[test]
    fn a_valid_document_parses() {
        assert!(errors("[a]\nlisten = \"x\"\ncount = 3\n").is_empty());
    }
}
