//! Compressing the page stream: the `--compress` option, and the codecs that squeeze a `Pages`
//! frame's payload on the way out and restore it on the way in.
//!
//! Each frame is compressed alone (no state carries over, so a frame decodes by itself, as
//! every other frame does), and only when that pays: a payload that does not shrink by at
//! least [`MIN_SAVING`] of itself travels as it is, so incompressible memory costs little more
//! than the attempt. Decompression writes into a buffer of exactly the length the frame
//! announces, which its entries bound, so no input can make it write more (a decompression
//! bomb is an error, as is a payload that comes out shorter).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::protocol::{Codec, FrameError};

/// How the sender compresses `Pages` frames (`migrator migrate --compress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// Frames travel as they are.
    #[default]
    None,
    /// LZ4's block format: fast (hundreds of MB/s to GB/s a core), about 3x on text.
    Lz4,
    /// Zstandard at `level`: slower than LZ4 at every level, and smaller.
    Zstd { level: i32 },
}

/// Zstandard's level when `--compress zstd` names none: its fastest positive level, since
/// the compression runs on the sender's thread in line with the link.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// The levels `zstd:LEVEL` takes: zstd's fast levels down to -7 and its levels up to 22.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -7..=22;
/// A compressed payload is sent only if it saves at least this share of the payload (1/8):
/// smaller savings cost the destination a decompression for little, and the rule keeps
/// incompressible memory from travelling compressed at all.
pub const MIN_SAVING: usize = 8;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CompressError {
    #[error(
        "`{0}` is not a compression: none, lz4, zstd or zstd:LEVEL (LEVEL from -7 to 22, default 1)"
    )]
    Spec(String),
    #[error("zstd level {0} is out of range (-7 to 22)")]
    ZstdLevel(i32),
    #[error("cannot set up the zstd compressor: {0}")]
    ZstdContext(String),
}

impl Compress {
    /// Refuses a level zstd does not take (options may arrive over the API, not only from
    /// the command line's parser).
    pub fn validate(self) -> Result<(), CompressError> {
        match self {
            Self::Zstd { level } if !ZSTD_LEVELS.contains(&level) => {
                Err(CompressError::ZstdLevel(level))
            }
            _ => Ok(()),
        }
    }
}

impl FromStr for Compress {
    type Err = CompressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let spec = || CompressError::Spec(text.to_string());
        let compress = match text.trim() {
            "none" => Self::None,
            "lz4" => Self::Lz4,
            "zstd" => Self::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            },
            other => {
                let level = other
                    .strip_prefix("zstd:")
                    .and_then(|l| l.trim().parse::<i32>().ok())
                    .ok_or_else(spec)?;
                Self::Zstd { level }
            }
        };
        compress.validate().map_err(|_| spec())?;
        Ok(compress)
    }
}

impl fmt::Display for Compress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Lz4 => f.write_str("lz4"),
            Self::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// The sender's side: compresses payloads with one codec, keeping its context between frames.
pub struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Room for LZ4's worst case, which its encoder insists on before it starts.
    scratch: Vec<u8>,
}

impl Compressor {
    /// A compressor for `compress`, or `None` when frames travel as they are.
    pub fn new(compress: Compress) -> Result<Option<Self>, CompressError> {
        compress.validate()?;
        let (codec, zstd) = match compress {
            Compress::None => return Ok(None),
            Compress::Lz4 => (Codec::Lz4, None),
            Compress::Zstd { level } => (
                Codec::Zstd,
                Some(
                    zstd::bulk::Compressor::new(level)
                        .map_err(|e| CompressError::ZstdContext(e.to_string()))?,
                ),
            ),
        };
        Ok(Some(Self {
            codec,
            zstd,
            scratch: Vec::new(),
        }))
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Compresses `input` into the start of `output` if that saves at least [`MIN_SAVING`]
    /// of it and fits; returns the compressed length, or `None` to send `input` as it is.
    pub fn compress(&mut self, input: &[u8], output: &mut [u8]) -> Option<usize> {
        let limit = (input.len() - input.len() / MIN_SAVING).min(output.len());
        let len = match (self.codec, &mut self.zstd) {
            (Codec::Zstd, Some(zstd)) => {
                // zstd stops with an error once the output is full: the limit is the bound.
                zstd.compress_to_buffer(input, &mut output[..limit]).ok()?
            }
            _ => {
                let room = lz4_flex::block::get_maximum_output_size(input.len());
                if self.scratch.len() < room {
                    self.scratch.resize(room, 0);
                }
                let len = lz4_flex::block::compress_into(input, &mut self.scratch).ok()?;
                let out = output.get_mut(..len).filter(|_| len <= limit)?;
                out.copy_from_slice(self.scratch.get(..len)?);
                len
            }
        };
        (len <= limit).then_some(len)
    }
}

/// The reader's side: restores payloads of either codec.
#[derive(Default)]
pub struct Decompressor {
    /// Made on the first zstd frame.
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decompressor {
    /// Decompresses `input` into all of `output`, whose length the frame announced: a
    /// payload that would decompress to more, or to less, is refused.
    pub fn decompress(
        &mut self,
        codec: Codec,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<(), FrameError> {
        let refused = |detail: String| FrameError::Decompress { codec, detail };
        let len = match codec {
            Codec::Lz4 => lz4_flex::block::decompress_into(input, output)
                .map_err(|e| refused(e.to_string()))?,
            Codec::Zstd => {
                let zstd = match &mut self.zstd {
                    Some(zstd) => zstd,
                    none => none.insert(
                        zstd::bulk::Decompressor::new().map_err(|e| refused(e.to_string()))?,
                    ),
                };
                zstd.decompress_to_buffer(input, output)
                    .map_err(|e| refused(e.to_string()))?
            }
        };
        if len != output.len() {
            return Err(FrameError::Decompressed {
                got: len as u64,
                want: output.len() as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused_with_one_message() {
        assert_eq!("none".parse(), Ok(Compress::None));
        assert_eq!("lz4".parse(), Ok(Compress::Lz4));
        assert_eq!("zstd".parse(), Ok(Compress::Zstd { level: 1 }));
        assert_eq!("zstd:19".parse(), Ok(Compress::Zstd { level: 19 }));
        assert_eq!("zstd:-3".parse(), Ok(Compress::Zstd { level: -3 }));
        for bad in [
            "", "gzip", "zstd:", "zstd:x", "zstd:23", "zstd:-8", "lz4:1", "LZ4",
        ] {
            assert_eq!(
                bad.parse::<Compress>(),
                Err(CompressError::Spec(bad.into())),
                "{bad}"
            );
        }
        for compress in [Compress::None, Compress::Lz4, Compress::Zstd { level: 5 }] {
            assert_eq!(compress.to_string().parse(), Ok(compress));
        }
        assert_eq!(
            Compress::Zstd { level: 99 }.validate(),
            Err(CompressError::ZstdLevel(99))
        );
        assert!(Compressor::new(Compress::Zstd { level: 99 }).is_err());
    }

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog; "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    #[test]
    fn each_codec_round_trips_and_refuses_lengths_other_than_announced() {
        let input = text(64 << 10);
        for compress in [Compress::Lz4, Compress::Zstd { level: 1 }] {
            let mut compressor = Compressor::new(compress).unwrap().unwrap();
            let mut packed = vec![0; input.len()];
            let len = compressor.compress(&input, &mut packed).expect("shrinks");
            assert!(len < input.len() / 8, "{compress}: {len}");
            let codec = compressor.codec();
            let mut decompressor = Decompressor::default();
            let mut out = vec![0; input.len()];
            decompressor
                .decompress(codec, &packed[..len], &mut out)
                .unwrap();
            assert_eq!(out, input);
            // A bomb: more than announced does not fit, and is refused.
            let mut short = vec![0; input.len() - 1];
            assert!(matches!(
                decompressor.decompress(codec, &packed[..len], &mut short),
                Err(FrameError::Decompress { .. } | FrameError::Decompressed { .. })
            ));
            // Less than announced is refused too.
            let mut long = vec![0; input.len() + 1];
            assert!(
                decompressor
                    .decompress(codec, &packed[..len], &mut long)
                    .is_err(),
                "{compress}"
            );
            // Garbage and zeros never decode.
            for bad in [vec![0u8; len], vec![0xff; len], packed[..len / 2].to_vec()] {
                assert!(decompressor.decompress(codec, &bad, &mut out).is_err());
            }
        }
    }

    #[test]
    fn what_does_not_save_an_eighth_is_not_compressed() {
        // Pseudo-random bytes: nothing to find.
        let mut state = 1u64;
        let noise: Vec<u8> = (0..64 << 10)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                (state >> 56) as u8
            })
            .collect();
        for compress in [Compress::Lz4, Compress::Zstd { level: 3 }] {
            let mut compressor = Compressor::new(compress).unwrap().unwrap();
            let mut out = vec![0; noise.len()];
            assert_eq!(compressor.compress(&noise, &mut out), None, "{compress}");
            // Half text and half noise saves about half: that goes compressed.
            let mut mixed = text(32 << 10);
            mixed.extend_from_slice(&noise[..32 << 10]);
            assert!(compressor.compress(&mixed, &mut out).is_some());
        }
        assert!(Compressor::new(Compress::None).unwrap().is_none());
    }
}
