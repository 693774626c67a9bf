//! Per-sample compression: each sample is one zstd frame of its own (random access stays O(1)),
//! or stored as it is when compressing would not pay.
//!
//! Decompression never trusts the frame: the original size comes from the index, the output
//! buffer has exactly that size, a frame that claims another size is refused before any work,
//! and one that would write more is stopped by the buffer's end. The index itself bounds the
//! size it may claim (see [`MAX_EXPANSION`]), so a hostile index cannot ask for a huge buffer.

/// Stored as it is.
pub const RAW: u8 = 0;
/// One zstd frame.
pub const ZSTD: u8 = 1;
/// One zstd frame made with the dataset's dictionary.
pub const ZSTD_DICT: u8 = 2;

/// zstd cannot expand data by more than this factor: its densest block (an RLE block) turns 4
/// bytes into at most 128 KiB. An index entry that claims more is corrupt.
pub const MAX_EXPANSION: u64 = 1 << 15;

/// Default compression level (zstd's own default).
pub const DEFAULT_LEVEL: i32 = 3;

/// The `--compress` choice. Parsed from (`FromStr`) and written as (`Display`, serde) its
/// command-line form: `none`, `zstd:LEVEL`, `auto:LEVEL` (plan files and manifests record it so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compress {
    /// Everything stored as it is (the default; the index stays format version 1).
    #[default]
    None,
    /// Every sample compressed at this level, kept only where it got smaller.
    Zstd(i32),
    /// Like `Zstd`, but samples that look already compressed (JPEG, PNG, zip, ...) or tiny are
    /// not even tried, and compression is kept only when it saves at least 1/16 of the size.
    Auto(i32),
}

impl Compress {
    pub const ACCEPTED: &'static str = "none, zstd, zstd:LEVEL (1..22, negative for faster), auto, auto:LEVEL";

    /// Parses `none`, `zstd`, `zstd:LEVEL`, `auto`, `auto:LEVEL`.
    pub fn parse(s: &str) -> Option<Compress> {
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (n, Some(l.parse::<i32>().ok()?)),
            None => (s, None),
        };
        let level = level.unwrap_or(DEFAULT_LEVEL);
        if level < zstd::zstd_safe::min_c_level() || level > zstd::zstd_safe::max_c_level() {
            return None;
        }
        match name {
            "none" if !s.contains(':') => Some(Compress::None),
            "zstd" => Some(Compress::Zstd(level)),
            "auto" => Some(Compress::Auto(level)),
            _ => None,
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Compress::None)
    }

    pub fn level(&self) -> i32 {
        match *self {
            Compress::None => 0,
            Compress::Zstd(l) | Compress::Auto(l) => l,
        }
    }

    /// As given on the command line (recorded in the manifest).
    pub fn name(&self) -> String {
        match *self {
            Compress::None => "none".into(),
            Compress::Zstd(l) => format!("zstd:{l}"),
            Compress::Auto(l) => format!("auto:{l}"),
        }
    }
}

impl std::str::FromStr for Compress {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Compress> {
        Compress::parse(s).ok_or_else(|| crate::Error::bad_choice("--compress", s, "understood", Self::ACCEPTED))
    }
}

impl std::fmt::Display for Compress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl serde::Serialize for Compress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Compress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Compress, D::Error> {
        let s = String::deserialize(d)?;
        Compress::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown --compress {s:?} (accepted: {})", Compress::ACCEPTED)))
    }
}

/// Magic numbers of formats that are compressed already: trying zstd on them wastes CPU.
pub fn looks_compressed(data: &[u8]) -> bool {
    const MAGICS: &[&[u8]] = &[
        b"\xFF\xD8\xFF",         // JPEG
        b"\x89PNG\r\n\x1a\n",    // PNG
        b"GIF8",                 // GIF
        b"PK\x03\x04",           // zip, docx, npz, jar
        b"\x1F\x8B",             // gzip
        b"\x28\xB5\x2F\xFD",     // zstd
        b"BZh",                  // bzip2
        b"\xFD7zXZ\x00",         // xz
        b"\x04\x22\x4D\x18",     // lz4
        b"7z\xBC\xAF\x27\x1C",   // 7z
        b"fLaC",                 // FLAC
        b"OggS",                 // Ogg (Vorbis, Opus)
        b"ID3",                  // MP3 with ID3 tag
        b"\xFF\xFB",             // MP3 frame
        b"\x1A\x45\xDF\xA3",     // Matroska / WebM
        b"\x00\x00\x00\x0CjP  ", // JPEG 2000
    ];
    if MAGICS.iter().any(|m| data.starts_with(m)) {
        return true;
    }
    // RIFF....WEBP, and ISO-BMFF (MP4, HEIC, AVIF): "ftyp" at offset 4.
    (data.len() >= 12 && &data[0..4] == b"RIFF" && &data[8..12] == b"WEBP") || (data.len() >= 8 && &data[4..8] == b"ftyp")
}

/// Compresses samples on one thread (each I/O thread owns one).
pub struct Encoder {
    mode: Compress,
    cctx: zstd::zstd_safe::CCtx<'static>,
    cdict: Option<zstd::zstd_safe::CDict<'static>>,
}

impl Encoder {
    pub fn new(mode: Compress, dict: Option<&[u8]>) -> Encoder {
        let cdict = dict.filter(|d| !d.is_empty()).map(|d| zstd::zstd_safe::CDict::create(d, mode.level()));
        Encoder { mode, cctx: zstd::zstd_safe::CCtx::create(), cdict }
    }

    /// Decides how `data` is stored. Returns the codec; for a compressed codec the frame is in
    /// `out` (cleared first). `force` compresses even when it does not pay (see the tar member
    /// naming rule in docs/FORMAT.md).
    pub fn encode(&mut self, data: &[u8], out: &mut Vec<u8>, force: bool) -> u8 {
        out.clear();
        let auto = matches!(self.mode, Compress::Auto(_));
        match self.mode {
            Compress::None if !force => return RAW,
            Compress::Auto(_) if !force && (data.len() < 64 || looks_compressed(data)) => return RAW,
            _ => {}
        }
        // Room for a frame that saves something (auto: at least 1/16); a frame that does not
        // fit means "store raw", and zstd stops as soon as it knows.
        let cap = if force {
            zstd::zstd_safe::compress_bound(data.len())
        } else if auto {
            data.len() - data.len() / 16 - 1
        } else {
            data.len().saturating_sub(1)
        };
        if cap == 0 {
            return RAW;
        }
        out.reserve(cap);
        let level = if self.mode.is_none() { DEFAULT_LEVEL } else { self.mode.level() };
        // The frame must record its content size (readers compare it with the index).
        let res = match &self.cdict {
            Some(cd) => self.cctx.compress_using_cdict(&mut Limited(out, cap), data, cd),
            None => self.cctx.compress(&mut Limited(out, cap), data, level),
        };
        match res {
            Ok(_) => {
                if self.cdict.is_some() {
                    ZSTD_DICT
                } else {
                    ZSTD
                }
            }
            Err(_) => {
                out.clear();
                RAW
            }
        }
    }
}

/// A Vec seen by zstd as having only `cap` bytes of room.
struct Limited<'a>(&'a mut Vec<u8>, usize);

// SAFETY: delegates to Vec's buffer, never reporting more capacity than it has.
unsafe impl zstd::zstd_safe::WriteBuf for Limited<'_> {
    fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }
    fn capacity(&self) -> usize {
        self.1.min(self.0.capacity())
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    unsafe fn filled_until(&mut self, n: usize) {
        self.0.set_len(n)
    }
}

/// Why a stored sample could not be decoded.
#[derive(Debug)]
pub struct DecodeError(pub String);

/// Decompresses samples of one dataset. Shared by all threads: decompression contexts are
/// kept in a small pool (a context allocates its tables once; making one per call, or per
/// short-lived thread, would cost more than decoding a small sample).
pub struct Decoder {
    ddict: Option<zstd::zstd_safe::DDict<'static>>,
    pool: std::sync::Mutex<Vec<zstd::zstd_safe::DCtx<'static>>>,
}

// SAFETY: a zstd DDict is read-only after creation; zstd documents it as shareable between
// threads (ZSTD_decompress_usingDDict only reads it). DCtx values move between threads only
// through the mutex-guarded pool, one user at a time.
unsafe impl Sync for Decoder {}
unsafe impl Send for Decoder {}

impl Decoder {
    pub fn new(dict: Option<&[u8]>) -> Decoder {
        Decoder { ddict: dict.filter(|d| !d.is_empty()).map(zstd::zstd_safe::DDict::create), pool: std::sync::Mutex::new(Vec::new()) }
    }

    /// The checks that need no output buffer: a known codec, sizes that agree, a frame that
    /// records the original size, a dictionary when one is needed. Run before allocating the
    /// output, so a lying frame or index costs nothing.
    pub fn check(&self, codec: u8, stored: &[u8], raw_size: u64) -> Result<(), DecodeError> {
        match codec {
            RAW => {
                if stored.len() as u64 != raw_size {
                    return Err(DecodeError(format!("stored size {} differs from the original size {raw_size}", stored.len())));
                }
                return Ok(());
            }
            ZSTD | ZSTD_DICT => {}
            c => return Err(DecodeError(format!("unknown codec {c}"))),
        }
        match zstd::zstd_safe::get_frame_content_size(stored) {
            Ok(Some(n)) if n == raw_size => {}
            Ok(Some(n)) => return Err(DecodeError(format!("zstd frame claims {n} bytes, the index says {raw_size}"))),
            Ok(None) => return Err(DecodeError("zstd frame does not record its size".into())),
            Err(_) => return Err(DecodeError("not a zstd frame".into())),
        }
        if codec == ZSTD_DICT && self.ddict.is_none() {
            return Err(DecodeError("sample needs the dataset's zstd dictionary, which is missing".into()));
        }
        Ok(())
    }

    /// Decodes `stored` (codec `codec`) into `dst`, which has exactly the original size.
    pub fn decode_into(&self, codec: u8, stored: &[u8], dst: &mut [u8]) -> Result<(), DecodeError> {
        self.check(codec, stored, dst.len() as u64)?;
        if codec == RAW {
            dst.copy_from_slice(stored);
            return Ok(());
        }
        // try_lock, never lock: a pool held by a thread that does not exist after a fork must
        // not block the child (it then simply makes a context of its own).
        let mut c = self.pool.try_lock().ok().and_then(|mut p| p.pop()).unwrap_or_else(zstd::zstd_safe::DCtx::create);
        let res = match (&self.ddict, codec) {
            (Some(d), ZSTD_DICT) => c.decompress_using_ddict(dst, stored, d),
            _ => c.decompress(dst, stored),
        };
        if let Ok(mut pool) = self.pool.try_lock() {
            if pool.len() < 64 {
                pool.push(c);
            }
        }
        match res {
            Ok(n) if n == dst.len() => Ok(()),
            Ok(n) => Err(DecodeError(format!("zstd frame decoded to {n} bytes, the index says {}", dst.len()))),
            Err(code) => Err(DecodeError(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))),
        }
    }

    /// Decodes into a new buffer (fallible allocation: a huge claimed size is an error).
    pub fn decode(&self, codec: u8, stored: &[u8], raw_size: u64) -> Result<Vec<u8>, DecodeError> {
        self.check(codec, stored, raw_size)?;
        let n = usize::try_from(raw_size).map_err(|_| DecodeError(format!("original size {raw_size} does not fit in memory")))?;
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| DecodeError(format!("cannot allocate {n} bytes for the decoded sample")))?;
        v.resize(n, 0);
        self.decode_into(codec, stored, &mut v)?;
        Ok(v)
    }
}

/// Trains a zstd dictionary of at most `size` bytes on `samples`.
pub fn train_dict(samples: &[Vec<u8>], size: usize) -> Result<Vec<u8>, String> {
    zstd::dict::from_samples(samples, size).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_enums_parse_and_name_the_accepted_values() {
        use crate::pack::ShardFormat;
        use crate::tarindex::Link;
        use crate::walk::OnError;
        assert_eq!("zstd".parse::<Compress>().unwrap(), Compress::Zstd(DEFAULT_LEVEL));
        assert_eq!("auto:-5".parse::<Compress>().unwrap(), Compress::Auto(-5));
        assert_eq!("tar".parse::<ShardFormat>().unwrap(), ShardFormat::Tar);
        assert_eq!("hdf5".parse::<ShardFormat>().unwrap(), ShardFormat::H5);
        assert_eq!("skip".parse::<OnError>().unwrap(), OnError::Skip);
        assert_eq!("hard".parse::<Link>().unwrap(), Link::Hard);
        for (err, option, accepted) in [
            ("gzip".parse::<Compress>().unwrap_err(), "--compress", Compress::ACCEPTED),
            ("zstd:99".parse::<Compress>().unwrap_err(), "--compress", Compress::ACCEPTED),
            ("zip".parse::<ShardFormat>().unwrap_err(), "--format", ShardFormat::ACCEPTED),
            ("warn".parse::<OnError>().unwrap_err(), "--on-error", OnError::ACCEPTED),
            ("soft".parse::<Link>().unwrap_err(), "--link", Link::ACCEPTED),
        ] {
            let msg = err.to_string();
            assert!(matches!(err, crate::Error::Usage { .. }) && msg.starts_with(option) && msg.contains(accepted), "{msg}");
        }
        // Written (plan files, manifests) exactly as given on the command line.
        for c in [Compress::None, Compress::Zstd(3), Compress::Auto(-2)] {
            let j = serde_json::to_string(&c).unwrap();
            assert_eq!(j, format!("\"{}\"", c.name()));
            assert_eq!(serde_json::from_str::<Compress>(&j).unwrap(), c);
        }
        assert!(serde_json::from_str::<Compress>("\"gzip\"").is_err());
        assert_eq!(serde_json::to_string(&OnError::Skip).unwrap(), "\"skip\"");
        assert_eq!(serde_json::to_string(&Link::Symlink).unwrap(), "\"symlink\"");
        assert_eq!(serde_json::to_string(&ShardFormat::H5).unwrap(), "\"h5\"");
    }

    #[test]
    fn parse_modes() {
        assert_eq!(Compress::parse("none"), Some(Compress::None));
        assert_eq!(Compress::parse("zstd"), Some(Compress::Zstd(3)));
        assert_eq!(Compress::parse("zstd:19"), Some(Compress::Zstd(19)));
        assert_eq!(Compress::parse("auto:-5"), Some(Compress::Auto(-5)));
        assert_eq!(Compress::parse("zstd:99"), None);
        assert_eq!(Compress::parse("gzip"), None);
        assert_eq!(Compress::parse("none:3"), None);
    }

    #[test]
    fn round_trip_raw_fallback_and_bounds() {
        let text: Vec<u8> = b"hello packds ".iter().cycle().take(10_000).copied().collect();
        let mut e = Encoder::new(Compress::Zstd(3), None);
        let mut out = Vec::new();
        assert_eq!(e.encode(&text, &mut out, false), ZSTD);
        assert!(out.len() < 200);
        let d = Decoder::new(None);
        assert_eq!(d.decode(ZSTD, &out, text.len() as u64).unwrap(), text);
        // A wrong size claim is refused before decoding; a short buffer can't be overrun.
        assert!(d.decode(ZSTD, &out, 9_999).is_err());
        assert!(d.decode(ZSTD, &out, 10_001).is_err());
        // Random bytes do not shrink: stored raw.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        assert_eq!(e.encode(&noise, &mut out, false), RAW);
        assert!(out.is_empty());
        // Forced: compressed even when it grows, and still decodes.
        assert_eq!(e.encode(&noise, &mut out, true), ZSTD);
        assert_eq!(d.decode(ZSTD, &out, noise.len() as u64).unwrap(), noise);
        // Empty input is raw; auto skips JPEG-looking data.
        assert_eq!(e.encode(b"", &mut out, false), RAW);
        let mut jpeg = b"\xFF\xD8\xFF\xE0".to_vec();
        jpeg.extend(std::iter::repeat(0u8).take(5000));
        assert_eq!(Encoder::new(Compress::Auto(3), None).encode(&jpeg, &mut out, false), RAW);
        assert_eq!(e.encode(&jpeg, &mut out, false), ZSTD);
    }

    #[test]
    fn a_lying_frame_never_allocates() {
        // A 13-byte-ish frame header claiming a terabyte: refused by the size comparison.
        let mut frame = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0];
        frame.extend_from_slice(&(1u64 << 40).to_le_bytes());
        frame.extend_from_slice(&[1, 0, 0]);
        let d = Decoder::new(None);
        assert!(d.decode(ZSTD, &frame, 16).is_err());
        assert!(d.decode(ZSTD, b"not zstd", 16).is_err());
        assert!(d.decode(ZSTD_DICT, &frame, 16).is_err());
        assert!(d.decode(9, &frame, 16).is_err());
    }

    #[test]
    fn dictionary_helps_small_similar_samples() {
        let samples: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("{{\"id\": {i}, \"label\": \"class_{}\", \"caption\": \"a photo of a small thing number {}\"}}", i % 10, i * 7).into_bytes())
            .collect();
        let dict = train_dict(&samples, 4096).unwrap();
        let (mut plain, mut with) = (0usize, 0usize);
        let mut e0 = Encoder::new(Compress::Zstd(3), None);
        let mut e1 = Encoder::new(Compress::Zstd(3), Some(&dict));
        let d1 = Decoder::new(Some(&dict));
        let mut out = Vec::new();
        for s in &samples {
            let c = e0.encode(s, &mut out, false);
            plain += if c == RAW { s.len() } else { out.len() };
            let c = e1.encode(s, &mut out, false);
            with += if c == RAW { s.len() } else { out.len() };
            if c != RAW {
                assert_eq!(d1.decode(c, &out, s.len() as u64).unwrap(), *s);
            }
        }
        assert!(with * 2 < plain, "dictionary: {with} bytes, without: {plain}");
    }
}
