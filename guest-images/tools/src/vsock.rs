//! AF_VSOCK stream sockets: connect, listen, accept. std has no vsock, so
//! these are thin wrappers over libc returning owned descriptors.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; a non-negative result is a new
    // descriptor that nothing else owns.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor (checked above), owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all zeroes is a valid value
    // (and the reserved fields must be zero).
    let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const ADDR_LEN: libc::socklen_t = mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A stream connection to `port` on `cid`.
pub fn connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    let sock = stream_socket()?;
    let addr = address(cid, port);
    loop {
        // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes that
        // outlives the call.
        let rc = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                ADDR_LEN,
            )
        };
        if rc == 0 {
            return Ok(sock);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A socket listening on `port` for connections from any CID.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let sock = stream_socket()?;
    let addr = address(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes that outlives
    // the call.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen() takes no pointers.
    if unsafe { libc::listen(sock.as_raw_fd(), 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// The next connection on `listener`, and the peer's CID and port.
pub fn accept(listener: &OwnedFd) -> io::Result<(OwnedFd, u32, u32)> {
    loop {
        // SAFETY: all zeroes is a valid sockaddr_vm.
        let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
        let mut len = ADDR_LEN;
        // SAFETY: addr and len are valid for writes of len bytes and
        // outlive the call.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                (&mut addr as *mut libc::sockaddr_vm).cast(),
                &mut len,
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd is a fresh descriptor, owned from here on.
            let conn = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok((conn, addr.svm_cid, addr.svm_port));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
