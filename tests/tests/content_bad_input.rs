//! Bad content-provisioning input on the host: each gets one clear error
//! line and exit status 1, before any guest runs (the store is opened and
//! every grant checked before KVM is touched). These need no KVM and run
//! directly on this host.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use stasis_e2e::{assert_refused, guest_image, repo_root, scratch, stasis_bin};

const SOME_ID: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `boot` of the default guest with `extra` arguments, refused with `needle`.
fn boot_refused(extra: &[&str], needle: &str) {
    let kernel = guest_image("vmlinux");
    let mut args = vec!["boot", "--kernel", kernel.as_str()];
    args.extend_from_slice(extra);
    assert_refused(&args, &[], needle);
}

/// A store holding one small file; its path and the file's ID.
fn store_with_one(dir: &Path) -> (String, String) {
    let store = dir.join("store");
    let file = dir.join("item");
    fs::write(&file, b"abc").expect("write");
    let out = Command::new(stasis_bin())
        .args(["content", "add", "--store", text(&store), text(&file)])
        .output()
        .expect("stasis content add");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout, format!("{SOME_ID}  {}\n", text(&file)), "the ID of \"abc\"");
    (text(&store).to_string(), SOME_ID.to_string())
}

#[test]
fn missing_store_is_refused() {
    boot_refused(&["--content-store", "/nonexistent/store"], "content store /nonexistent/store does not exist");
}

#[test]
fn a_directory_that_is_not_a_store_is_refused() {
    let dir = scratch();
    boot_refused(&["--content-store", text(dir.path())], "is not a content store");
}

#[test]
fn grant_of_an_id_not_in_the_store_is_refused() {
    let dir = scratch();
    let (store, _) = store_with_one(dir.path());
    let absent = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    boot_refused(&["--content-store", &store, "--grant", absent], "has no such item");
}

#[test]
fn malformed_grants_are_refused() {
    let dir = scratch();
    let (store, id) = store_with_one(dir.path());
    boot_refused(&["--content-store", &store, "--grant", "sha256:1234"], "is not a content ID");
    boot_refused(&["--content-store", &store, "--grant", "../../etc/passwd"], "is not a content ID");
    boot_refused(&["--content-store", &store, "--grant", &format!("{id},uses=0")], "at least 1");
    boot_refused(&["--content-store", &store, "--grant", &format!("{id},forever")], "ID[,uses=N][,expires=SECONDS]");
    boot_refused(&["--content-store", &store, "--content-max-size", "lots"], "--content-max-size");
}

#[test]
fn content_commands_refuse_bad_input() {
    let dir = scratch();
    let (store, _) = store_with_one(dir.path());
    let missing = dir.path().join("missing-file");
    assert_refused(&["content", "add", "--store", &store, text(&missing)], &[], "missing-file");
    assert_refused(&["content", "add", "--store", &store, text(dir.path())], &[], "is not a regular file");
    assert_refused(&["content", "list", "--store", "/nonexistent/store"], &[], "does not exist");
    let sock = dir.path().join("none.sock");
    assert_refused(&["content", "grant", "--api-sock", text(&sock), "sha256:xyz"], &[], "is not a content ID");
}

/// A store the VMM's user cannot read. Run as root here (CI), the VMM runs
/// as `nobody` through `setpriv`, with its binary and kernel copied where
/// that user can read them.
#[test]
fn unreadable_store_is_refused() {
    let dir = scratch();
    let (store, id) = store_with_one(dir.path());
    fs::set_permissions(&store, fs::Permissions::from_mode(0o700)).expect("chmod");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    let open = tempfile::Builder::new().prefix("stasis-e2e-open").tempdir().expect("tempdir");
    fs::set_permissions(open.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let bin = open.path().join("stasis");
    let kernel = open.path().join("vmlinux");
    fs::copy(stasis_bin(), &bin).expect("copy stasis");
    fs::copy(repo_root().join(guest_image("vmlinux")), &kernel).expect("copy kernel");
    for f in [&bin, &kernel] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(&bin);
        c
    } else {
        fs::set_permissions(&store, fs::Permissions::from_mode(0o000)).expect("chmod");
        Command::new(&bin)
    };
    cmd.args(["boot", "--kernel", text(&kernel), "--content-store", &store, "--grant", &id]);
    let out = cmd.stdin(Stdio::null()).output().expect("stasis runs");
    let _ = fs::set_permissions(&store, fs::Permissions::from_mode(0o700));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("stasis: error: cannot read the content store"), "{stderr}");
    assert!(lines[0].contains("Permission denied"), "{stderr}");
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
