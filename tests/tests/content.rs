//! Content provisioning end to end: a store on the host, grants given at
//! boot, over the control socket and at restore, and the guest's
//! `stasis-get` fetching over vsock. Checks what the guest received
//! (sha256), what it was refused and why, and that a refused or broken
//! transfer leaves no file behind in the guest.
//!
//! On hosts without hardware KVM each test re-runs itself inside the test
//! host, where the VMs, the store and the control clients share KVM.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use stasis_e2e::{
    boot_args, pseudo_random, run_in_kvm_host, scratch, sha256_hex, snapshot, stasis_bin, Guest, EXIT_TIMEOUT,
};

/// Moving hundreds of MiB through vsock under nested KVM.
const WORK_TIMEOUT: Duration = Duration::from_secs(600);

fn text(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}



/// `stasis ARGS`, checked to succeed; its stdout.
fn stasis(args: &[&str]) -> String {
    let out = Command::new(stasis_bin()).args(args).stdin(Stdio::null()).output().expect("stasis runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "stasis {args:?}: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Writes each `(name, bytes)` into `dir`, adds them all to `store` with
/// `stasis content add`, and returns their IDs (checked against sha256).
fn add_files(dir: &Path, store: &Path, files: &[(&str, &[u8])]) -> Vec<String> {
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, data)| {
            let path = dir.join(name);
            fs::write(&path, data).expect("write");
            path
        })
        .collect();
    let mut args = vec!["content".to_string(), "add".into(), "--store".into(), text(store)];
    args.extend(paths.iter().map(|p| text(p)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = stasis(&args);
    let ids: Vec<String> = out.lines().map(|l| l.split_whitespace().next().expect("an ID").to_string()).collect();
    assert_eq!(ids.len(), files.len(), "one line per file: {out}");
    for ((_, data), id) in files.iter().zip(&ids) {
        assert_eq!(id, &format!("sha256:{}", sha256_hex(data)), "the ID is the content's sha256");
    }
    ids
}

/// `stasis-get ARGS` in the guest: its exit status and what it printed on
/// stderr.
fn fetch(guest: &mut Guest, args: &str) -> (String, String) {
    let started = std::time::Instant::now();
    let answer = guest.query_within(
        "GET",
        &format!("stasis-get {args} 2>/tmp/get.err; echo \"GET=$?:$(head -c 400 /tmp/get.err)\""),
        WORK_TIMEOUT,
    );
    let (rc, message) = answer.split_once(':').unwrap_or((&answer, ""));
    // Progress for the test's log: where a slow run spends its time.
    eprintln!("content: stasis-get {args:.90} -> {rc} in {:.1} s", started.elapsed().as_secs_f64());
    (rc.to_string(), message.to_string())
}

/// sha256 of a guest file (`-` when it is not there).
fn guest_sha(guest: &mut Guest, path: &str) -> String {
    guest.query_within(
        "SHA",
        &format!("echo SHA=$( [ -e {path} ] && sha256sum {path} | cut -d' ' -f1 || echo - )"),
        WORK_TIMEOUT,
    )
}

/// Files in the guest's /tmp whose names start with `prefix`.
fn guest_files(guest: &mut Guest, prefix: &str) -> usize {
    guest.query("FILES", &format!("echo FILES=$(ls -a /tmp | grep -c '^{prefix}')")).parse().expect("a count")
}

/// Asserts a refused fetch: exit status 1, the host's word in the message,
/// and no file (whole or partial) left at `/tmp/<out>`.
fn assert_refused_fetch(guest: &mut Guest, args: &str, out: &str, word: &str) {
    let (rc, message) = fetch(guest, &format!("{args} -o /tmp/{out}"));
    assert_eq!(rc, "1", "stasis-get {args}: want exit 1; it said {message:?}");
    assert!(message.starts_with(&format!("stasis-get: {word}: ")), "stasis-get {args}: {message:?}");
    assert_eq!(guest_files(guest, out), 0, "stasis-get {args} left a file behind");
}

fn boot_with_store(store: &Path, sock: &Path, grants: &[String]) -> Guest {
    let mut extra = vec![
        "--memory".to_string(),
        "768M".into(),
        "--api-sock".into(),
        text(sock),
        "--content-store".into(),
        text(store),
    ];
    for grant in grants {
        extra.extend(["--grant".to_string(), grant.clone()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let guest = Guest::spawn(&boot_args("vmlinux", &extra));
    guest.wait_ready();
    guest
}

#[test]
fn guest_gets_exactly_what_it_was_granted() {
    if run_in_kvm_host("guest_gets_exactly_what_it_was_granted") {
        return;
    }
    let dir = scratch();
    let store = dir.path().join("store");
    let small = pseudo_random(100_000, 1);
    let big = pseudo_random(256 << 20, 2);
    let files: Vec<(&str, &[u8])> = vec![
        ("small", &small),
        ("big", &big),
        ("secret", b"never granted\n"),
        ("limited", b"twice only\n"),
        ("altered", &[0x5a; 300_000]),
        ("removed", b"granted, then removed from the store\n"),
    ];
    let ids = add_files(dir.path(), &store, &files);
    eprintln!("content: store ready");
    let [small_id, big_id, secret_id, limited_id, altered_id, removed_id] = &ids[..] else { unreachable!() };
    let sock = dir.path().join("api.sock");
    let grants =
        [small_id.clone(), big_id.clone(), format!("{limited_id},uses=2"), altered_id.clone(), removed_id.clone()];
    let mut guest = boot_with_store(&store, &sock, &grants);
    eprintln!("content: guest ready");

    // The two granted items, whole and identical.
    assert_eq!(fetch(&mut guest, &format!("{small_id} -o /tmp/small")).0, "0");
    assert_eq!(guest_sha(&mut guest, "/tmp/small"), sha256_hex(&small));
    let (rc, message) = fetch(&mut guest, &format!("{big_id} -o /tmp/big"));
    assert_eq!(rc, "0", "256 MiB fetch: {message}");
    assert_eq!(guest_sha(&mut guest, "/tmp/big"), sha256_hex(&big));
    guest.send_line("rm -f /tmp/big");
    // A range.
    assert_eq!(fetch(&mut guest, &format!("{small_id} --range 1000-1100 -o /tmp/range")).0, "0");
    assert_eq!(guest_sha(&mut guest, "/tmp/range"), sha256_hex(&small[1000..1100]));

    // Each refusal with its own word, and nothing left behind.
    assert_refused_fetch(&mut guest, secret_id, "secret", "not-granted");
    assert_refused_fetch(&mut guest, "--raw sha256:not-hex", "malformed", "bad-id");
    assert_refused_fetch(&mut guest, "--raw ../../../etc/passwd", "traversal", "bad-id");
    assert_refused_fetch(&mut guest, &format!("--raw {}", "A".repeat(400)), "overlong", "bad-request");
    assert_refused_fetch(&mut guest, &format!("{small_id} --range 5-100000000"), "badrange", "bad-range");
    fs::remove_file(store.join("sha256").join(&removed_id["sha256:".len()..])).expect("remove from the store");
    assert_refused_fetch(&mut guest, removed_id, "removed", "not-found");

    // A store file altered after import: the transfer ends in a mismatch.
    let altered_path = store.join("sha256").join(&altered_id["sha256:".len()..]);
    fs::set_permissions(&altered_path, fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut bytes = fs::read(&altered_path).expect("read");
    bytes[150_000] ^= 1;
    fs::write(&altered_path, &bytes).expect("alter");
    assert_refused_fetch(&mut guest, altered_id, "altered", "mismatch");
    let (_, message) = fetch(&mut guest, &format!("{altered_id} -o /tmp/altered"));
    assert!(message.contains("content does not match its ID"), "{message}");

    // A use-limited grant: twice, then refused.
    for n in 0..2 {
        let (rc, message) = fetch(&mut guest, &format!("{limited_id} -o /tmp/limited{n}"));
        assert_eq!(rc, "0", "use {n} of 2: {message}");
    }
    assert_refused_fetch(&mut guest, limited_id, "limited2", "not-granted");

    // Revoked while running: the next request is refused; granted again
    // over the control socket, 16 fetches at once all succeed.
    stasis(&["content", "revoke", "--api-sock", &text(&sock), small_id]);
    assert_refused_fetch(&mut guest, small_id, "revoked", "not-granted");
    stasis(&["content", "grant", "--api-sock", &text(&sock), small_id]);
    let grants = stasis(&["content", "grants", "--api-sock", &text(&sock)]);
    let grants: serde_json::Value = serde_json::from_str(grants.trim()).expect("grants JSON");
    let listed: Vec<&str> = grants["grants"].as_array().expect("a list").iter().filter_map(|g| g["id"].as_str()).collect();
    assert!(listed.contains(&small_id.as_str()) && !listed.contains(&limited_id.as_str()), "{grants}");
    let together = guest.query_within(
        "PAR",
        &format!(
            "for i in $(seq 16); do stasis-get {small_id} -o /tmp/par$i 2>/dev/null & done; wait; \
             echo PAR=$(ls /tmp | grep -c '^par')/$(cat /tmp/par* | sha256sum | cut -d' ' -f1)"
        ),
        WORK_TIMEOUT,
    );
    let mut sixteen = Vec::new();
    for _ in 0..16 {
        sixteen.extend_from_slice(&small);
    }
    assert_eq!(together, format!("16/{}", sha256_hex(&sixteen)), "16 concurrent fetches");
    let output = guest.poweroff();
    assert!(!output.contains("panicked"), "{output}");
}

#[test]
fn clones_of_one_snapshot_get_only_their_own_grants() {
    if run_in_kvm_host("clones_of_one_snapshot_get_only_their_own_grants") {
        return;
    }
    let dir = scratch();
    let store = dir.path().join("store");
    let files: Vec<(&str, &[u8])> =
        vec![("golden", b"granted to the golden VM\n"), ("one", b"for clone one\n"), ("two", b"for clone two\n")];
    let ids = add_files(dir.path(), &store, &files);
    let sock = dir.path().join("api.sock");
    let mut golden = boot_with_store(&store, &sock, &ids[..1]);
    assert_eq!(fetch(&mut golden, &format!("{} -o /tmp/golden", ids[0])).0, "0");
    let snap = dir.path().join("snap");
    snapshot(&sock, &snap, "exit");
    let (status, output) = golden.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "the golden VM did not end after its snapshot: {status}\n{output}");

    // Two clones at once from the one snapshot and the one store, each
    // with its own grant.
    let clone = |n: usize| {
        let api = dir.path().join(format!("clone{n}.sock"));
        let args = vec![
            "restore".to_string(),
            text(&snap),
            "--api-sock".into(),
            text(&api),
            "--content-store".into(),
            text(&store),
            "--grant".into(),
            ids[n].clone(),
        ];
        Guest::spawn(&args)
    };
    let mut clones = [clone(1), clone(2)];
    for (n, guest) in clones.iter_mut().enumerate() {
        let own = n + 1;
        let other = 3 - own;
        let (rc, message) = fetch(guest, &format!("{} -o /tmp/own", ids[own]));
        assert_eq!(rc, "0", "clone {own} fetching its own grant: {message}");
        assert_eq!(guest_sha(guest, "/tmp/own"), sha256_hex(files[own].1));
        assert_refused_fetch(guest, &ids[other], "other", "not-granted");
        // Grants are not saved in the snapshot: the golden VM's is gone.
        assert_refused_fetch(guest, &ids[0], "golden-again", "not-granted");
        // What the golden VM fetched before the snapshot is still there.
        assert_eq!(guest_sha(guest, "/tmp/golden"), sha256_hex(files[0].1));
    }
    for guest in clones {
        guest.poweroff();
    }
}
