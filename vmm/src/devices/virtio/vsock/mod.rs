//! virtio-vsock with a Unix-socket host side. (Stand-in until the real
//! implementation lands.)

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{DeviceState, QueueContext, VirtioDevice};

/// virtio-vsock state saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {}

/// Errors setting up the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Not available yet.
    #[error("vsock on {0} is not supported yet")]
    Unsupported(PathBuf),
}

/// The vsock device.
pub struct Vsock;

impl Vsock {
    /// A device for `guest_cid` listening on `uds_path`.
    pub fn new(_guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        Err(VsockError::Unsupported(uds_path.to_path_buf()))
    }
    /// Rebuilds one from a snapshot.
    pub fn from_state(_state: &VsockState, uds_path: &Path) -> Result<Vsock, VsockError> {
        Err(VsockError::Unsupported(uds_path.to_path_buf()))
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        super::device_type::VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 256]
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
        DeviceState::Vsock(VsockState {})
    }
}
