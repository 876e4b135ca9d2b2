//! Finding the real libLLVM shared object of a toolchain, and telling which libLLVM a
//! bpf-linker binary was linked against.
//!
//! A toolchain's `lib/` holds either a plain `libLLVM*.so`, or a GNU ld linker script named like
//! a library (`libLLVM-23-rust-1.101.0-nightly.so`, text: `INPUT(libLLVM.so.23.1-…)`) beside
//! the versioned shared object it names. Only the shared object can be linked and loaded, so
//! scripts are followed to what they name, and whatever is returned is checked to be an ELF
//! shared object.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use object::{
    Endianness,
    elf::{DT_NEEDED, DT_SONAME, ET_DYN, FileHeader64},
    read::elf::{Dyn, FileHeader},
};

/// How deep linker scripts may name further scripts before the lookup gives up.
const MAX_SCRIPT_DEPTH: usize = 4;

/// The one real libLLVM shared object in the toolchain library folder `lib`.
pub fn find_libllvm(lib: &Path) -> Result<PathBuf> {
    let mut names: Vec<PathBuf> = fs::read_dir(lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
        })
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("no libLLVM*.so* in {}", lib.display());
    }
    let mut objects = Vec::new();
    for name in &names {
        let real =
            resolve(lib, name, 0).with_context(|| format!("following {}", name.display()))?;
        let real =
            fs::canonicalize(&real).with_context(|| format!("resolving {}", real.display()))?;
        if !objects.contains(&real) {
            objects.push(real);
        }
    }
    match objects.as_slice() {
        [one] => Ok(one.clone()),
        many => bail!(
            "{} holds {} different libLLVM shared objects ({}); expected one",
            lib.display(),
            many.len(),
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// What `path` stands for: itself if it is an ELF shared object, or what the linker script it
/// holds names (relative names are looked up in `lib`, as ld does for `INPUT(name)`).
fn resolve(lib: &Path, path: &Path, depth: usize) -> Result<PathBuf> {
    let mut head = Vec::with_capacity(4096);
    fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(4096)
        .read_to_end(&mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    if head.starts_with(&object::elf::ELFMAG) {
        if !is_shared_object(&head) {
            bail!("{} is an ELF file but not a shared object", path.display());
        }
        return Ok(path.to_path_buf());
    }
    if depth >= MAX_SCRIPT_DEPTH {
        bail!(
            "linker scripts nest deeper than {MAX_SCRIPT_DEPTH} at {}",
            path.display()
        );
    }
    let text = std::str::from_utf8(&head)
        .with_context(|| format!("{} is neither ELF nor a linker script", path.display()))?;
    let inputs = script_inputs(text);
    let [input] = inputs.as_slice() else {
        bail!(
            "{} is not a linker script naming one library (it names {})",
            path.display(),
            inputs.len()
        );
    };
    let next = if Path::new(input).is_absolute() {
        PathBuf::from(input)
    } else {
        lib.join(input)
    };
    resolve(lib, &next, depth + 1)
}

/// The files a GNU ld linker script's `INPUT(...)` and `GROUP(...)` commands name (`-l`
/// options and `AS_NEEDED` wrappers aside).
fn script_inputs(script: &str) -> Vec<String> {
    let mut files = Vec::new();
    let mut rest = script;
    while let Some(at) = ["INPUT", "GROUP"]
        .iter()
        .filter_map(|cmd| rest.find(cmd).map(|i| (i, cmd.len())))
        .min()
    {
        let after = rest[at.0 + at.1..].trim_start();
        let Some(body) = after.strip_prefix('(') else {
            rest = &rest[at.0 + at.1..];
            continue;
        };
        let Some(end) = body.find(')') else { break };
        files.extend(
            body[..end]
                .split(|c: char| c.is_whitespace() || c == ',' || c == '(')
                .filter(|w| !w.is_empty() && *w != "AS_NEEDED" && !w.starts_with("-l"))
                .map(str::to_string),
        );
        rest = &body[end..];
    }
    files
}

/// Whether an ELF header (its first bytes) is that of a 64-bit shared object.
fn is_shared_object(head: &[u8]) -> bool {
    let Ok(header) = FileHeader64::<Endianness>::parse(head) else {
        return false;
    };
    header
        .endian()
        .is_ok_and(|endian| header.e_type(endian) == ET_DYN)
}

/// The `DT_NEEDED` names of the ELF executable at `path` (the libraries it loads).
pub fn needed_libraries(path: &Path) -> Result<Vec<String>> {
    dynamic_strings(path, DT_NEEDED)
}

/// The name a binary linked against the shared object at `libllvm` records in `DT_NEEDED`:
/// its `DT_SONAME`, or its file name when it has none.
pub fn soname(libllvm: &Path) -> Result<String> {
    if let Some(name) = dynamic_strings(libllvm, DT_SONAME)?.into_iter().next() {
        return Ok(name);
    }
    libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("{} has no file name", libllvm.display()))
}

/// The strings of every dynamic-section entry tagged `tag` in the 64-bit ELF file at `path`.
fn dynamic_strings(path: &Path, tag: i64) -> Result<Vec<String>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let data = &*data;
    (|| -> object::Result<Vec<String>> {
        let header = FileHeader64::<Endianness>::parse(data)?;
        let endian = header.endian()?;
        let sections = header.sections(endian, data)?;
        let Some((entries, strings_index)) = sections.dynamic(endian, data)? else {
            return Ok(Vec::new());
        };
        let strings = sections.strings(endian, data, strings_index)?;
        let mut found = Vec::new();
        for entry in entries {
            if entry.tag32(endian).map(i64::from) == Some(tag) {
                found.push(String::from_utf8_lossy(entry.string(endian, strings)?).into_owned());
            }
        }
        Ok(found)
    })()
    .with_context(|| format!("reading the dynamic section of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch folder under target/, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = crate::process::workspace_root()
                .join("target/xtask-tests")
                .join(format!("{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("scratch dir");
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A minimal 64-bit little-endian ELF header of the given type (64 bytes).
    fn elf_header(e_type: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(&object::elf::ELFMAG);
        h[4] = object::elf::ELFCLASS64;
        h[5] = object::elf::ELFDATA2LSB;
        h[6] = object::elf::EV_CURRENT;
        h[16..18].copy_from_slice(&e_type.to_le_bytes());
        h[18..20].copy_from_slice(&object::elf::EM_X86_64.to_le_bytes());
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        h[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        h
    }

    #[test]
    fn a_plain_shared_object_is_found() {
        let dir = Scratch::new("plain");
        fs::write(dir.0.join("libLLVM-22.so"), elf_header(ET_DYN)).unwrap();
        fs::write(dir.0.join("librustc_driver-1.so"), elf_header(ET_DYN)).unwrap();
        let found = find_libllvm(&dir.0).unwrap();
        assert_eq!(
            found,
            fs::canonicalize(dir.0.join("libLLVM-22.so")).unwrap()
        );
    }

    #[test]
    fn a_linker_script_is_followed_to_the_versioned_object() {
        let dir = Scratch::new("script");
        // The name sorts first, so a lookup that took the first match would take the script.
        fs::write(
            dir.0.join("libLLVM-23-rust-1.101.0-nightly.so"),
            "INPUT(libLLVM.so.23.1-rust-1.101.0-nightly)\n",
        )
        .unwrap();
        fs::write(
            dir.0.join("libLLVM.so.23.1-rust-1.101.0-nightly"),
            elf_header(ET_DYN),
        )
        .unwrap();
        let found = find_libllvm(&dir.0).unwrap();
        assert_eq!(
            found,
            fs::canonicalize(dir.0.join("libLLVM.so.23.1-rust-1.101.0-nightly")).unwrap()
        );
    }

    #[test]
    fn a_script_naming_a_missing_file_is_an_error() {
        let dir = Scratch::new("dangling");
        fs::write(dir.0.join("libLLVM-23.so"), "INPUT(libLLVM.so.23.1)\n").unwrap();
        let err = format!("{:#}", find_libllvm(&dir.0).unwrap_err());
        assert!(err.contains("libLLVM.so.23.1"), "{err}");
    }

    #[test]
    fn an_elf_that_is_not_a_shared_object_is_refused() {
        let dir = Scratch::new("exec");
        fs::write(dir.0.join("libLLVM.so"), elf_header(object::elf::ET_EXEC)).unwrap();
        let err = format!("{:#}", find_libllvm(&dir.0).unwrap_err());
        assert!(err.contains("not a shared object"), "{err}");
    }

    #[test]
    fn two_different_objects_are_ambiguous() {
        let dir = Scratch::new("two");
        fs::write(dir.0.join("libLLVM.so.22"), elf_header(ET_DYN)).unwrap();
        fs::write(dir.0.join("libLLVM.so.23"), elf_header(ET_DYN)).unwrap();
        assert!(find_libllvm(&dir.0).is_err());
        let empty = Scratch::new("empty");
        assert!(find_libllvm(&empty.0).is_err());
    }

    #[test]
    fn linker_script_inputs() {
        assert_eq!(script_inputs("INPUT(libfoo.so.1)"), ["libfoo.so.1"]);
        assert_eq!(
            script_inputs(
                "/* GNU ld script */\nGROUP ( /lib/libc.so.6 AS_NEEDED ( /lib/ld.so ) -lm )"
            ),
            ["/lib/libc.so.6", "/lib/ld.so"]
        );
        assert!(script_inputs("OUTPUT_FORMAT(elf64-x86-64)").is_empty());
    }
}
