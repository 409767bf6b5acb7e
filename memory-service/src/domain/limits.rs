//! Size limits on what callers may send and on what the service answers and
//! keeps. All configurable (see `config.rs`); the defaults suit chat messages.

/// Bounds enforced on every request, response and conversation.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `content`, in bytes (UTF-8).
    pub max_content_bytes: usize,
    /// Largest metadata map: keys plus values, in bytes.
    pub max_metadata_bytes: usize,
    /// Most metadata entries.
    pub max_metadata_entries: usize,
    /// Longest emotion label or per-emotion key, in characters.
    pub max_label_chars: usize,
    /// Most per-emotion scores on one message.
    pub max_emotion_scores: usize,
    /// Most tool calls plus tool results on one message.
    pub max_tool_items: usize,
    /// Largest page a listing returns.
    pub max_page_size: u32,
    /// Most points GetEmotionHistory returns.
    pub max_history_limit: u32,
    /// Largest encoded listing page (messages or conversations plus the
    /// page token), in bytes; a page always holds at least one item.
    pub max_page_bytes: usize,
    /// Most distinct emotion labels counted per conversation; scores with
    /// further labels are counted under [`OVERFLOW_LABEL`](super::emotion::OVERFLOW_LABEL).
    pub max_distinct_labels: u32,
    /// Largest conversation state, in bytes of JSON text: as sent, and as
    /// stored (jsonb's text form).
    pub max_state_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_content_bytes: 32 * 1024,
            max_metadata_bytes: 8 * 1024,
            max_metadata_entries: 64,
            max_label_chars: 32,
            max_emotion_scores: 32,
            max_tool_items: 64,
            max_page_size: 500,
            max_history_limit: 200,
            max_page_bytes: 1024 * 1024,
            max_distinct_labels: 32,
            max_state_bytes: 64 * 1024,
        }
    }
}

impl Limits {
    /// An upper bound on one encoded `Conversation`: 2 KiB for ids, channel,
    /// counters and timestamps (under 1 KiB even with user id and channel at
    /// 4 bytes a character), plus one `label_counts` entry (tags, lengths, a
    /// 10-byte count) per distinct label and the overflow bucket.
    pub fn largest_conversation_bytes(&self) -> usize {
        let entry = self.max_label_chars + 19;
        2 * 1024 + (self.max_distinct_labels as usize + 1) * entry
    }

    /// The byte budget of GetContext's messages (content, tool calls and
    /// results, metadata, and 200 bytes each for the rest): a listing page's,
    /// less what the conversation and the state may add to the answer.
    /// The newest message always goes in (like a listing page's first item),
    /// so room is kept for one more of the largest.
    pub fn context_message_bytes(&self, response_limit: usize) -> usize {
        let room = response_limit.saturating_sub(self.smallest_context_bytes());
        self.max_page_bytes.min(room).max(1)
    }

    /// An upper bound on a GetContext answer before its byte budget: the
    /// conversation, its state, the newest message (always sent) and 4 KiB
    /// of framing. Start-up refuses limits that put it over the response
    /// limit.
    pub fn smallest_context_bytes(&self) -> usize {
        self.largest_conversation_bytes()
            + self.max_state_bytes
            + self.largest_request_bytes()
            + 4 * 1024
    }

    /// Largest gRPC request the decoder accepts: the content limit plus room
    /// for metadata, tool calls and framing. A stored message is never larger.
    pub fn largest_request_bytes(&self) -> usize {
        self.max_content_bytes * 2 + self.max_metadata_bytes + 64 * 1024
    }

    /// An upper bound on one encoded GetEmotionHistory answer: per point,
    /// the label plus about 90 bytes of id, sequence, score and timestamp.
    pub fn largest_history_bytes(&self) -> usize {
        self.max_history_limit as usize * (self.max_label_chars + 128)
    }
}
