//! `stasis checkpoint …` run as a user would: the built binary, real files,
//! exit codes and the one-line error it prints.

use std::path::Path;
use std::process::Command;

/// Runs `stasis` with `args`; returns exit code, stdout and stderr.
fn stasis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stasis"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run stasis");
    (
        out.status.code().expect("exited normally"),
        String::from_utf8(out.stdout).expect("utf-8 stdout"),
        String::from_utf8(out.stderr).expect("utf-8 stderr"),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A raw image of an odd length: text, zeros, pseudo-random bytes.
fn raw_image(len: usize) -> Vec<u8> {
    let mut image = vec![0u8; len];
    for (i, b) in image[..len / 3].iter_mut().enumerate() {
        *b = b"#include <stdio.h>\nint main(void) { return 0; }\n"[i % 48];
    }
    let mut x = 0xdead_beef_cafe_f00du64;
    for b in &mut image[2 * len / 3..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    image
}

/// Packs a fresh raw image in `dir`; returns the checkpoint path.
fn packed(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
    let raw = dir.join("raw");
    std::fs::write(&raw, raw_image(1 << 20)).expect("write raw");
    let ckpt = dir.join("ckpt");
    let mut args = vec!["checkpoint", "pack", s(&raw), "--out", s(&ckpt)];
    args.extend_from_slice(extra);
    let (code, _, err) = stasis(&args);
    assert_eq!(code, 0, "{err}");
    ckpt
}

#[test]
fn pack_then_unpack_gives_back_identical_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let raw = dir.path().join("raw");
    let image = raw_image(3 * (1 << 20) + 1234);
    std::fs::write(&raw, &image).expect("write raw");
    for (i, extra) in [
        &[][..],
        &["--block-size", "4K", "--level", "3"][..],
        &["--block-size", "2M", "--storage-block-size", "2MiB"][..],
        &["--block-size", "256KiB", "--level", "-5", "--threads", "1"][..],
    ]
    .iter()
    .enumerate()
    {
        let ckpt = dir.path().join(format!("ckpt{i}"));
        let back = dir.path().join(format!("back{i}"));
        let mut args = vec!["checkpoint", "pack", s(&raw), "--out", s(&ckpt)];
        args.extend_from_slice(extra);
        let (code, out, err) = stasis(&args);
        assert_eq!(code, 0, "pack {extra:?}: {err}");
        assert!(out.starts_with("packed 3.00 MiB into"), "{out}");
        let (code, out, err) = stasis(&["checkpoint", "unpack", s(&ckpt), "--out", s(&back)]);
        assert_eq!(code, 0, "unpack {extra:?}: {err}");
        assert!(out.starts_with("unpacked 3.00 MiB into"), "{out}");
        assert!(
            std::fs::read(&back).expect("read back") == image,
            "{extra:?} differs"
        );
    }
}

#[test]
fn inspect_reports_version_block_size_kinds_and_ratio() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ckpt = packed(dir.path(), &["--block-size", "64KiB"]);
    let (code, out, err) = stasis(&["checkpoint", "inspect", s(&ckpt)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("version      1.0 (block checksums crc32c)\n"), "{out}");
    assert!(out.contains("memory       1.00 MiB in 1 region\n"), "{out}");
    assert!(out.contains("blocks       16 of 64.0 KiB: "), "{out}");
    assert!(out.contains("compression ratio"), "{out}");
}

#[test]
fn inspect_json_is_machine_readable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ckpt = packed(dir.path(), &["--block-size", "16K"]);
    let (code, out, err) = stasis(&["checkpoint", "inspect", s(&ckpt), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["version"], "1.0");
    assert_eq!(v["memory_block_size"], 16384);
    assert_eq!(v["blocks"], 64);
    assert_eq!(v["regions"][0]["guest_addr"], 0);
    assert_eq!(v["regions"][0]["size"], 1 << 20);
    let kinds = ["zero_blocks", "raw_blocks", "zstd_blocks"].map(|k| v[k].as_u64().expect("count"));
    assert_eq!(kinds.iter().sum::<u64>(), 64);
    assert!(kinds.iter().all(|&k| k > 0), "{kinds:?}");
}

#[test]
fn verify_accepts_a_sound_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ckpt = packed(dir.path(), &[]);
    let (code, out, err) = stasis(&["checkpoint", "verify", s(&ckpt)]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(
        out,
        format!("ok: {}: 16 blocks, every checksum matches\n", s(&ckpt))
    );
}

#[test]
fn verify_names_the_first_bad_block() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ckpt = packed(dir.path(), &["--block-size", "4K"]);
    // Find a raw block with the library, then damage one of its bytes.
    let reader = stasis::checkpoint::Reader::open(&ckpt).expect("opens");
    let victim = (0..reader.block_count())
        .filter_map(|i| reader.block_info(i))
        .find(|b| b.kind == stasis::checkpoint::BlockKind::Raw)
        .expect("a raw block");
    let mut bytes = std::fs::read(&ckpt).expect("read");
    bytes[victim.file_offset as usize + 7] ^= 0x20;
    std::fs::write(&ckpt, &bytes).expect("write");
    let (code, out, err) = stasis(&["checkpoint", "verify", s(&ckpt)]);
    assert_eq!((code, out.as_str()), (1, ""));
    let expected = format!(
        "stasis: error: checkpoint verification failed: checksum mismatch in block {} at offset {}: ",
        victim.index, victim.file_offset
    );
    assert!(err.starts_with(&expected), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Runs `verify` on `bytes` and returns its one stderr line.
fn verify_error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad");
    std::fs::write(&path, bytes).expect("write");
    let (code, out, err) = stasis(&["checkpoint", "verify", s(&path)]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    err.replace(s(&path), "FILE")
}

#[test]
fn truncated_file_error_line_says_truncated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = std::fs::read(packed(dir.path(), &[])).expect("read");
    assert_eq!(
        verify_error(&bytes[..30]),
        "stasis: error: checkpoint verification failed: FILE is truncated: it is 30 bytes but its header needs 48\n"
    );
    let cut = bytes.len() - 100;
    assert_eq!(
        verify_error(&bytes[..cut]),
        format!(
            "stasis: error: checkpoint verification failed: FILE is not a valid checkpoint: no footer at offset {}: the file is truncated or its write did not finish\n",
            cut - 64
        )
    );
}

#[test]
fn flipped_header_bit_error_line_names_the_header_checksum() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bytes = std::fs::read(packed(dir.path(), &[])).expect("read");
    bytes[50] ^= 1;
    let err = verify_error(&bytes);
    assert!(
        err.starts_with("stasis: error: checkpoint verification failed: FILE is not a valid checkpoint: header checksum mismatch at offset 64: stored 0x"),
        "{err}"
    );
}

#[test]
fn wrong_magic_error_line_says_bad_magic() {
    let err = verify_error(&[b'x'; 10000]);
    assert!(
        err.starts_with("stasis: error: checkpoint verification failed: FILE is not a valid checkpoint: bad magic at offset 0: found [78, 78"),
        "{err}"
    );
}

#[test]
fn unknown_version_error_line_names_the_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bytes = std::fs::read(packed(dir.path(), &[])).expect("read");
    bytes[8] = 9;
    assert_eq!(
        verify_error(&bytes),
        "stasis: error: checkpoint verification failed: FILE is not a valid checkpoint: unsupported format version 9.0 at offset 8 (this stasis reads 1.x)\n"
    );
}

#[test]
fn absurd_region_count_error_line_names_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bytes = std::fs::read(packed(dir.path(), &[])).expect("read");
    bytes[24..28].copy_from_slice(&0x4000_0000u32.to_le_bytes());
    assert_eq!(
        verify_error(&bytes),
        "stasis: error: checkpoint verification failed: FILE is not a valid checkpoint: bad header field at offset 24: region count 1073741824 is outside 1..=1024\n"
    );
}

#[test]
fn directory_and_missing_path_error_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (code, _, err) = stasis(&["checkpoint", "inspect", s(dir.path())]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "stasis: error: cannot inspect checkpoint: {} is a directory, not a checkpoint file\n",
            s(dir.path())
        )
    );
    let missing = dir.path().join("missing");
    let (code, _, err) = stasis(&["checkpoint", "unpack", s(&missing), "--out", "/dev/null"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "stasis: error: cannot unpack: cannot open {}: No such file or directory (os error 2)\n",
            s(&missing)
        )
    );
}

#[test]
fn pack_refuses_a_block_size_that_is_not_a_power_of_two() {
    let dir = tempfile::tempdir().expect("temp dir");
    let raw = dir.path().join("raw");
    std::fs::write(&raw, [1u8; 8192]).expect("write");
    let out = dir.path().join("ckpt");
    let (code, _, err) = stasis(&[
        "checkpoint",
        "pack",
        s(&raw),
        "--out",
        s(&out),
        "--block-size",
        "12K",
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "stasis: error: cannot pack: invalid writer options: memory block size 12288 is not a power of two from 4 KiB to 2 MiB\n"
    );
    assert!(!out.exists());
}

#[test]
fn pack_refuses_an_unknown_size_suffix_and_an_empty_image() {
    let dir = tempfile::tempdir().expect("temp dir");
    let raw = dir.path().join("raw");
    std::fs::write(&raw, []).expect("write");
    let out = dir.path().join("ckpt");
    let (code, _, err) = stasis(&[
        "checkpoint",
        "pack",
        s(&raw),
        "--out",
        s(&out),
        "--block-size",
        "4KB",
    ]);
    assert_eq!(code, 2, "clap rejects it");
    assert!(err.contains("unknown suffix"), "{err}");
    let (code, _, err) = stasis(&["checkpoint", "pack", s(&raw), "--out", s(&out)]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "stasis: error: cannot pack: memory image {} is empty\n",
            s(&raw)
        )
    );
}
