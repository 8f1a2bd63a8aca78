//! Staged checkpoint files (placeholder, being written).
