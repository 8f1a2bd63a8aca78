//! The virtio-mmio transport. (Being written.)
