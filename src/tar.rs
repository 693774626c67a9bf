//! The tar side of the shard format: POSIX.1-2001 (pax) headers, written by hand so the core
//! knows every byte offset it writes (the index records where each member's data starts).
//!
//! Each member is `[pax 'x' header + records]? ustar header, data, zero padding to 512`.
//! A pax record set is written only when ustar cannot hold a field: a name longer than 100
//! bytes or not plain ASCII (`path`, plus `hdrcharset=BINARY` when not UTF-8), a size of 8 GiB
//! or more (`size`), ids or times out of the octal range. The shard ends with two zero blocks.

pub const BLOCK: u64 = 512;
/// What ends every shard: two zero blocks.
pub const END: [u8; 1024] = [0u8; 1024];

const MAX_OCTAL_11: u64 = 0o77777777777; // 12-byte field: 11 digits + NUL
const MAX_OCTAL_7: u64 = 0o7777777; // 8-byte field

/// What a member header records about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    pub uid: u32,
    pub gid: u32,
}

/// Bytes of zero padding after `size` data bytes.
pub fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// Zero-padded octal digits filling the field, then NUL (values are range-checked by callers).
fn octal(field: &mut [u8], mut v: u64) {
    let w = field.len() - 1;
    for d in field[..w].iter_mut().rev() {
        *d = b'0' + (v & 7) as u8;
        v >>= 3;
    }
    field[w] = 0;
}

fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    // "<len> key=value\n", where len counts itself.
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn ustar(out: &mut Vec<u8>, name: &[u8], meta: &Meta, typeflag: u8, size: u64, link: &[u8]) {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    octal(&mut h[100..108], u64::from(meta.mode & 0o7777));
    octal(&mut h[108..116], u64::from(meta.uid).min(MAX_OCTAL_7));
    octal(&mut h[116..124], u64::from(meta.gid).min(MAX_OCTAL_7));
    octal(&mut h[124..136], if size > MAX_OCTAL_11 { 0 } else { size });
    let mt = u64::try_from(meta.mtime).unwrap_or(0);
    octal(&mut h[136..148], if mt > MAX_OCTAL_11 { 0 } else { mt });
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], 0);
    octal(&mut h[337..345], 0);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
}

/// Length of the header(s) `write_header` writes for `name` and `meta`.
pub fn header_len(name: &[u8], meta: &Meta) -> u64 {
    let mut v = Vec::new();
    write_header(&mut v, name, meta) as u64
}

/// Appends the header(s) for a regular file `name` to `out`. The member's data must follow
/// immediately, then `padding(meta.size)` zero bytes. Returns the number of header bytes.
pub fn write_header(out: &mut Vec<u8>, name: &[u8], meta: &Meta) -> usize {
    write_typed(out, name, meta, b'0', b"")
}

/// Appends a hard link member (typeflag `1`, no data): `name` is another name of the member
/// `target` (an earlier member of the same shard). Returns the number of bytes.
pub fn write_link_header(out: &mut Vec<u8>, name: &[u8], target: &[u8], meta: &Meta) -> usize {
    write_typed(out, name, &Meta { size: 0, ..*meta }, b'1', target)
}

/// Appends a directory member (typeflag `5`, no data) named `name` plus a trailing `/`.
/// Returns the number of bytes.
pub fn write_dir_header(out: &mut Vec<u8>, name: &[u8], meta: &Meta) -> usize {
    let mut n = name.to_vec();
    n.push(b'/');
    write_typed(out, &n, &Meta { size: 0, ..*meta }, b'5', b"")
}

/// A name that ustar cannot hold (longer than 100 bytes or not plain ASCII) goes in a pax record.
fn needs_pax(name: &[u8]) -> bool {
    name.len() > 100 || !name.is_ascii()
}

fn write_typed(out: &mut Vec<u8>, name: &[u8], meta: &Meta, typeflag: u8, link: &[u8]) -> usize {
    let start = out.len();
    let mut rec = Vec::new();
    if (needs_pax(name) && std::str::from_utf8(name).is_err()) || (needs_pax(link) && std::str::from_utf8(link).is_err()) {
        pax_record(&mut rec, "hdrcharset", b"BINARY");
    }
    if needs_pax(name) {
        pax_record(&mut rec, "path", name);
    }
    if needs_pax(link) {
        pax_record(&mut rec, "linkpath", link);
    }
    if meta.size > MAX_OCTAL_11 {
        pax_record(&mut rec, "size", meta.size.to_string().as_bytes());
    }
    if u64::try_from(meta.mtime).map_or(true, |m| m > MAX_OCTAL_11) {
        pax_record(&mut rec, "mtime", meta.mtime.to_string().as_bytes());
    }
    if u64::from(meta.uid) > MAX_OCTAL_7 {
        pax_record(&mut rec, "uid", meta.uid.to_string().as_bytes());
    }
    if u64::from(meta.gid) > MAX_OCTAL_7 {
        pax_record(&mut rec, "gid", meta.gid.to_string().as_bytes());
    }
    if !rec.is_empty() {
        let pm = Meta { size: rec.len() as u64, mode: 0o644, mtime: 0, uid: 0, gid: 0 };
        ustar(out, b"././@PaxHeader", &pm, b'x', rec.len() as u64, b"");
        out.extend_from_slice(&rec);
        out.resize(out.len() + padding(rec.len() as u64) as usize, 0);
    }
    ustar(out, name, meta, typeflag, meta.size, link);
    out.len() - start
}

fn parse_octal(f: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(f).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Reads mode and mtime back from the ustar header that precedes a member's data, if it is a
/// valid header (checksum matches). Used by `unpack` to restore file metadata.
pub fn parse_mode_mtime(h: &[u8]) -> Option<(u32, i64)> {
    if h.len() != 512 || &h[257..262] != b"ustar" {
        return None;
    }
    let want = parse_octal(&h[148..156])?;
    let sum: u64 = h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    if sum != want {
        return None;
    }
    let mode = u32::try_from(parse_octal(&h[100..108])?).ok()? & 0o7777;
    let mtime = i64::try_from(parse_octal(&h[136..148])?).ok()?;
    Some((mode, mtime))
}

/// Mode and mtime of a member from its header bytes (`hdrs` = everything from the end of the
/// previous member's data to the start of this member's data: an optional pax header with its
/// records, then the ustar header; before them there may be members without data, hard links
/// and directories, which are passed over). A pax `mtime` record wins over the ustar field
/// (times before 1970 or after 2242).
pub fn parse_member_meta(hdrs: &[u8]) -> Option<(u32, i64)> {
    let n = hdrs.len();
    if n < 512 || n % 512 != 0 {
        return None;
    }
    let (mode, ustar_mtime) = parse_mode_mtime(&hdrs[n - 512..])?;
    // Walk the headers from the start; the last group (pax header + ustar header) is this member's.
    let (mut at, mut pax_mtime) = (0usize, None);
    while at + 512 < n {
        let h = &hdrs[at..at + 512];
        parse_mode_mtime(h)?;
        let size = usize::try_from(parse_octal(&h[124..136])?).ok()?;
        if h[156] == b'x' {
            let recs = hdrs.get(at + 512..(at + 512).checked_add(size)?)?;
            pax_mtime = Some(pax_mtime_of(recs)?);
            at += 512 + size.div_ceil(512) * 512;
        } else {
            // A member without data before this one (a link or a directory): its pax records
            // were its own.
            if size != 0 {
                return None;
            }
            pax_mtime = None;
            at += 512;
        }
    }
    if at != n - 512 {
        return None;
    }
    Some((mode, pax_mtime.flatten().unwrap_or(ustar_mtime)))
}

/// The `mtime` record of a pax record set, if any (None inside when there is none).
fn pax_mtime_of(mut rest: &[u8]) -> Option<Option<i64>> {
    let mut mtime = None;
    // Records are "<len> key=value\n", where len counts the whole record: values may hold
    // newlines (a path can), so records are cut by their length, never at newlines.
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return None;
        }
        if let Some(v) = rest[sp + 1..len - 1].strip_prefix(b"mtime=") {
            let v = std::str::from_utf8(v).ok()?;
            let whole = v.split('.').next().unwrap_or(v);
            mtime = Some(whole.parse().ok()?);
        }
        rest = &rest[len..];
    }
    Some(mtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut v = Vec::new();
        pax_record(&mut v, "path", &[b'a'; 93]);
        // 3 digits + ' ' + 4 + '=' + 93 + '\n' = 102... length field must equal total
        let s = std::str::from_utf8(&v).unwrap();
        let (n, _) = s.split_once(' ').unwrap();
        assert_eq!(n.parse::<usize>().unwrap(), v.len());
        for k in 1..300 {
            let mut v = Vec::new();
            pax_record(&mut v, "path", &vec![b'x'; k]);
            let s = std::str::from_utf8(&v).unwrap();
            assert_eq!(s.split_once(' ').unwrap().0.parse::<usize>().unwrap(), v.len(), "k={k}");
        }
    }

    #[test]
    fn short_ascii_name_is_one_block_and_parses_back() {
        let m = Meta { size: 5, mode: 0o640, mtime: 1_700_000_000, uid: 1000, gid: 1000 };
        let mut v = Vec::new();
        assert_eq!(write_header(&mut v, b"a/b.txt", &m), 512);
        assert_eq!(parse_mode_mtime(&v), Some((0o640, 1_700_000_000)));
    }

    #[test]
    fn pax_mtime_parses_back() {
        for mtime in [-86_400i64, 0, 9_000_000_000, 1_700_000_000] {
            let m = Meta { size: 1, mode: 0o600, mtime, uid: 0, gid: 0 };
            let mut v = Vec::new();
            write_header(&mut v, &[b'n'; 150], &m);
            assert_eq!(parse_member_meta(&v), Some((0o600, mtime)), "{mtime}");
        }
    }

    #[test]
    fn link_and_directory_members_and_the_member_after_them() {
        let m = Meta { size: 77, mode: 0o640, mtime: 1_700_000_000, uid: 1, gid: 2 };
        let mut v = Vec::new();
        assert_eq!(write_link_header(&mut v, b"b", b"dir/a", &m), 512);
        assert_eq!((v[156], &v[157..162], parse_octal(&v[124..136])), (b'1', &b"dir/a"[..], Some(0)));
        let long = vec![b'n'; 150];
        let n = write_link_header(&mut v, b"c", &long, &m);
        let recs = String::from_utf8_lossy(&v[1024..512 + n - 512]).into_owned();
        assert!(recs.contains(&format!("linkpath={}", "n".repeat(150))), "{recs}");
        let at = v.len();
        assert_eq!(write_dir_header(&mut v, b"e/f", &m), 512);
        assert_eq!((v[at + 156], &v[at..at + 5]), (b'5', &b"e/f/\0"[..]));
        // The headers of a member after link and directory members: its own pax mtime counts.
        let mt = Meta { mtime: -5, ..m };
        write_header(&mut v, &long, &mt);
        assert_eq!(parse_member_meta(&v), Some((0o640, -5)));
        let mut w = Vec::new();
        write_link_header(&mut w, &long, b"x", &mt); // a pax mtime of the link's own
        write_header(&mut w, b"short", &m);
        assert_eq!(parse_member_meta(&w), Some((0o640, 1_700_000_000)));
    }

    #[test]
    fn long_or_binary_names_and_huge_sizes_use_pax() {
        let m = Meta { size: 9 << 30, mode: 0o644, mtime: 1, uid: 0, gid: 0 };
        let mut v = Vec::new();
        let n = write_header(&mut v, b"\xff\xfe-not-utf8", &m);
        assert_eq!(n % 512, 0);
        assert!(n > 512);
        let recs = String::from_utf8_lossy(&v[512..n - 512]).into_owned();
        assert!(recs.contains("hdrcharset=BINARY"));
        assert!(recs.contains(&format!("size={}", 9u64 << 30)));
    }
}
