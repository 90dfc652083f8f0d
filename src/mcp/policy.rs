//! Tool rules (`[mcp] tool_policy`, MCP.md §3): which tools, prompts and resources each
//! identity may use, per-identity × per-tool limits, and the audit line of each call.
//!
//! Where rules come from: an API key's own `tools` / `prompts` / `resources` in keys.toml
//! (reloaded with it); for htpasswd users, client certificates and tokens, the `[[mcp.grants]]`
//! that name them (by user, by token subject, or by a scope the token holds), joined.
//!
//! Fails closed: an identity no grant names may use nothing, anonymous callers nothing, and a
//! name no rule matches is refused. A tool limit whose store cannot answer follows
//! `[rate_limit] redis_failure`, as every other limit does.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::Identity;
use crate::authz::{Glob, McpKind, McpRules, Permit};
use crate::ratelimit::{Quota, RateLimits, Subject};

/// `[mcp] tool_policy = true` and what goes with it, validated.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// The largest POST body read on the MCP path (larger → 413, never forwarded uninspected);
    /// also the largest list answer, or SSE event, that is filtered.
    pub max_inspect_bytes: usize,
    /// Log a call's arguments in its audit line (off: only their digest).
    pub audit_arguments: bool,
    pub grants: Vec<Grant>,
    pub tool_limits: Vec<ToolLimit>,
}

/// One `[[mcp.grants]]`: whom it names, and what they may use.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// htpasswd users and client-certificate identities; `*`: every one.
    pub users: Vec<String>,
    /// Token identities (the `identity_claim` value); `*`: every token.
    pub subjects: Vec<String>,
    /// A token holding any of these scopes.
    pub scopes: Vec<String>,
    pub rules: McpRules,
}

impl Grant {
    /// Whether the grant names `identity`.
    fn names(&self, identity: &Identity) -> bool {
        let listed = |list: &[String], name: &str| list.iter().any(|u| u == "*" || u == name);
        match identity {
            Identity::User(u) | Identity::ClientCert(u) => listed(&self.users, u),
            Identity::Token(t) => {
                listed(&self.subjects, &t.subject)
                    || self.scopes.iter().any(|s| t.scopes.contains(s))
            }
            Identity::Key(_) | Identity::Anonymous => false,
        }
    }
}

/// One `[[mcp.tool_limits]]`: each identity gets its own budget per tool it matches.
#[derive(Debug, Clone)]
pub struct ToolLimit {
    pub tools: Vec<Glob>,
    /// `None`: only `concurrency` applies.
    pub quota: Option<Quota>,
    /// Calls of one tool by one identity in flight at once.
    pub concurrency: Option<u32>,
}

/// What the rules say about one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed, and the rule that allowed it (for the audit line).
    Allow(DecidedBy),
    /// Refused, and the rule that decided it.
    Deny(DecidedBy),
    /// Refused, but a token holding one more scope would be allowed: the scopes to ask for
    /// (those held and the one missing).
    StepUp(String),
}

/// The rule that decided a call, for its audit line: kept as it is and written out only when
/// the line is (nothing is formatted on the request path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecidedBy {
    /// The key's own field; the entry that matched (`None`: the field is absent, every one).
    Key(McpKind, Option<Arc<str>>),
    /// The key's field matched nothing.
    KeyNoMatch(McpKind),
    /// `[[mcp.grants]]` number `index` (from 0); the entry that matched, as for keys.
    Grant(usize, McpKind, Option<Arc<str>>),
    /// Grants name the identity, but none covers the name.
    GrantsNoMatch(McpKind),
    /// No grant names the identity.
    NoGrant,
    Anonymous,
    /// Refused for a scope the token lacks: the scopes asked for.
    StepUp(String),
}

impl std::fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecidedBy::Key(k, None) => write!(f, "key {}: every one", k.field()),
            DecidedBy::Key(k, Some(e)) => write!(f, "key {}: {:?}", k.field(), e),
            DecidedBy::KeyNoMatch(k) => write!(f, "key {}: no match", k.field()),
            DecidedBy::Grant(i, k, None) => write!(f, "grants[{i}] {}: every one", k.field()),
            DecidedBy::Grant(i, k, Some(e)) => write!(f, "grants[{i}] {}: {:?}", k.field(), e),
            DecidedBy::GrantsNoMatch(k) => write!(f, "grants {}: no match", k.field()),
            DecidedBy::NoGrant => f.write_str("grants: none names this identity"),
            DecidedBy::Anonymous => f.write_str("anonymous"),
            DecidedBy::StepUp(scopes) => write!(f, "step-up: {scopes}"),
        }
    }
}

/// The tool rules in force.
pub struct Policy {
    pub config: PolicyConfig,
    /// The tool limits' budgets: in memory, or in the `[rate_limit]` Redis.
    rate: RateLimits,
    /// Calls in flight per (identity, tool), for `concurrency`; an entry lives while a call does.
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
}

/// A call counted against a concurrency limit until dropped (the end of its answer).
pub struct InFlight {
    table: Arc<Mutex<HashMap<String, u32>>>,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.key);
            }
        }
    }
}

/// Why a call was held back by a tool limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Whole seconds before a retry can succeed (at least 1).
    pub retry_after: u64,
}

impl Policy {
    /// `shared`: the `[rate_limit]` limiter, whose Redis (when it has one) keeps the tool
    /// budgets too, so replicas share them.
    pub fn new(config: PolicyConfig, shared: &RateLimits) -> Policy {
        let unused = Quota {
            per_second: 1,
            burst: 1,
        };
        let rate = match shared {
            RateLimits::Shared { shared, .. } => RateLimits::Shared {
                default: unused,
                shared: Box::new(crate::ratelimit::Shared::new(shared.link.clone())),
            },
            RateLimits::Off | RateLimits::Local { .. } => RateLimits::Local {
                default: unused,
                local: crate::ratelimit::Local::new(),
            },
        };
        Policy {
            config,
            rate,
            in_flight: Arc::default(),
        }
    }

    /// The rules `identity` uses, and what they come from (`keys` or the grants' indices).
    pub fn rules<'a>(&'a self, identity: &'a Identity) -> (Cow<'a, McpRules>, Vec<usize>) {
        if let Identity::Key(k) = identity {
            return (Cow::Borrowed(&k.mcp), Vec::new());
        }
        let mut joined: Option<McpRules> = None;
        let mut from = Vec::new();
        for (i, g) in self.config.grants.iter().enumerate() {
            if g.names(identity) {
                from.push(i);
                match &mut joined {
                    None => joined = Some(g.rules.clone()),
                    Some(j) => j.union(&g.rules),
                }
            }
        }
        let nothing = McpRules {
            tools: Some(Vec::new()),
            prompts: Some(Vec::new()),
            resources: Some(Vec::new()),
        };
        (Cow::Owned(joined.unwrap_or(nothing)), from)
    }

    /// Judge a call of `name` (a tool, prompt or resource URI) by `identity`.
    pub fn decide(&self, identity: &Identity, kind: McpKind, name: &str) -> Verdict {
        if let Identity::Key(k) = identity {
            return match k.mcp.permits(kind, name) {
                Some(Permit::Unrestricted) => Verdict::Allow(DecidedBy::Key(kind, None)),
                Some(Permit::Entry(i)) => {
                    Verdict::Allow(DecidedBy::Key(kind, k.mcp.entry(kind, i)))
                }
                None => Verdict::Deny(DecidedBy::KeyNoMatch(kind)),
            };
        }
        if matches!(identity, Identity::Anonymous) {
            return Verdict::Deny(DecidedBy::Anonymous);
        }
        let mut named = false;
        for (i, g) in self.config.grants.iter().enumerate() {
            if !g.names(identity) {
                continue;
            }
            named = true;
            match g.rules.permits(kind, name) {
                Some(Permit::Unrestricted) => {
                    return Verdict::Allow(DecidedBy::Grant(i, kind, None))
                }
                Some(Permit::Entry(e)) => {
                    return Verdict::Allow(DecidedBy::Grant(i, kind, g.rules.entry(kind, e)))
                }
                None => {}
            }
        }
        if let Identity::Token(t) = identity {
            // Step-up (MCP authorization, "insufficient_scope"): a scope some grant would
            // accept; the client asks for it along with those it holds.
            let grant = self.config.grants.iter().find(|g| {
                !g.scopes.is_empty() && !g.names(identity) && g.rules.permits(kind, name).is_some()
            });
            if let Some(g) = grant {
                let mut scopes = t.scopes.clone();
                scopes.push(g.scopes[0].clone());
                return Verdict::StepUp(scopes.join(" "));
            }
        }
        Verdict::Deny(if named {
            DecidedBy::GrantsNoMatch(kind)
        } else {
            DecidedBy::NoGrant
        })
    }

    /// Count a call of `tool` by `owner` (`kind:name`) against the first `[[mcp.tool_limits]]`
    /// that matches it. `Ok(None)`: no limit applies.
    pub async fn limit(&self, owner: &str, tool: &str) -> Result<Option<InFlight>, Limited> {
        let Some((index, limit)) = self
            .config
            .tool_limits
            .iter()
            .enumerate()
            .find(|(_, l)| l.tools.iter().any(|g| g.matches(tool)))
        else {
            return Ok(None);
        };
        // Tool names have no spaces: "owner tool" is unambiguous read from the right.
        let key = format!("{owner} {tool} {index}");
        let subject = Subject::Tool(Arc::from(key.as_str()));
        if let Some(quota) = limit.quota {
            let decision = self
                .rate
                .check(&subject, Some(quota.per_second), Some(quota.burst))
                .await;
            if let Some(d) = decision.filter(|d| !d.allowed) {
                return Err(Limited {
                    retry_after: d.retry_after.max(1),
                });
            }
        }
        let Some(max) = limit.concurrency else {
            return Ok(None);
        };
        let mut table = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = table.entry(key.clone()).or_insert(0);
        if *n >= max {
            return Err(Limited { retry_after: 1 });
        }
        *n += 1;
        Ok(Some(InFlight {
            table: self.in_flight.clone(),
            key,
        }))
    }

    /// Whether any `[[mcp.tool_limits]]` is set (else a call costs no limit lookup).
    pub fn has_limits(&self) -> bool {
        !self.config.tool_limits.is_empty()
    }

    pub fn housekeep(&self) {
        self.rate.housekeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::TokenIdentity;

    fn token(subject: &str, scopes: &[&str]) -> Identity {
        Identity::Token(Arc::new(TokenIdentity {
            subject: subject.into(),
            value: None,
            fingerprint: "0".repeat(12),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expires: std::time::SystemTime::now(),
        }))
    }

    fn tools(list: &[&str]) -> McpRules {
        McpRules::parse_field(McpKind::Tool, list).unwrap()
    }

    fn policy(grants: Vec<Grant>, tool_limits: Vec<ToolLimit>) -> Policy {
        Policy::new(
            PolicyConfig {
                max_inspect_bytes: 1 << 20,
                audit_arguments: false,
                grants,
                tool_limits,
            },
            &RateLimits::Off,
        )
    }

    #[test]
    fn grants_join_for_whoever_they_name_and_nobody_else_gets_anything() {
        let p = policy(
            vec![
                Grant {
                    users: vec!["alice".into()],
                    rules: tools(&["search_*"]),
                    ..Grant::default()
                },
                Grant {
                    users: vec!["*".into()],
                    rules: tools(&["get_time"]),
                    ..Grant::default()
                },
                Grant {
                    scopes: vec!["mcp:admin".into()],
                    rules: tools(&["delete_*"]),
                    ..Grant::default()
                },
            ],
            vec![],
        );
        let alice = Identity::User("alice".into());
        let v = p.decide(&alice, McpKind::Tool, "search_docs");
        let Verdict::Allow(by) = v else {
            panic!("{v:?}")
        };
        assert_eq!(by.to_string(), "grants[0] tools: \"search_*\"");
        assert!(matches!(
            p.decide(&alice, McpKind::Tool, "get_time"),
            Verdict::Allow(_)
        ));
        assert_eq!(
            p.decide(&alice, McpKind::Tool, "delete_all"),
            Verdict::Deny(DecidedBy::GrantsNoMatch(McpKind::Tool))
        );
        assert!(matches!(
            p.decide(&alice, McpKind::Prompt, "any"),
            Verdict::Allow(_)
        ));
        let (rules, from) = p.rules(&alice);
        assert_eq!(from, vec![0, 1]);
        assert!(rules.permits(McpKind::Tool, "delete_all").is_none());
        let t = token("svc", &["mcp:tools"]);
        assert_eq!(
            p.decide(&t, McpKind::Tool, "delete_all"),
            Verdict::StepUp("mcp:tools mcp:admin".into())
        );
        assert_eq!(
            p.decide(&t, McpKind::Tool, "search_docs"),
            Verdict::Deny(DecidedBy::NoGrant)
        );
        let admin = token("svc", &["mcp:admin"]);
        assert!(matches!(
            p.decide(&admin, McpKind::Tool, "delete_all"),
            Verdict::Allow(_)
        ));
        assert_eq!(
            p.decide(&Identity::Anonymous, McpKind::Tool, "get_time"),
            Verdict::Deny(DecidedBy::Anonymous)
        );
    }

    #[tokio::test]
    async fn a_tool_limit_is_per_identity_and_per_tool() {
        let p = policy(
            vec![],
            vec![ToolLimit {
                tools: vec![Glob::parse("search_*").unwrap()],
                quota: Some(Quota {
                    per_second: 1,
                    burst: 2,
                }),
                concurrency: Some(1),
            }],
        );
        let first = p.limit("key:a", "search_docs").await.unwrap();
        assert!(first.is_some());
        assert_eq!(
            p.limit("key:a", "search_docs").await.err(),
            Some(Limited { retry_after: 1 }),
            "one in flight at once"
        );
        drop(first);
        assert!(
            p.limit("key:a", "search_docs").await.is_err(),
            "burst spent"
        );
        assert!(
            p.limit("key:b", "search_docs").await.is_ok(),
            "another identity"
        );
        assert!(p.limit("key:a", "search_web").await.is_ok(), "another tool");
        assert!(matches!(p.limit("key:a", "get_time").await, Ok(None)));
        assert!(p.in_flight.lock().unwrap().is_empty(), "every call ended");
    }
}
