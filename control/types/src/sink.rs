//! The consumer seam of the endpoint stream (ADR 0008). The agent has one follow loop: it
//! reads the gossip table's changes and hands them, in order, to every sink; it decides when
//! a sink must be brought back in step with the whole table of a network (after the stream
//! lagged, when the node joins a network, when a warm-up ends, periodically against drift,
//! and after a sink failed), and it never hands a sink an empty table because gossip stopped
//! answering. Sinks hold no policy of their own about lag or resync.

use std::sync::Arc;

use crate::{Change, Endpoint, NetworkId};

/// How much a resync's endpoint list can be trusted to be all there is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resync {
    /// The table of the network as it stands: anything else the sink holds for the network
    /// (or programmed into the kernel for it) is stale and goes.
    Complete,
    /// The table may still be filling (the agent has just started and is catching up):
    /// add and correct what is listed, remove nothing.
    Partial,
}

/// A sink's failure; the follow loop logs it (with the sink's name and the network) and
/// resyncs that network of that sink a little later.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// One consumer of the endpoint stream.
#[async_trait::async_trait]
pub trait Sink: Send {
    /// Short name for logs (`overlay`, `dns`, ...).
    fn name(&self) -> &'static str;

    /// Changes in the order the table made them (a batch may span several networks).
    async fn apply(&mut self, changes: &[Change]) -> Result<(), SinkError>;

    /// Every endpoint of `network` the table holds now.
    async fn resync(&mut self, network: &NetworkId, endpoints: &[Arc<Endpoint>], how: Resync) -> Result<(), SinkError>;

    /// This node left `network`: drop what is held for it (the kernel objects of the network
    /// go with its sandbox; a sink only forgets its own bookkeeping).
    async fn forget(&mut self, network: &NetworkId) -> Result<(), SinkError>;

    /// An input from outside the endpoint table addressed to this sink (the manager's word,
    /// the runtime's tasks, a reader): the follow loop delivers it between batches, so a sink
    /// has one writer. The sink's own handle makes it and knows its type; a sink that takes
    /// none refuses it.
    async fn input(&mut self, input: Box<dyn std::any::Any + Send>) -> Result<(), SinkError> {
        drop(input);
        Err(format!("the {} sink takes no other input", self.name()).into())
    }
}

/// An input for the sink named `sink`, sent to the follow loop (see [`Sink::input`]).
pub struct SinkInput {
    pub sink: &'static str,
    pub input: Box<dyn std::any::Any + Send>,
}
