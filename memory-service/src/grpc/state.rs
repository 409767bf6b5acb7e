//! Conversation state and context: the handlers of GetConversationState,
//! UpdateConversationState and GetContext.

use maitre_api::memory::v1 as pb;

use super::{MemoryApi, convert};
use crate::{
    domain::{
        queries,
        state::{ContextQuery, StateUpdate},
    },
    error::Error,
    startup::MAX_RESPONSE_BYTES,
    store::{self, state::WriteOutcome},
};

impl MemoryApi {
    pub(super) async fn get_conversation_state(
        &self,
        request: pb::GetConversationStateRequest,
    ) -> Result<pb::GetConversationStateResponse, Error> {
        let id = queries::conversation_id(&request.conversation_id)?;
        let row = store::state::get(&self.pool, id)
            .await?
            .ok_or(Error::ConversationNotFound(id))?;
        Ok(pb::GetConversationStateResponse {
            state: Some(convert::state(
                id,
                row.version,
                row.state_json,
                row.updated_at,
            )),
        })
    }

    pub(super) async fn update_conversation_state(
        &self,
        request: pb::UpdateConversationStateRequest,
    ) -> Result<pb::UpdateConversationStateResponse, Error> {
        let update = StateUpdate::parse(request, &self.limits)?;
        let now = maitre_runtime::db::now();
        let max_bytes = self.limits.max_state_bytes;
        let outcome = store::state::write(&self.pool, &update, now, max_bytes).await?;
        match outcome {
            WriteOutcome::Written {
                version,
                state_json,
            } => Ok(pb::UpdateConversationStateResponse {
                state: Some(convert::state(
                    update.conversation_id,
                    Some(version),
                    Some(state_json),
                    Some(now),
                )),
            }),
            WriteOutcome::NotFound => Err(Error::ConversationNotFound(update.conversation_id)),
            WriteOutcome::VersionMismatch { current } => Err(Error::StateVersionMismatch {
                expected: update.expected_version,
                current,
            }),
            WriteOutcome::NotAnObject { json_type } => Err(invalid_state(
                &update,
                "INVALID_STATE_JSON",
                format!("the merge patch makes the state a JSON {json_type}; a state is an object"),
            )),
            WriteOutcome::TooLarge { bytes } => Err(invalid_state(
                &update,
                "STATE_TOO_LARGE",
                format!("the state would be {bytes} bytes as stored; at most {max_bytes}"),
            )),
        }
    }

    pub(super) async fn get_context(
        &self,
        request: pb::GetContextRequest,
    ) -> Result<pb::GetContextResponse, Error> {
        let query = ContextQuery::parse(request, &self.limits)?;
        let byte_budget = self.limits.context_message_bytes(MAX_RESPONSE_BYTES);
        let mut row = store::context::get(&self.pool, &query, byte_budget)
            .await?
            .ok_or(Error::ConversationNotFound(query.conversation_id))?;
        let messages: Vec<pb::Message> = row.messages().into_iter().map(convert::message).collect();
        let state = convert::state(
            query.conversation_id,
            row.state_version,
            row.state_json,
            row.state_updated_at,
        );
        let conversation = row.conversation;
        let oldest = messages
            .first()
            .map_or(conversation.message_count + 1, |m| m.sequence);
        Ok(pb::GetContextResponse {
            truncated: oldest > 1,
            conversation: Some(convert::conversation(conversation)),
            messages,
            token_count: row.m_token_count,
            state: Some(state),
        })
    }
}

fn invalid_state(update: &StateUpdate, reason: &'static str, message: String) -> Error {
    Error::InvalidState {
        field: if update.change.is_patch() {
            "merge_patch_json"
        } else {
            "state_json"
        },
        reason,
        message,
    }
}
