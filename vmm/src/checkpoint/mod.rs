//! Staged checkpoint files: guest memory cut into memory blocks, each
//! elided (zero), compressed (zstd) or stored raw, packed into aligned
//! storage blocks, with a checksummed index at the end.
//!
//! The on-disk layout is documented in [`format`] and in
//! `docs/checkpoint-format.md`. [`writer::write_checkpoint`] writes a file
//! from any [`source::MemorySource`]; [`reader::Reader`] opens one for random
//! (userfaultfd) or sequential (eager) restore; [`cli`] is
//! `stasis checkpoint …`.

pub mod cli;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod reader;
pub mod source;
pub mod writer;

pub use format::{BlockKind, Region};
pub use reader::{
    BlockIndex, BlockInfo, BlockSink, ReadError, Reader, ReaderOptions, Sequential, SinkError,
    Summary,
};
pub use source::{FileSource, ImageSource, MemorySource, SourceError};
pub use writer::{write_checkpoint, WriteError, WriteStats, WriterOptions};
