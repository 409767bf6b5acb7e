//! memory-service's own metrics, beside the shared RPC and pool metrics:
//! what StoreMessage's group commit does ([`GroupCommitMetrics`]), so an
//! operator can see whether calls are grouped and whether they queue.

use prometheus_client::registry::Registry;

use crate::store::group_commit::GroupCommitMetrics;

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
