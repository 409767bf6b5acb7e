//! memory-service's own metrics, beside the shared RPC and pool metrics:
//! what StoreMessage's group commit does ([`GroupCommitMetrics`]), so an
//! operator can see whether calls are grouped and whether they queue; and
//! what the message feed and its watchers do ([`FeedMetrics`]).

use prometheus_client::registry::Registry;

use crate::{feed::FeedMetrics, store::group_commit::GroupCommitMetrics};

/// Registers the group commit's metrics; the writer updates them.
pub fn register_group_commit(registry: &mut Registry) -> GroupCommitMetrics {
    let metrics = GroupCommitMetrics::default();
    registry.register(
        "store_queued",
        "StoreMessage calls waiting for a group-commit writer",
        metrics.queued.clone(),
    );
    registry.register(
        "store_batch_size",
        "Messages written per StoreMessage statement (group commit)",
        metrics.batch_size.clone(),
    );
    registry.register(
        "store_batches_split",
        "Group-commit statements that failed as a whole and were written again one \
         message at a time",
        metrics.split.clone(),
    );
    metrics
}

/// Registers the message feed's metrics; the sequencer and the watchers
/// update them.
pub fn register_feed(registry: &mut Registry) -> FeedMetrics {
    let metrics = FeedMetrics::default();
    registry.register(
        "feed_sequenced",
        "Messages this replica's sequencer gave a feed position",
        metrics.sequenced.clone(),
    );
    registry.register(
        "watch_streams",
        "WatchMessages streams open on this replica",
        metrics.watchers.clone(),
    );
    registry.register(
        "watch_too_slow",
        "WatchMessages streams ended because their client did not read in time",
        metrics.too_slow.clone(),
    );
    metrics
}
