//! Client errors.

use std::net::SocketAddr;

use thiserror::Error;

use super::seal::SealError;
use crate::protocol::{FrameError, Status};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no memory server configured")]
    NoServers,
    #[error("I/O with memory server {addr}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("memory server {addr} refused authentication: {reason}")]
    AuthRefused { addr: SocketAddr, reason: String },
    #[error("memory server {addr} is marked down")]
    Down { addr: SocketAddr },
    #[error("request to memory server {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("connection to memory server {addr} lost")]
    ConnectionLost { addr: SocketAddr },
    #[error("memory server {addr} answered {status:?}: {reason}")]
    Refused {
        addr: SocketAddr,
        status: Status,
        reason: String,
    },
    #[error("protocol violation by memory server {addr}")]
    Protocol {
        addr: SocketAddr,
        #[source]
        source: FrameError,
    },
    #[error("only {got} of {want} replicas accepted the page")]
    NotEnoughReplicas { got: usize, want: usize },
    #[error("page (namespace {namespace}, key {key}) is unreadable")]
    Integrity {
        namespace: u64,
        key: u64,
        #[source]
        source: SealError,
    },
    #[error("page (namespace {namespace}, key {key}) is lost: no replica answered")]
    Unavailable {
        namespace: u64,
        key: u64,
        #[source]
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// Whether this error says something about the server's health (as opposed to a
    /// well-formed refusal or a bad page).
    pub fn is_server_failure(&self) -> bool {
        matches!(
            self,
            ClientError::Io { .. }
                | ClientError::Timeout { .. }
                | ClientError::ConnectionLost { .. }
                | ClientError::Protocol { .. }
                | ClientError::Down { .. }
        )
    }
}
