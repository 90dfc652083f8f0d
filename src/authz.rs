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
}
