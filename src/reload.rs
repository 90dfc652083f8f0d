//! Watching files for hot reload.
//!
//! The *parent directories* are watched, not the files: a watch on a file goes deaf once an
//! editor renames a new file over it, `mv` replaces it, or Kubernetes swaps its `..data`
//! symlink (how Secret and ConfigMap volumes update). Any event naming one of the files or
//! `..data` counts; events are debounced, so a burst of writes is one reload.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;

/// How long to wait for a burst of events to settle before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watch `files`; call `on_change` once per settled burst of changes until `stop`.
/// The returned watcher must be kept alive.
pub fn watch<F>(
    files: &[PathBuf],
    stop: CancellationToken,
    on_change: F,
) -> notify::Result<notify::RecommendedWatcher>
where
    F: Fn() + Send + 'static,
{
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
            on_change();
        }
    });
    Ok(watcher)
}
