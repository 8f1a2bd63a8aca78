//! Virtio devices end to end: a root file system on a virtio-blk disk, a
//! read-only disk, a second disk carrying 64 MiB, entropy from virtio-rng,
//! vsock connections both ways, and all of it across a snapshot and a lazy
//! restore. Each test checks what the guest says and what the host sees
//! (image contents, bytes received).
//!
//! On hosts without hardware KVM each test re-runs itself inside the test
//! host, where the VMs and the host side of their sockets share KVM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use stasis_e2e::{
    boot_args, guest_image, pseudo_random, repo_root, run_in_kvm_host, run_in_kvm_host_carrying, scratch,
    sha256_hex, snapshot, Guest,
    COMMAND_TIMEOUT, EXIT_TIMEOUT,
};

/// Moving tens of MiB through a device under nested KVM.
const WORK_TIMEOUT: Duration = Duration::from_secs(600);
/// The default command line with the root file system on the first disk.
const ROOT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet root=/dev/vda";

fn text(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

/// A private copy of the default root file system image.
fn root_disk(dir: &Path) -> PathBuf {
    let path = dir.join("root.ext4");
    std::fs::copy(repo_root().join(guest_image("rootfs.ext4")), &path).expect("copy rootfs.ext4");
    path
}

fn boot(extra: &[String]) -> Guest {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let guest = Guest::spawn(&boot_args("vmlinux", &extra));
    guest.wait_ready();
    guest
}

fn root_args(disk: &Path) -> Vec<String> {
    vec!["--disk".into(), text(disk), "--cmdline".into(), ROOT_CMDLINE.into()]
}


/// sha256 of the first `len` bytes of the file at `path`.
fn file_sha256(path: &Path, len: usize) -> String {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut buf)).expect("read image");
    sha256_hex(&buf)
}


#[test]
fn root_on_disk_persists_across_boots_and_rng_feeds_the_guest() {
    if run_in_kvm_host("root_on_disk_persists_across_boots_and_rng_feeds_the_guest") {
        return;
    }
    let dir = scratch();
    let disk = root_disk(dir.path());
    let mut guest = boot(&root_args(&disk));
    let root = guest.query("ROOT", "echo ROOT=$(awk '$2 == \"/\" { print $1 }' /proc/mounts | tail -n 1)");
    let rng = guest.query("RNG", "echo RNG=$(cat /sys/class/misc/hw_random/rng_current)");
    let hex = guest.query("HWRNG", "echo HWRNG=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n')");
    let mark = guest.query("MARK", "echo written-$RANDOM-$RANDOM > /root/marker; sync; echo MARK=$(cat /root/marker)");
    let output = guest.poweroff();
    assert_eq!(root, "/dev/vda", "root is not on the disk; output:\n{output}");
    assert!(rng.starts_with("virtio_rng"), "current hwrng is {rng:?}; output:\n{output}");
    assert_eq!(hex.len(), 64, "read {hex:?} from /dev/hwrng");
    assert_ne!(hex, "0".repeat(64), "/dev/hwrng gave zeros");

    let mut guest = boot(&root_args(&disk));
    let again = guest.query("MARK", "echo MARK=$(cat /root/marker)");
    let output = guest.poweroff();
    assert_eq!(again, mark, "file written before power-off is gone after the next boot; output:\n{output}");
}

#[test]
fn read_only_disk_refuses_writes_and_a_second_disk_round_trips_64_mib() {
    if run_in_kvm_host("read_only_disk_refuses_writes_and_a_second_disk_round_trips_64_mib") {
        return;
    }
    let dir = scratch();
    let data = dir.path().join("data.img");
    std::fs::File::create(&data).and_then(|f| f.set_len(96 << 20)).expect("data image");
    // The bytes come from the host, through the read-only disk: the guest
    // copies them onto the data disk and reads them back, and the host
    // checks both images.
    let ro = dir.path().join("ro.img");
    let payload = pseudo_random(64 << 20, 7);
    std::fs::write(&ro, &payload).expect("ro image");
    let sha = sha256_hex(&payload);
    drop(payload);

    let mut guest = boot(&["--disk".into(), text(&data), "--disk".into(), format!("{},ro", text(&ro))]);
    let copied = guest.query_within(
        "COPIED",
        "dd if=/dev/vdb of=/dev/vda bs=1M count=64 conv=fsync 2>/dev/null; echo COPIED=$?",
        WORK_TIMEOUT,
    );
    let read = guest.query_within(
        "READ",
        "echo 3 > /proc/sys/vm/drop_caches; echo READ=$(head -c 67108864 /dev/vda | sha256sum | cut -d' ' -f1)",
        WORK_TIMEOUT,
    );
    let ro_flag = guest.query("ROFLAG", "echo ROFLAG=$(blockdev --getro /dev/vdb)");
    let ro_write =
        guest.query("ROWRITE", "dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync 2>/dev/null; echo ROWRITE=$?");
    let output = guest.poweroff();
    assert_eq!(copied, "0", "copying 64 MiB between the disks failed; output:\n{output}");
    assert_eq!(read, sha, "the data disk gave back other bytes than were written; output:\n{output}");
    assert_eq!(file_sha256(&data, 64 << 20), sha, "the data image holds other bytes than the guest wrote");
    assert_eq!(ro_flag, "1", "the read-only disk is writable in the guest; output:\n{output}");
    assert_ne!(ro_write, "0", "a write to the read-only disk succeeded; output:\n{output}");
    assert_eq!(file_sha256(&ro, 64 << 20), sha, "the read-only image changed");
}

/// Connects to the VM's vsock socket and asks for guest `port`; retries
/// while nobody listens there yet. Returns the stream after `OK`.
fn connect_to_guest(uds: &Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let mut stream = UnixStream::connect(uds).expect("connect to the VM's vsock socket");
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).expect("CONNECT");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut line = String::new();
        let ok = reader.read_line(&mut line).is_ok() && line.starts_with("OK ");
        if ok {
            assert!(reader.buffer().is_empty(), "data before the guest sent any");
            return stream;
        }
        assert!(Instant::now() < deadline, "guest port {port} never accepted (last answer {line:?})");
        thread::sleep(Duration::from_millis(300));
    }
}

/// The next connection on `listener`, waiting at most until `deadline`.
fn accept_by(listener: &UnixListener, deadline: Instant) -> UnixStream {
    listener.set_nonblocking(true).expect("non-blocking listener");
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                stream.set_read_timeout(Some(WORK_TIMEOUT)).expect("read timeout");
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the guest did not connect in time");
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Accepts `count` connections on `listener` and returns what each sent;
/// the joining thread panics if they do not all arrive within
/// `WORK_TIMEOUT`, so a guest that never connects fails the test instead
/// of hanging it.
fn receive_all(listener: UnixListener, count: usize) -> thread::JoinHandle<Vec<Vec<u8>>> {
    thread::spawn(move || {
        let deadline = Instant::now() + WORK_TIMEOUT;
        let handlers: Vec<_> = (0..count)
            .map(|_| {
                let mut stream = accept_by(&listener, deadline);
                thread::spawn(move || {
                    let mut data = Vec::new();
                    stream.read_to_end(&mut data).expect("read what the guest sent");
                    data
                })
            })
            .collect();
        handlers.into_iter().map(|h| h.join().expect("reader")).collect()
    })
}

fn listen(uds: &Path, port: u32) -> UnixListener {
    UnixListener::bind(format!("{}_{port}", text(uds))).expect("bind host port")
}

#[test]
fn vsock_carries_32_mib_each_way_and_many_connections() {
    if run_in_kvm_host("vsock_carries_32_mib_each_way_and_many_connections") {
        return;
    }
    let dir = scratch();
    let uds = dir.path().join("v.sock");
    let mut guest = boot(&["--vsock".into(), format!("3,{}", text(&uds))]);

    // Host to guest: the guest listens, the host connects through the
    // VM's socket and sends 32 MiB.
    guest.send_line("stasis-vsock listen 5000 </dev/null >/tmp/in &");
    let payload = pseudo_random(32 << 20, 0x5eed);
    let mut stream = connect_to_guest(&uds, 5000);
    stream.write_all(&payload).expect("send to the guest");
    stream.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("guest closes");
    let got = guest.query_within("INSHA", "wait; echo INSHA=$(sha256sum /tmp/in | cut -d' ' -f1)", WORK_TIMEOUT);
    assert_eq!(got, sha256_hex(&payload), "the guest received other bytes than the host sent");

    // Guest to host: the guest sends the 32 MiB back to a host port.
    let incoming = receive_all(listen(&uds, 5001), 1);
    let rc =
        guest.query_within("OUTRC", "stasis-vsock connect 2 5001 </tmp/in >/dev/null; echo OUTRC=$?", WORK_TIMEOUT);
    let received = incoming.join().expect("host side").remove(0);
    assert_eq!(rc, "0", "stasis-vsock connect failed");
    assert_eq!(received.len(), 32 << 20, "host got {} bytes", received.len());
    assert!(received == payload, "the host received other bytes than the guest sent");

    // Eight at once.
    let incoming = receive_all(listen(&uds, 5002), 8);
    let done = guest.query_within("MANY",
        "for i in 1 2 3 4 5 6 7 8; do (echo conn$i; head -c 1048576 /dev/zero) | stasis-vsock connect 2 5002 >/dev/null & done; wait; echo MANY=done",
        WORK_TIMEOUT,
    );
    assert_eq!(done, "done");
    let mut heads: Vec<String> = incoming
        .join()
        .expect("host side")
        .iter()
        .map(|data| {
            let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
            assert_eq!(data.len(), line.len() + 1 + (1 << 20), "short connection {:?}", String::from_utf8_lossy(line));
            String::from_utf8_lossy(line).into_owned()
        })
        .collect();
    heads.sort();
    assert_eq!(heads, (1..=8).map(|i| format!("conn{i}")).collect::<Vec<_>>());

    // Nobody listens on host port 5999: refused at once, no hang.
    let refused = guest.query("REFUSED", "stasis-vsock connect 2 5999 </dev/null; echo REFUSED=$?");
    let output = guest.poweroff();
    assert_ne!(refused, "0", "connect to a port nobody listens on succeeded; output:\n{output}");
}

fn e2fsck() -> String {
    let out = Command::new("sh").args(["-c", "command -v e2fsck"]).output().expect("sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!path.is_empty(), "e2fsck is missing: install e2fsprogs (scripts/test does)");
    path
}

#[test]
fn snapshot_with_disk_and_vsock_restores_lazily() {
    if run_in_kvm_host_carrying("snapshot_with_disk_and_vsock_restores_lazily", &[&e2fsck()]) {
        return;
    }
    let dir = scratch();
    let disk = root_disk(dir.path());
    let uds = dir.path().join("v.sock");
    let sock = dir.path().join("api.sock");
    let mut args = root_args(&disk);
    args.extend(["--vsock".into(), format!("3,{}", text(&uds)), "--api-sock".into(), text(&sock)]);
    let mut guest = boot(&args);

    let sha = guest.query_within("FSHA",
        "dd if=/dev/urandom of=/root/file bs=1M count=16 2>/dev/null; sync; echo FSHA=$(sha256sum /root/file | cut -d' ' -f1)",
        WORK_TIMEOUT,
    );
    // A writer that keeps the disk busy through the snapshot, and an open
    // vsock connection.
    guest.send_line("(i=0; while true; do i=$((i+1)); echo $i >/root/counter; sync; sleep 0.2; done) &");
    let listener = listen(&uds, 5003);
    guest.send_line("sleep 600 | stasis-vsock connect 2 5003 >/dev/null &");
    let mut held = accept_by(&listener, Instant::now() + COMMAND_TIMEOUT);
    // A live snapshot first: its disk copy is made while the writer goes
    // on (each block copied before the guest overwrites it).
    let live = dir.path().join("live");
    snapshot(&sock, &live, "resume");
    let snap = dir.path().join("snap");
    snapshot(&sock, &snap, "exit");
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "VM did not end after snapshot --then exit: {status}\n{output}");
    // The connection ended with the VM: the host side sees its end.
    let mut rest = Vec::new();
    assert!(held.read_to_end(&mut rest).is_ok(), "the held connection did not end with the VM");
    assert!(snap.join("disk0.img").is_file(), "no disk copy in the snapshot");

    let disks = dir.path().join("restored-disks");
    let sock2 = dir.path().join("api2.sock");
    let restore =
        vec!["restore".to_string(), text(&snap), "--disk-dir".into(), text(&disks), "--api-sock".into(), text(&sock2)];
    let mut guest = Guest::spawn(&restore);
    let again = guest.query_within("RSHA", "echo RSHA=$(sha256sum /root/file | cut -d' ' -f1)", WORK_TIMEOUT);
    let c1: u64 = guest.query("C1", "echo C1=$(cat /root/counter)").parse().expect("counter");
    thread::sleep(Duration::from_secs(2));
    let c2: u64 = guest.query("C2", "echo C2=$(cat /root/counter)").parse().expect("counter");
    // A new connection works at once after the restore.
    let incoming = receive_all(listen(&uds, 5004), 1);
    let rc = guest.query("NEWRC", "echo hello-after-restore | stasis-vsock connect 2 5004 >/dev/null; echo NEWRC=$?");
    let received = incoming.join().expect("host side").remove(0);
    // Stop the writer and leave the file system clean for fsck.
    guest.send_line("kill %1 %2 2>/dev/null; sync; mount -o remount,ro /; echo REMOUNTED=yes");
    let output = guest.poweroff();
    assert_eq!(again, sha, "file written before the snapshot changed; output:\n{output}");
    assert!(c2 > c1, "the disk writer did not go on after restore ({c1} then {c2}); output:\n{output}");
    assert_eq!(rc, "0", "vsock connect after restore failed; output:\n{output}");
    assert_eq!(received, b"hello-after-restore\n");
    fsck_clean(&disks.join("disk0.img"));

    // The live snapshot: its disk matches its memory (the file system
    // goes on, and is clean after a clean shutdown).
    let disks = dir.path().join("live-disks");
    let mut guest = Guest::spawn(&["restore".to_string(), text(&live), "--disk-dir".into(), text(&disks)]);
    let again = guest.query_within("RSHA", "echo RSHA=$(sha256sum /root/file | cut -d' ' -f1)", WORK_TIMEOUT);
    let c1: u64 = guest.query("C1", "echo C1=$(cat /root/counter)").parse().expect("counter");
    thread::sleep(Duration::from_secs(2));
    let c2: u64 = guest.query("C2", "echo C2=$(cat /root/counter)").parse().expect("counter");
    guest.send_line("kill %1 %2 2>/dev/null; sync; mount -o remount,ro /; echo REMOUNTED=yes");
    let output = guest.poweroff();
    assert_eq!(again, sha, "file written before the live snapshot changed; output:\n{output}");
    assert!(c2 > c1, "the disk writer did not go on after restoring the live snapshot ({c1} then {c2}); output:\n{output}");
    fsck_clean(&disks.join("disk0.img"));
}

fn fsck_clean(image: &Path) {
    let fsck = Command::new(e2fsck()).arg("-fn").arg(image).output().expect("e2fsck runs");
    assert!(
        fsck.status.success(),
        "the restored VM's file system is not clean:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}
