//! Configuration errors: each names the file, the line and the key at fault.

use std::fmt;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or other origin) the text came from.
    pub origin: String,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// 1-based column on that line.
    pub column: Option<usize>,
    /// Dotted key path such as `queues[0].max_inflight` (empty for the whole file).
    pub key: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl ConfigError {
    /// A problem with the file as a whole (unreadable, not TOML at all).
    pub fn whole_file(origin: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: origin.to_string(),
            line: None,
            column: None,
            key: String::new(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": `{}`: {}", self.key, self.message)
        }
    }
}

/// Every problem found in one configuration, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Wraps a single error.
    pub fn single(error: ConfigError) -> ConfigErrors {
        ConfigErrors(vec![error])
    }

    /// The errors, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} error{} in configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for err in &self.0 {
            writeln!(f, "  {err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
