//! virtio-blk: a disk image file as a block device. (Being written.)

use serde::{Deserialize, Serialize};

pub mod image;

/// virtio-blk state saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {}
