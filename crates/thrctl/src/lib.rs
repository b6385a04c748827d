//! thrctl, the operator's view of thr: what waits, what runs, which quotas
//! are full, who is alive; and the few actions an operator needs (purge,
//! pause, resume, retry). Every read command has `--json` (stable field
//! names, documented in the README) for scripts.
//!
//! - [`commands`]: one function per subcommand;
//! - [`table`]: aligned text tables that fit the terminal;
//! - [`top`]: the live view (ratatui).

pub mod commands;
pub mod table;
pub mod top;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use thr_broker::protocol::keys::DEFAULT_NAMESPACE;
use thr_broker::{Broker, RedisBroker};
use thr_core::config::Config;

/// See and act on thr's queues.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Redis URL (default: the configuration's, else redis://127.0.0.1:6379).
    #[arg(long, env = "THR_REDIS_URL", global = true)]
    pub redis: Option<String>,
    /// Configuration file: queue names, limits, Redis URL [default:
    /// config/thr.toml if the working directory has one, else
    /// /etc/thr/thr.toml if it exists, else none].
    #[arg(long, short = 'c', env = "THR_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text (read commands).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// thrctl's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every queue, live fronts and workers, saturated quotas: one screen.
    Status,
    /// Queue depths.
    Queues,
    /// One queue's waiting jobs, in dispatch order, paged.
    Queue {
        /// Queue name.
        name: String,
        /// Page (from 1).
        #[arg(long, default_value_t = 1)]
        page: usize,
        /// Jobs per page.
        #[arg(long, default_value_t = 50)]
        per_page: usize,
    },
    /// Jobs running now, longest first.
    Running {
        /// Only this queue.
        name: Option<String>,
    },
    /// Quotas in use: running, waiting, rate state.
    Limits,
    /// One job in full.
    Show {
        /// Job id.
        id: String,
        /// Print the body too.
        #[arg(long)]
        body: bool,
    },
    /// Cancel waiting jobs (their clients get 503).
    Purge {
        /// Queue name.
        name: String,
        /// Only jobs waiting longer than this, e.g. 5m.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// Only jobs of a priority above (less urgent than) this.
        #[arg(long)]
        priority_above: Option<u8>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Stop workers from claiming from a queue (clients keep waiting).
    Pause {
        /// Queue name.
        name: String,
    },
    /// Let workers claim from a paused queue again.
    Resume {
        /// Queue name.
        name: String,
    },
    /// Jobs set aside, with the reason.
    DeadLetters {
        /// Only this queue.
        name: Option<String>,
    },
    /// Run a dead letter again.
    Retry {
        /// Job id.
        id: String,
    },
    /// Live view, refreshed every second (q to quit).
    Top,
    /// Validate a configuration file and print every error.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// Show which rules match a request and what the front would do.
    Explain {
        /// Method.
        method: String,
        /// `/path?query` or `http://host/path?query`.
        url: String,
        /// `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
}

/// A failure: a one-line message and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong, for the operator.
    pub message: String,
    /// 1: Redis or I/O trouble; 2: bad input (unknown queue or id, bad config).
    pub code: u8,
}

impl Failure {
    /// Bad input.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 2,
        }
    }
}

impl From<thr_broker::BrokerError> for Failure {
    fn from(err: thr_broker::BrokerError) -> Failure {
        Failure {
            message: err.to_string(),
            code: 1,
        }
    }
}

/// What a command works on.
pub struct Context {
    /// The Redis connection.
    pub broker: RedisBroker,
    /// The configuration, when given.
    pub config: Option<Config>,
    /// Queue names: the configuration's, else those found in Redis.
    pub queues: Vec<String>,
    /// JSON output.
    pub json: bool,
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let one_line = |e: thr_core::config::ConfigErrors| e.to_string().trim_end().replace('\n', "; ");
    let config = match (&cli.config, Config::default_path()) {
        (Some(path), _) => Some(Config::load(path).map_err(|e| Failure::usage(one_line(e)))?),
        // Found, not asked for: one an operator may not be allowed to read
        // (/etc/thr is the daemons') is passed over, not an error.
        (None, Some(path)) => match Config::load(&path) {
            Ok(config) => Some(config),
            Err(e) => {
                eprintln!(
                    "thrctl: not using {} ({}); give --config or --redis",
                    path.display(),
                    one_line(e)
                );
                None
            }
        },
        (None, None) => None,
    };
    match &cli.command {
        Command::CheckConfig { file } => return commands::check_config(file),
        Command::Explain {
            method,
            url,
            headers,
        } => {
            let config = config.ok_or_else(|| Failure::usage("explain needs --config"))?;
            return commands::explain(&config, method, url, headers);
        }
        _ => {}
    }
    // Each call thrctl makes is short (reads and purges go a page at a
    // time); this bounds a wait behind busy production traffic.
    let timeout = Duration::from_secs(3);
    let url = cli
        .redis
        .clone()
        .or_else(|| config.as_ref().map(|c| c.redis.url.clone()))
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_string());
    // With a configuration: its namespace and TLS CA (the URL may be
    // overridden by --redis).
    let ca = config
        .as_ref()
        .and_then(|c| c.redis.tls_ca_file.as_ref())
        .map(std::fs::read)
        .transpose();
    let ca = ca.map_err(|e| Failure::usage(format!("cannot read the TLS CA file: {e}")))?;
    let namespace = config
        .as_ref()
        .map_or(DEFAULT_NAMESPACE, |c| c.redis.namespace.as_str());
    let broker = RedisBroker::connect(&url, timeout, ca, namespace)
        .map_err(|e| Failure::usage(e.to_string()))?;
    broker.ping().await.map_err(|e| Failure {
        message: format!(
            "cannot reach Redis at {}: {e}",
            thr_broker::redis::redact_url(&url)
        ),
        code: 1,
    })?;
    let queues = match &config {
        Some(c) => c.queues.iter().map(|q| q.name.clone()).collect(),
        None => broker.queue_names().await?,
    };
    let cx = Context {
        broker,
        config,
        queues,
        json: cli.json,
    };
    commands::dispatch(&cx, cli.command).await
}
