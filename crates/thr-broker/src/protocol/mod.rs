//! The broker protocol on Redis, the single source of truth for its keys
//! ([`keys`]), records ([`records`]) and scripts ([`scripts`]), ARCHITECTURE.md
//! decision 14. The broker, `thrctl` and the tests use it; nothing else
//! builds a key or parses a record. ARCHITECTURE.md ("The broker protocol")
//! lists the invariants the scripts keep.

pub mod keys;
pub mod records;
pub(crate) mod scripts;

pub use scripts::{helper as lua_helper, source as script_source};
