//! A page-fault-heavy workload for the heatprobe benchmark: maps PAGES fresh pages, writes each
//! once (one fault per page), unmaps them, ROUNDS times. Waits for a line on stdin before
//! starting, then prints the nanoseconds the loop took.
use std::{io::BufRead, time::Instant};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: fault_storm ROUNDS PAGES"))
        .collect();
    let [rounds, pages] = args[..] else {
        panic!("usage: fault_storm ROUNDS PAGES");
    };
    let len = (pages * 4096) as usize;
    println!("ready");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");
    let start = Instant::now();
    for _ in 0..rounds {
        // SAFETY: a fresh private anonymous mapping, unmapped below.
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
        assert_ne!(base, libc::MAP_FAILED);
        // SAFETY: advice on our mapping; one fault per page is the point.
        unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) };
        for p in 0..pages as usize {
            // SAFETY: inside the mapping.
            unsafe { base.cast::<u8>().add(p * 4096).write_volatile(1) };
        }
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(base, len) };
    }
    println!("{}", start.elapsed().as_nanos());
}
