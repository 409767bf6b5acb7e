//! The gRPC surface: thin handlers that parse, call the store, convert back.

pub mod convert;
pub mod paging;
mod state;
mod watch;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use maitre_api::memory::v1::{self as pb, memory_service_server::MemoryService};
use maitre_runtime::{pagination, rpc::CallContext, status::reply};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    domain::{
        Limits, NewMessage,
        queries::{self, ConversationCursor, ConversationPage, HistoryQuery, MessagePage},
    },
    erasure::{self, PurgeSettings, Purger},
    error::Error,
    feed::Feed,
    store::{
        self,
        group_commit::MessageWriter,
        messages::{KeyScope, StoreOutcome},
    },
};

/// How long DeleteUserData works when it runs outside an RPC (no deadline in
/// the call context), e.g. called directly in a test.
const ERASE_WITHOUT_DEADLINE: Duration = Duration::from_secs(5);

/// Implements `maitre.memory.v1.MemoryService`.
#[derive(Debug, Clone)]
pub struct MemoryApi {
    /// The `memory` schema's pool.
    pool: PgPool,
    /// StoreMessage's writes, grouped (`store::group_commit`).
    writer: MessageWriter,
    /// Bounds on what callers may send.
    limits: Limits,
    /// The background purger, woken when an erasure is left unfinished.
    purger: Purger,
    purge: PurgeSettings,
    /// The message feed WatchMessages reads; nudged after each store.
    feed: Feed,
}

impl MemoryApi {
    pub fn new(
        pool: PgPool,
        writer: MessageWriter,
        limits: Limits,
        purger: Purger,
        purge: PurgeSettings,
        feed: Feed,
    ) -> Self {
        Self {
            pool,
            writer,
            limits,
            purger,
            purge,
            feed,
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// Wakes the purger when dropped while still holding it.
struct WakeOnDrop<'a>(Option<&'a Purger>);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(purger) = self.0 {
            purger.wake();
        }
    }
}

/// The handlers proper: each takes the decoded request message and answers
/// with the service's own [`Error`], which `?` converts into through `From`.
/// The [`MemoryService`] impl below only unwraps the request and turns the
/// error into a status, once, in `reply`.
impl MemoryApi {
    async fn store_message(
        &self,
        request: pb::StoreMessageRequest,
    ) -> Result<pb::StoreMessageResponse, Error> {
        let message = Arc::new(NewMessage::parse(request, &self.limits)?);
        let message_id = Uuid::now_v7();
        // Keys are scoped by the authenticated caller: no other client can
        // claim (and so answer for) the key another will use.
        let caller = CallContext::current_caller().unwrap_or_default();
        let fingerprint = message.fingerprint();
        let key = KeyScope {
            caller: &caller,
            fingerprint: &fingerprint,
        };
        let outcome = self
            .writer
            .store(message_id, message.clone(), key, maitre_runtime::db::now())
            .await?;
        if matches!(outcome, StoreOutcome::Stored { .. }) {
            self.feed.nudge();
        }
        // The writer let go of its share once it answered.
        let message = Arc::unwrap_or_clone(message);
        let response = match outcome {
            StoreOutcome::Stored {
                message_id,
                sequence,
                created_at,
                message_count,
                conversation_created,
            } => pb::StoreMessageResponse {
                message: Some(convert::stored_message(
                    message, message_id, sequence, created_at,
                )),
                conversation_created,
                conversation_message_count: message_count,
                replayed: false,
            },
            StoreOutcome::Replayed {
                message,
                message_count,
            } => pb::StoreMessageResponse {
                message: Some(convert::message(*message)),
                conversation_created: false,
                conversation_message_count: message_count,
                replayed: true,
            },
            StoreOutcome::OtherUsersConversation => {
                return Err(Error::ConversationOfAnotherUser(message.conversation_id));
            }
            StoreOutcome::KeyReused => return Err(Error::RequestIdReused),
            StoreOutcome::ConversationErased => {
                return Err(Error::ConversationErased(message.conversation_id));
            }
        };
        Ok(response)
    }

    async fn get_conversation(
        &self,
        request: pb::GetConversationRequest,
    ) -> Result<pb::GetConversationResponse, Error> {
        let id = queries::conversation_id(&request.conversation_id)?;
        let row = store::conversations::get(&self.pool, id)
            .await?
            .ok_or(Error::ConversationNotFound(id))?;
        Ok(pb::GetConversationResponse {
            conversation: Some(convert::conversation(row)),
        })
    }

    async fn list_messages(
        &self,
        request: pb::ListMessagesRequest,
    ) -> Result<pb::ListMessagesResponse, Error> {
        let page = MessagePage::parse(request, &self.limits)?;
        let token_query = MessagePage::token_query(page.conversation_id, page.order);
        let filled = paging::fill(
            store::messages::list(&self.pool, &page),
            page.page_size,
            self.limits.max_page_bytes,
            paging::token_reserve(&pagination::encode(&token_query, &i64::MAX)),
            |row| {
                let message = convert::message(row);
                let sequence = message.sequence;
                (message, sequence)
            },
        )
        .await?;
        // A conversation always holds at least one message, so an empty first
        // page means there is no such conversation. A later page is empty
        // only when messages went since the previous one: the conversation
        // was erased (or never existed, with a forged token).
        if filled.items.is_empty()
            && (page.after.is_none()
                || !store::conversations::exists(&self.pool, page.conversation_id).await?)
        {
            return Err(Error::ConversationNotFound(page.conversation_id));
        }
        Ok(pb::ListMessagesResponse {
            messages: filled.items,
            next_page_token: filled
                .next
                .map(|sequence| pagination::encode(&token_query, &sequence))
                .unwrap_or_default(),
        })
    }

    async fn get_emotion_history(
        &self,
        request: pb::GetEmotionHistoryRequest,
    ) -> Result<pb::GetEmotionHistoryResponse, Error> {
        let query = HistoryQuery::parse(request, &self.limits)?;
        let mut rows = store::messages::emotion_history(&self.pool, &query).await?;
        if rows.is_empty()
            && !store::conversations::exists(&self.pool, query.conversation_id).await?
        {
            return Err(Error::ConversationNotFound(query.conversation_id));
        }
        // Read newest first (the index order); answered oldest first.
        rows.reverse();
        Ok(pb::GetEmotionHistoryResponse {
            points: rows.into_iter().map(convert::emotion_point).collect(),
        })
    }

    async fn list_conversations(
        &self,
        request: pb::ListConversationsRequest,
    ) -> Result<pb::ListConversationsResponse, Error> {
        let page = ConversationPage::parse(request, &self.limits)?;
        let token_query = ConversationPage::token_query(&page.user_id, page.active_only);
        // The longest cursor: `false` is one character longer than `true`,
        // and no `seq` has more digits than the largest.
        let longest = ConversationCursor {
            in_closed: false,
            last_seq: i64::MAX,
        };
        let filled = paging::fill(
            store::conversations::list_for_user(&self.pool, &page),
            page.page_size,
            self.limits.max_page_bytes,
            paging::token_reserve(&pagination::encode(&token_query, &longest)),
            |row| {
                let cursor = ConversationCursor {
                    in_closed: row.closed_at.is_some(),
                    last_seq: row.seq,
                };
                (convert::conversation(row), cursor)
            },
        )
        .await?;
        Ok(pb::ListConversationsResponse {
            conversations: filled.items,
            next_page_token: filled
                .next
                .map(|cursor| pagination::encode(&token_query, &cursor))
                .unwrap_or_default(),
        })
    }

    async fn close_conversation(
        &self,
        request: pb::CloseConversationRequest,
    ) -> Result<pb::CloseConversationResponse, Error> {
        let id = queries::conversation_id(&request.conversation_id)?;
        let row = store::conversations::close(&self.pool, id, maitre_runtime::db::now())
            .await?
            .ok_or(Error::ConversationNotFound(id))?;
        Ok(pb::CloseConversationResponse {
            conversation: Some(convert::conversation(row)),
        })
    }

    async fn delete_user_data(
        &self,
        request: pb::DeleteUserDataRequest,
    ) -> Result<pb::DeleteUserDataResponse, Error> {
        let user_id = queries::erasable_user_id(&request.user_id)?;
        let deadline = CallContext::current_deadline()
            .unwrap_or_else(|| Instant::now() + ERASE_WITHOUT_DEADLINE);
        // Should this call end before the purge does (out of time, an error,
        // or dropped at its deadline by the RPC layer), the background purger
        // is woken to finish at once rather than at its next interval.
        let mut unfinished = WakeOnDrop(Some(&self.purger));
        let done = erasure::erase_user(&self.pool, &user_id, deadline, &self.purge).await?;
        if done.complete() {
            unfinished.0 = None;
        }
        // Counts only: a user id is personal data and stays out of the logs
        // (the call's span carries its request id).
        let request_id = CallContext::current().map(|c| c.request_id);
        tracing::info!(
            request_id = request_id.as_deref(),
            conversations_erased = done.conversations_erased,
            messages_deleted = done.messages_deleted,
            batches = done.batches,
            messages_remaining = done.messages_remaining,
            complete = done.complete(),
            "user data erased"
        );
        Ok(pb::DeleteUserDataResponse {
            conversations_deleted: done.conversations_erased,
            messages_deleted: done.messages_deleted,
            complete: done.complete(),
            messages_remaining: done.messages_remaining,
            conversations_remaining: done.conversations_remaining,
        })
    }
}

#[tonic::async_trait]
impl MemoryService for MemoryApi {
    async fn store_message(
        &self,
        request: Request<pb::StoreMessageRequest>,
    ) -> Reply<pb::StoreMessageResponse> {
        reply(MemoryApi::store_message(self, request.into_inner()).await)
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Reply<pb::GetConversationResponse> {
        reply(MemoryApi::get_conversation(self, request.into_inner()).await)
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Reply<pb::ListMessagesResponse> {
        reply(MemoryApi::list_messages(self, request.into_inner()).await)
    }

    async fn get_emotion_history(
        &self,
        request: Request<pb::GetEmotionHistoryRequest>,
    ) -> Reply<pb::GetEmotionHistoryResponse> {
        reply(MemoryApi::get_emotion_history(self, request.into_inner()).await)
    }

    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Reply<pb::ListConversationsResponse> {
        reply(MemoryApi::list_conversations(self, request.into_inner()).await)
    }

    async fn close_conversation(
        &self,
        request: Request<pb::CloseConversationRequest>,
    ) -> Reply<pb::CloseConversationResponse> {
        reply(MemoryApi::close_conversation(self, request.into_inner()).await)
    }

    async fn delete_user_data(
        &self,
        request: Request<pb::DeleteUserDataRequest>,
    ) -> Reply<pb::DeleteUserDataResponse> {
        reply(MemoryApi::delete_user_data(self, request.into_inner()).await)
    }

    async fn get_conversation_state(
        &self,
        request: Request<pb::GetConversationStateRequest>,
    ) -> Reply<pb::GetConversationStateResponse> {
        reply(MemoryApi::get_conversation_state(self, request.into_inner()).await)
    }

    async fn update_conversation_state(
        &self,
        request: Request<pb::UpdateConversationStateRequest>,
    ) -> Reply<pb::UpdateConversationStateResponse> {
        reply(MemoryApi::update_conversation_state(self, request.into_inner()).await)
    }

    async fn get_context(
        &self,
        request: Request<pb::GetContextRequest>,
    ) -> Reply<pb::GetContextResponse> {
        reply(MemoryApi::get_context(self, request.into_inner()).await)
    }

    type WatchMessagesStream = watch::WatchStream;

    async fn watch_messages(
        &self,
        request: Request<pb::WatchMessagesRequest>,
    ) -> Reply<Self::WatchMessagesStream> {
        let deadline = watch::client_deadline(request.metadata());
        reply(MemoryApi::watch_messages(self, request.into_inner(), deadline).await)
    }
}
