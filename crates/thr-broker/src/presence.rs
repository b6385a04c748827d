//! Heartbeats: every daemon says it is alive once a second, with a short
//! JSON description (what `thrctl status` shows). A worker silent for
//! [`HEARTBEAT_TIMEOUT`](crate::HEARTBEAT_TIMEOUT) loses its leases; a silent
//! front's waiting jobs are dropped at claim time.

use tokio::sync::watch;

use crate::{Broker, Daemon, HEARTBEAT_EVERY};

/// Beats until `stop` turns true, then says goodbye (`retire`). `info`
/// describes the daemon at each beat.
pub async fn keep_alive<B: Broker>(
    broker: &B,
    kind: Daemon,
    id: &str,
    info: impl Fn() -> String + Send,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(HEARTBEAT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        match broker.heartbeat(kind, id, &info()).await {
            Ok(()) => warned = false,
            Err(err) if !warned => {
                warned = true;
                tracing::warn!(%err, "heartbeat failed");
            }
            Err(_) => {}
        }
    }
    if let Err(err) = broker.retire(kind, id).await {
        tracing::debug!(%err, "could not retire");
    }
}

/// Seconds since the Unix epoch, for `started` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
