//! virtio-blk: a disk image file as a block device. (Stand-in until the
//! real implementation lands.)

use serde::{Deserialize, Serialize};

pub mod image;

use image::DiskImage;

use super::{DeviceState, QueueContext, VirtioDevice};

/// virtio-blk state saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {}

/// Errors rebuilding a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Not available yet.
    #[error("disks are not supported yet")]
    Unsupported,
}

/// The block device.
pub struct Block {
    image: DiskImage,
}

impl Block {
    /// A block device over `image`.
    pub fn new(image: DiskImage, _serial: String) -> Block {
        Block { image }
    }
    /// Rebuilds one from a snapshot.
    pub fn from_state(_image: DiskImage, _state: &BlockState) -> Result<Block, BlockError> {
        Err(BlockError::Unsupported)
    }
    /// The image.
    pub fn image(&self) -> &DiskImage {
        &self.image
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        super::device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn features(&self) -> u64 {
        super::features::VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn reset(&mut self) {}
    fn process_queue(&mut self, _index: usize, _ctx: &mut QueueContext<'_>) {}
    fn state(&self) -> DeviceState {
        DeviceState::Block(BlockState {})
    }
}
