//! Per-key authorization: `allow = ["GET /api/*", "POST /api/v1/invoke", "* /mcp"]`.
//!
//! Rules are matched against the normalised path (see [`crate::path`]), which is exactly the
//! path the backend receives, so no spelling of a path can reach what a rule denies.
//! Fails closed: a key with an `allow` list may do only what the list names.

use std::fmt;

/// An exact path, or a prefix when written with a trailing `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
}

impl PathPattern {
    /// Parse `/exact/path` or `/prefix/*`. The pattern must itself be a normalised path, so an
    /// operator cannot write a rule that no request could ever match.
    pub fn parse(s: &str) -> Result<PathPattern, String> {
        let s = s.trim();
        if !s.starts_with('/') {
            return Err(format!("\"{s}\" must start with '/'"));
        }
        let (body, prefix) = match s.strip_suffix('*') {
            Some(b) => (b, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(format!("\"{s}\": '*' is allowed only at the end"));
        }
        match crate::path::normalize(body) {
            Ok(n) if n == body => {}
            _ => {
                return Err(format!(
                    "\"{s}\" is not a normalised path (no '//', '.', '..', '%2F' or backslash segments)"
                ))
            }
        }
        Ok(if prefix {
            PathPattern::Prefix(body.to_string())
        } else {
            PathPattern::Exact(body.to_string())
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// `METHOD /path` or `* /path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `None` matches every method.
    pub method: Option<http::Method>,
    pub path: PathPattern,
}

impl Rule {
    pub fn parse(s: &str) -> Result<Rule, String> {
        let mut parts = s.split_whitespace();
        let (Some(method), Some(path), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "\"{s}\" must be \"METHOD /path\", e.g. \"GET /api/*\" or \"* /mcp\""
            ));
        };
        let method = if method == "*" {
            None
        } else {
            if !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!(
                    "\"{s}\": method \"{method}\" must be upper case, like GET or POST, or *"
                ));
            }
            Some(
                http::Method::from_bytes(method.as_bytes())
                    .map_err(|_| format!("\"{s}\": \"{method}\" is not a method"))?,
            )
        };
        Ok(Rule {
            method,
            path: PathPattern::parse(path)?,
        })
    }

    pub fn matches(&self, method: &http::Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && self.path.matches(path)
    }
}

/// Whether `rules` (a key's `allow` list, `None` for no list) let `method path` through.
pub fn is_allowed(rules: Option<&[Rule]>, method: &http::Method, path: &str) -> bool {
    match rules {
        None => true,
        Some(rules) => rules.iter().any(|r| r.matches(method, path)),
    }
}

/// A tool or prompt name pattern (`[mcp] tool_policy`): `*` stands for any run of characters
/// (`search_*`, `*_read`, `*`); every other character matches itself, case-sensitively, as MCP
/// servers compare names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(std::sync::Arc<str>);

impl Glob {
    /// 1–128 visible ASCII characters (MCP tool names are letters, digits, `_`, `-`, `.`, `/`).
    pub fn parse(s: &str) -> Result<Glob, String> {
        if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{s:?} must be 1-128 visible ASCII characters, '*' standing for any run of them"
            ));
        }
        Ok(Glob(s.into()))
    }

    /// Whether `name` matches, in linear time (the classic two-pointer wildcard match: on a
    /// mismatch, back up to just after the last `*`, which absorbs one more character).
    pub fn matches(&self, name: &str) -> bool {
        let (p, n) = (self.0.as_bytes(), name.as_bytes());
        let (mut i, mut j) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while j < n.len() {
            if i < p.len() && p[i] == b'*' {
                star = Some((i, j));
                i += 1;
            } else if i < p.len() && p[i] == n[j] {
                i += 1;
                j += 1;
            } else if let Some((si, sj)) = star {
                i = si + 1;
                j = sj + 1;
                star = Some((si, sj + 1));
            } else {
                return false;
            }
        }
        p[i..].iter().all(|&c| c == b'*')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The pattern, shared (for an audit record that outlives a reload).
    pub fn shared(&self) -> std::sync::Arc<str> {
        self.0.clone()
    }
}

/// What MCP asks for by name: a tool (`tools/call`), a prompt (`prompts/get`), a resource
/// (`resources/read`, by URI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum McpKind {
    Tool,
    Prompt,
    Resource,
}

impl McpKind {
    /// The method that asks for one.
    pub fn method(self) -> &'static str {
        match self {
            McpKind::Tool => "tools/call",
            McpKind::Prompt => "prompts/get",
            McpKind::Resource => "resources/read",
        }
    }

    /// The rule field that governs it, as keys.toml and `[[mcp.grants]]` spell it.
    pub fn field(self) -> &'static str {
        match self {
            McpKind::Tool => "tools",
            McpKind::Prompt => "prompts",
            McpKind::Resource => "resources",
        }
    }
}

/// Which MCP tools, prompts and resources an identity may use (`[mcp] tool_policy`): tools and
/// prompts by [`Glob`], resources by URI prefix. In each field, `None` (the field absent) is
/// every one, and an empty list none. Fails closed: a name no entry matches is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpRules {
    pub tools: Option<Vec<Glob>>,
    pub prompts: Option<Vec<Glob>>,
    pub resources: Option<Vec<std::sync::Arc<str>>>,
}

/// Which entry of a rule list let a name through, for the audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// The field is absent: every name.
    Unrestricted,
    /// The entry at this index.
    Entry(usize),
}

impl McpRules {
    /// Every tool, prompt and resource.
    pub const ALL: McpRules = McpRules {
        tools: None,
        prompts: None,
        resources: None,
    };

    /// Whether `name` of `kind` is covered, and by what; `None`: refused.
    pub fn permits(&self, kind: McpKind, name: &str) -> Option<Permit> {
        let found = match kind {
            McpKind::Tool | McpKind::Prompt => {
                let list = if kind == McpKind::Tool {
                    &self.tools
                } else {
                    &self.prompts
                };
                let Some(list) = list else {
                    return Some(Permit::Unrestricted);
                };
                list.iter().position(|g| g.matches(name))
            }
            McpKind::Resource => {
                let Some(list) = &self.resources else {
                    return Some(Permit::Unrestricted);
                };
                list.iter().position(|p| name.starts_with(&**p))
            }
        };
        found.map(Permit::Entry)
    }

    /// Whether every name of `kind` is covered (a list answer needs no filtering).
    pub fn unrestricted(&self, kind: McpKind) -> bool {
        match kind {
            McpKind::Tool => self.tools.is_none(),
            McpKind::Prompt => self.prompts.is_none(),
            McpKind::Resource => self.resources.is_none(),
        }
    }

    /// The entry at `index` of `kind`'s list, as written (for the audit line).
    pub fn entry(&self, kind: McpKind, index: usize) -> Option<std::sync::Arc<str>> {
        match kind {
            McpKind::Tool => self.tools.as_ref()?.get(index).map(Glob::shared),
            McpKind::Prompt => self.prompts.as_ref()?.get(index).map(Glob::shared),
            McpKind::Resource => self.resources.as_ref()?.get(index).cloned(),
        }
    }

    /// What either set covers: a field absent in one is absent in the union.
    pub fn union(&mut self, other: &McpRules) {
        fn join<T: Clone>(a: &mut Option<Vec<T>>, b: &Option<Vec<T>>) {
            match (a.as_mut(), b) {
                (Some(a), Some(b)) => a.extend(b.iter().cloned()),
                (Some(_), None) => *a = None,
                (None, _) => {}
            }
        }
        join(&mut self.tools, &other.tools);
        join(&mut self.prompts, &other.prompts);
        join(&mut self.resources, &other.resources);
    }

    /// Set one field (`tools`, `prompts` or `resources`) from its entries as a file writes
    /// them; `Err` names the bad entry, and the rules are left as they were.
    pub fn set(&mut self, kind: McpKind, entries: &[String]) -> Result<(), String> {
        let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
        let parsed = McpRules::parse_field(kind, &entries)?;
        match kind {
            McpKind::Tool => self.tools = parsed.tools,
            McpKind::Prompt => self.prompts = parsed.prompts,
            McpKind::Resource => self.resources = parsed.resources,
        }
        Ok(())
    }

    /// Parse one field's entries, naming the bad ones.
    pub fn parse_field(kind: McpKind, entries: &[&str]) -> Result<McpRules, String> {
        let mut rules = McpRules::default();
        match kind {
            McpKind::Tool | McpKind::Prompt => {
                let globs = entries
                    .iter()
                    .map(|e| Glob::parse(e))
                    .collect::<Result<Vec<_>, _>>()?;
                if kind == McpKind::Tool {
                    rules.tools = Some(globs);
                } else {
                    rules.prompts = Some(globs);
                }
            }
            McpKind::Resource => {
                for e in entries {
                    if e.is_empty() || e.chars().any(|c| c.is_control() || c == ' ') {
                        return Err(format!(
                            "{e:?} must be a URI prefix such as \"file:///docs/\" (no spaces)"
                        ));
                    }
                }
                rules.resources = Some(entries.iter().map(|e| (*e).into()).collect());
            }
        }
        Ok(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn rules(list: &[&str]) -> Vec<Rule> {
        list.iter().map(|r| Rule::parse(r).unwrap()).collect()
    }

    #[test]
    fn exact_and_prefix_rules_match_only_what_they_name() {
        let r = rules(&["GET /api/*", "POST /api/v1/invoke"]);
        assert!(is_allowed(Some(&r), &Method::GET, "/api/models"));
        assert!(is_allowed(Some(&r), &Method::POST, "/api/v1/invoke"));
        assert!(!is_allowed(Some(&r), &Method::POST, "/api/v1/invoke/x"));
        assert!(!is_allowed(Some(&r), &Method::DELETE, "/api/models"));
        assert!(!is_allowed(Some(&r), &Method::GET, "/api"));
        assert!(!is_allowed(Some(&r), &Method::GET, "/admin"));
    }

    #[test]
    fn star_method_matches_every_method() {
        let r = rules(&["* /mcp"]);
        assert!(is_allowed(Some(&r), &Method::DELETE, "/mcp"));
        assert!(!is_allowed(Some(&r), &Method::GET, "/mcp/x"));
    }

    #[test]
    fn no_list_allows_everything_and_an_empty_list_nothing() {
        assert!(is_allowed(None, &Method::GET, "/anything"));
        assert!(!is_allowed(Some(&[]), &Method::GET, "/anything"));
    }

    #[test]
    fn malformed_rules_are_refused() {
        for bad in [
            "GET",
            "get /x",
            "GET x",
            "GET /a/*/b",
            "GET /a/../b",
            "GET //a",
            "GET /a b",
            "GET /a%2Fb",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn tool_globs_match_whole_names_with_stars_for_any_run() {
        let g = |p: &str| Glob::parse(p).unwrap();
        assert!(g("search_*").matches("search_docs"));
        assert!(g("search_*").matches("search_"));
        assert!(!g("search_*").matches("research_docs"));
        assert!(g("*_read").matches("file_read"));
        assert!(!g("*_read").matches("file_read_all"));
        assert!(g("a*b*c").matches("axxbyyc"));
        assert!(!g("a*b*c").matches("axxbyy"));
        assert!(g("*").matches(""));
        assert!(g("get").matches("get"));
        assert!(!g("get").matches("Get"), "names compare case-sensitively");
        assert!(g("**x").matches("abx"));
        assert!(Glob::parse("").is_err());
        assert!(Glob::parse("has space").is_err());
    }

    #[test]
    fn absent_fields_cover_everything_and_empty_lists_nothing() {
        let all = McpRules::ALL;
        assert_eq!(all.permits(McpKind::Tool, "x"), Some(Permit::Unrestricted));
        let none = McpRules {
            tools: Some(vec![]),
            prompts: Some(vec![]),
            resources: Some(vec![]),
        };
        assert_eq!(none.permits(McpKind::Tool, "x"), None);
        assert_eq!(none.permits(McpKind::Resource, "file:///x"), None);
        let mut some = McpRules::parse_field(McpKind::Tool, &["get_*", "search"]).unwrap();
        assert_eq!(
            some.permits(McpKind::Tool, "search"),
            Some(Permit::Entry(1))
        );
        assert_eq!(some.entry(McpKind::Tool, 1).as_deref(), Some("search"));
        assert_eq!(some.permits(McpKind::Tool, "delete"), None);
        assert_eq!(
            some.permits(McpKind::Prompt, "p"),
            Some(Permit::Unrestricted)
        );
        some.union(&McpRules::parse_field(McpKind::Tool, &["delete"]).unwrap());
        assert_eq!(
            some.permits(McpKind::Tool, "delete"),
            Some(Permit::Entry(2))
        );
        some.union(&McpRules::ALL);
        assert!(some.unrestricted(McpKind::Tool));
        let r = McpRules::parse_field(McpKind::Resource, &["file:///docs/"]).unwrap();
        assert!(r.permits(McpKind::Resource, "file:///docs/a.md").is_some());
        assert!(r.permits(McpKind::Resource, "file:///etc/passwd").is_none());
    }
}
