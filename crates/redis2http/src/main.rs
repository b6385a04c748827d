//! `redis2http`: the worker daemon. Parses flags, loads the configuration,
//! starts logging and hands over to [`redis2http::run`].

use std::process::ExitCode;

use clap::Parser;
use thr_daemon::CommonArgs;

/// mimalloc rather than glibc malloc: allocation was a fifth of the
/// daemon's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// thr's worker: claims queued requests from Redis in priority order,
/// forwards them to the queue's backend and pushes the replies back.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if cli.common.check {
        return cli.common.check();
    }
    let config = match cli.common.load() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let threads = config.worker.threads;
    thr_daemon::block_on("redis2http", threads, serve(cli.common, config))
}

/// Logs and runs the worker until it is asked to stop.
async fn serve(common: CommonArgs, config: thr_core::config::Config) -> ExitCode {
    thr_daemon::init_tracing(common.log_format);
    let config = thr_daemon::watch_config(&common, config);
    match redis2http::run(config, thr_daemon::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("redis2http: {err:#}");
            ExitCode::from(1)
        }
    }
}
