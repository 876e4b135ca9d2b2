//! Sizes as people type them on command lines: `4096`, `64K`, `256M`, `1G`, `1.5GiB`, with
//! `K`, `KB` and `KiB` alike powers of 1024 (guest memory and map sizes are counted in pages,
//! so `256M` must be 256 MiB). The parsing is the parse-size crate's, in its binary mode.

use thiserror::Error;

/// A size that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("`{text}` is not a size such as 256M")]
pub struct SizeError {
    text: String,
    #[source]
    source: parse_size::Error,
}

/// Parses a size in bytes. The message of an error names the bad text.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
        .map_err(|source| SizeError {
            text: text.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256MB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999G").is_err());
        let error = parse_size("12Q").expect_err("refused");
        assert_eq!(error.to_string(), "`12Q` is not a size such as 256M");
    }
}
