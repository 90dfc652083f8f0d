//! Validation of `[mcp] tool_policy` and its tables (`[[mcp.grants]]`, `[[mcp.tool_limits]]`):
//! who may use which tools, prompts and resources, and the per-tool budgets.

use toml::Spanned;

use crate::authz::{Glob, McpKind, McpRules};
use crate::mcp::policy::{Grant, PolicyConfig, ToolLimit};
use crate::ratelimit::Quota;

use super::raw::*;
use super::validate::Validator;

/// The default bound on a POST body (and a list answer, or one SSE event) read on the MCP path.
const MAX_INSPECT_BYTES: u64 = 1 << 20;

impl Validator<'_> {
    /// `tool_policy` and what goes with it; `None` when it is off (tables given then are an
    /// error: rules that are never applied would be a silent hole).
    pub(super) fn tool_policy(&mut self, r: &RawMcp) -> Option<PolicyConfig> {
        let on = r.tool_policy.as_ref().is_some_and(|v| *v.get_ref());
        if !on {
            let stray = r
                .grants
                .iter()
                .flatten()
                .map(|g| g.span().start)
                .next()
                .or_else(|| {
                    r.tool_limits
                        .iter()
                        .flatten()
                        .map(|l| l.span().start)
                        .next()
                });
            if let Some(at) = stray {
                self.err(&Spanned::new(at..at, ()), "[[mcp.grants]] and [[mcp.tool_limits]] take effect only with [mcp] tool_policy = true; set it, or remove them");
            }
            return None;
        }
        let max = self.size(&r.max_inspect_bytes, "max_inspect_bytes", MAX_INSPECT_BYTES);
        if let Some(v) = &r.max_inspect_bytes {
            if !(1024..=64 << 20).contains(&max) {
                self.err(v, "max_inspect_bytes must be between 1KiB and 64MiB");
            }
        }
        let mut grants = Vec::new();
        for g in r.grants.iter().flatten() {
            if let Some(grant) = self.grant(g) {
                grants.push(grant);
            }
        }
        let mut tool_limits = Vec::new();
        for l in r.tool_limits.iter().flatten() {
            if let Some(limit) = self.tool_limit(l) {
                tool_limits.push(limit);
            }
        }
        Some(PolicyConfig {
            max_inspect_bytes: max as usize,
            audit_arguments: r.audit_arguments.unwrap_or(false),
            grants,
            tool_limits,
        })
    }

    /// One rule field (`tools`, `prompts`, `resources`) of a grant.
    fn rule_field(
        &mut self,
        rules: &mut McpRules,
        kind: McpKind,
        field: &Option<Spanned<Vec<String>>>,
    ) {
        let Some(list) = field else { return };
        if let Err(e) = rules.set(kind, list.get_ref()) {
            self.err(list, format!("{}: {e}", kind.field()));
        }
    }

    fn names(&mut self, list: &Option<Vec<Spanned<String>>>, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for n in list.iter().flatten() {
            let v = n.get_ref();
            if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
                self.err(
                    n,
                    format!("{key}: {v:?} must be 1-256 characters of one line"),
                );
            } else {
                out.push(v.clone());
            }
        }
        out
    }

    fn grant(&mut self, raw: &Spanned<RawGrant>) -> Option<Grant> {
        let g = raw.get_ref();
        let users = self.names(&g.users, "users");
        let subjects = self.names(&g.subjects, "subjects");
        let scopes = self.names(&g.scopes, "scopes");
        if users.is_empty() && subjects.is_empty() && scopes.is_empty() {
            self.err(raw, "[[mcp.grants]] names nobody: give users = [...] (htpasswd users, client certificates), subjects = [...] (token identities) or scopes = [...]");
            return None;
        }
        if g.tools.is_none() && g.prompts.is_none() && g.resources.is_none() {
            self.err(raw, "[[mcp.grants]] grants nothing: give tools = [...], prompts = [...] or resources = [...] (a field left out means every one, so name at least one)");
            return None;
        }
        let mut rules = McpRules::ALL;
        self.rule_field(&mut rules, McpKind::Tool, &g.tools);
        self.rule_field(&mut rules, McpKind::Prompt, &g.prompts);
        self.rule_field(&mut rules, McpKind::Resource, &g.resources);
        Some(Grant {
            users,
            subjects,
            scopes,
            rules,
        })
    }

    fn tool_limit(&mut self, raw: &Spanned<RawToolLimit>) -> Option<ToolLimit> {
        let l = raw.get_ref();
        let Some(list) = &l.tools else {
            self.err(
                raw,
                "[[mcp.tool_limits]] needs tools = [\"…\"] (names, '*' for any run of characters)",
            );
            return None;
        };
        let mut tools = Vec::new();
        for t in list.get_ref() {
            match Glob::parse(t) {
                Ok(g) => tools.push(g),
                Err(e) => self.err(list, format!("tools: {e}")),
            }
        }
        let mut number = |v: &S<i64>, key: &str| -> Option<u32> {
            let v = v.as_ref()?;
            if (1..=1_000_000).contains(v.get_ref()) {
                Some(*v.get_ref() as u32)
            } else {
                self.err(v, format!("{key} must be between 1 and 1000000"));
                None
            }
        };
        let per_second = number(&l.requests_per_second, "requests_per_second");
        let burst = number(&l.burst, "burst");
        let concurrency = number(&l.concurrency, "concurrency");
        if per_second.is_none() && concurrency.is_none() {
            self.err(raw, "[[mcp.tool_limits]] limits nothing: give requests_per_second (and burst) or concurrency");
            return None;
        }
        let quota = per_second.map(|r| Quota {
            per_second: r,
            burst: burst.unwrap_or(r.saturating_mul(2)),
        });
        Some(ToolLimit {
            tools,
            quota,
            concurrency,
        })
    }
}
