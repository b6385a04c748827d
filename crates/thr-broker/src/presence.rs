//! Heartbeats: every daemon says it is alive on Redis's clock, with a short
//! JSON description (what `thrctl status` shows). A worker silent for
//! [`HEARTBEAT_TIMEOUT`](crate::HEARTBEAT_TIMEOUT) loses its leases; a front
//! silent for [`FRONT_TIMEOUT`](crate::FRONT_TIMEOUT) has its waiting jobs
//! dropped at claim time. Each beat's answer ([`Beat`]) goes to the caller,
//! which is how a front learns that Redis lost its data or that it was
//! silent long enough to be taken for dead.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

use crate::{Beat, Broker, BrokerError, Daemon};

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
    // The check under way, for that generation. It runs beside the beats,
    // never between two: a slow answer must not make this daemon look
    // silent (a front silent for 750 ms is taken for dead).
    type Check<'a> = Pin<Box<dyn Future<Output = Result<Vec<String>, BrokerError>> + Send + 'a>>;
    let mut checking: Option<(String, Check<'_>)> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => break,
            result = async { (&mut checking.as_mut().expect("guarded").1).await }, if checking.is_some() => {
                let (generation, _) = checking.take().expect("guarded");
                match result {
                    Ok(warnings) => {
                        checked = Some(generation);
                        for warning in warnings {
                            tracing::warn!("{warning}");
                        }
                    }
                    Err(err) => tracing::debug!(%err, "could not read Redis's settings"),
                }
                continue;
            }
        }
        if *stop.borrow() {
            break;
        }
        match broker.heartbeat(kind, id, &info()).await {
            Ok(beat) => {
                warned = false;
                if checked.as_ref() != Some(&beat.generation) && checking.is_none() {
                    checking = Some((beat.generation.clone(), Box::pin(broker.setup_warnings())));
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
