//! Fuzzes the checkpoint reader: arbitrary bytes opened as a checkpoint
//! file, every block read at random and sequentially. The body lives in
//! `stasis::checkpoint::fuzzing` so stable builds compile and test it.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    stasis::checkpoint::fuzzing::read_untrusted(data);
});
