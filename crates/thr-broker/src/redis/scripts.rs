//! The Lua scripts, loaded from `scripts/*.lua`. redis-rs runs them with
//! EVALSHA and falls back to EVAL on NOSCRIPT, so a Redis restarted empty
//! gets them again without help.

use std::sync::OnceLock;

use redis::Script;

/// Every script the broker runs.
pub struct Scripts {
    pub enqueue: Script,
    pub claim: Script,
    pub cancel: Script,
}

impl Scripts {
    /// The scripts, hashed once per process.
    pub fn get() -> &'static Scripts {
        static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
        SCRIPTS.get_or_init(|| Scripts {
            enqueue: Script::new(include_str!("../../scripts/enqueue.lua")),
            claim: Script::new(include_str!("../../scripts/claim.lua")),
            cancel: Script::new(include_str!("../../scripts/cancel.lua")),
        })
    }
}
