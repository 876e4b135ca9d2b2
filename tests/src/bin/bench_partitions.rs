//! `cargo xtask bench partitions`: what running inside a partition costs.
//!
//! - guest ops/s of `kv-zipf` inside a 1-vCPU partition against the very same workload code
//!   run as a host function over memory of the same size, interleaved, medians of ratios;
//! - time to launch a 1 GiB partition (`Partition::launch`: memory, image, VM, vCPU thread).
//!
//! Prints a Markdown report for docs/BENCHMARKS.md.

use std::{
    cell::Cell,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use migrator::vmm::{GuestImage, Partition, PartitionConfig, PartitionState};
use migrator_guest::{Platform, Progress, args::Args, workloads};

const MEM: u64 = 256 << 20;
const ARGS: &str = "theta=0.99 write=0.2";
const WINDOW: Duration = Duration::from_secs(2);
const REPEATS: usize = 5;

/// The workload's platform on the host: wall-clock ticks; stops after a window of operations
/// that starts once the data is initialized (at the first operation).
struct Host {
    start: Instant,
    window: Cell<Option<(Instant, u64)>>,
    finished: Cell<Option<(Duration, u64)>>,
}

impl Platform for Host {
    fn ticks(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn ticks_per_ms(&self) -> u64 {
        1_000_000
    }
    fn report(&mut self, _: &Progress) {}
    fn check_failed(&mut self, d0: u64, d1: u64) {
        panic!("host run failed a self-check: {d0:#x} {d1:#x}");
    }
    fn console(&mut self, _: &str) {}
    fn sleep(&mut self, nanos: u64) {
        thread::sleep(Duration::from_nanos(nanos));
    }
    fn should_stop(&self, progress: &Progress) -> bool {
        // Reading the clock costs as much as an operation; look every 1024.
        if progress.ops == 0 || !progress.ops.is_multiple_of(1024) {
            return false;
        }
        let now = Instant::now();
        let (t0, ops0) = self.window.get().unwrap_or((now, progress.ops));
        self.window.set(Some((t0, ops0)));
        if now - t0 < WINDOW {
            return false;
        }
        self.finished.set(Some((now - t0, progress.ops - ops0)));
        true
    }
}

/// The per-vCPU share the guest gets of MEM (see the guest's entry code), in u64 words.
fn guest_share_words() -> usize {
    let image_end = 0x11_0000u64; // the built-in image ends below this
    let stacks = migrator_guest::abi::STACK_SIZE;
    (((MEM - stacks - image_end) & !4095) / 8) as usize
}

fn host_ops_per_sec() -> Result<f64> {
    let mut memory = vec![0u64; guest_share_words()];
    let mut host = Host {
        start: Instant::now(),
        window: Cell::new(None),
        finished: Cell::new(None),
    };
    let text = format!("kv-zipf {ARGS}");
    if let Err(e) = workloads::run(&Args::new(&text), &mut memory, 0, 1, &mut host) {
        bail!("host run refused its arguments: {e:?}");
    }
    let Some((elapsed, ops)) = host.finished.get() else {
        bail!("host run ended without a window");
    };
    Ok(ops as f64 / elapsed.as_secs_f64())
}

fn guest_ops_per_sec() -> Result<f64> {
    let partition = Partition::launch(PartitionConfig {
        name: None,
        mem_size: MEM,
        vcpus: 1,
        image: GuestImage::Builtin("kv-zipf".into()),
        args: ARGS.into(),
    })?;
    // Wait for initialization to end (the first operations).
    let deadline = Instant::now() + Duration::from_secs(30);
    while partition.status().progress.ops == 0 {
        if Instant::now() > deadline {
            bail!("the guest never started its operations");
        }
        thread::sleep(Duration::from_millis(5));
    }
    let (t0, ops0) = (Instant::now(), partition.status().progress.ops);
    thread::sleep(WINDOW);
    let status = partition.status();
    let elapsed = t0.elapsed();
    if status.state != PartitionState::Running || status.progress.errors != 0 {
        bail!("guest run went wrong: {status:?}");
    }
    Ok((status.progress.ops - ops0) as f64 / elapsed.as_secs_f64())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<()> {
    let (mut host, mut guest, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        let h = host_ops_per_sec()?;
        let g = guest_ops_per_sec()?;
        host.push(h);
        guest.push(g);
        ratio.push(g / h);
    }
    let mut launch_ms = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        let partition = Partition::launch(PartitionConfig {
            name: None,
            mem_size: 1 << 30,
            vcpus: 1,
            image: GuestImage::Builtin("idle".into()),
            args: String::new(),
        })?;
        launch_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        drop(partition);
    }
    println!("### partitions\n");
    println!(
        "kv-zipf `{ARGS}` over {} MiB, 1 vCPU, {}-second windows after initialization; medians of {REPEATS} interleaved repeats.\n",
        MEM >> 20,
        WINDOW.as_secs()
    );
    println!("| figure | measured | target |");
    println!("|---|---|---|");
    println!(
        "| kv-zipf ops/s as a host function | {:.2} M | |",
        median(&mut host) / 1e6
    );
    println!(
        "| kv-zipf ops/s inside a partition | {:.2} M | |",
        median(&mut guest) / 1e6
    );
    println!(
        "| partition / host ratio | {:.3} | ≥ 0.9 |",
        median(&mut ratio)
    );
    println!(
        "| time to launch a 1 GiB partition | {:.1} ms | ≤ 50 ms |",
        median(&mut launch_ms)
    );
    Ok(())
}
