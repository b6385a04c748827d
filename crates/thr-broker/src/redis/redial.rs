//! The shared connections' one retry. redis-rs's `ConnectionManager` keeps
//! the outcome of its last reconnection: once Redis was down long enough
//! for one to fail, the first call after Redis is back gets that old
//! refusal (a 503 for a client, a backoff for a daemon's loop), and only
//! starts the reconnection that the next call uses. [`Redial`] sends a
//! call that certainly never reached Redis (refused at connect, or on a
//! connection that could not be set up: `error::undelivered`) once more,
//! on the connection that failure set up. Nothing of such a call reached
//! Redis, so sending it again is safe whatever it does.
//!
//! Only for calls bounded by the command timeout (`bounded`): Linux may
//! report an ICMP "port unreachable" on an established connection as a
//! refusal, but only after minutes of retransmissions.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use crate::error::undelivered;

/// True for a failure of a call that never reached Redis.
fn unsent(err: &RedisError) -> bool {
    undelivered(err) == Some(true)
}

/// A [`ConnectionManager`] that sends a call that never reached Redis
/// once more.
#[derive(Clone)]
pub(crate) struct Redial(pub(crate) ConnectionManager);

impl ConnectionLike for Redial {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self.0.send_packed_command(cmd).await {
                Err(e) if unsent(&e) => self.0.send_packed_command(cmd).await,
                answer => answer,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match self.0.send_packed_commands(pipeline, offset, count).await {
                Err(e) if unsent(&e) => self.0.send_packed_commands(pipeline, offset, count).await,
                answers => answers,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}
