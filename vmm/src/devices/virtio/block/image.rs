//! Disk image files: opening, locking, copying. (Being written.)
