//! The demo workload `cargo xtask run` profiles: three regions used at different rates.
//!
//! A process's pages fault only on first touch, so to show heat the workload drops its own
//! pages (MADV_DONTNEED) and touches them again, at a different rate per region:
//! a hot region every 20 ms, a warm one every 200 ms, a cold one once, half a second in (so a
//! profiler attached at start sees it). The hot region's first half is only read, its second
//! half written. The sizes put the default class quantiles inside each region. It exits when
//! its stdin closes.

use std::{
    io::Read,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

const PAGE: usize = 4096;

struct Region {
    base: *mut u8,
    pages: usize,
}

impl Region {
    fn new(pages: usize) -> Result<Self> {
        let len = pages * PAGE;
        // SAFETY: a fresh private anonymous mapping; the result is checked below.
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
        if base == libc::MAP_FAILED {
            bail!(
                "mmap of {pages} pages failed: {}",
                std::io::Error::last_os_error()
            );
        }
        // Huge pages would fault 512 pages at once; the demo wants per-page faults.
        // SAFETY: advice on the mapping just created.
        unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) };
        Ok(Self {
            base: base.cast(),
            pages,
        })
    }

    /// Reads the pages below `write_from` and writes the others.
    fn touch(&self, write_from: usize) {
        for p in 0..self.pages {
            // SAFETY: p < pages, so the page lies inside the mapping.
            let page = unsafe { self.base.add(p * PAGE) };
            if p >= write_from {
                // SAFETY: as above.
                unsafe { page.write_volatile(1) };
            } else {
                // SAFETY: as above.
                unsafe { page.read_volatile() };
            }
        }
    }

    /// Drops the pages so the next touch faults again.
    fn drop_pages(&self) {
        // SAFETY: advice on our own private mapping, whose contents the demo does not need.
        unsafe { libc::madvise(self.base.cast(), self.pages * PAGE, libc::MADV_DONTNEED) };
    }
}

pub fn workload() -> Result<()> {
    let hot = Region::new(320)?;
    let warm = Region::new(512)?;
    let cold = Region::new(448)?;
    let mut cold_touched = false;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_reader = Arc::clone(&stop);
    thread::spawn(move || {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        stop_reader.store(true, Ordering::Relaxed);
    });
    let start = Instant::now();
    let mut last_warm = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        hot.touch(hot.pages / 2);
        hot.drop_pages();
        if !cold_touched && start.elapsed() >= Duration::from_millis(500) {
            cold.touch(usize::MAX);
            cold_touched = true;
        }
        if start.elapsed() - last_warm >= Duration::from_millis(200) {
            warm.touch(usize::MAX);
            warm.drop_pages();
            last_warm = start.elapsed();
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
