//! Broker errors, split by what the caller should do about them.

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached in time: retry later, answer 503.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// The broker answered with an error (a bug or a misconfiguration).
    #[error("redis error: {0}")]
    Failed(String),
}

impl BrokerError {
    /// True when the broker is down or unreachable, as opposed to refusing.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, BrokerError::Unavailable(_))
    }
}

impl From<::redis::RedisError> for BrokerError {
    fn from(err: ::redis::RedisError) -> BrokerError {
        if err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_unrecoverable_error()
        {
            BrokerError::Unavailable(err.to_string())
        } else {
            BrokerError::Failed(err.to_string())
        }
    }
}

impl From<::redis::ParsingError> for BrokerError {
    fn from(err: ::redis::ParsingError) -> BrokerError {
        BrokerError::Failed(format!("unexpected answer from Redis: {err}"))
    }
}
