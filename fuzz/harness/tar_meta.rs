//! Fuzz harness for the `tar_meta` target, shared by the cargo-fuzz target and the stable
//! regression test (`tests/fuzz_regressions.rs`). Must return normally for every input.
#![allow(dead_code)]

// ------------------------------------------------------------------------------------------
// Target `tar_meta`: the tar header parsers.

/// The input is fed to `parse_member_meta` and `parse_mode_mtime` as it is; then it is read
/// as a member (`mode u32, mtime i64, uid u32, gid u32, size u64`, little-endian, then the
/// name), `write_header` writes its headers and `parse_member_meta` must give back
/// (mode & 0o7777, mtime): the round trip `unpack` relies on to restore metadata.
pub fn run_tar_meta(data: &[u8]) {
    use packds::tar;
    let _ = tar::parse_member_meta(data);
    let _ = tar::parse_mode_mtime(data);
    if data.len() >= 512 {
        let _ = tar::parse_mode_mtime(&data[data.len() - 512..]);
        let _ = tar::parse_member_meta(&data[..data.len() / 512 * 512]);
    }
    if data.len() < 28 {
        return;
    }
    let mode = u32::from_le_bytes(data[0..4].try_into().unwrap());
    let mtime = i64::from_le_bytes(data[4..12].try_into().unwrap());
    let uid = u32::from_le_bytes(data[12..16].try_into().unwrap());
    let gid = u32::from_le_bytes(data[16..20].try_into().unwrap());
    let size = u64::from_le_bytes(data[20..28].try_into().unwrap());
    let name = &data[28..];
    let meta = tar::Meta { size, mode, mtime, uid, gid };
    let mut out = Vec::new();
    let n = tar::write_header(&mut out, name, &meta);
    assert_eq!(n, out.len());
    assert_eq!(n % 512, 0, "headers are not a whole number of blocks");
    assert_eq!(tar::parse_member_meta(&out), Some((mode & 0o7777, mtime)), "header round trip lost mode or mtime");
}
