//! Size limits on what callers may send. All configurable (see `config.rs`);
//! the defaults suit chat messages.

/// Bounds enforced on every request.
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
        }
    }
}
