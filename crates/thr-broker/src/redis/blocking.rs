//! Blocking loops' dedicated connections: a worker's doorbell (BLMPOP on
//! its offer's list and the doorbell, or BLPOP) and a
//! front's reply stream (BLMPOP: a batch, or a wait for the first reply).
//!
//! Each owns its connection, made lazily and dropped after any error so the
//! next call reconnects. Its response timeout is the blocking time plus a
//! margin: long enough that redis-rs never abandons a pop Redis has already
//! performed, short enough to notice a dead server.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};

use crate::{BrokerError, Doorbell, ReplyStream};

/// Most replies taken in one round trip.
const REPLY_BATCH: usize = 256;

struct BlockingConn {
    client: Client,
    conn: Option<MultiplexedConnection>,
    connect_timeout: Duration,
}

impl BlockingConn {
    async fn get(&mut self, block: Duration) -> Result<MultiplexedConnection, BrokerError> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            // Outlive the longest block this loop asks for (see module docs).
            .set_response_timeout(Some(
                block * 2 + self.connect_timeout + Duration::from_secs(5),
            ));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    fn seconds(block: Duration) -> f64 {
        // Redis takes fractional seconds; 0 would mean "forever".
        block.as_secs_f64().max(0.01)
    }
}

/// A worker's wait for new jobs on one queue.
pub struct RedisDoorbell {
    inner: BlockingConn,
    key: String,
}

impl RedisDoorbell {
    pub(crate) fn new(client: Client, key: String, connect_timeout: Duration) -> RedisDoorbell {
        RedisDoorbell {
            inner: BlockingConn {
                client,
                conn: None,
                connect_timeout,
            },
            key,
        }
    }
}

/// What a `BLMPOP` of one item answers: the list it came from and the item.
type ListAndItems = Option<(String, Vec<Vec<u8>>)>;

/// What a doorbell wait with an offer returned.
pub(crate) enum Popped {
    /// An enqueue handed the job to the offer: its
    /// [`Handed`](crate::protocol::records::Handed) record.
    Handed(Vec<u8>),
    /// The doorbell rang, or the wait is up: claim.
    Claim,
}

impl RedisDoorbell {
    /// Offers to take a handed-off job (`offer`: the `HSET` of the offer
    /// record under its token), then waits at most `max` on the offer's
    /// list and the doorbell at once, in one round trip (ARCHITECTURE.md
    /// decision 27). The offer's list comes first: a handed job is taken
    /// before a ring. A pop that Redis refuses (a wrong type, an ACL)
    /// cannot wait: that is logged and waited out here, so a caller never
    /// spins on it.
    pub(crate) async fn offer_and_wait(
        &mut self,
        max: Duration,
        offer: redis::Cmd,
        offer_list: &str,
    ) -> Result<Popped, BrokerError> {
        let mut conn = self.inner.get(max).await?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors()
            .add_command(offer)
            .cmd("BLMPOP")
            .arg(BlockingConn::seconds(max))
            .arg(2)
            .arg(offer_list)
            .arg(&self.key)
            .arg("LEFT")
            .arg("COUNT")
            .arg(1);
        let answer: redis::RedisResult<Vec<redis::Value>> = pipe.query_async(&mut conn).await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                self.inner.conn = None;
                return Err(e.into());
            }
        };
        match answer.into_iter().nth(1) {
            Some(redis::Value::ServerError(e)) => {
                tracing::warn!(key = %self.key, err = %redis::RedisError::from(e), "the doorbell cannot be waited on");
                tokio::time::sleep(max).await;
                Ok(Popped::Claim)
            }
            Some(value) => {
                let popped: redis::RedisResult<ListAndItems> =
                    redis::from_redis_value(value).map_err(redis::RedisError::from);
                Ok(match popped {
                    Ok(Some((list, mut items))) if list == offer_list => {
                        items.pop().map_or(Popped::Claim, Popped::Handed)
                    }
                    Ok(_) => Popped::Claim,
                    // The offer was made: whatever the pop says, the claim
                    // under its token follows (it withdraws the offer and
                    // returns a job handed to it).
                    Err(err) => {
                        tracing::warn!(key = %self.key, %err, "the doorbell's pop answered what thr cannot read; claiming");
                        Popped::Claim
                    }
                })
            }
            None => {
                tracing::warn!(key = %self.key, "the doorbell's pop had no answer; claiming");
                Ok(Popped::Claim)
            }
        }
    }
}

impl Doorbell for RedisDoorbell {
    async fn wait(&mut self, max: Duration) -> Result<bool, BrokerError> {
        let mut conn = self.inner.get(max).await?;
        let popped: redis::RedisResult<Option<(String, String)>> = redis::cmd("BLPOP")
            .arg(&self.key)
            .arg(BlockingConn::seconds(max))
            .query_async(&mut conn)
            .await;
        match popped {
            Ok(p) => Ok(p.is_some()),
            Err(e) => {
                self.inner.conn = None;
                Err(e.into())
            }
        }
    }
}

/// A front's stream of replies.
pub struct RedisReplies {
    inner: BlockingConn,
    key: String,
}

impl RedisReplies {
    pub(crate) fn new(client: Client, key: String, connect_timeout: Duration) -> RedisReplies {
        RedisReplies {
            inner: BlockingConn {
                client,
                conn: None,
                connect_timeout,
            },
            key,
        }
    }

    async fn pop(&mut self, max: Duration) -> Result<Vec<Bytes>, BrokerError> {
        let mut conn = self.inner.get(max).await?;
        // One command whatever the load (decision 24): BLMPOP answers at
        // once with up to a batch when replies are already there (as under
        // load), and otherwise blocks for the first one. (A BRPOP after a
        // batched RPOP cost a round trip and a wake of this loop more per
        // reply on an idle system.)
        let popped: Option<(String, Vec<Vec<u8>>)> = redis::cmd("BLMPOP")
            .arg(BlockingConn::seconds(max))
            .arg(1)
            .arg(&self.key)
            .arg("RIGHT")
            .arg("COUNT")
            .arg(REPLY_BATCH)
            .query_async(&mut conn)
            .await?;
        Ok(popped
            .map(|(_, batch)| batch.into_iter().map(Bytes::from).collect())
            .unwrap_or_default())
    }
}

impl ReplyStream for RedisReplies {
    async fn next_batch(&mut self, max: Duration) -> Result<Vec<Bytes>, BrokerError> {
        match self.pop(max).await {
            Ok(batch) => Ok(batch),
            Err(e) => {
                self.inner.conn = None;
                Err(e)
            }
        }
    }
}
