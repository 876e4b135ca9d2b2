//! `cargo xtask bench order-bound [RUNS]`: how few pages any push order can leave the guest
//! to demand after a hybrid cutover, on a workload whose popularity is known.
//!
//! A model, not a migration: it takes each page's intended touches per operation from the
//! guest's own popularity model (`migrator_guest::workloads::popularity`, the ground truth the
//! heat bench scores recall against) and plays the time after the resume. At the cutover the
//! pages written in the last stretch before it are stale, each with the chance its write rate
//! gives, the stretch chosen so that as many are stale as the scenario's measured migrations
//! discarded. The budget sends the first pages of the order during the pause; the push
//! sends the rest in order at the measured push rate. The guest, one vCPU, touches pages at
//! random by their weights; touching a stale page the push has not delivered yet is a demand,
//! which blocks it for the measured demand latency while the push goes on.
//!
//! Three orders share each run's stale set and touches: the *oracle*, by true popularity
//! (what a perfect heat profile gives, and the most any order can save), *address* (lowest
//! first, the baseline) and *random*. The oracle's demands against address's bound what heat
//! can reach on the workload. Prints a Markdown report for docs/BENCHMARKS.md.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use heatprobe_tests::bench::{Spread, commit, plural, show};
use migrator_guest::{
    rng::SplitMix64,
    workloads::{popularity, vcpu_share},
};

/// Guest memory of the migration bench's partitions.
const MEM: u64 = 512 << 20;
/// Pages the 100 ms budget sent in the hybrid matrix's kv-zipf runs (2,550-2,720).
const BUDGET: usize = 2_600;
/// The post-copy push's rate: 90% of the shaped link's measured 920-935 Mbit/s, in pages.
const PUSH_PAGES_PER_S: f64 = 25_500.0;
/// A demand's median latency in the hybrid matrix (p50 230-330 µs).
const DEMAND_S: f64 = 300e-6;
/// What the guest's first touch of a page costs it on the destination, where no page is
/// mapped for it yet: a fault, about 2 µs on this host (`docs/BENCHMARKS.md`, heat fidelity).
const FIRST_TOUCH_S: f64 = 2e-6;

/// A scenario of the migration bench, with what its measured runs give the model.
struct Scenario {
    name: &'static str,
    args: &'static str,
    /// The guest's operations a second while it runs: the paced rate, or the flat-out rate of
    /// `cargo xtask bench partitions` (5.4 M on 256 MiB).
    ops_per_s: f64,
    /// The share of operations that write (the workload's `write`; every `hotspot` one does).
    write: f64,
    /// Stale pages at the cutover: address's median `discarded_pages` in the hybrid matrix at
    /// 2f8dd73.
    stale: f64,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "kv-zipf paced, in place",
        args: "kv-zipf theta=0.99 write=0.2 rate=500000",
        ops_per_s: 500_000.0,
        write: 0.2,
        stale: 19_000.0,
    },
    Scenario {
        name: "kv-zipf paced, scattered",
        args: "kv-zipf theta=0.99 write=0.2 rate=500000 scramble=1",
        ops_per_s: 500_000.0,
        write: 0.2,
        stale: 42_200.0,
    },
    Scenario {
        name: "kv-zipf flat out, in place",
        args: "kv-zipf theta=0.99 write=0.2",
        ops_per_s: 5_000_000.0,
        write: 0.2,
        stale: 76_700.0,
    },
    Scenario {
        name: "kv-zipf flat out, scattered",
        args: "kv-zipf theta=0.99 write=0.2 scramble=1",
        ops_per_s: 5_000_000.0,
        write: 0.2,
        stale: 80_800.0,
    },
    // The hybrid matrix at 4682ad8, on a machine whose guests dirtied less: heat's and
    // address's median stale sets there, to set the demands a smaller stale set saves beside
    // what order saves.
    Scenario {
        name: "kv-zipf paced, scattered, 15k stale",
        args: "kv-zipf theta=0.99 write=0.2 rate=500000 scramble=1",
        ops_per_s: 500_000.0,
        write: 0.2,
        stale: 15_260.0,
    },
    Scenario {
        name: "kv-zipf paced, scattered, 22k stale",
        args: "kv-zipf theta=0.99 write=0.2 rate=500000 scramble=1",
        ops_per_s: 500_000.0,
        write: 0.2,
        stale: 22_380.0,
    },
    // The matrix's graded and hotspot runs converge, and the budget takes nearly all their
    // stale pages; these give them paced kv-zipf scattered's stale set, to see what order
    // does where the budget cannot take it whole.
    Scenario {
        name: "graded, scattered, 42k stale",
        args: "graded rate=200000 scatter=1",
        ops_per_s: 200_000.0,
        write: 0.2,
        stale: 42_200.0,
    },
    Scenario {
        name: "hotspot, scattered, 42k stale",
        args: "hotspot rate=200000 scatter=1",
        ops_per_s: 200_000.0,
        write: 1.0,
        stale: 42_200.0,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum OrderKind {
    Oracle,
    Address,
    Random,
}

const ORDERS: [OrderKind; 3] = [OrderKind::Oracle, OrderKind::Address, OrderKind::Random];

impl OrderKind {
    fn name(self) -> &'static str {
        match self {
            Self::Oracle => "oracle (true popularity)",
            Self::Address => "address",
            Self::Random => "random",
        }
    }
}

/// A share's pages by intended touches per operation, with their running sums to draw from.
struct Pages {
    weight: Vec<f64>,
    cumulative: Vec<f64>,
    /// Write fraction of the operations.
    write: f64,
}

impl Pages {
    fn of(args: &str, write: f64) -> Result<Self> {
        let share = vcpu_share(0, MEM, 1, 0);
        let model = popularity(args, share.end - share.start)
            .map_err(|e| anyhow::anyhow!("{args}: {e:?}"))?;
        let weight: Vec<f64> = (0..model.pages()).map(|p| model.weight(p)).collect();
        let mut sum = 0.0;
        let cumulative = weight
            .iter()
            .map(|w| {
                sum += w;
                sum
            })
            .collect();
        Ok(Self {
            weight,
            cumulative,
            write,
        })
    }

    /// Touches per operation over all pages.
    fn total(&self) -> f64 {
        self.cumulative.last().copied().unwrap_or(0.0)
    }

    /// A page drawn by weight.
    fn draw(&self, rng: &mut SplitMix64) -> usize {
        let x = rng.unit() * self.total();
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.weight.len() - 1)
    }

    /// The chance page `p` is stale after `stretch` seconds of writes.
    fn stale_chance(&self, p: usize, ops_per_s: f64, stretch: f64) -> f64 {
        1.0 - (-ops_per_s * self.write * self.weight[p] * stretch).exp()
    }

    /// The stretch of writes before the cutover that leaves `stale` pages stale, expected.
    fn stretch_for(&self, ops_per_s: f64, stale: f64) -> Result<f64> {
        let expected = |s: f64| -> f64 {
            (0..self.weight.len())
                .map(|p| self.stale_chance(p, ops_per_s, s))
                .sum()
        };
        let (mut low, mut high) = (0.0, 1.0);
        while expected(high) < stale {
            high *= 2.0;
            if high > 1e6 {
                bail!("no stretch of writes leaves {stale} pages stale");
            }
        }
        for _ in 0..60 {
            let mid = (low + high) / 2.0;
            if expected(mid) < stale {
                low = mid;
            } else {
                high = mid;
            }
        }
        Ok(high)
    }
}

/// One order's outcomes over the runs, in run order.
#[derive(Default)]
struct Outcomes {
    demands: Vec<f64>,
    blocktime_ms: Vec<f64>,
    /// Demands over address order's in the same run.
    ratio: Vec<f64>,
}

/// What the guest demanded after one cutover.
#[derive(Clone, Copy, Default)]
struct Outcome {
    demands: f64,
    blocktime_ms: f64,
}

/// Plays the time after the resume: `order` lists the stale pages, the first [`BUDGET`] sent
/// in the pause, the rest pushed in turn; the guest's touches come from `seed`.
fn play(pages: &Pages, order: &[usize], ops_per_s: f64, seed: u64) -> Outcome {
    let mut arrival = vec![0.0f64; pages.weight.len()];
    let pushed = order.get(BUDGET..).unwrap_or(&[]);
    for (i, &p) in pushed.iter().enumerate() {
        arrival[p] = (i + 1) as f64 / PUSH_PAGES_PER_S;
    }
    let end = pushed.len() as f64 / PUSH_PAGES_PER_S;
    let touch = 1.0 / (ops_per_s * pages.total());
    let mut rng = SplitMix64::new(seed);
    let mut touched = vec![false; pages.weight.len()];
    let (mut now, mut outcome) = (0.0, Outcome::default());
    while now < end {
        let p = pages.draw(&mut rng);
        if !std::mem::replace(&mut touched[p], true) {
            now += FIRST_TOUCH_S;
        }
        if arrival[p] > now {
            // Demanded: here from now on.
            arrival[p] = 0.0;
            outcome.demands += 1.0;
            outcome.blocktime_ms += DEMAND_S * 1e3;
            now += DEMAND_S;
        }
        now += touch;
    }
    outcome
}

fn order_of(kind: OrderKind, pages: &Pages, stale: &[usize], rng: &mut SplitMix64) -> Vec<usize> {
    let mut order = stale.to_vec();
    match kind {
        OrderKind::Oracle => {
            order.sort_by(|&a, &b| pages.weight[b].total_cmp(&pages.weight[a]).then(a.cmp(&b)))
        }
        OrderKind::Address => {}
        OrderKind::Random => {
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
    }
    order
}

fn main() -> Result<()> {
    let runs: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse().context("RUNS: a number of runs")?,
        None => 5,
    };
    if runs == 0 {
        bail!("RUNS must be at least 1");
    }
    println!("### How much any push order can save (a model)\n");
    println!("Reproduce: `cargo xtask bench order-bound {runs}`.\n");
    println!(
        "Built from commit {}.\n",
        commit().unwrap_or_else(|| "unknown".into())
    );
    println!(
        "Budget {BUDGET} pages, push {PUSH_PAGES_PER_S} pages/s, demand {:.0} µs; {}.\n",
        DEMAND_S * 1e6,
        plural(runs, "run")
    );
    println!("| scenario | order | stale pages | demands | blocktime ms | demands / address's |");
    println!("|---|---|---|---|---|---|");
    for (s, scenario) in SCENARIOS.iter().enumerate() {
        let pages = Pages::of(scenario.args, scenario.write)?;
        let stretch = pages.stretch_for(scenario.ops_per_s, scenario.stale)?;
        let mut by_order: BTreeMap<OrderKind, Outcomes> = BTreeMap::new();
        let mut stale_counts = Vec::new();
        for run in 0..runs {
            let seed = (s * 1_000 + run) as u64;
            let mut rng = SplitMix64::new(seed ^ 0x5eed);
            let stale: Vec<usize> = (0..pages.weight.len())
                .filter(|&p| rng.unit() < pages.stale_chance(p, scenario.ops_per_s, stretch))
                .collect();
            stale_counts.push(stale.len() as f64);
            let address = play(&pages, &stale, scenario.ops_per_s, seed);
            for kind in ORDERS {
                let outcome = match kind {
                    OrderKind::Address => address,
                    _ => play(
                        &pages,
                        &order_of(kind, &pages, &stale, &mut rng),
                        scenario.ops_per_s,
                        seed,
                    ),
                };
                let entry = by_order.entry(kind).or_default();
                entry.demands.push(outcome.demands);
                entry.blocktime_ms.push(outcome.blocktime_ms);
                entry.ratio.push(outcome.demands / address.demands.max(1.0));
            }
        }
        let stale = show(Spread::of(stale_counts), 0);
        for (kind, outcomes) in by_order {
            let ratio = Spread::of(outcomes.ratio).context("no runs")?;
            println!(
                "| {} | {} | {stale} | {} | {} | {:.2}x ({:.2}–{:.2}x) |",
                scenario.name,
                kind.name(),
                show(Spread::of(outcomes.demands), 0),
                show(Spread::of(outcomes.blocktime_ms), 1),
                ratio.median,
                ratio.min,
                ratio.max,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hotspot() -> Pages {
        Pages::of("hotspot rate=200000 scatter=1", 1.0).unwrap()
    }

    #[test]
    fn a_stale_set_the_budget_takes_whole_leaves_nothing_to_demand() {
        let pages = hotspot();
        let stale: Vec<usize> = (0..BUDGET).collect();
        assert_eq!(play(&pages, &stale, 200_000.0, 1).demands, 0.0);
    }

    #[test]
    fn the_true_popularity_saves_demands_on_a_scattered_hot_set() {
        let pages = hotspot();
        // The hot region, and every 32nd page besides: more than the budget takes.
        let hottest = pages.weight.iter().copied().fold(0.0, f64::max);
        let stale: Vec<usize> = (0..pages.weight.len())
            .filter(|&p| pages.weight[p] == hottest || p % 32 == 0)
            .collect();
        assert!(stale.len() > BUDGET);
        let mut rng = SplitMix64::new(7);
        let oracle = order_of(OrderKind::Oracle, &pages, &stale, &mut rng);
        let address = play(&pages, &stale, 200_000.0, 1);
        let best = play(&pages, &oracle, 200_000.0, 1);
        assert!(address.demands > 0.0);
        assert!(
            best.demands < 0.5 * address.demands,
            "{} against {}",
            best.demands,
            address.demands
        );
    }

    #[test]
    fn the_stretch_found_leaves_the_stale_set_asked_for() {
        let pages = hotspot();
        let stretch = pages.stretch_for(200_000.0, 10_000.0).unwrap();
        let expected: f64 = (0..pages.weight.len())
            .map(|p| pages.stale_chance(p, 200_000.0, stretch))
            .sum();
        assert!((expected - 10_000.0).abs() < 1.0, "{expected}");
        assert!(pages.stretch_for(200_000.0, 1e9).is_err());
    }
}
