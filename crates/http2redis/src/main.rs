//! `http2redis`: the front daemon. Parses flags, loads the configuration,
//! starts logging and hands over to [`http2redis::run`].

use std::process::ExitCode;

use clap::Parser;
use thr_daemon::CommonArgs;

/// thr's front: accepts HTTP requests, queues them in Redis and answers each
/// client with its reply.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.common.check {
        return cli.common.check();
    }
    let config = match cli.common.load() {
        Ok(config) => config,
        Err(code) => return code,
    };
    thr_daemon::init_tracing(cli.common.log_format);
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
    match http2redis::run(config, listener, thr_daemon::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("http2redis: {err:#}");
            ExitCode::from(1)
        }
    }
}
