//! The body of the control-socket fuzz target (`fuzz/fuzz_targets/api.rs`),
//! kept in the library so ordinary tests compile and run it on stable.
//!
//! The first input byte picks the state the VMM is in when the bytes
//! arrive and how the client's bytes are cut into reads; the rest is what
//! one client sends. The bytes go through the server's own connection loop
//! (`serve_stream`: bounded line reads, parsing, the snapshot guard, the
//! shutdown check, reply writing) to a VMM model on another thread that
//! answers as the VMM does in that state. The VM side of a request (KVM,
//! snapshot files) is not here; the end-to-end tests cover it.
//!
//! Any panic is a bug, and so is any of these:
//! - a reply line that is not a JSON object with a boolean `ok` (and a
//!   non-empty `error` when it is false);
//! - a reply count other than one per non-blank request line, up to and
//!   including the first line over [`MAX_REQUEST_BYTES`], after which the
//!   connection ends;
//! - a request reaching the VMM that should not have (the snapshot guard
//!   or the shutdown let it past), or one that should have not reaching it;
//! - a request the server accepts that does not come back the same after
//!   the client's encoding (`request_json`) and the server's parsing.

use std::io::{BufReader, Read};
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use serde_json::{Map, Value};

use super::{parse_request, request_json, serve_stream, ApiCall, ApiRequest, Shared, SnapshotGuard, MAX_REQUEST_BYTES};

/// The VMM's state while the client's bytes arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Built, vCPUs not started yet: calls wait until the event loop runs.
    Booting,
    Running,
    Paused,
    /// Another client's snapshot (or backup) is in flight.
    Snapshotting,
    /// A lazy restore still loading memory.
    Restoring,
    /// The VMM is shutting down.
    Stopping,
}

impl State {
    fn from_byte(b: u8) -> State {
        match b % 6 {
            0 => State::Booting,
            1 => State::Running,
            2 => State::Paused,
            3 => State::Snapshotting,
            4 => State::Restoring,
            _ => State::Stopping,
        }
    }
}

/// A reader handing out at most `chunk` bytes per read, as a socket may.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The VMM model: answers each call as the VMM would in `state`, and
/// counts the calls.
fn model_vmm(calls: mpsc::Receiver<ApiCall>, mut state: State) -> usize {
    let mut count = 0;
    for call in calls {
        count += 1;
        let reply = match &call.request {
            ApiRequest::Pause => {
                state = State::Paused;
                Ok(())
            }
            ApiRequest::Resume => {
                state = State::Running;
                Ok(())
            }
            ApiRequest::Status => Ok(()),
            ApiRequest::Snapshot { parent: Some(_), .. } => Err("the parent is not this VM's latest snapshot".to_owned()),
            ApiRequest::Snapshot { .. } | ApiRequest::Backup { .. } => Ok(()),
            ApiRequest::Grant { .. } | ApiRequest::Revoke { .. } | ApiRequest::Grants => {
                Err("this VM serves no content: start it with --content-store DIR".to_owned())
            }
        };
        let reply = reply.map(|()| {
            let mut fields = Map::new();
            let name = if state == State::Paused { "paused" } else { "running" };
            fields.insert("state".into(), Value::String(name.into()));
            fields
        });
        call.respond(reply);
    }
    count
}

/// What the server should do with each line: the replies it owes and the
/// calls that should reach the VMM, worked out without the server's code.
fn expected(stream: &[u8], state: State) -> (usize, usize) {
    let (mut replies, mut calls) = (0, 0);
    let mut rest = stream;
    while !rest.is_empty() {
        let (line, next, terminated) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..], true),
            None => (rest, &rest[rest.len()..], false),
        };
        if line.len() > MAX_REQUEST_BYTES {
            return (replies + 1, calls);
        }
        if !line.trim_ascii().is_empty() {
            replies += 1;
            if let Ok(request) = parse_request(line) {
                let guarded = matches!(request, ApiRequest::Snapshot { .. } | ApiRequest::Backup { .. });
                let refused = state == State::Stopping || (guarded && state == State::Snapshotting);
                calls += usize::from(!refused);
            }
        }
        if !terminated {
            break;
        }
        rest = next;
    }
    (replies, calls)
}

/// Fuzz entry: see the module documentation.
pub fn serve_untrusted(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else { return };
    let state = State::from_byte(first);
    // Reads of 1 to 32 bytes, or whatever the buffer holds.
    let chunk = match first / 6 % 8 {
        0 => usize::MAX,
        k => 1 << (k - 1),
    };
    let shared = Shared::default();
    // Another client's snapshot holds the guard the whole time.
    let _other = if state == State::Snapshotting { SnapshotGuard::acquire(&shared.snapshot_busy) } else { None };
    if state == State::Stopping {
        shared.stopping.store(true, Ordering::SeqCst);
    }
    let (tx, rx) = mpsc::channel::<ApiCall>();
    let out = std::thread::scope(|s| {
        let vmm = s.spawn(move || {
            if state == State::Booting {
                // The event loop starts a moment after the socket.
                std::thread::yield_now();
            }
            model_vmm(rx, state)
        });
        let mut out = Vec::new();
        let reader = BufReader::with_capacity(64, Chunked { data: stream, chunk });
        serve_stream(reader, &mut out, 0, &shared, &tx);
        drop(tx);
        let calls = vmm.join().expect("the VMM model panicked");
        (out, calls)
    });
    let (out, calls) = out;
    let (want_replies, want_calls) = expected(stream, state);

    let text = std::str::from_utf8(&out).expect("replies are UTF-8");
    let mut replies = 0;
    for line in text.split_terminator('\n') {
        replies += 1;
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"));
        let ok = value.get("ok").and_then(Value::as_bool).unwrap_or_else(|| panic!("reply {line:?} has no boolean ok"));
        if !ok {
            let error = value.get("error").and_then(Value::as_str).unwrap_or_default();
            assert!(!error.is_empty(), "refusal {line:?} says nothing");
        }
    }
    assert!(text.is_empty() || text.ends_with('\n'), "a reply line is unterminated");
    assert_eq!(replies, want_replies, "replies for {:?}", String::from_utf8_lossy(stream));
    assert_eq!(calls, want_calls, "calls reaching the VMM in {state:?}");

    // Every accepted request survives the client's encoding.
    for line in stream.split(|&b| b == b'\n').filter(|l| l.len() <= MAX_REQUEST_BYTES) {
        if let Ok(request) = parse_request(line) {
            let wire = request_json(&request).expect("an accepted request encodes").to_string();
            assert_eq!(parse_request(wire.as_bytes()).as_ref(), Ok(&request), "{wire}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds like the fuzz corpus's, in every state and read size.
    #[test]
    fn seeds_in_every_state() {
        let long = format!("{{\"op\":\"status\",\"x\":\"{}\"}}\n{{\"op\":\"status\"}}\n", "a".repeat(MAX_REQUEST_BYTES));
        let seeds: [&[u8]; 9] = [
            b"{\"op\":\"status\"}\n",
            b"{\"op\":\"pause\"}\n{\"op\":\"resume\"}\n\n  \n{\"op\":\"status\"}",
            b"{\"op\":\"snapshot\",\"out\":\"/tmp/s\",\"then\":\"exit\",\"stop_the_world\":true}\n",
            b"{\"op\":\"snapshot\",\"out\":\"rel\"}\n{\"op\":\"snapshot\",\"out\":\"/a\",\"parent\":\"/b\"}\n",
            b"{\"op\":\"backup\",\"to\":\"/store\",\"full\":true,\"state_dir\":null}\n",
            b"{\"op\":\"grant\",\"ids\":[\"sha256:0000000000000000000000000000000000000000000000000000000000000000\"],\"uses\":2}\n",
            b"[1,2]\n{\"op\":7}\n{}\nnot json\n\xff\xfe\n{\"op\":\"status\",\"extra\":1}\n",
            b"{\"op\":\"status\"",
            long.as_bytes(),
        ];
        for first in 0..48u8 {
            for seed in seeds {
                let mut data = vec![first];
                data.extend_from_slice(seed);
                serve_untrusted(&data);
            }
        }
    }

    #[test]
    fn random_bytes_never_break_the_server() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let mut data = Vec::new();
            let len = (x % 400) as usize;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.push(b"{}\":,op status\n pause[]snapshot/\xff"[(x % 33) as usize]);
            }
            serve_untrusted(&data);
        }
    }
}
