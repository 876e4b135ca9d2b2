//! tracefs: making sure it is mounted, and reading field offsets out of event format files.
//!
//! Tracepoint record layouts change between kernel versions, so the eBPF programs are not
//! compiled against one; userspace reads `events/<category>/<event>/format` at load time and
//! hands the offsets to the programs as global data.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use rustix::mount::{MountFlags, mount};
use thiserror::Error;

/// Where tracefs lives on current kernels.
pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed (needs root)")]
    Mount(#[source] io::Error),
    #[error("cannot read {path}")]
    ReadFormat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has no field `{field}`")]
    MissingField { path: PathBuf, field: String },
    #[error("{path}: cannot parse the print format for `{what}`")]
    PrintFormat { path: PathBuf, what: String },
}

/// Whether tracefs is mounted at [`TRACEFS`].
pub fn is_mounted() -> bool {
    Path::new(TRACEFS).join("events").is_dir()
}

/// Mounts tracefs at [`TRACEFS`] unless it already is. Returns whether it mounted it.
pub fn ensure_mounted() -> Result<bool, TracefsError> {
    if is_mounted() {
        return Ok(false);
    }
    match mount("nodev", TRACEFS, "tracefs", MountFlags::empty(), None) {
        Ok(()) => Ok(true),
        // Another process (a partition process loading its probes at the same moment)
        // mounted it first: it is there now, which is all that was asked.
        Err(_) if is_mounted() => Ok(false),
        Err(errno) => Err(TracefsError::Mount(errno.into())),
    }
}

/// Path of an event's directory.
pub fn event_dir(category: &str, event: &str) -> PathBuf {
    Path::new(TRACEFS).join("events").join(category).join(event)
}

/// Whether this kernel has the tracepoint.
pub fn has_event(category: &str, event: &str) -> bool {
    event_dir(category, event).join("format").is_file()
}

/// One parsed `format` file.
#[derive(Clone, Debug)]
pub struct EventFormat {
    path: PathBuf,
    fields: Vec<(String, u32)>,
    print_fmt: String,
}

impl EventFormat {
    /// Reads and parses the format file of `category:event`.
    pub fn read(category: &str, event: &str) -> Result<Self, TracefsError> {
        let path = event_dir(category, event).join("format");
        let text = fs::read_to_string(&path).map_err(|source| TracefsError::ReadFormat {
            path: path.clone(),
            source,
        })?;
        Ok(Self::parse(path, &text))
    }

    /// Parses the text of a format file. Lines that are not field or print-format lines are
    /// ignored; asking for a missing field is the error.
    pub fn parse(path: PathBuf, text: &str) -> Self {
        let mut fields = Vec::new();
        let mut print_fmt = String::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("print fmt:") {
                print_fmt = rest.trim().to_string();
                continue;
            }
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut parts = rest.split(';').map(str::trim);
            let decl = parts.next().unwrap_or_default();
            let offset = parts
                .find_map(|p| p.strip_prefix("offset:"))
                .and_then(|o| o.parse::<u32>().ok());
            // The name is the last word of the declaration, minus any array suffix.
            let name = decl
                .rsplit([' ', '*'])
                .next()
                .unwrap_or_default()
                .split('[')
                .next()
                .unwrap_or_default();
            if let (false, Some(offset)) = (name.is_empty(), offset) {
                fields.push((name.to_string(), offset));
            }
        }
        Self {
            path,
            fields,
            print_fmt,
        }
    }

    /// Offset of the field `name` in the record.
    pub fn offset(&self, name: &str) -> Result<u32, TracefsError> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, o)| o)
            .ok_or_else(|| TracefsError::MissingField {
                path: self.path.clone(),
                field: name.to_string(),
            })
    }

    /// For a print format such as `"... fixed %d", ..., REC->ret == 5`, the constant that the
    /// argument printed after the word `label` compares `REC->field` with.
    pub fn compared_constant(&self, label: &str, field: &str) -> Result<u32, TracefsError> {
        let err = || TracefsError::PrintFormat {
            path: self.path.clone(),
            what: format!("{label} ({field})"),
        };
        let fmt = &self.print_fmt;
        let open = fmt.find('"').ok_or_else(err)?;
        let close = open + 1 + fmt[open + 1..].find('"').ok_or_else(err)?;
        let format_string = &fmt[open + 1..close];
        // Which conversion (by position) follows the label.
        let mut index = None;
        let mut seen = 0;
        let words: Vec<&str> = format_string.split_whitespace().collect();
        for (i, word) in words.iter().enumerate() {
            if word.starts_with('%') && !word.starts_with("%%") {
                if i > 0 && words[i - 1] == label {
                    index = Some(seen);
                }
                seen += 1;
            }
        }
        let index = index.ok_or_else(err)?;
        let args = split_top_level(fmt[close + 1..].trim_start_matches([',', ' ']));
        let arg = args.get(index).ok_or_else(err)?;
        let rhs = arg
            .trim()
            .strip_prefix(&format!("REC->{field}"))
            .and_then(|r| r.trim().strip_prefix("=="))
            .ok_or_else(err)?;
        rhs.trim().parse().map_err(|_| err())
    }
}

/// Splits `text` at commas that are not inside parentheses or braces.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' | '{' => depth += 1,
            ')' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(text[start..].trim());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST_PAGE_FAULT: &str = r#"name: fast_page_fault
ID: 122
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:int vcpu_id;	offset:8;	size:4;	signed:1;
	field:gpa_t cr2_or_gpa;	offset:16;	size:8;	signed:0;
	field:u64 error_code;	offset:24;	size:8;	signed:0;
	field:u64 * sptep;	offset:32;	size:8;	signed:0;
	field:char name[16];	offset:40;	size:16;	signed:0;
	field:int ret;	offset:56;	size:4;	signed:1;

print fmt: "vcpu %d gva %llx error_code %s sptep %p spurious %d fixed %d", REC->vcpu_id, REC->cr2_or_gpa, __print_flags(REC->error_code, "|", { ((((1UL))) << (0)), "P" }, { ((((1UL))) << (1)), "W" }), REC->sptep, REC->ret == 6, REC->ret == 5
"#;

    #[test]
    fn parses_offsets_and_the_fixed_constant() {
        let f = EventFormat::parse("x".into(), FAST_PAGE_FAULT);
        assert_eq!(f.offset("cr2_or_gpa").unwrap(), 16);
        assert_eq!(f.offset("sptep").unwrap(), 32);
        assert_eq!(f.offset("name").unwrap(), 40);
        assert_eq!(f.offset("ret").unwrap(), 56);
        assert_eq!(f.compared_constant("fixed", "ret").unwrap(), 5);
        assert_eq!(f.compared_constant("spurious", "ret").unwrap(), 6);
    }

    #[test]
    fn missing_things_are_errors() {
        let f = EventFormat::parse("x".into(), FAST_PAGE_FAULT);
        assert!(matches!(
            f.offset("nope"),
            Err(TracefsError::MissingField { .. })
        ));
        assert!(f.compared_constant("vcpu", "ret").is_err());
        assert!(f.compared_constant("absent", "ret").is_err());
        let empty = EventFormat::parse("y".into(), "garbage\n\0\n");
        assert!(empty.offset("ret").is_err());
        assert!(empty.compared_constant("fixed", "ret").is_err());
    }
}
