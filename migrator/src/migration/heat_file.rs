//! Heat from a file (`migrate --heat-file FILE`): a migration ordered by heat measured
//! elsewhere (`heatprobe record --vm`, the workload's own knowledge, an oracle) instead of
//! profiled. The file is what `migrator heat --json` prints: an object whose `pages` list
//! guest frames (`page`) with their `heat`, and `reads` and `writes` if known; pages it does
//! not list are cold. Its `class` and `access` are taken if present, and otherwise derived
//! as the profiler would (hot and warm by quantile of heat; read-write if any write).
//!
//! Refused whole, with one error, before anything starts: anything but such JSON, a frame out
//! of range or listed twice, a heat that is negative or not finite.

use heatprobe::{Access, HeatClass, PageHeat, heat::HeatConfig};
use serde::Deserialize;
use thiserror::Error;

/// Largest heat file taken: 64 Mi entries would be 256 GiB of guest memory.
pub const MAX_BYTES: usize = 1 << 30;

#[derive(Debug, Error, PartialEq)]
pub enum HeatFileError {
    #[error("the heat file is {0} bytes; the limit is {MAX_BYTES}")]
    TooLarge(usize),
    #[error("the heat file is not `migrator heat --json`'s JSON: {0}")]
    Json(String),
    #[error("the heat file lists frame {page}, but the partition has {frames} frames")]
    OutOfRange { page: u64, frames: u64 },
    #[error("the heat file lists frame {0} twice")]
    Duplicate(u64),
    #[error("the heat file gives frame {page} the heat {heat}; heat is a finite number ≥ 0")]
    BadHeat { page: u64, heat: f64 },
}

#[derive(Deserialize)]
struct File {
    pages: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    page: u64,
    heat: f64,
    #[serde(default)]
    reads: u64,
    #[serde(default)]
    writes: u64,
    class: Option<HeatClass>,
    access: Option<Access>,
}

/// The pages of heat file `bytes`, checked against nothing yet but themselves: heat finite
/// and not negative, no frame twice. [`check`] checks them against a partition.
pub fn parse(bytes: &[u8]) -> Result<Vec<PageHeat>, HeatFileError> {
    if bytes.len() > MAX_BYTES {
        return Err(HeatFileError::TooLarge(bytes.len()));
    }
    let file: File =
        serde_json::from_slice(bytes).map_err(|e| HeatFileError::Json(e.to_string()))?;
    let mut heats: Vec<f64> = Vec::with_capacity(file.pages.len());
    for entry in &file.pages {
        if !entry.heat.is_finite() || entry.heat < 0.0 {
            return Err(HeatFileError::BadHeat {
                page: entry.page,
                heat: entry.heat,
            });
        }
        heats.push(entry.heat);
    }
    heats.sort_by(f64::total_cmp);
    let config = HeatConfig::default();
    let rank = |q: f64| -> f64 {
        let index = ((q * heats.len() as f64).ceil() as usize).clamp(1, heats.len().max(1)) - 1;
        heats.get(index).copied().unwrap_or(0.0)
    };
    let (floor, warm, hot) = (
        heats.first().copied().unwrap_or(0.0),
        rank(config.warm_quantile),
        rank(config.hot_quantile),
    );
    let classify = |heat: f64| {
        if heat <= floor {
            HeatClass::Cold
        } else if heat >= hot {
            HeatClass::Hot
        } else if heat >= warm {
            HeatClass::Warm
        } else {
            HeatClass::Cold
        }
    };
    let mut pages: Vec<PageHeat> = file
        .pages
        .into_iter()
        .map(|e| PageHeat {
            page: e.page,
            reads: e.reads,
            writes: e.writes,
            heat: e.heat,
            class: e.class.unwrap_or_else(|| classify(e.heat)),
            access: e.access.unwrap_or(if e.writes > 0 {
                Access::ReadWrite
            } else {
                Access::ReadOnly
            }),
        })
        .collect();
    pages.sort_by_key(|p| p.page);
    if let Some(twice) = pages.windows(2).find(|w| w[0].page == w[1].page) {
        return Err(HeatFileError::Duplicate(twice[0].page));
    }
    Ok(pages)
}

/// Checks `pages` (as [`parse`] returns them, or as a client sent them) against a partition
/// of `frames` frames.
pub fn check(pages: &[PageHeat], frames: u64) -> Result<(), HeatFileError> {
    let mut last: Option<u64> = None;
    for page in pages {
        if page.page >= frames {
            return Err(HeatFileError::OutOfRange {
                page: page.page,
                frames,
            });
        }
        if !page.heat.is_finite() || page.heat < 0.0 {
            return Err(HeatFileError::BadHeat {
                page: page.page,
                heat: page.heat,
            });
        }
        if last.is_some_and(|l| l >= page.page) {
            return Err(HeatFileError::Duplicate(page.page));
        }
        last = Some(page.page);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_migrator_heat_prints_is_taken_as_it_is() {
        let file = br#"{"partition": "p0", "frames": 16, "pages": [
            {"page": 3, "reads": 1, "writes": 0, "heat": 0.5, "class": "warm", "access": "ro"},
            {"page": 1, "reads": 9, "writes": 4, "heat": 7.25, "class": "hot", "access": "rw"}
        ]}"#;
        let pages = parse(file).unwrap();
        assert_eq!(pages.len(), 2);
        assert_eq!((pages[0].page, pages[0].class), (1, HeatClass::Hot));
        assert_eq!(pages[0].access, Access::ReadWrite);
        assert_eq!((pages[1].page, pages[1].class), (3, HeatClass::Warm));
        assert_eq!(check(&pages, 16), Ok(()));
    }

    #[test]
    fn class_and_access_are_derived_where_missing() {
        let entries: Vec<String> = (0..100)
            .map(|n| format!(r#"{{"page": {n}, "heat": {n}, "writes": {}}}"#, n % 2))
            .collect();
        let file = format!(r#"{{"pages": [{}]}}"#, entries.join(","));
        let pages = parse(file.as_bytes()).unwrap();
        assert_eq!(pages[99].class, HeatClass::Hot);
        assert_eq!(pages[0].class, HeatClass::Cold);
        assert_eq!(pages[1].access, Access::ReadWrite);
        assert_eq!(pages[2].access, Access::ReadOnly);
    }

    #[test]
    fn bad_files_are_refused_with_what_is_wrong() {
        assert!(matches!(parse(b"not json"), Err(HeatFileError::Json(_))));
        assert!(matches!(
            parse(b"{\"frames\": 3}"),
            Err(HeatFileError::Json(_))
        ));
        assert!(matches!(
            parse(br#"{"pages": [{"page": -1, "heat": 1}]}"#),
            Err(HeatFileError::Json(_))
        ));
        assert_eq!(
            parse(br#"{"pages": [{"page": 2, "heat": -0.5}]}"#),
            Err(HeatFileError::BadHeat {
                page: 2,
                heat: -0.5
            })
        );
        // JSON has no NaN or infinity; a number too large for f64 is one.
        assert!(parse(br#"{"pages": [{"page": 2, "heat": 1e400}]}"#).is_err());
        assert_eq!(
            parse(br#"{"pages": [{"page": 2, "heat": 1}, {"page": 2, "heat": 3}]}"#),
            Err(HeatFileError::Duplicate(2))
        );
        let pages = parse(br#"{"pages": [{"page": 16, "heat": 1}]}"#).unwrap();
        assert_eq!(
            check(&pages, 16),
            Err(HeatFileError::OutOfRange {
                page: 16,
                frames: 16
            })
        );
    }

    #[test]
    fn pages_sent_by_a_client_are_checked_again() {
        let page = |page, heat| PageHeat {
            page,
            reads: 0,
            writes: 0,
            heat,
            class: HeatClass::Cold,
            access: Access::ReadOnly,
        };
        assert!(check(&[page(1, f64::NAN)], 4).is_err());
        assert!(check(&[page(2, 1.0), page(1, 1.0)], 4).is_err());
        assert!(check(&[page(1, 1.0), page(2, f64::INFINITY)], 4).is_err());
        assert_eq!(check(&[page(1, 1.0), page(3, 0.0)], 4), Ok(()));
    }
}
