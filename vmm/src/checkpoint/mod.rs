//! Staged checkpoint files: guest memory cut into memory blocks, each
//! elided (zero), compressed (zstd) or stored raw, packed into aligned
//! storage blocks, with a checksummed index at the end.
//!
//! The on-disk layout is documented in [`format`] and in
//! `docs/checkpoint-format.md`. [`writer::write_checkpoint`] writes a file
//! from any [`source::MemorySource`]; [`reader::Reader`] opens one for random
//! (userfaultfd) or sequential (eager) restore; [`cli`] is
//! `stasis checkpoint …`.
//!
//! Incremental checkpoints: a *layered* file stores only the blocks that
//! changed since its parent checkpoint and marks the others as in the
//! parent. [`reader::Reader::open_chain`] reads a chain of such files as
//! one memory image; [`writer::flatten`] merges a chain into one plain file.

pub mod cli;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod reader;
pub mod source;
pub mod writer;

pub use format::{BlockChecksum, BlockKind, Region};
pub use reader::{
    BlockIndex, BlockInfo, BlockSink, LayerSummary, ReadError, Reader, ReaderOptions, Sequential,
    SinkError, Summary,
};
pub use source::{BlockHint, FileSource, ImageSource, MemorySource, ReaderSource, SourceError};
pub use writer::{flatten, rebase_layer, write_checkpoint, WriteError, WriteStats, WriterOptions};
