//! Start-up plumbing shared by `http2redis` and `redis2http`: the common
//! flags, loading the configuration with command-line overrides, logging,
//! and turning SIGTERM / Ctrl-C into a shutdown future.
//!
//! Keeping it here keeps both `main.rs` files thin (parse, load, log, run).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use thr_core::config::Config;

/// Flags every thr daemon takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Configuration file [default: config/thr.toml if the working
    /// directory has one, else /etc/thr/thr.toml].
    #[arg(long, short = 'c', env = "THR_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Redis URL, overriding `[redis].url`.
    #[arg(long, env = "THR_REDIS_URL", global = true)]
    pub redis: Option<String>,
    /// Validate the configuration, print every error, and exit.
    #[arg(long, global = true)]
    pub check: bool,
    /// Log format.
    #[arg(long, value_enum, env = "THR_LOG_FORMAT", default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl CommonArgs {
    /// The configuration file: `--config`, else [`Config::default_path`]
    /// (found once, then kept: reloads read the same file).
    pub fn config_path(&mut self) -> Result<PathBuf, ExitCode> {
        match self.config.clone().or_else(Config::default_path) {
            Some(path) => {
                self.config = Some(path.clone());
                Ok(path)
            }
            None => {
                eprintln!(
                    "no configuration file: neither {} (in the working directory) nor {} exists; name one with --config",
                    thr_core::config::LOCAL_CONFIG,
                    thr_core::config::SYSTEM_CONFIG
                );
                Err(ExitCode::from(2))
            }
        }
    }

    /// Loads the configuration and applies the command-line overrides.
    /// On error, prints every problem and returns the exit code to use.
    pub fn load(&mut self) -> Result<Config, ExitCode> {
        match Config::load(&self.config_path()?) {
            Ok(mut config) => {
                if let Some(url) = &self.redis {
                    config.redis.url = url.clone();
                }
                Ok(config)
            }
            Err(errors) => {
                eprint!("{errors}");
                Err(ExitCode::from(2))
            }
        }
    }

    /// For `--check`: prints a verdict and the exit code.
    pub fn check(&mut self) -> ExitCode {
        match self.load() {
            Ok(config) => checked(&config),
            Err(code) => code,
        }
    }
}

/// `--check`'s verdict on a configuration found valid.
pub fn checked(config: &Config) -> ExitCode {
    println!(
        "{}: ok ({} queue{})",
        config.origin,
        config.queues.len(),
        if config.queues.len() == 1 { "" } else { "s" }
    );
    ExitCode::SUCCESS
}

impl CommonArgs {}

/// Runs the daemon `name`'s main future on a runtime of `threads`
/// ([`runtime`]); a runtime that cannot start is exit code 1.
pub fn block_on(
    name: &str,
    threads: usize,
    main: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    match runtime(threads) {
        Ok(runtime) => runtime.block_on(main),
        Err(err) => {
            eprintln!("{name}: cannot start the runtime: {err}");
            ExitCode::from(1)
        }
    }
}

/// The daemon's async runtime: `threads` from its configuration section.
/// One thread (the default) is a current-thread runtime: every task runs
/// on the main thread, so a request crossing the front or the worker wakes
/// no other thread. Zero means one worker thread per CPU core.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

/// Tells systemd (a `Type=notify` unit, see `contrib/systemd`) that the
/// daemon serves now. Does nothing outside systemd (no `NOTIFY_SOCKET`).
pub fn notify_ready() {
    if let Err(err) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(%err, "could not tell systemd that the daemon is ready");
    }
}

/// Tells systemd that the daemon is stopping (its grace has begun).
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Starts logging to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a file or a journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Resolves when the process is asked to stop (SIGTERM, SIGINT). The
/// handlers are installed by this call, not when the future is first
/// polled: a daemon tells systemd it is ready before its main loop polls
/// the future, and a SIGTERM in between must not kill it unannounced.
/// Call it within the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
        async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = int.recv() => tracing::info!("interrupt received, shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Starts watching the configuration: SIGHUP, or a change of the file (its
/// directory is watched, since editors save by renaming), reloads it. A
/// valid file replaces the configuration atomically for new requests;
/// an invalid one is logged with every error and the old one stays.
pub fn watch_config(
    args: &CommonArgs,
    initial: Config,
) -> tokio::sync::watch::Receiver<Arc<Config>> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| initial.origin.clone().into());
    reload::spawn(path, args.redis.clone(), initial)
}

/// A configuration that never changes (tests, tools).
pub fn fixed_config(config: Config) -> tokio::sync::watch::Receiver<Arc<Config>> {
    tokio::sync::watch::channel(Arc::new(config)).1
}

mod reload;

pub mod admin;
pub mod limits;
pub mod log_every;
