//! The copy loop: input → socket and socket → output at once, with poll(2),
//! until both directions have ended. When the input ends, the socket's
//! sending side is shut down so the peer reads end-of-file.
//!
//! The socket is made non-blocking (it is ours alone); input and output are
//! left as they are, since they may be shared with other processes (a
//! terminal, say). A read only follows a readiness report, and writes to
//! the output may block: that is back-pressure, not a deadlock, because
//! nothing but the output's reader decides when it drains.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

/// Bytes buffered per direction.
pub const BUF_SIZE: usize = 64 * 1024;

/// One direction's bytes on their way.
struct Buffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
    /// The source has ended (end-of-file read).
    eof: bool,
}

impl Buffer {
    fn new() -> Buffer {
        Buffer {
            data: vec![0; BUF_SIZE],
            start: 0,
            end: 0,
            eof: false,
        }
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// Which side failed, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Input,
    Output,
    Socket,
}

/// An I/O error and where it happened.
#[derive(Debug)]
pub struct PipeError {
    pub side: Side,
    pub error: io::Error,
}

fn fail(side: Side) -> PipeError {
    PipeError {
        side,
        error: io::Error::last_os_error(),
    }
}

fn read(fd: RawFd, buf: &mut [u8]) -> isize {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL takes no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn is_retry(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

/// Copies `input` to `sock` and `sock` to `output` until both directions
/// have ended. A socket that has been read to its end and an input already
/// at its end (e.g. an earlier connection consumed it) are handled alike:
/// `input_done` says the input has ended before this call, and is set when
/// it ends during it.
pub fn pipe(
    input: BorrowedFd<'_>,
    output: BorrowedFd<'_>,
    sock: BorrowedFd<'_>,
    input_done: &mut bool,
) -> Result<(), PipeError> {
    let (input, output, sock) = (input.as_raw_fd(), output.as_raw_fd(), sock.as_raw_fd());
    set_nonblocking(sock).map_err(|error| PipeError {
        side: Side::Socket,
        error,
    })?;
    let mut up = Buffer::new(); // input → socket
    let mut down = Buffer::new(); // socket → output
    up.eof = *input_done;
    let mut shut_down = false;
    loop {
        // The sending side ends once the input has ended and all of it went.
        if up.eof && up.is_empty() && !shut_down {
            // SAFETY: shutdown() takes no pointers.
            if unsafe { libc::shutdown(sock, libc::SHUT_WR) } != 0 {
                let err = io::Error::last_os_error();
                // The peer may have gone already: then the next read says so.
                if err.raw_os_error() != Some(libc::ENOTCONN) {
                    return Err(PipeError {
                        side: Side::Socket,
                        error: err,
                    });
                }
            }
            shut_down = true;
        }
        if shut_down && down.eof && down.is_empty() {
            return Ok(());
        }

        // What each descriptor waits for now; -1 entries are ignored.
        let mut fds = [
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            }, // input readable
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            }, // socket
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            }, // output writable
        ];
        if !up.eof && up.is_empty() {
            fds[0] = libc::pollfd {
                fd: input,
                events: libc::POLLIN,
                revents: 0,
            };
        }
        let mut sock_events = 0;
        if !up.is_empty() {
            sock_events |= libc::POLLOUT;
        }
        if !down.eof && down.is_empty() {
            sock_events |= libc::POLLIN;
        }
        if sock_events != 0 {
            fds[1] = libc::pollfd {
                fd: sock,
                events: sock_events,
                revents: 0,
            };
        }
        if !down.is_empty() {
            fds[2] = libc::pollfd {
                fd: output,
                events: libc::POLLOUT,
                revents: 0,
            };
        }
        // SAFETY: fds is a valid array of fds.len() pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(PipeError {
                side: Side::Socket,
                error: err,
            });
        }

        if fds[0].revents != 0 {
            if fds[0].revents & libc::POLLNVAL != 0 {
                // No input at all (a closed stdin): as good as empty.
                up.eof = true;
            } else {
                let got = read(input, &mut up.data);
                if got > 0 {
                    up.end = got as usize;
                } else if got == 0 {
                    up.eof = true;
                } else {
                    let err = fail(Side::Input);
                    if !is_retry(&err.error) {
                        return Err(err);
                    }
                }
            }
            *input_done = up.eof;
        }
        if fds[1].revents != 0 {
            if !up.is_empty() {
                let pending = up.pending();
                // SAFETY: pending is valid for reads of its length.
                // MSG_NOSIGNAL: a gone peer is an EPIPE error, not a SIGPIPE.
                let sent = unsafe {
                    libc::send(
                        sock,
                        pending.as_ptr().cast(),
                        pending.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if sent >= 0 {
                    up.consume(sent as usize);
                } else {
                    let err = fail(Side::Socket);
                    if !is_retry(&err.error) {
                        return Err(err);
                    }
                }
            }
            if !down.eof && down.is_empty() {
                let got = read(sock, &mut down.data);
                if got > 0 {
                    down.end = got as usize;
                } else if got == 0 {
                    down.eof = true;
                } else {
                    let err = fail(Side::Socket);
                    if !is_retry(&err.error) {
                        return Err(err);
                    }
                }
            }
        }
        if fds[2].revents != 0 {
            let pending = down.pending();
            // SAFETY: pending is valid for reads of its length.
            let wrote = unsafe { libc::write(output, pending.as_ptr().cast(), pending.len()) };
            if wrote >= 0 {
                down.consume(wrote as usize);
            } else {
                let err = fail(Side::Output);
                if !is_retry(&err.error) {
                    return Err(err);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    fn os_pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds is valid for two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are fresh descriptors, owned from here on.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// A peer that reads everything until end-of-file, then sends back
    /// its length and `tail` and closes.
    fn spawn_peer(mut peer: UnixStream, tail: Vec<u8>) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).expect("peer read");
            peer.write_all(format!("{}:", got.len()).as_bytes())
                .expect("peer write");
            peer.write_all(&tail).expect("peer write");
            got.len()
        })
    }

    #[test]
    fn copies_both_ways_and_half_closes_after_the_input() {
        let (ours, peer) = UnixStream::pair().expect("socketpair");
        // More than the buffer both ways, so the loop turns many times.
        let tail = vec![b'x'; 3 * BUF_SIZE + 7];
        let peer = spawn_peer(peer, tail.clone());
        let (in_r, in_w) = os_pipe();
        let writer = std::thread::spawn(move || {
            let mut w = std::fs::File::from(in_w);
            w.write_all(&vec![b'a'; 5 * BUF_SIZE + 3])
                .expect("input write");
        });
        let (out_r, out_w) = os_pipe();
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            std::fs::File::from(out_r)
                .read_to_end(&mut out)
                .expect("output read");
            out
        });
        let mut done = false;
        pipe(in_r.as_fd(), out_w.as_fd(), ours.as_fd(), &mut done).expect("pipe");
        drop(out_w);
        assert!(done);
        writer.join().expect("writer");
        assert_eq!(peer.join().expect("peer"), 5 * BUF_SIZE + 3);
        let mut expected = format!("{}:", 5 * BUF_SIZE + 3).into_bytes();
        expected.extend_from_slice(&tail);
        assert_eq!(reader.join().expect("reader"), expected);
    }

    #[test]
    fn an_input_already_ended_shuts_down_at_once() {
        let (ours, peer) = UnixStream::pair().expect("socketpair");
        let peer = spawn_peer(peer, b"bye".to_vec());
        let (in_r, _in_w) = os_pipe(); // never ends by itself
        let (out_r, out_w) = os_pipe();
        let mut done = true;
        pipe(in_r.as_fd(), out_w.as_fd(), ours.as_fd(), &mut done).expect("pipe");
        drop(out_w);
        assert_eq!(peer.join().expect("peer"), 0);
        let mut out = String::new();
        std::fs::File::from(out_r)
            .read_to_string(&mut out)
            .expect("read");
        assert_eq!(out, "0:bye");
    }

    #[test]
    fn a_reset_connection_is_a_socket_error() {
        let (ours, peer) = UnixStream::pair().expect("socketpair");
        drop(peer);
        let (in_r, in_w) = os_pipe();
        std::fs::File::from(in_w).write_all(b"data").expect("write");
        let (_out_r, out_w) = os_pipe();
        let mut done = false;
        let err = pipe(in_r.as_fd(), out_w.as_fd(), ours.as_fd(), &mut done)
            .expect_err("the peer is gone");
        assert_eq!(err.side, Side::Socket);
        assert_eq!(err.error.raw_os_error(), Some(libc::EPIPE));
    }
}
