//! Compressing the page stream: the `--compress` option, and the codecs that squeeze a `Pages`
//! frame's payload on the way out and restore it on the way in.
//!
//! Each frame is compressed alone (no state carries over, so a frame decodes by itself, as
//! every other frame does), and only when that pays: a payload that does not shrink by at
//! least [`MIN_SAVING`] of itself travels as it is, so incompressible memory costs little more
//! than the attempt. Decompression writes into a buffer of exactly the length the frame
//! announces, which its entries bound, so no input can make it write more (a decompression
//! bomb is an error, as is a payload that comes out shorter).
//!
//! `auto` compresses with LZ4 only where that is faster than sending as it is, judged from
//! what the sender measures as it goes ([`Auto`]).

use std::{
    fmt,
    str::FromStr,
    time::{Duration, Instant},
};

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
    /// LZ4 on the frames where compressing is measured to beat the link ([`Auto`]).
    Auto,
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
        "`{0}` is not a compression: none, lz4, zstd or zstd:LEVEL (LEVEL from -7 to 22, default 1), or auto"
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
            "auto" => Self::Auto,
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
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// `--compress auto`'s judgement: whether compressing the next frame is faster than sending it
/// as it is, from what compressing and writing took so far.
///
/// Sent as it is, memory moves at `W`, the rate the sender's writes drain at (time writing and
/// pacing: the link's rate when the link is what limits, far more when the socket takes what
/// it is given). Compressed, it moves at `min(C, r W)`, where `C` is the rate the codec
/// compresses at and `r` its ratio: the socket's buffers keep the link busy with the frames
/// before while the sender compresses the next. Compressing pays when `C > W` and `r` is at
/// least what a frame must save to go compressed. Measured on the fly, as moving averages of
/// totals (bytes over seconds), since `C` depends on the content and on what else the host
/// runs, and `W` on the link and the pacer. While it does not pay, one frame in
/// [`PROBE_EVERY`] is compressed anyway, so the figures stay current.
///
/// (Judged as if compressing and writing could not overlap, `C (1 - 1/r) > W`, it sent a
/// third of a text guest's frames uncompressed on the shaped 1 Gbit/s link, where the
/// sender shares two cores with the TLS tunnel and the destination, and moved it at 2.05x the
/// link against LZ4's 2.78x.)
#[derive(Clone, Debug, Default)]
pub struct Auto {
    /// Bytes compressed and the seconds it took.
    compressed: Average,
    /// Bytes given to the codec and the bytes that went out for them.
    ratio: Average,
    /// Bytes written and the seconds writing (and pacing) took.
    written: Average,
    since_probe: u32,
}

/// While compressing does not pay, one frame in this many is compressed, to keep measuring.
pub const PROBE_EVERY: u32 = 16;
/// The weight of each new frame in [`Auto`]'s averages.
const WEIGHT: f64 = 0.25;

/// A moving average of a rate: totals of an amount and of what it is per, both decayed alike.
#[derive(Clone, Copy, Debug, Default)]
struct Average {
    amount: f64,
    per: f64,
}

impl Average {
    fn add(&mut self, amount: f64, per: f64) {
        if self.per == 0.0 {
            (self.amount, self.per) = (amount, per);
        } else {
            self.amount += WEIGHT * (amount - self.amount);
            self.per += WEIGHT * (per - self.per);
        }
    }

    fn rate(&self) -> Option<f64> {
        (self.per > 0.0).then(|| self.amount / self.per)
    }
}

impl Auto {
    /// Whether to compress the next frame: when it pays, or nothing is known yet, or it is
    /// time to probe.
    pub fn wants(&mut self) -> bool {
        let pays = match (
            self.compressed.rate(),
            self.ratio.rate(),
            self.written.rate(),
        ) {
            (Some(speed), Some(ratio), Some(wire)) => {
                speed > wire && ratio * (1.0 - 1.0 / MIN_SAVING as f64) >= 1.0
            }
            _ => true,
        };
        self.since_probe += 1;
        if pays || self.since_probe >= PROBE_EVERY {
            self.since_probe = 0;
            true
        } else {
            false
        }
    }

    /// Compressing `raw` bytes took `took` and made `sent` bytes to send (`raw` when it was
    /// not worth sending compressed).
    pub fn compressed(&mut self, raw: usize, sent: usize, took: Duration) {
        self.compressed
            .add(raw as f64, took.as_secs_f64().max(1e-9));
        self.ratio.add(raw as f64, sent.max(1) as f64);
    }

    /// Writing `bytes` (and pacing them) took `took`.
    pub fn wrote(&mut self, bytes: usize, took: Duration) {
        self.written.add(bytes as f64, took.as_secs_f64().max(1e-9));
    }
}

/// The sender's side: compresses payloads with one codec, keeping its context between frames.
pub struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Room for LZ4's worst case, which its encoder insists on before it starts.
    scratch: Vec<u8>,
    /// `--compress auto`: when to compress at all.
    auto: Option<Auto>,
}

impl Compressor {
    /// A compressor for `compress`, or `None` when frames travel as they are.
    pub fn new(compress: Compress) -> Result<Option<Self>, CompressError> {
        compress.validate()?;
        let (codec, zstd) = match compress {
            Compress::None => return Ok(None),
            Compress::Lz4 | Compress::Auto => (Codec::Lz4, None),
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
            auto: (compress == Compress::Auto).then(Auto::default),
        }))
    }

    /// Tells `auto` that writing `bytes` (pacing included) took `took`.
    pub fn wrote(&mut self, bytes: usize, took: Duration) {
        if let Some(auto) = &mut self.auto {
            auto.wrote(bytes, took);
        }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Compresses `input` into the start of `output` if that saves at least [`MIN_SAVING`]
    /// of it and fits (and, with `auto`, if compressing is worth trying); returns the
    /// compressed length, or `None` to send `input` as it is.
    pub fn compress(&mut self, input: &[u8], output: &mut [u8]) -> Option<usize> {
        if !self.auto.as_mut().is_none_or(Auto::wants) {
            return None;
        }
        let started = Instant::now();
        let len = self.compress_now(input, output);
        if let Some(auto) = &mut self.auto {
            auto.compressed(input.len(), len.unwrap_or(input.len()), started.elapsed());
        }
        len
    }

    fn compress_now(&mut self, input: &[u8], output: &mut [u8]) -> Option<usize> {
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
        assert_eq!("auto".parse(), Ok(Compress::Auto));
        for compress in [
            Compress::None,
            Compress::Lz4,
            Compress::Zstd { level: 5 },
            Compress::Auto,
        ] {
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

    const MB: f64 = 1e6;

    /// How many of `frames` frames `auto` compresses when the codec runs at `speed` bytes a
    /// second with `ratio`, and writes drain at `wire`.
    fn compressed_of(frames: u32, speed: f64, ratio: f64, wire: f64) -> u32 {
        let mut auto = Auto::default();
        let frame = 4.0 * MB;
        let mut compressed = 0;
        for _ in 0..frames {
            let sent = if auto.wants() {
                compressed += 1;
                auto.compressed(
                    frame as usize,
                    (frame / ratio) as usize,
                    Duration::from_secs_f64(frame / speed),
                );
                frame / ratio
            } else {
                frame
            };
            auto.wrote(sent as usize, Duration::from_secs_f64(sent / wire));
        }
        compressed
    }

    #[test]
    fn auto_compresses_where_it_beats_the_link_and_probes_elsewhere() {
        // LZ4 on text (600 MB/s, 2.9x) over 1 Gbit/s: every frame.
        assert_eq!(compressed_of(160, 600.0 * MB, 2.9, 125.0 * MB), 160);
        // A slower codec (a busy host) still pays while it outruns the link, since the
        // socket's buffers keep the link busy meanwhile.
        assert_eq!(compressed_of(160, 250.0 * MB, 2.9, 200.0 * MB), 160);
        // The same over a link that takes 1.2 GB/s: the first frame, then one in 16.
        let probes = compressed_of(160, 600.0 * MB, 2.9, 1200.0 * MB);
        assert_eq!(probes, 1 + 159 / PROBE_EVERY, "{probes}");
        // Incompressible memory, any link: probes only.
        let probes = compressed_of(160, 2000.0 * MB, 1.0, 125.0 * MB);
        assert_eq!(probes, 1 + 159 / PROBE_EVERY, "{probes}");
        // A link that slows down (a full queue, a pacer) turns it back on.
        let mut auto = Auto::default();
        auto.compressed(4 << 20, (4 << 20) / 3, Duration::from_millis(7));
        auto.wrote(4 << 20, Duration::from_millis(2));
        assert!(!auto.wants());
        for _ in 0..8 {
            auto.wrote(4 << 20, Duration::from_millis(40));
        }
        assert!(auto.wants());
    }

    #[test]
    fn auto_compresses_with_lz4_and_keeps_the_eighth_rule() {
        let mut compressor = Compressor::new(Compress::Auto).unwrap().unwrap();
        assert_eq!(compressor.codec(), Codec::Lz4);
        let input = text(64 << 10);
        let mut out = vec![0; input.len()];
        // Nothing measured: the first frame is tried.
        assert!(compressor.compress(&input, &mut out).is_some());
    }
}
