//! virtio-rng. (Being written.)
