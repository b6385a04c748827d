//! Heartbeats: every daemon says it is alive on Redis's clock, with a short
//! JSON description (what `thrctl status` shows). A worker silent for
//! [`HEARTBEAT_TIMEOUT`](crate::HEARTBEAT_TIMEOUT) loses its leases; a front
//! silent for [`FRONT_TIMEOUT`](crate::FRONT_TIMEOUT) has its waiting jobs
//! dropped at claim time. Each beat's answer ([`Beat`]) goes to the caller,
//! which is how a front learns that Redis lost its data or that it was
//! silent long enough to be taken for dead.

use tokio::sync::watch;

use crate::{Beat, Broker, Daemon};

/// Beats every [`Daemon::period`] until `stop` turns true, then says
/// goodbye (`retire`). `info` describes the daemon at each beat; `on_beat`
/// sees each answer.
pub async fn keep_alive<B: Broker>(
    broker: &B,
    kind: Daemon,
    id: &str,
    info: impl Fn() -> String + Send,
    mut on_beat: impl FnMut(Beat) + Send,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(kind.period());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    // The generation whose Redis settings were last checked: checked at
    // the first beat, and again when Redis was replaced or restarted empty.
    let mut checked: Option<String> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        match broker.heartbeat(kind, id, &info()).await {
            Ok(beat) => {
                warned = false;
                if checked.as_ref() != Some(&beat.generation) {
                    match broker.setup_warnings().await {
                        Ok(warnings) => {
                            checked = Some(beat.generation.clone());
                            for warning in warnings {
                                tracing::warn!("{warning}");
                            }
                        }
                        Err(err) => tracing::debug!(%err, "could not read Redis's settings"),
                    }
                }
                on_beat(beat);
            }
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
