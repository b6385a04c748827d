//! The process's descriptor limit: a front holds one descriptor per client
//! connection, so the soft limit (often 1,024) is raised to the hard one
//! at start, as nginx (`worker_rlimit_nofile`) and Go programs do.

/// Raises the soft limit on open files to the hard limit; returns the limit
/// in force afterwards (None where it cannot be read).
pub fn raise_open_files() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(err) => {
            tracing::debug!(%err, "could not raise the open-files limit");
            open_files()
        }
    }
}

/// The soft limit on open files.
pub fn open_files() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}
