//! memory-service settings: command-line flags, each with an environment
//! variable fallback and a default that works on a laptop. `--help` lists
//! them all; README.md's Configuration tables explain them. The settings both
//! services share are [`CommonArgs`] and [`ServerArgs`]; memory-service's own
//! are read from `MEMORY_*` variables.
//!
//! [`Settings::check_limits`] refuses, at start-up, limits under which an
//! answer could outgrow [`MAX_RESPONSE_BYTES`]: such a call would fail only
//! after its work was done.

use std::time::Duration;

use clap::{Args, CommandFactory, Subcommand};
use maitre_runtime::{
    config::{CommonArgs, RenamedVariables, ServiceDefaults},
    db::PoolSettings,
    server::ServerArgs,
};

use anyhow::ensure;

use crate::{
    domain::Limits, erasure::PurgeSettings, feed::FeedSettings, startup::MAX_RESPONSE_BYTES,
    store::group_commit::GroupCommit,
};

/// memory-service's defaults for the settings both services share.
const DEFAULTS: ServiceDefaults = ServiceDefaults {
    grpc_addr: "0.0.0.0:50051",
    admin_addr: "0.0.0.0:9101",
    db_max_connections: "16",
    log_filter: "info,sqlx=warn",
};

/// Variables memory-service read before the naming scheme of issue 11: it
/// refuses to start while one is set (see [`RenamedVariables`]).
pub const RENAMED_VARIABLES: RenamedVariables = RenamedVariables {
    shared_prefix: "MEMORY_",
    own: &[],
};

/// What a response wrapping one item adds to the item's own encoding, at
/// most: field tags and lengths, ids and a timestamp the request did not
/// carry, a page token (under 100 bytes).
const ENVELOPE_BYTES: usize = 1024;

/// maitre memory-service: stores every chat message with its emotion score
/// and keeps per-conversation emotion statistics and history, over gRPC.
#[derive(Debug, Args)]
#[command(version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

/// By hand rather than derived, to apply memory-service's [`DEFAULTS`] to
/// the shared flags: `Cli::parse()` and `--help` both see them.
impl CommandFactory for Cli {
    fn command() -> clap::Command {
        DEFAULTS.apply(Self::augment_args(clap::Command::new("memory-service")))
    }

    fn command_for_update() -> clap::Command {
        DEFAULTS.apply(Self::augment_args_for_update(clap::Command::new(
            "memory-service",
        )))
    }
}

impl clap::Parser for Cli {}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Apply pending migrations (unless skipped) and serve gRPC until SIGTERM (the default).
    Serve,
    /// Create the database if missing, apply pending migrations, and exit.
    Migrate,
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Largest message content accepted, in bytes.
    #[arg(long, env = "MEMORY_MAX_CONTENT_BYTES", default_value_t = 32 * 1024, global = true)]
    pub max_content_bytes: usize,

    /// Largest metadata map accepted (keys plus values), in bytes.
    #[arg(long, env = "MEMORY_MAX_METADATA_BYTES", default_value_t = 8 * 1024, global = true)]
    pub max_metadata_bytes: usize,

    /// Longest emotion label accepted, in characters.
    #[arg(
        long,
        env = "MEMORY_MAX_LABEL_CHARS",
        default_value_t = 32,
        global = true
    )]
    pub max_label_chars: usize,

    /// Largest encoded ListMessages / ListConversations page, in bytes: a page
    /// holds fewer than page_size items when the next would pass this (never
    /// fewer than one). At most 4128768, the largest response the server sends.
    #[arg(long, env = "MEMORY_MAX_PAGE_BYTES", default_value_t = 1024 * 1024, global = true)]
    pub max_page_bytes: usize,

    /// Largest conversation state (UpdateConversationState), in bytes of JSON
    /// text: as sent, and as stored (jsonb's text form, a space after each
    /// colon and comma). At most what one request can carry.
    #[arg(
        long,
        env = "MEMORY_MAX_STATE_BYTES",
        default_value_t = 64 * 1024,
        value_parser = clap::value_parser!(u32).range(2..=1_048_576),
        global = true
    )]
    pub max_state_bytes: u32,

    /// Most distinct emotion labels counted per conversation; scores with a
    /// further label are counted under the label "~other".
    #[arg(
        long,
        env = "MEMORY_MAX_DISTINCT_LABELS",
        default_value_t = 32,
        global = true
    )]
    pub max_distinct_labels: u32,

    /// Most messages one statement of an erasure's purge deletes: each batch
    /// is its own short transaction, far below the statement timeout.
    #[arg(
        long,
        env = "MEMORY_PURGE_BATCH_SIZE",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(i64).range(1..=1_000_000),
        global = true
    )]
    pub purge_batch_size: i64,

    /// How often the background purger looks for erasures left unfinished
    /// (a DeleteUserData that ran out of time wakes it at once).
    #[arg(long, env = "MEMORY_PURGE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub purge_interval: Duration,

    /// StoreMessage group commit: how many writers each write the calls
    /// queued at the time as one statement (one plan and one commit for many
    /// calls under load; a lone call is written at once). 0 writes each call
    /// on its own.
    #[arg(
        long,
        env = "MEMORY_STORE_WRITERS",
        default_value_t = 4,
        value_parser = clap::value_parser!(u16).range(0..=256),
        global = true
    )]
    pub store_writers: u16,

    /// Most messages one group-commit statement writes.
    #[arg(
        long,
        env = "MEMORY_STORE_BATCH_MAX",
        default_value_t = 64,
        value_parser = clap::value_parser!(u16).range(1..=1000),
        global = true
    )]
    pub store_batch_max: u16,

    /// StoreMessage group commit: how long a batch waits for each row lock
    /// (a conversation held by another statement) before it is split and its
    /// calls written on their own, and how long a writer waits for a lone
    /// call before leaving it to a task of its own.
    #[arg(long, env = "MEMORY_STORE_LOCK_WAIT", default_value = "50ms", value_parser = humantime::parse_duration, global = true)]
    pub store_lock_wait: Duration,

    /// WatchMessages: how often the message feed is sequenced and its end
    /// read when no message stored through this replica prompts it (how soon
    /// a watcher here sees messages stored through another replica).
    #[arg(long, env = "MEMORY_FEED_POLL_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration, global = true)]
    pub feed_poll_interval: Duration,

    /// How long the message feed keeps a position: a WatchMessages cursor
    /// older than this has expired (OUT_OF_RANGE, CURSOR_EXPIRED).
    #[arg(long, env = "MEMORY_FEED_RETENTION", default_value = "7d", value_parser = humantime::parse_duration, global = true)]
    pub feed_retention: Duration,

    /// How often an idle WatchMessages stream gets a heartbeat.
    #[arg(long, env = "MEMORY_WATCH_HEARTBEAT", default_value = "15s", value_parser = humantime::parse_duration, global = true)]
    pub watch_heartbeat: Duration,

    /// Messages held for one WatchMessages stream that its client has not
    /// read yet (at most this many, plus a page of 64 being sent).
    #[arg(
        long,
        env = "MEMORY_WATCH_BUFFER",
        default_value_t = 64,
        value_parser = clap::value_parser!(u32).range(1..=4096),
        global = true
    )]
    pub watch_buffer: u32,

    /// A WatchMessages stream whose buffer stays full this long (its client
    /// stopped reading) is ended with UNAVAILABLE, WATCHER_TOO_SLOW.
    #[arg(long, env = "MEMORY_WATCH_STALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub watch_stall_timeout: Duration,

    /// Most WatchMessages streams open at once on this replica.
    #[arg(
        long,
        env = "MEMORY_WATCH_MAX_STREAMS",
        default_value_t = 256,
        global = true
    )]
    pub watch_max_streams: usize,

    /// Most WatchMessages streams one caller may have open at once on this
    /// replica (with AUTH_MODE=none every client is the same caller).
    #[arg(
        long,
        env = "MEMORY_WATCH_MAX_STREAMS_PER_CALLER",
        default_value_t = 16,
        global = true
    )]
    pub watch_max_streams_per_caller: usize,

    #[command(flatten)]
    pub server: ServerArgs,
}

impl Settings {
    /// Defaults for everything, with the given database (used by tests).
    pub fn for_database(database_url: &str) -> Self {
        let mut settings = <Cli as clap::Parser>::parse_from(["memory-service"]).settings;
        settings.common.database_url = database_url.to_owned();
        // Tests bind loopback and opt into authentication where they test it.
        settings.server.auth_mode = maitre_runtime::server::AuthMode::None;
        settings
    }

    pub fn pool(&self) -> PoolSettings {
        self.common.pool("memory-service")
    }

    pub fn purge(&self) -> PurgeSettings {
        PurgeSettings {
            batch_size: self.purge_batch_size,
            interval: self.purge_interval,
        }
    }

    pub fn feed(&self) -> FeedSettings {
        FeedSettings {
            poll_interval: self.feed_poll_interval,
            retention: self.feed_retention,
            heartbeat: self.watch_heartbeat,
            stall_timeout: self.watch_stall_timeout,
            buffer: self.watch_buffer as usize,
            max_streams: self.watch_max_streams,
            max_streams_per_caller: self.watch_max_streams_per_caller,
        }
    }

    pub fn group_commit(&self) -> GroupCommit {
        GroupCommit {
            writers: usize::from(self.store_writers),
            max_batch: usize::from(self.store_batch_max),
            max_distinct_labels: self.max_distinct_labels,
            lock_wait: self.store_lock_wait,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_content_bytes: self.max_content_bytes,
            max_metadata_bytes: self.max_metadata_bytes,
            max_label_chars: self.max_label_chars,
            max_page_size: self.common.max_page_size,
            max_page_bytes: self.max_page_bytes,
            max_distinct_labels: self.max_distinct_labels,
            max_state_bytes: self.max_state_bytes as usize,
            ..Limits::default()
        }
    }

    /// Refuses limits under which some answer could exceed
    /// [`MAX_RESPONSE_BYTES`]. The server would still do the work (a
    /// StoreMessage would store a message it then fails to echo) and only the
    /// encoding would fail, so this is checked once, before serving.
    pub fn check_limits(&self) -> anyhow::Result<()> {
        let limits = self.limits();
        ensure!(
            (1..=MAX_RESPONSE_BYTES).contains(&limits.max_page_bytes),
            "MEMORY_MAX_PAGE_BYTES (--max-page-bytes) is {}: it must be between 1 and \
             {MAX_RESPONSE_BYTES}, the largest response the server encodes",
            limits.max_page_bytes
        );
        ensure!(
            limits.max_distinct_labels >= 1,
            "MEMORY_MAX_DISTINCT_LABELS (--max-distinct-labels) must be at least 1"
        );
        ensure!(
            self.max_request_bytes() + ENVELOPE_BYTES <= MAX_RESPONSE_BYTES,
            "MEMORY_MAX_CONTENT_BYTES and MEMORY_MAX_METADATA_BYTES admit messages of up to \
             {} bytes, too large to echo or list under the {MAX_RESPONSE_BYTES}-byte response limit",
            self.max_request_bytes()
        );
        ensure!(
            limits.max_state_bytes + ENVELOPE_BYTES <= self.max_request_bytes(),
            "MEMORY_MAX_STATE_BYTES (--max-state-bytes) is {}: a request carrying such a state \
             would pass the {}-byte request limit (set by MEMORY_MAX_CONTENT_BYTES and \
             MEMORY_MAX_METADATA_BYTES)",
            limits.max_state_bytes,
            self.max_request_bytes()
        );
        ensure!(
            limits.largest_conversation_bytes() + ENVELOPE_BYTES <= MAX_RESPONSE_BYTES,
            "MEMORY_MAX_DISTINCT_LABELS and MEMORY_MAX_LABEL_CHARS admit conversations of up to \
             {} bytes, over the {MAX_RESPONSE_BYTES}-byte response limit",
            limits.largest_conversation_bytes()
        );
        ensure!(
            limits.largest_history_bytes() + ENVELOPE_BYTES <= MAX_RESPONSE_BYTES,
            "MEMORY_MAX_LABEL_CHARS admits emotion histories of up to {} bytes, over the \
             {MAX_RESPONSE_BYTES}-byte response limit",
            limits.largest_history_bytes()
        );
        let feed = self.feed();
        for (name, value, least) in [
            (
                "MEMORY_FEED_POLL_INTERVAL",
                feed.poll_interval,
                Duration::from_millis(10),
            ),
            (
                "MEMORY_WATCH_HEARTBEAT",
                feed.heartbeat,
                Duration::from_millis(100),
            ),
            (
                "MEMORY_WATCH_STALL_TIMEOUT",
                feed.stall_timeout,
                Duration::from_millis(100),
            ),
            (
                "MEMORY_FEED_RETENTION",
                feed.retention,
                Duration::from_millis(1),
            ),
        ] {
            ensure!(
                value >= least && value <= Duration::from_secs(10 * 365 * 24 * 3600),
                "{name} is {value:?}: it must be between {least:?} and 10 years"
            );
        }
        ensure!(
            feed.max_streams >= 1 && feed.max_streams_per_caller >= 1,
            "MEMORY_WATCH_MAX_STREAMS and MEMORY_WATCH_MAX_STREAMS_PER_CALLER must be at least 1"
        );
        let smallest_context = limits.smallest_context_bytes();
        ensure!(
            smallest_context <= MAX_RESPONSE_BYTES,
            "MEMORY_MAX_STATE_BYTES, MEMORY_MAX_CONTENT_BYTES and MEMORY_MAX_METADATA_BYTES admit \
             GetContext answers (a conversation, its state and its newest message) of up to {} \
             bytes, over the {MAX_RESPONSE_BYTES}-byte response limit",
            smallest_context
        );
        Ok(())
    }

    /// Largest gRPC request the decoder accepts: the content limit plus room
    /// for metadata, tool calls and framing.
    pub fn max_request_bytes(&self) -> usize {
        self.limits().largest_request_bytes()
    }
}
