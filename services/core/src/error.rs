//! One error type for Baton's libraries, with a [`Kind`] a caller branches on.
//!
//! What a consumer does with a failure depends only on its kind: a transient failure (a timeout, a
//! leader election, a server that is not up yet) is retried with backoff and never becomes a dead
//! letter; a permanent one (a message too large to store, a workflow version that does not exist)
//! is dead-lettered once with the reason; invalid input is the sender's to fix and is refused with
//! what is wrong and where.

use std::fmt;

use async_nats::jetstream;

/// What a caller should do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Retry later: the same request may succeed (timeouts, no stream leader, connection lost).
    Transient,
    /// Retrying cannot help; record the failure with its reason and move on.
    Permanent,
    /// The input is wrong: tell the sender what and where.
    InvalidInput,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Transient => "transient",
            Kind::Permanent => "permanent",
            Kind::InvalidInput => "invalid-input",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with a [`Kind`] and an actionable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: Kind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn transient(message: impl Into<String>) -> Error {
        Error::new(Kind::Transient, message)
    }

    pub fn permanent(message: impl Into<String>) -> Error {
        Error::new(Kind::Permanent, message)
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(Kind::InvalidInput, message)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn is_transient(&self) -> bool {
        self.kind == Kind::Transient
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error, its message prefixed with what was being done.
    pub fn context(self, what: impl fmt::Display) -> Error {
        Error {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }

    /// A failed JetStream publish or publish ack. A message too large to store can never be
    /// stored; an expected-sequence conflict will not change by itself; anything else (a timeout,
    /// no responders while a stream elects a leader, a lost connection) may succeed later.
    pub fn publish(error: &jetstream::context::PublishError) -> Error {
        use jetstream::context::PublishErrorKind as K;
        let kind = match error.kind() {
            K::MaxPayloadExceeded | K::WrongLastMessageId | K::WrongLastSequence => Kind::Permanent,
            K::Other if jetstream_code(error).is_some_and(permanent_code) => Kind::Permanent,
            _ => Kind::Transient,
        };
        let message = match error.kind() {
            K::MaxPayloadExceeded => format!(
                "the message is larger than the server's max_payload and can never be stored \
                 ({error}); make the data smaller (large payloads belong in an object store, \
                 referenced by URL)"
            ),
            _ => format!("cannot store the message: {error}"),
        };
        Error::new(kind, message)
    }

    /// Any other JetStream or KV request: only a server's explicit "no", or a message too large
    /// to ever be stored, is permanent.
    pub fn request(what: impl fmt::Display, error: &(dyn std::error::Error + 'static)) -> Error {
        let too_large = chain(error).any(|e| {
            e.downcast_ref::<jetstream::context::PublishError>()
                .is_some_and(|p| {
                    p.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
                })
        });
        let kind = match jetstream_code(error) {
            _ if too_large => Kind::Permanent,
            Some(code) if permanent_code(code) => Kind::Permanent,
            _ => Kind::Transient,
        };
        Error::new(kind, format!("{what}: {error}"))
    }
}

/// JetStream API error codes that no retry can change.
fn permanent_code(code: jetstream::ErrorCode) -> bool {
    use jetstream::ErrorCode as C;
    [
        C::STREAM_MESSAGE_EXCEEDS_MAXIMUM,
        C::STREAM_NOT_MATCH,
        C::STREAM_WRONG_LAST_SEQUENCE,
        C::STREAM_WRONG_LAST_MESSAGE_ID,
    ]
    .contains(&code)
}

/// `error` and its sources.
fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// The JetStream API error code somewhere in `error`'s source chain.
fn jetstream_code(error: &(dyn std::error::Error + 'static)) -> Option<jetstream::ErrorCode> {
    chain(error).find_map(|e| {
        e.downcast_ref::<jetstream::Error>()
            .map(|js| js.error_code())
    })
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_errors_are_classified_by_what_a_retry_can_change() {
        use jetstream::context::{PublishError, PublishErrorKind as K};
        let too_big = Error::publish(&PublishError::new(K::MaxPayloadExceeded));
        assert_eq!(too_big.kind(), Kind::Permanent);
        assert!(too_big.message().contains("max_payload"), "{too_big}");
        for kind in [
            K::TimedOut,
            K::BrokenPipe,
            K::StreamNotFound,
            K::MaxAckPending,
        ] {
            assert_eq!(
                Error::publish(&PublishError::new(kind)).kind(),
                Kind::Transient
            );
        }
        let context = Error::transient("timed out").context("reading workflow w v1");
        assert_eq!(context.to_string(), "reading workflow w v1: timed out");
        assert!(context.is_transient());
    }
}
