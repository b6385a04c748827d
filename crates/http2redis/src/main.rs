//! `http2redis`: the front daemon. Parses flags, loads the configuration,
//! starts logging and hands over to [`http2redis::run`]; `explain` runs the
//! rules on a request described on the command line instead.

use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use thr_daemon::CommonArgs;

/// mimalloc rather than glibc malloc: allocation was a fifth of the
/// daemon's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// thr's front: accepts HTTP requests, queues them in Redis and answers each
/// client with its reply.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show which rules match a request and what the front would do with it.
    Explain {
        /// Request method, e.g. GET.
        method: String,
        /// `/path?query`, or `http://host/path?query` (the host becomes Host).
        url: String,
        /// A request header, `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The client's address (default 127.0.0.1).
        #[arg(long)]
        remote_ip: Option<IpAddr>,
    },
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if cli.common.check {
        // The front also reads its TLS files (the other programs that load
        // the configuration never do).
        return match cli.common.load() {
            Err(code) => code,
            Ok(config) => match config.front.tls.as_ref().map(http2redis::tls::Tls::load) {
                Some(Err(err)) => {
                    eprintln!("{}: `http2redis.tls`: {err:#}", config.origin);
                    ExitCode::from(2)
                }
                _ => thr_daemon::checked(&config),
            },
        };
    }
    let config = match cli.common.load() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Some(Command::Explain {
        method,
        url,
        headers,
        remote_ip,
    }) = cli.command
    {
        let probe = http2redis::explain::Probe {
            method,
            url,
            headers,
            remote_ip,
        };
        return match http2redis::explain::explain(&config, &probe) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("http2redis explain: {err}");
                ExitCode::from(2)
            }
        };
    }
    let threads = config.front.threads;
    thr_daemon::block_on("http2redis", threads, serve(cli.common, config))
}

/// Logs, binds the listener and runs the front until it is asked to stop.
async fn serve(common: CommonArgs, config: thr_core::config::Config) -> ExitCode {
    thr_daemon::init_tracing(common.log_format);
    thr_daemon::limits::raise_open_files();
    let listener = match http2redis::Listener::bind(&config.front.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!(
                "http2redis: cannot listen on {}: {err}",
                config.front.listen
            );
            return ExitCode::from(1);
        }
    };
    let config = thr_daemon::watch_config(&common, config);
    match http2redis::run(config, listener, thr_daemon::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("http2redis: {err:#}");
            ExitCode::from(1)
        }
    }
}
