//! Errors with a kind (issue 19): a refusal says what kind of failure it is, so a client can
//! act on it (try again later, find another manager, fix its input) and the CLI exits with a
//! code of its own for each kind.

use serde::{Deserialize, Serialize};

/// What kind of failure a refusal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or asks for something impossible (a bad flag value, a name
    /// that breaks the rules, a port out of range).
    Invalid,
    /// What it names does not exist (a network, a service, a node).
    NotFound,
    /// The cluster's state does not allow it now (a name taken, a port published, a
    /// network in use, an exhausted subnet).
    Conflict,
    /// The daemon, the manager or the store cannot be reached or cannot answer now: retry.
    Unavailable,
    /// Answered by the cluster's leader only: ask it (several managers).
    NotLeader,
    /// Answered by a manager only, and this node is not one.
    NotManager,
    /// Not allowed: a removed node, a certificate or token not of this cluster.
    Refused,
    /// Anything else (a bug, a failed encoding).
    Internal,
    /// The change was made, but the service did not converge within the CLI's `--timeout`.
    Timeout,
}

impl ErrorKind {
    /// The CLI's exit code for this kind (README, "Exit codes"). 2 is also what the CLI
    /// exits with for a bad flag it refuses itself.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::Invalid => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::Conflict => 4,
            ErrorKind::Unavailable => 5,
            ErrorKind::NotLeader => 6,
            ErrorKind::NotManager => 7,
            ErrorKind::Refused => 8,
            ErrorKind::Timeout => 9,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::NotLeader => "not the leader",
            ErrorKind::NotManager => "not a manager",
            ErrorKind::Refused => "refused",
            ErrorKind::Internal => "internal",
            ErrorKind::Timeout => "timeout",
        }
    }
}

/// A refusal: its kind and a message that names what it is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl std::fmt::Display) -> ApiError {
        ApiError { kind, message: message.to_string() }
    }

    pub fn invalid(message: impl std::fmt::Display) -> ApiError {
        Self::new(ErrorKind::Invalid, message)
    }

    pub fn not_found(message: impl std::fmt::Display) -> ApiError {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn conflict(message: impl std::fmt::Display) -> ApiError {
        Self::new(ErrorKind::Conflict, message)
    }

    pub fn unavailable(message: impl std::fmt::Display) -> ApiError {
        Self::new(ErrorKind::Unavailable, message)
    }

    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        Self::new(ErrorKind::Internal, message)
    }

    /// The same kind, with `what` before the message.
    pub fn context(self, what: impl std::fmt::Display) -> ApiError {
        ApiError { kind: self.kind, message: format!("{what}: {}", self.message) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_an_exit_code_of_its_own() {
        let kinds = [
            ErrorKind::Internal,
            ErrorKind::Invalid,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::Unavailable,
            ErrorKind::NotLeader,
            ErrorKind::NotManager,
            ErrorKind::Refused,
            ErrorKind::Timeout,
        ];
        let codes: std::collections::BTreeSet<u8> = kinds.iter().map(|k| k.exit_code()).collect();
        assert_eq!(codes.len(), kinds.len());
        assert!(!codes.contains(&0));
        let e = ApiError::not_found("service web not found").context("scale");
        assert_eq!(e.to_string(), "scale: service web not found");
        assert_eq!(serde_json::to_string(&e).expect("json"), r#"{"kind":"not_found","message":"scale: service web not found"}"#);
    }
}
