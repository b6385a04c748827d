//! Configuration reloads: SIGHUP and file changes, debounced, validated,
//! published on a `watch` channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use thr_core::config::Config;
use tokio::sync::{mpsc, watch};

/// Editors write a file in several steps; wait for them to settle.
const SETTLE: Duration = Duration::from_millis(150);

pub(crate) fn spawn(
    path: PathBuf,
    redis: Option<String>,
    initial: Config,
) -> watch::Receiver<Arc<Config>> {
    let (tx, rx) = watch::channel(Arc::new(initial));
    let (events, mut changed) = mpsc::unbounded_channel::<()>();
    let watcher = file_watcher(&path, events);
    tokio::spawn(async move {
        // Keep the watcher alive as long as the loop runs.
        let _watcher = watcher;
        let mut hup = hangup();
        loop {
            let why = tokio::select! {
                Some(()) = changed.recv() => "file changed",
                Some(()) = recv_hup(&mut hup) => "SIGHUP",
                else => break,
            };
            tokio::time::sleep(SETTLE).await;
            while changed.try_recv().is_ok() {}
            match Config::load(&path) {
                Ok(mut config) => {
                    if let Some(url) = &redis {
                        config.redis.url = url.clone();
                    }
                    warn_about_restart_only_settings(&tx.borrow(), &config);
                    tracing::info!(
                        reason = why,
                        queues = config.queues.len(),
                        rules = config.rules.len(),
                        "configuration reloaded"
                    );
                    if tx.send(Arc::new(config)).is_err() {
                        break;
                    }
                }
                Err(errors) => {
                    for e in errors.iter() {
                        tracing::error!(
                            reason = why,
                            "reload refused, keeping the running configuration: {e}"
                        );
                    }
                }
            }
        }
    });
    rx
}

fn warn_about_restart_only_settings(old: &Config, new: &Config) {
    if old.front.listen != new.front.listen {
        tracing::warn!(old = %old.front.listen, new = %new.front.listen, "`http2redis.listen` changes only on restart");
    }
    if old.redis.url != new.redis.url {
        tracing::warn!("`redis.url` changes only on restart");
    }
    // The front's HTTP settings are its connection builder's and its
    // connection cap, made once at start.
    let (o, n) = (&old.front, &new.front);
    for (changed, key) in [
        (o.max_connections != n.max_connections, "max_connections"),
        (
            o.header_read_timeout != n.header_read_timeout,
            "header_read_timeout",
        ),
        (o.max_header_bytes != n.max_header_bytes, "max_header_size"),
        (o.max_headers != n.max_headers, "max_headers"),
        (o.threads != n.threads, "threads"),
        // Whether the listener speaks TLS is fixed; its files reload.
        (o.tls.is_some() != n.tls.is_some(), "tls"),
    ] {
        if changed {
            tracing::warn!("`http2redis.{key}` changes only on restart");
        }
    }
    if old.worker.threads != new.worker.threads {
        tracing::warn!("`redis2http.threads` changes only on restart");
    }
}

fn file_watcher(
    path: &Path,
    events: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    let name = path.file_name()?.to_os_string();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !event.kind.is_access()
            && event
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
        {
            let _ = events.send(());
        }
    })
    .map_err(|e| tracing::warn!(%e, "cannot watch the configuration file; SIGHUP still reloads"))
    .ok()?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!(%e, dir = %dir.display(), "cannot watch the configuration directory"))
        .ok()?;
    Some(watcher)
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn hangup() -> Hangup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

async fn recv_hup(hup: &mut Hangup) -> Option<()> {
    #[cfg(unix)]
    {
        match hup {
            Some(signal) => signal.recv().await,
            None => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = hup;
        std::future::pending().await
    }
}
