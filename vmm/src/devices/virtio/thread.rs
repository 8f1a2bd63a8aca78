//! Device threads. (Being written.)
