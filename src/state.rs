//! [`Snapshot`]: everything a request reads that a reload may replace, built before it is
//! swapped in. Requests load one snapshot once and use it to the end.
//!
//! Reloading (DESIGN.md §6): the keys file and the htpasswd file are re-read when the watcher
//! or SIGHUP says so. Unchanged content is skipped; a file that fails to load keeps the last
//! good set in force and is reported; after a swap, every credential that can no longer be
//! used has its live streams closed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::auth::api_key::KeySet;
use crate::auth::htpasswd::Htpasswd;
use crate::config::Config;
use crate::diag::Diagnostic;
use crate::proxy::Proxy;
use crate::streams::CredId;

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub keys: KeySet,
    pub htpasswd: Option<Arc<Htpasswd>>,
    /// 1 at start, one more for every swap.
    pub generation: u64,
}

impl Snapshot {
    pub fn from_config(config: &Config) -> Snapshot {
        Snapshot {
            keys: config.auth.keys.clone(),
            htpasswd: config.auth.htpasswd.clone(),
            generation: 1,
        }
    }
}

/// What the last reloads of one file did, for logs, `/readyz` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileStatus {
    pub file: PathBuf,
    /// Whether the last attempt loaded (or found the content unchanged).
    pub ok: bool,
    /// Why the last attempt failed, when it did.
    pub error: Option<String>,
    /// Successful loads, counting the one at start.
    pub loads: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    #[serde(serialize_with = "rfc3339")]
    pub last_success: SystemTime,
    #[serde(skip)]
    content: Option<[u8; 32]>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string())
}

impl FileStatus {
    fn new(file: PathBuf) -> FileStatus {
        FileStatus {
            file,
            ok: true,
            error: None,
            loads: 1,
            reloads_ok: 0,
            reloads_failed: 0,
            last_success: SystemTime::now(),
            // Unknown at start: the first reload parses whatever is there.
            content: None,
        }
    }
}

/// The reload status of the keys file and the htpasswd file.
#[derive(Debug)]
pub struct Reloads {
    pub keys: Option<Mutex<FileStatus>>,
    pub htpasswd: Option<Mutex<FileStatus>>,
    /// One reload at a time (the watcher and SIGHUP may coincide).
    serial: Mutex<()>,
}

impl Reloads {
    pub fn new(config: &Config) -> Reloads {
        let status = |p: &Option<PathBuf>| p.clone().map(|p| Mutex::new(FileStatus::new(p)));
        Reloads {
            keys: status(&config.auth.keys_file),
            htpasswd: status(&config.auth.htpasswd_file),
            serial: Mutex::new(()),
        }
    }

    /// A copy of a file's status.
    pub fn status(which: &Option<Mutex<FileStatus>>) -> Option<FileStatus> {
        which
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

enum Attempt<T> {
    Unchanged,
    Loaded(T),
    Failed,
}

/// Read and parse one file; record the result in `status` and log it.
fn attempt<T>(
    status: &Mutex<FileStatus>,
    label: &'static str,
    parse: impl FnOnce(&Path, &str) -> Result<T, Vec<Diagnostic>>,
) -> Attempt<T> {
    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
    let path = st.file.clone();
    let failed = |st: &mut FileStatus, error: String| {
        tracing::error!(event = "reload", file = label, path = %path.display(), result = "error", error = %error, "{label} not reloaded; the previous set stays in force");
        st.ok = false;
        st.error = Some(error);
        st.reloads_failed += 1;
        Attempt::Failed
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => return failed(&mut st, format!("{}: cannot read: {e}", path.display())),
    };
    let content: [u8; 32] = Sha256::digest(&bytes).into();
    if st.content == Some(content) {
        // The last good content, again (possibly after a failed attempt): nothing to swap.
        st.ok = true;
        st.error = None;
        return Attempt::Unchanged;
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(_) => return failed(&mut st, format!("{}: not UTF-8 text", path.display())),
    };
    match parse(&path, &text) {
        Ok(loaded) => {
            st.content = Some(content);
            st.ok = true;
            st.error = None;
            st.loads += 1;
            st.reloads_ok += 1;
            st.last_success = SystemTime::now();
            Attempt::Loaded(loaded)
        }
        Err(diagnostics) => {
            let text: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
            failed(&mut st, text.join("; "))
        }
    }
}

/// A credential a swap took away, for the audit line.
struct Revoked {
    cred: CredId,
    kind: &'static str,
    name: String,
    fingerprint: Option<String>,
    reason: &'static str,
}

impl Proxy {
    /// Re-read the keys file and the htpasswd file; swap in what changed and loaded, then close
    /// the streams of every credential that can no longer be used.
    pub fn reload_credentials(&self) {
        let reloads = &self.reloads;
        let _one_at_a_time = reloads.serial.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.snapshot.load_full();
        let mut new = (*old).clone();
        let mut changed = false;
        if let Some(status) = &reloads.keys {
            let started = std::time::Instant::now();
            if let Attempt::Loaded(mut keys) = attempt(status, "keys", KeySet::parse) {
                keys.adopt_stats(&old.keys);
                tracing::info!(
                    event = "reload",
                    file = "keys",
                    result = "ok",
                    keys = keys.len(),
                    enabled = keys.enabled_count(),
                    // Reading, parsing and validating the whole file.
                    duration_ms = started.elapsed().as_millis() as u64,
                    "keys reloaded"
                );
                new.keys = keys;
                changed = true;
            }
        }
        if let Some(status) = &reloads.htpasswd {
            let started = std::time::Instant::now();
            let plaintext = self.config.auth.htpasswd_plaintext;
            let parse = |path: &Path, text: &str| Htpasswd::parse(path, text, plaintext);
            if let Attempt::Loaded((file, warnings)) = attempt(status, "htpasswd", parse) {
                for w in warnings {
                    tracing::warn!("{}", w.0);
                }
                tracing::info!(
                    event = "reload",
                    file = "htpasswd",
                    result = "ok",
                    users = file.len(),
                    duration_ms = started.elapsed().as_millis() as u64,
                    "htpasswd reloaded"
                );
                new.htpasswd = Some(Arc::new(file));
                changed = true;
            }
        }
        if !changed {
            return;
        }
        new.generation = old.generation + 1;
        let generation = new.generation;
        let revoked = revoked_between(&old, &new, SystemTime::now());
        self.snapshot.store(Arc::new(new));
        tracing::info!(event = "reload", generation, "credentials swapped");
        for r in revoked {
            self.revoke(&r);
        }
    }

    /// Close the streams of keys whose `expires` passed in `(since, now]`.
    pub fn revoke_expired(&self, since: SystemTime, now: SystemTime) {
        let snapshot = self.snapshot.load();
        for key in snapshot.keys.keys() {
            if key.enabled && key.expires.is_some_and(|e| since < e && e <= now) {
                self.revoke(&Revoked {
                    cred: CredId::Key(*key.digest()),
                    kind: "key",
                    name: key.name.clone(),
                    fingerprint: Some(key.fingerprint.clone()),
                    reason: "expired",
                });
            }
        }
    }

    fn revoke(&self, r: &Revoked) {
        let closed = self.streams.revoke(|c| c == &r.cred);
        tracing::info!(
            event = "credential_revoked",
            credential = r.kind,
            name = %r.name,
            key_fp = r.fingerprint.as_deref(),
            reason = r.reason,
            streams_closed = closed,
            "{} {:?} {}: {closed} live stream(s) closed",
            r.kind,
            r.name,
            r.reason
        );
    }
}

/// Every credential usable under `old` that is not under `new`: a key removed, disabled,
/// expired or re-keyed (its digest gone), an htpasswd user removed or given a new hash.
fn revoked_between(old: &Snapshot, new: &Snapshot, now: SystemTime) -> Vec<Revoked> {
    let mut out = Vec::new();
    for key in old.keys.keys() {
        if !key.usable(now) || new.keys.usable(key.digest(), now) {
            continue;
        }
        let reason = match new.keys.keys().find(|k| k.digest() == key.digest()) {
            None => "removed",
            Some(k) if !k.enabled => "disabled",
            Some(_) => "expired",
        };
        out.push(Revoked {
            cred: CredId::Key(*key.digest()),
            kind: "key",
            name: key.name.clone(),
            fingerprint: Some(key.fingerprint.clone()),
            reason,
        });
    }
    if let Some(old_users) = &old.htpasswd {
        for user in old_users.users() {
            let now_stored = new
                .htpasswd
                .as_ref()
                .and_then(|f| f.user(&user.name))
                .map(|u| u.stored.as_str());
            let reason = match now_stored {
                Some(s) if s == user.stored => continue,
                Some(_) => "password_changed",
                None => "removed",
            };
            out.push(Revoked {
                cred: CredId::User(user.name.as_str().into()),
                kind: "user",
                name: user.name.clone(),
                fingerprint: None,
                reason,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> KeySet {
        KeySet::parse(Path::new("keys.toml"), text).unwrap()
    }

    fn users(text: &str) -> Option<Arc<Htpasswd>> {
        Some(Arc::new(
            Htpasswd::parse(Path::new("htpasswd"), text, true)
                .unwrap()
                .0,
        ))
    }

    #[test]
    fn removed_disabled_rekeyed_and_changed_credentials_are_revoked_and_others_are_not() {
        let a = "mas_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let b = "mas_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        let c = "mas_cccccccccccccccccccccccccccccccccccccccccccc";
        let c2 = "mas_dddddddddddddddddddddddddddddddddddddddddddd";
        let old = Snapshot {
            keys: keys(&format!(
                "[[keys]]\nname=\"a\"\napi_key=\"{a}\"\n[[keys]]\nname=\"b\"\napi_key=\"{b}\"\n\
                 [[keys]]\nname=\"c\"\napi_key=\"{c}\"\n"
            )),
            htpasswd: users("alice:one\nbob:two\ncarol:three\n"),
            generation: 1,
        };
        let new = Snapshot {
            // a: unchanged; b: disabled; c: re-keyed under the same name.
            keys: keys(&format!(
                "[[keys]]\nname=\"a\"\napi_key=\"{a}\"\n[[keys]]\nname=\"b\"\napi_key=\"{b}\"\nenabled=false\n\
                 [[keys]]\nname=\"c\"\napi_key=\"{c2}\"\n"
            )),
            // alice unchanged, bob's password changed, carol removed.
            htpasswd: users("alice:one\nbob:new\n"),
            generation: 2,
        };
        let mut got: Vec<(String, &str)> = revoked_between(&old, &new, SystemTime::now())
            .into_iter()
            .map(|r| (r.name, r.reason))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("b".into(), "disabled"),
                ("bob".into(), "password_changed"),
                ("c".into(), "removed"),
                ("carol".into(), "removed"),
            ]
        );
    }
}
