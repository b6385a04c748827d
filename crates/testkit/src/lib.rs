//! Test fixtures for thr, shared by every test and by the benchmark.
//!
//! - [`redis::RedisServer`]: a real `redis-server` on a free port in a
//!   private directory, killed on drop (never the developer's 6379);
//! - [`backend::SlowBackend`]: an in-process HTTP backend that behaves like
//!   a legacy app (N synchronous workers, a delay) and records what it got;
//! - [`daemons::Thr`]: http2redis and redis2http started in-process;
//! - [`bins`]: the real binaries, for tests that send signals or kill;
//! - [`ws::EchoBackend`]: a WebSocket backend that echoes messages.

pub mod backend;
pub mod bins;
pub mod daemons;
pub mod redis;
pub mod ws;

pub use backend::{BackendBuilder, SlowBackend};
pub use daemons::Thr;
pub use redis::{CommandStat, RedisServer};

/// Sends test logs to the test harness's captured output (once per process).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
