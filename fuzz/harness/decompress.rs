//! Fuzz harness for the `decompress` target, shared by the cargo-fuzz target and the stable
//! regression test (`tests/fuzz_regressions.rs`). Must return normally for every input.
#![allow(dead_code)]

/// Raw-content zstd dictionary (the same bytes as the coded fixture's in `dataset.rs`).
pub const DICT: &[u8] = b"#!/bin/sh\necho hi\nnot utf-8 hello packds dictionary ccccccccccccccccccccccc";

// ------------------------------------------------------------------------------------------
// Target `decompress`: the bounded zstd decoder and the encoder round trip.

/// The original size a decode is asked for is capped here (the index allows up to
/// `stored × MAX_EXPANSION`; larger claims only cost memset time, not coverage).
const DECODE_MAX: u64 = 1 << 20;

/// `data[0]`: mode bits, `data[1]`: codec (any value, unknown ones included), `data[2..6]`: the
/// claimed original size (u32 LE, capped by the index's bound and [`DECODE_MAX`]), the rest is
/// the stored sample. It is decoded with and without the dictionary, by `decode` and by
/// `decode_into` (which must agree); then the rest is compressed (`Zstd`/`Auto`, forced or
/// not, with or without the dictionary, as mode bits say) and must decode back to itself.
pub fn run_decompress(data: &[u8]) {
    use packds::codec::{self, Compress, Decoder, Encoder};
    if data.len() < 6 {
        return;
    }
    let (mode, codec_id) = (data[0], data[1]);
    let stored = &data[6..];
    let bound = (stored.len() as u64).saturating_mul(codec::MAX_EXPANSION).min(DECODE_MAX);
    let raw = u64::from(u32::from_le_bytes(data[2..6].try_into().unwrap())) % (bound + 1);
    for dec in [Decoder::new(None), Decoder::new(Some(DICT))] {
        let out = dec.decode(codec_id, stored, raw);
        let mut buf = vec![0u8; raw as usize];
        let into = dec.decode_into(codec_id, stored, &mut buf);
        assert_eq!(out.is_ok(), into.is_ok(), "decode and decode_into disagree");
        if let Ok(v) = out {
            assert_eq!(v.len() as u64, raw, "decode returned another size than asked");
            assert_eq!(v, buf, "decode and decode_into differ");
        }
    }
    let level = [1, 3, -5][usize::from(mode >> 4) % 3];
    let how = if mode & 2 != 0 { Compress::Auto(level) } else { Compress::Zstd(level) };
    let dict = (mode & 4 != 0).then_some(DICT);
    let mut enc = Encoder::new(how, dict);
    let mut frame = Vec::new();
    let c = enc.encode(stored, &mut frame, mode & 1 != 0);
    if c == codec::RAW {
        assert!(frame.is_empty(), "a raw decision left bytes in the output");
        assert!(mode & 1 == 0, "forced compression stored raw");
    } else {
        if mode & 1 == 0 {
            assert!(frame.len() < stored.len(), "kept a frame that is not smaller");
        }
        let back = Decoder::new(Some(DICT)).decode(c, &frame, stored.len() as u64).expect("own frame does not decode");
        assert_eq!(back, stored, "round trip changed the bytes");
    }
}
