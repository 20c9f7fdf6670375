//! (being written)

/// Format version.
pub const VERSION: u16 = 1;
