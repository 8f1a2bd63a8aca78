//! virtio-vsock with a Unix-socket host side. (Being written.)

use serde::{Deserialize, Serialize};

/// virtio-vsock state saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {}
