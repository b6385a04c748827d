//! `slowapp`: a demo legacy backend for the quickstart and the benchmarks.
//! It handles at most `--workers` requests at once, like a Django or PHP app
//! with N synchronous worker processes, each taking `--delay`; the others
//! wait. Query parameters shape replies (see `testkit::backend`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// A slow legacy web app, simulated.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Listen on this unix socket instead of TCP.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Requests handled at once.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Time each request takes, e.g. "50ms".
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    delay: Duration,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let mut builder = testkit::SlowBackend::builder()
        .workers(cli.workers)
        .delay(cli.delay)
        .listen(cli.listen)
        .record(false);
    if let Some(path) = cli.unix.clone() {
        builder = builder.unix(path);
    }
    let backend = builder.start().await;
    eprintln!(
        "slowapp: {} workers, {:?} per request, on {}",
        cli.workers,
        cli.delay,
        backend.url()
    );
    let _ = tokio::signal::ctrl_c().await;
}
