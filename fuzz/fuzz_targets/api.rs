//! Fuzzes the control socket: one client's bytes through the server's
//! connection loop to a VMM model, in each VMM state. The body lives in
//! `stasis::api::fuzzing` so stable builds compile and test it.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    stasis::api::fuzzing::serve_untrusted(data);
});
