//! Bad device arguments: each gets one clear error line and exit status 1,
//! before any guest runs (disks are opened and the vsock socket is bound
//! before KVM is touched). These need no KVM and run directly on this host.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use stasis_e2e::{assert_refused, guest_image, stasis_bin};

/// `boot` of the default guest with `extra` device arguments.
fn boot_with(extra: &[&str]) -> Vec<String> {
    let mut args = vec!["boot".to_string(), "--kernel".to_string(), guest_image("vmlinux")];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn refused(extra: &[&str], needle: &str) {
    let args = boot_with(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(&args, &[], needle);
}

/// A sparse image of `size` bytes in `dir`.
fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).and_then(|f| f.set_len(size)).expect("image");
    path
}

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn missing_disk_is_refused() {
    refused(&["--disk", "/nonexistent/disk.img"], "/nonexistent/disk.img");
}

#[test]
fn disk_that_is_a_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    refused(&["--disk", text(dir.path())], text(dir.path()));
}

#[test]
fn disk_of_odd_size_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "odd.img", 1000);
    refused(&["--disk", text(&img)], "multiple of 512");
}

#[test]
fn unreadable_disk_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let img = image(dir.path(), "locked.img", 1 << 20);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    // Root reads anything: drop to nobody, with a kernel it can read.
    let kernel = dir.path().join("vmlinux");
    std::fs::copy(stasis_e2e::repo_root().join(guest_image("vmlinux")), &kernel).expect("copy kernel");
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let bin = dir.path().join("stasis");
    std::fs::copy(stasis_bin(), &bin).expect("copy stasis");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["boot", "--kernel"])
        .arg(&kernel)
        .arg("--disk")
        .arg(&img)
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "unreadable disk: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("locked.img") && stderr.to_lowercase().contains("permission"), "{stderr}");
}

/// Holds an exclusive flock on `path` (as another VM would) until killed.
fn hold_lock(path: &Path) -> Child {
    let child = Command::new("flock")
        .args(["--exclusive", "--nonblock"])
        .arg(path)
        .args(["sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
        .expect("flock runs");
    // Give it time to take the lock.
    std::thread::sleep(std::time::Duration::from_millis(300));
    child
}

#[test]
fn disk_locked_by_another_vm_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "busy.img", 1 << 20);
    let mut holder = hold_lock(&img);
    let args = boot_with(&["--disk", text(&img)]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = std::panic::catch_unwind(|| assert_refused(&args, &[], "in use by another VM"));
    let _ = holder.kill();
    let _ = holder.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn nine_disks_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut extra = Vec::new();
    for i in 0..9 {
        extra.push("--disk".to_string());
        extra.push(image(dir.path(), &format!("d{i}.img"), 1 << 20).to_str().expect("utf-8").to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    refused(&extra, "at most 8");
}

#[test]
fn vsock_cid_below_3_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = format!("2,{}", text(&dir.path().join("v.sock")));
    refused(&["--vsock", &spec], "at least 3");
}

#[test]
fn vsock_spec_without_a_path_is_refused() {
    refused(&["--vsock", "3"], "CID,UDS_PATH");
}

#[test]
fn vsock_socket_in_a_missing_directory_is_refused() {
    refused(&["--vsock", "3,/nonexistent/dir/v.sock"], "/nonexistent/dir");
}

#[test]
fn vsock_socket_already_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.sock");
    let _listener = UnixListener::bind(&path).expect("bind");
    let spec = format!("3,{}", text(&path));
    refused(&["--vsock", &spec], "in use");
}
