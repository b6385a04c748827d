//! The Lua scripts, loaded from `scripts/*.lua`. redis-rs runs them with
//! EVALSHA and falls back to EVAL on NOSCRIPT, so a Redis restarted empty
//! gets them again without help.

use std::sync::OnceLock;

use redis::Script;

/// The shared quota arithmetic, prepended to every script; public so that
/// tests can drive it with a fake clock.
pub const QUOTA_LUA: &str = include_str!("../../scripts/quota.lua");

/// Every script the broker runs.
pub(crate) struct Scripts {
    pub(crate) enqueue: Script,
    pub(crate) claim: Script,
    pub(crate) cancel: Script,
    pub(crate) release: Script,
    pub(crate) renew: Script,
    pub(crate) reap: Script,
    pub(crate) heartbeat: Script,
    pub(crate) purge: Script,
}

impl Scripts {
    /// The scripts, hashed once per process.
    pub(crate) fn get() -> &'static Scripts {
        static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
        SCRIPTS.get_or_init(|| Scripts {
            enqueue: Script::new(concat!(
                include_str!("../../scripts/quota.lua"),
                include_str!("../../scripts/enqueue.lua")
            )),
            claim: Script::new(concat!(
                include_str!("../../scripts/quota.lua"),
                include_str!("../../scripts/claim.lua")
            )),
            cancel: Script::new(concat!(
                include_str!("../../scripts/quota.lua"),
                include_str!("../../scripts/cancel.lua")
            )),
            release: Script::new(concat!(
                include_str!("../../scripts/quota.lua"),
                include_str!("../../scripts/release.lua")
            )),
            renew: Script::new(concat!(
                include_str!("../../scripts/quota.lua"),
                include_str!("../../scripts/renew.lua")
            )),
            reap: Script::new(concat!(
                include_str!("../../scripts/quota.lua"),
                include_str!("../../scripts/reap.lua")
            )),
            heartbeat: Script::new(concat!(
                include_str!("../../scripts/quota.lua"),
                include_str!("../../scripts/heartbeat.lua")
            )),
            purge: Script::new(concat!(
                include_str!("../../scripts/quota.lua"),
                include_str!("../../scripts/purge.lua")
            )),
        })
    }
}
