//! WatchMessages: each stream is fed by a task of its own that reads the
//! message feed page by page from its cursor into a bounded buffer. Writers
//! never wait for a watcher: a watcher only reads committed positions at its
//! own pace, and one whose client stops reading is ended once its buffer
//! stayed full for the stall timeout (its client resumes from its cursor).

use std::{
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::Stream;
use maitre_api::memory::v1 as pb;
use maitre_runtime::rpc::CallContext;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tracing::Instrument;

use super::{MemoryApi, convert};
use crate::{
    domain::feed::{FeedCursor, WatchFilter, WatchQuery},
    error::Error,
    feed::{Feed, StreamSlot},
    store::{self, feed::FeedRow},
};

/// Most positions one page read looks at: with a narrow filter a page may
/// hold few messages, but its cost stays bounded.
const SCAN_WINDOW: i64 = 4096;
/// Most messages one page read returns (held in memory until sent).
const PAGE_ROWS: i64 = 64;

/// The stream tonic sends: the buffered responses, then how it ended.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchMessagesResponse, Status>> + Send>>;

impl MemoryApi {
    pub(super) async fn watch_messages(
        &self,
        request: pb::WatchMessagesRequest,
        deadline: Option<Instant>,
    ) -> Result<WatchStream, Error> {
        let query = WatchQuery::parse(request)?;
        let caller = CallContext::current_caller().unwrap_or_default();
        let slot = self.feed.open_stream(&caller)?;
        let state = {
            let _turn = self.feed.read_turn().await;
            store::feed::state(&self.pool).await?
        };
        self.feed.saw_end(state.last_pos);
        let start = match query.after {
            None => state.last_pos,
            Some(FeedCursor(cursor)) if cursor > state.last_pos => {
                return Err(Error::CursorAhead {
                    cursor,
                    last: state.last_pos,
                });
            }
            Some(FeedCursor(cursor)) if cursor < state.pruned_to => {
                return Err(Error::CursorExpired {
                    cursor,
                    oldest: state.pruned_to,
                });
            }
            Some(FeedCursor(cursor)) => cursor,
        };
        let settings = self.feed.settings();
        let (items, delivered) = mpsc::channel(settings.buffer.max(1));
        let delivered = Arc::new(Mutex::new(delivered));
        let (end_tx, end) = oneshot::channel();
        let request_id = CallContext::current().map(|c| c.request_id);
        let span = tracing::info_span!("watch", request_id = request_id.as_deref(), caller);
        let watcher = Watcher {
            pool: self.pool.clone(),
            feed: self.feed.clone(),
            filter: query.filter,
            items,
            buffer: Arc::downgrade(&delivered),
            stopping: self.feed.stopping(),
            deadline,
            cursor: start,
            sent: 0,
            _slot: slot,
        };
        tokio::spawn(watcher.run(end_tx).instrument(span));
        Ok(Box::pin(Delivery {
            delivered,
            end,
            done: false,
        }))
    }
}

/// One stream's reader.
struct Watcher {
    pool: sqlx::PgPool,
    feed: Feed,
    filter: WatchFilter,
    items: mpsc::Sender<pb::WatchMessagesResponse>,
    /// The other end of `items`, emptied here when the client stalled (a
    /// client that reads nothing more would otherwise keep it full). Weak:
    /// when the client goes, the receiver goes, and `items` sees it closed.
    buffer: Weak<Mutex<mpsc::Receiver<pb::WatchMessagesResponse>>>,
    /// The server's shutdown, which also ends a wait on a full buffer.
    stopping: tokio::sync::watch::Receiver<bool>,
    deadline: Option<Instant>,
    /// Everything up to here was delivered or filtered out.
    cursor: i64,
    /// Messages sent, for the log line.
    sent: u64,
    /// The stream counts against the limits while it is read.
    _slot: StreamSlot,
}

impl Watcher {
    async fn run(mut self, end: oneshot::Sender<Status>) {
        let start = self.cursor;
        let result = self.stream().await;
        let (cursor, sent) = (self.cursor, self.sent);
        let error = match result {
            Ok(()) => {
                tracing::debug!(start, cursor, sent, "watcher left");
                return;
            }
            Err(error) => error,
        };
        // A stalled client (or one at shutdown) is not kept waiting for
        // what it has not read: it resumes from its cursor.
        let drop_buffer = matches!(
            error,
            Error::WatcherTooSlow { .. } | Error::ServerStopping { .. }
        );
        match &error {
            Error::WatcherTooSlow { .. } => {
                self.feed.metrics().too_slow.inc();
                tracing::warn!(start, cursor, sent, "watch stream ended: client too slow");
            }
            Error::Database(cause) => {
                tracing::error!(start, cursor, sent, error = %cause, "watch stream failed");
            }
            other => tracing::info!(start, cursor, sent, reason = %other, "watch stream ended"),
        }
        // Set before the buffer closes: the client reads it after the
        // buffered messages, and its last cursor is where it resumes.
        let _ = end.send(error.into());
        if drop_buffer && let Some(buffer) = self.buffer.upgrade() {
            // A client that reads nothing more would hold it until its
            // connection closes.
            let mut buffer = buffer.lock().unwrap_or_else(|p| p.into_inner());
            buffer.close();
            while buffer.try_recv().is_ok() {}
        }
        // Dropping `items` (and the slot) ends the stream once drained.
    }

    /// Delivers until the client leaves (`Ok`) or the stream must end.
    async fn stream(&mut self) -> Result<(), Error> {
        let settings = self.feed.settings().clone();
        let mut end = self.feed.end();
        let mut stopping = self.stopping.clone();
        if !self.send(heartbeat(self.cursor), &settings).await? {
            return Ok(());
        }
        // A heartbeat goes out whenever nothing did for an interval, also
        // while pages are read whose messages the filters leave out.
        let mut last_sent = tokio::time::Instant::now();
        loop {
            if *stopping.borrow() {
                return Err(Error::ServerStopping {
                    cursor: self.cursor,
                });
            }
            if last_sent.elapsed() >= settings.heartbeat {
                if !self.send(heartbeat(self.cursor), &settings).await? {
                    return Ok(());
                }
                last_sent = tokio::time::Instant::now();
            }
            let known_end = *end.borrow_and_update();
            if self.cursor < known_end {
                match self.read_page(known_end, &settings).await? {
                    None => return Ok(()),
                    Some(0) => {}
                    Some(_) => last_sent = tokio::time::Instant::now(),
                }
                continue;
            }
            let deadline = self.deadline.map(tokio::time::Instant::from_std);
            tokio::select! {
                changed = end.changed() => {
                    if changed.is_err() {
                        return Err(Error::ServerStopping { cursor: self.cursor });
                    }
                }
                () = tokio::time::sleep_until(last_sent + settings.heartbeat) => {}
                () = crate::feed::stopped(&mut stopping) => {
                    return Err(Error::ServerStopping { cursor: self.cursor });
                }
                () = self.items.closed() => return Ok(()),
                () = sleep_until_or_never(deadline) => {
                    return Err(Error::StreamDeadline { cursor: self.cursor });
                }
            }
        }
    }

    /// Reads and sends the messages after the cursor, up to `known_end`
    /// and one page at most; how many it sent, `None` when the client left.
    async fn read_page(
        &mut self,
        known_end: i64,
        settings: &crate::feed::FeedSettings,
    ) -> Result<Option<usize>, Error> {
        let until = known_end.min(self.cursor.saturating_add(SCAN_WINDOW));
        let (rows, state) = {
            // Watchers take turns for the database: however many there are,
            // they hold a few of the pool's connections, not the writers'.
            let _turn = self.feed.read_turn().await;
            let rows =
                store::feed::page(&self.pool, self.cursor, until, &self.filter, PAGE_ROWS).await?;
            // Read after the page: retention only moves forward, so if it has
            // not passed the cursor now, the page lost nothing to it.
            (rows, store::feed::state(&self.pool).await?)
        };
        if state.pruned_to > self.cursor {
            return Err(Error::CursorExpired {
                cursor: self.cursor,
                oldest: state.pruned_to,
            });
        }
        self.feed.saw_end(state.last_pos);
        let full = rows.len() as i64 == PAGE_ROWS;
        let mut sent = 0;
        for row in rows {
            let pos = row.pos;
            if !self.send(message(row), settings).await? {
                return Ok(None);
            }
            self.cursor = pos;
            self.sent += 1;
            sent += 1;
        }
        if !full {
            // Nothing else up to `until` passes the filters.
            self.cursor = until;
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::StreamDeadline {
                cursor: self.cursor,
            });
        }
        Ok(Some(sent))
    }

    /// Queues a response; false when the client left. A buffer that stays
    /// full for the stall timeout ends the stream.
    async fn send(
        &self,
        response: pb::WatchMessagesResponse,
        settings: &crate::feed::FeedSettings,
    ) -> Result<bool, Error> {
        let mut stopping = self.stopping.clone();
        let sent = tokio::select! {
            sent = self.items.send_timeout(response, settings.stall_timeout) => sent,
            () = crate::feed::stopped(&mut stopping) => {
                return Err(Error::ServerStopping { cursor: self.cursor });
            }
        };
        match sent {
            Ok(()) => Ok(true),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Ok(false),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Error::WatcherTooSlow {
                cursor: self.cursor,
                stalled_for: settings.stall_timeout,
            }),
        }
    }
}

async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn heartbeat(cursor: i64) -> pb::WatchMessagesResponse {
    pb::WatchMessagesResponse {
        cursor: FeedCursor(cursor).encode(),
        event: Some(pb::watch_messages_response::Event::Heartbeat(
            pb::Heartbeat {
                time: Some(convert::timestamp(maitre_runtime::db::now())),
            },
        )),
        ..Default::default()
    }
}

fn message(row: FeedRow) -> pb::WatchMessagesResponse {
    pb::WatchMessagesResponse {
        cursor: FeedCursor(row.pos).encode(),
        event: Some(pb::watch_messages_response::Event::Message(
            convert::message(row.message),
        )),
        user_id: row.user_id,
        channel: row.channel,
    }
}

/// What tonic polls: the buffered responses in order, then, once the
/// watcher is done and the buffer drained, the status it ended with.
struct Delivery {
    delivered: Arc<Mutex<mpsc::Receiver<pb::WatchMessagesResponse>>>,
    end: oneshot::Receiver<Status>,
    done: bool,
}

impl Stream for Delivery {
    type Item = Result<pb::WatchMessagesResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let next = self
            .delivered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .poll_recv(cx);
        match next {
            Poll::Ready(Some(response)) => Poll::Ready(Some(Ok(response))),
            Poll::Pending => Poll::Pending,
            // The watcher set its status before it let go; none means it
            // failed without one (it panicked).
            Poll::Ready(None) => {
                self.done = true;
                let status = self.end.try_recv().unwrap_or_else(|_| {
                    Status::internal("the watch stream failed; resume from your cursor")
                });
                Poll::Ready(Some(Err(status)))
            }
        }
    }
}

/// The client's own deadline for a stream, if it set one: a stream without
/// one runs until the client or the server ends it.
pub(super) fn client_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Instant> {
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(maitre_runtime::rpc::deadline::parse)
        .and_then(|d: Duration| Instant::now().checked_add(d))
}
