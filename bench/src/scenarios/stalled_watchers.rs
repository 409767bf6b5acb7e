//! Stalled change-feed consumers: WatchMessages streams that read their
//! opening heartbeat and then nothing, held open during a run to show that
//! writers do not notice them (`--stalled-watchers`).

use std::time::Duration;

use anyhow::{Context, Result};
use maitre_api::memory::v1::{self as memory, memory_service_client::MemoryServiceClient};
use tonic::{Streaming, transport::Channel};

use super::Endpoints;

/// HTTP/2's smallest default window: the client's connection takes in this
/// much of a stream it does not read, then the server's sends block. (The
/// transport's own default, 2 MiB, would have each "stalled" watcher read
/// a few thousand messages first.)
const WINDOW: u32 = 65_535;

/// Streams held open without being read; dropped, they close.
pub struct StalledWatchers {
    _streams: Vec<Streaming<memory::WatchMessagesResponse>>,
}

impl StalledWatchers {
    pub async fn open(endpoints: &Endpoints, count: usize) -> Result<Self> {
        let mut streams = Vec::with_capacity(count);
        for _ in 0..count {
            let channel = Channel::from_shared(endpoints.memory.clone())?
                .initial_stream_window_size(WINDOW)
                .initial_connection_window_size(WINDOW)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .context("connecting a watcher")?;
            let mut client = MemoryServiceClient::new(channel);
            let mut stream = client
                .watch_messages(memory::WatchMessagesRequest::default())
                .await
                .context("WatchMessages")?
                .into_inner();
            stream
                .message()
                .await
                .context("the opening heartbeat")?
                .context("the stream ended at once")?;
            streams.push(stream);
        }
        Ok(Self { _streams: streams })
    }
}
