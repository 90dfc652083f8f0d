//! Hot reload (DESIGN.md §6): one [`Reloader`] for the keys file, the htpasswd file and the
//! TLS certificate.
//!
//! The *parent directories* are watched, not the files: a watch on a file goes deaf once an
//! editor renames a new file over it, `mv` replaces it, or Kubernetes swaps its `..data`
//! symlink (how Secret and ConfigMap volumes update). Any event naming one of the files or
//! `..data` counts; events are debounced, so a burst of writes is one reload. SIGHUP does the
//! same as a change.
//!
//! Files are read, parsed and validated on a thread of their own at the lowest CPU priority,
//! off the async runtime: a 10,000-key file takes tens of milliseconds to parse, which would
//! stall every request on a one-CPU proxy. Only the finished snapshot is swapped in. Unchanged content is skipped; a
//! file that fails to load keeps the last good state in force and is reported (log, metric,
//! `/readyz`); after a swap, every credential that can no longer be used has its live streams
//! closed.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::auth::api_key::KeySet;
use crate::auth::htpasswd::Htpasswd;
use crate::auth::jwks::Jwks;
use crate::auth::jwt::{JwkKeys, JwksSource};
use crate::auth::{CredId, Snapshot};
use crate::config::Config;
use crate::diag::Diagnostic;
use crate::streams::Streams;
use crate::tls::{CertResolver, TlsConfig};

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

/// Reloads every watched file and reports what each last reload did.
pub struct Reloader {
    credentials: Arc<ArcSwap<Snapshot>>,
    streams: Arc<Streams>,
    /// The keys file's reload status, when there is one.
    pub keys: Option<Mutex<FileStatus>>,
    /// The htpasswd file's reload status, when there is one.
    pub htpasswd: Option<Mutex<FileStatus>>,
    /// `[auth.jwt] jwks_file`'s reload status, when there is one.
    pub jwks: Option<Mutex<FileStatus>>,
    /// The key set `jwks_file` feeds.
    jwks_set: Option<Arc<Jwks>>,
    htpasswd_plaintext: bool,
    /// The served certificate and the files it comes from, when TLS is on.
    cert: Option<(Arc<CertResolver>, TlsConfig)>,
    /// One credential reload at a time (the watcher and SIGHUP may coincide).
    serial: Mutex<()>,
}

impl Reloader {
    pub fn new(
        config: &Config,
        credentials: Arc<ArcSwap<Snapshot>>,
        streams: Arc<Streams>,
        cert: Option<Arc<CertResolver>>,
        jwks: Option<Arc<Jwks>>,
    ) -> Reloader {
        let jwks_file = match config.auth.jwt.as_ref().map(|j| &j.source) {
            Some(JwksSource::File(p)) => Some(p.clone()),
            _ => None,
        };
        let status = |p: &Option<PathBuf>| p.clone().map(|p| Mutex::new(FileStatus::new(p)));
        Reloader {
            credentials,
            streams,
            keys: status(&config.auth.keys_file),
            htpasswd: status(&config.auth.htpasswd_file),
            jwks: status(&jwks_file),
            jwks_set: jwks,
            htpasswd_plaintext: config.auth.htpasswd_plaintext,
            cert: cert.zip(config.tls.as_ref().map(|t| t.files.clone())),
            serial: Mutex::new(()),
        }
    }

    /// A copy of a file's status.
    pub fn status(which: &Option<Mutex<FileStatus>>) -> Option<FileStatus> {
        which
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Watch every file this reloads until `stop`; the watchers must be kept alive.
    pub fn watch(
        self: &Arc<Self>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Vec<notify::RecommendedWatcher>> {
        let mut watchers = Vec::new();
        if let Some((_, files)) = &self.cert {
            let this = self.clone();
            let watched = [files.cert.clone(), files.key.clone()];
            let w = watch(&watched, stop.clone(), move || this.reload_certificate())
                .map_err(|e| anyhow::anyhow!("cannot watch the certificate files: {e}"))?;
            watchers.push(w);
        }
        let credential_files: Vec<PathBuf> = [&self.keys, &self.htpasswd]
            .into_iter()
            .filter_map(|s| Reloader::status(s).map(|s| s.file))
            .collect();
        if let Some(file) = Reloader::status(&self.jwks).map(|s| s.file) {
            let this = self.clone();
            let w = watch(&[file], stop.clone(), move || this.reload_jwks())
                .map_err(|e| anyhow::anyhow!("cannot watch the JWKS file: {e}"))?;
            watchers.push(w);
        }
        if !credential_files.is_empty() {
            let this = self.clone();
            let w = watch(&credential_files, stop.clone(), move || {
                this.reload_credentials()
            })
            .map_err(|e| anyhow::anyhow!("cannot watch the credential files: {e}"))?;
            watchers.push(w);
        }
        Ok(watchers)
    }

    /// Re-read everything (SIGHUP), off the runtime; returns when done.
    pub async fn reload(self: &Arc<Self>) {
        let this = self.clone();
        off_runtime(move || {
            this.reload_certificate();
            this.reload_credentials();
            this.reload_jwks();
        })
        .await;
    }

    /// Load the certificate pair again and serve it to new handshakes; a broken or mismatched
    /// pair keeps the last good one in force. Blocking: reads files.
    pub fn reload_certificate(&self) {
        let Some((resolver, files)) = &self.cert else {
            return;
        };
        match crate::tls::load_cert(&files.cert, &files.key) {
            Ok(new) => {
                let old = resolver.current();
                if old.key.cert == new.key.cert {
                    return;
                }
                tracing::info!(
                    event = "reload", file = "tls", result = "ok",
                    subject = %new.subject,
                    not_after = %humantime::format_rfc3339_seconds(new.not_after),
                    "certificate reloaded"
                );
                if let Some(w) = crate::tls::expiry_warning(&new, &files.cert, SystemTime::now()) {
                    tracing::warn!("{w}");
                }
                resolver.swap(new);
                resolver
                    .reloads_ok
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                resolver
                    .reloads_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(event = "reload", file = "tls", result = "error", error = %e, "certificate not reloaded; the previous one stays in use");
            }
        }
    }

    /// Re-read the keys file and the htpasswd file; swap in what changed and loaded, then close
    /// the streams of every credential that can no longer be used. Blocking: reads and parses.
    pub fn reload_credentials(&self) {
        let _one_at_a_time = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.credentials.load_full();
        let mut new = (*old).clone();
        let mut changed = false;
        if let Some(status) = &self.keys {
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
        if let Some(status) = &self.htpasswd {
            let started = std::time::Instant::now();
            let plaintext = self.htpasswd_plaintext;
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
        self.credentials.store(Arc::new(new));
        tracing::info!(event = "reload", generation, "credentials swapped");
        self.revoke(&revoked);
        // The old snapshot (a whole keys file) is freed here, on this thread.
        drop(old);
    }

    /// Re-read `jwks_file` and swap in its keys; a file that does not parse, or holds no
    /// usable key, keeps the last good set. Blocking: reads and parses.
    pub fn reload_jwks(&self) {
        let (Some(status), Some(jwks)) = (&self.jwks, &self.jwks_set) else {
            return;
        };
        if let Attempt::Loaded(keys) = attempt(status, "jwks", JwkKeys::parse_file) {
            tracing::info!(
                event = "reload",
                file = "jwks",
                result = "ok",
                keys = keys.len(),
                "JWKS reloaded"
            );
            jwks.install(keys);
        }
    }

    /// Close the streams of keys whose `expires` passed in `(since, now]`.
    pub fn revoke_expired(&self, since: SystemTime, now: SystemTime) {
        let snapshot = self.credentials.load();
        let expired: Vec<Revoked> = snapshot
            .keys
            .keys()
            .filter(|k| k.enabled && k.expires.is_some_and(|e| since < e && e <= now))
            .map(|key| Revoked {
                cred: CredId::Key(*key.digest()),
                kind: "key",
                name: key.name.clone(),
                fingerprint: Some(key.fingerprint.clone()),
                reason: "expired",
            })
            .collect();
        self.revoke(&expired);
    }

    /// Close the live streams of every revoked credential (one pass over the registry, however
    /// many there are), and write one audit line per credential.
    fn revoke(&self, revoked: &[Revoked]) {
        if revoked.is_empty() {
            return;
        }
        let creds: std::collections::HashSet<&CredId> = revoked.iter().map(|r| &r.cred).collect();
        let closed = self.streams.revoke_all(&creds);
        for r in revoked {
            let closed = closed.get(&r.cred).copied().unwrap_or(0);
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
}

impl crate::metrics::ReloadReport for Reloader {
    fn rows(&self) -> Vec<crate::metrics::ReloadRow> {
        let mut rows = Vec::new();
        let files = [
            ("keys", &self.keys),
            ("htpasswd", &self.htpasswd),
            ("jwks", &self.jwks),
        ];
        for (file, status) in files {
            if let Some(s) = Reloader::status(status) {
                rows.push(crate::metrics::ReloadRow {
                    file,
                    ok: s.reloads_ok,
                    failed: s.reloads_failed,
                    last_success: s.last_success,
                });
            }
        }
        if let Some((t, _)) = &self.cert {
            use std::sync::atomic::Ordering::Relaxed;
            rows.push(crate::metrics::ReloadRow {
                file: "tls",
                ok: t.reloads_ok.load(Relaxed),
                failed: t.reloads_failed.load(Relaxed),
                last_success: t.last_success(),
            });
        }
        rows
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
    // The status is locked only to read and to record: /readyz and /metrics read it from the
    // runtime, which must never wait for a file to settle or parse.
    let (path, last_good) = {
        let st = status.lock().unwrap_or_else(|p| p.into_inner());
        (st.file.clone(), st.content)
    };
    let outcome = read_settled(&path, last_good).and_then(|read| match read {
        None => Ok(None),
        Some((bytes, content)) => {
            let text = String::from_utf8(bytes)
                .map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
            match parse(&path, &text) {
                Ok(loaded) => Ok(Some((loaded, content))),
                Err(diagnostics) => {
                    let text: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
                    Err(text.join("; "))
                }
            }
        }
    });
    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
    match outcome {
        // The last good content, again (possibly after a failed attempt): nothing to swap.
        Ok(None) => {
            st.ok = true;
            st.error = None;
            Attempt::Unchanged
        }
        Ok(Some((loaded, content))) => {
            st.content = Some(content);
            st.ok = true;
            st.error = None;
            st.loads += 1;
            st.reloads_ok += 1;
            st.last_success = SystemTime::now();
            Attempt::Loaded(loaded)
        }
        Err(error) => {
            tracing::error!(event = "reload", file = label, path = %path.display(), result = "error", error = %error, "{label} not reloaded; the previous set stays in force");
            st.ok = false;
            st.error = Some(error);
            st.reloads_failed += 1;
            Attempt::Failed
        }
    }
}

/// A settled file's bytes and their SHA-256.
type Settled = (Vec<u8>, [u8; 32]);

/// How many times a changing file is read again, [`DEBOUNCE`] apart, before the attempt gives
/// up until its next change.
const SETTLE_READS: u32 = 10;

/// The file's content once it has settled: the same bytes on two reads [`DEBOUNCE`] apart, so
/// a file being rewritten in place, with pauses, is never used half-written (a restricted key
/// whose `allow` line is not written yet must not pass as unrestricted). `Ok(None)` when the
/// content is the last good one. Blocking: sleeps between reads.
fn read_settled(path: &Path, last_good: Option<[u8; 32]>) -> Result<Option<Settled>, String> {
    let read = || std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()));
    let mut bytes = read()?;
    let mut content: [u8; 32] = Sha256::digest(&bytes).into();
    for _ in 0..SETTLE_READS {
        if last_good == Some(content) {
            return Ok(None);
        }
        std::thread::sleep(DEBOUNCE);
        let again = read()?;
        let again_content: [u8; 32] = Sha256::digest(&again).into();
        if again_content == content {
            return Ok(Some((bytes, content)));
        }
        (bytes, content) = (again, again_content);
    }
    Err(format!(
        "{}: still changing after {} reads {DEBOUNCE:?} apart; read again at its next change",
        path.display(),
        SETTLE_READS + 1
    ))
}

/// A credential a swap took away, for the audit line.
struct Revoked {
    cred: CredId,
    kind: &'static str,
    name: String,
    fingerprint: Option<String>,
    reason: &'static str,
}

/// Every credential usable under `old` that is not under `new`: a key removed, disabled,
/// expired or re-keyed (its digest gone), an htpasswd user removed or given a new hash.
fn revoked_between(old: &Snapshot, new: &Snapshot, now: SystemTime) -> Vec<Revoked> {
    let mut out = Vec::new();
    for key in old.keys.keys() {
        if !key.usable(now) || new.keys.usable(key.digest(), now) {
            continue;
        }
        let reason = match new.keys.get(key.digest()) {
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

/// Run `f` on a thread of its own at the lowest CPU priority, and wait for it: on a proxy
/// limited to one CPU, reading and parsing a large file must yield the CPU to requests rather
/// than share it with them. Not a thread of the runtime's blocking pool, which keeps its
/// threads (and their priority) for other work. A thread that cannot be started is logged,
/// and the last good state stays in force.
async fn off_runtime(f: impl FnOnce() + Send + 'static) {
    let (done, finished) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("portcullis-reload".into())
        .spawn(move || {
            crate::cpu::lowest_priority();
            f();
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            if finished.await.is_err() {
                tracing::error!(
                    event = "reload",
                    "the reload thread panicked; the previous state stays in force"
                );
            }
        }
        Err(e) => {
            tracing::error!(event = "reload", error = %e, "cannot start a reload thread; the previous state stays in force");
        }
    }
}

/// How long to wait for a burst of events to settle before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watch `files`; run `on_change` once per settled burst of changes until `stop`, on a
/// thread of its own (it reads and parses files: never on the async runtime, whose requests it
/// would stall), one run at a time. The returned watcher must be kept alive.
fn watch<F>(
    files: &[PathBuf],
    stop: CancellationToken,
    on_change: F,
) -> notify::Result<notify::RecommendedWatcher>
where
    F: Fn() + Send + Sync + 'static,
{
    let on_change = Arc::new(on_change);
    let mut names: HashSet<OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect();
    names.insert(OsString::from("..data"));
    let dirs: HashSet<PathBuf> = files
        .iter()
        .map(|f| f.parent().unwrap_or(Path::new(".")).to_path_buf())
        .collect();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(e) => e
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.contains(n))),
            // An overflow or watch error: reload to be safe.
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(());
        }
    })?;
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = rx.recv() => if got.is_none() { return },
            }
            // Let the burst settle: every further event restarts the wait.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                    got = rx.recv() => if got.is_none() { return },
                }
            }
            let run = on_change.clone();
            off_runtime(move || run()).await;
        }
    });
    Ok(watcher)
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
