//! A child process for the tests: maps fresh anonymous memory, prints its base address, waits
//! for a line on stdin, touches the pages it was told to, prints `done`, and waits for stdin
//! to close.
//!
//! `touch_pages PAGES READ WRITE READ_THEN_WRITE`, each list comma-separated page indexes
//! (may be empty, written `-`).

use std::io::{BufRead, Write};

fn parse_list(arg: &str) -> Vec<usize> {
    if arg == "-" {
        return Vec::new();
    }
    arg.split(',')
        .map(|p| p.parse().expect("page indexes are numbers"))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert_eq!(
        args.len(),
        5,
        "usage: touch_pages PAGES READ WRITE READ_THEN_WRITE"
    );
    let pages: usize = args[1].parse().expect("PAGES is a number");
    let (read, write, read_then_write) = (
        parse_list(&args[2]),
        parse_list(&args[3]),
        parse_list(&args[4]),
    );
    let len = pages * 4096;
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "mmap failed");
    // Transparent huge pages would fault 512 pages at once; the counts must be per page.
    // SAFETY: advice on the mapping just created.
    unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) };
    let base = base.cast::<u8>();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "base {:#x}", base as usize).unwrap();
    stdout.flush().unwrap();
    let mut line = String::new();
    let stdin = std::io::stdin();
    stdin.lock().read_line(&mut line).unwrap();
    let mut sink = 0u8;
    for &p in &read {
        // SAFETY: p < pages (the test's lists), inside the mapping.
        sink = sink.wrapping_add(unsafe { std::ptr::read_volatile(base.add(p * 4096)) });
    }
    for &p in &write {
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(base.add(p * 4096), 1) };
    }
    for &p in &read_then_write {
        // SAFETY: as above.
        unsafe {
            sink = sink.wrapping_add(std::ptr::read_volatile(base.add(p * 4096)));
            std::ptr::write_volatile(base.add(p * 4096), sink | 1);
        }
    }
    writeln!(stdout, "done {sink}").unwrap();
    stdout.flush().unwrap();
    // Stay alive until the test is done reading our counts.
    while stdin
        .lock()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
}
