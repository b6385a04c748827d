//! Broker errors, split by what the caller may conclude about its call.
//!
//! The split matters because a slow broker is not a failed one (ARCHITECTURE.md
//! decision 13): a call that timed out may still run, so only
//! [`BrokerError::Unreachable`] lets a caller conclude that nothing happened.

type Source = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The call was not delivered (connection refused, not connected): it
    /// certainly did nothing.
    #[error("redis unreachable: {source}")]
    Unreachable {
        /// What the client library said.
        #[source]
        source: Source,
    },
    /// No answer in time, or the connection broke while the call was out:
    /// it may or may not have run. Ask again (every call is safe to repeat).
    #[error("no answer from redis ({what})")]
    Timeout {
        /// What was waited for, or how the connection broke.
        what: String,
        /// What the client library said, when it said something.
        #[source]
        source: Option<Source>,
    },
    /// The broker answered with an error (a bug, a misconfiguration, out of
    /// memory): the call did nothing.
    #[error("redis error: {source}")]
    Failed {
        /// What the broker said.
        #[source]
        source: Source,
    },
    /// The broker answered something this version cannot read.
    #[error("unexpected answer from redis: {0}")]
    Protocol(String),
}

impl BrokerError {
    /// True when the broker is down or slow, as opposed to refusing.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            BrokerError::Unreachable { .. } | BrokerError::Timeout { .. }
        )
    }

    /// True when the call may have taken effect although it failed.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, BrokerError::Timeout { .. })
    }

    /// The same error again, for each caller of a call made for many (the
    /// same kind and text; the library's error object stays with the first).
    pub fn share(&self) -> BrokerError {
        match self {
            BrokerError::Unreachable { source } => BrokerError::Unreachable {
                source: source.to_string().into(),
            },
            BrokerError::Timeout { what, .. } => BrokerError::Timeout {
                what: what.clone(),
                source: None,
            },
            BrokerError::Failed { source } => BrokerError::failed(source.to_string()),
            BrokerError::Protocol(text) => BrokerError::Protocol(text.clone()),
        }
    }

    /// A failure described by text (for brokers without a source error).
    pub fn failed(text: impl Into<String>) -> BrokerError {
        BrokerError::Failed {
            source: text.into().into(),
        }
    }
}

impl From<::redis::RedisError> for BrokerError {
    fn from(err: ::redis::RedisError) -> BrokerError {
        match undelivered(&err) {
            Some(true) => BrokerError::Unreachable {
                source: Box::new(err),
            },
            Some(false) => BrokerError::Timeout {
                what: err.to_string(),
                source: Some(Box::new(err)),
            },
            None => BrokerError::Failed {
                source: Box::new(err),
            },
        }
    }
}

/// For a failure to talk to Redis: whether the command certainly never
/// reached it (Some(true)), or may have (Some(false)); None for an answer
/// that Redis gave (an error reply: the command did nothing).
///
/// redis-rs reports a connection that closed the same way whether a
/// request was still waiting to be written or already sent, so a closed
/// connection counts as "may have". Refused connections, and connections
/// that could not be set up (a TLS handshake refused: an I/O error that is
/// neither a drop nor a timeout), never carried the command.
pub(crate) fn undelivered(err: &::redis::RedisError) -> Option<bool> {
    let not_set_up = err.is_io_error() && !err.is_connection_dropped() && !err.is_timeout();
    if err.is_connection_refusal() || not_set_up {
        Some(true)
    } else if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_unrecoverable_error()
    {
        Some(false)
    } else {
        None
    }
}

impl From<::redis::ParsingError> for BrokerError {
    fn from(err: ::redis::ParsingError) -> BrokerError {
        BrokerError::Protocol(err.to_string())
    }
}
