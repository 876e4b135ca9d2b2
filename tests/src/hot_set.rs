//! Guests whose hot set is known, and how well a heat listing finds it: the heat benches'
//! ground truth (`cargo xtask bench heat`, `cargo xtask bench warm`).
//!
//! The true hot set is the smallest set of data pages taking 80% of the data pages' intended
//! accesses (`migrator_guest::workloads::popularity`), extended to every page as popular as
//! the least popular of them. Recall is the share of those pages among the top
//! ⌈1.25 × |hot|⌉ data pages by heat, pages of equal heat ranked in random order (counted in
//! expectation, so an address-ordered listing cannot favour the hot set of an in-place
//! layout); untouched pages have heat 0.

use std::{
    collections::BTreeSet,
    ops::Range,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{bench::known_popularity, daemon::Daemon};

/// The guests' memory.
pub const MEM: u64 = 256 << 20;
pub const MEM_ARG: &str = "256M";
/// The share of intended accesses the true hot set takes.
pub const HOT_SHARE: f64 = 0.8;
/// How many pages by heat may hold the hot set, as a multiple of its size.
pub const SLACK: f64 = 1.25;

/// A guest whose popularity the guest crate knows.
pub struct Scenario {
    pub name: &'static str,
    pub workload: &'static str,
    pub args: &'static str,
}

/// The guests of the pre-copy matrix whose hot set is known, at the matrix's pace. Their full
/// self-check reads every page alike, which the model of their popularity leaves out: at the
/// default `check_every` a paced `hotspot` sweeps all its pages three times a second, so every
/// page would be touched often and the hot set would not be the one the model says; here the
/// checks are rare.
pub const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "kv-zipf, in place",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 rate=500000 check_every=1000000000",
    },
    Scenario {
        name: "kv-zipf, scrambled",
        workload: "kv-zipf",
        args: "theta=0.99 write=0.2 rate=500000 scramble=1 check_every=1000000000",
    },
    Scenario {
        name: "hotspot, in place",
        workload: "hotspot",
        args: "rate=200000 check_every=1000000000",
    },
    Scenario {
        name: "hotspot, scattered",
        workload: "hotspot",
        args: "rate=200000 scatter=1 check_every=1000000000",
    },
    Scenario {
        name: "graded, in place",
        workload: "graded",
        args: "rate=200000 check_every=1000000000",
    },
    Scenario {
        name: "graded, scattered",
        workload: "graded",
        args: "rate=200000 scatter=1 check_every=1000000000",
    },
];

/// The slowdown's guest: flat out, its hot keys scattered, so a re-armed slice holds as many
/// touched pages as it can.
pub const FLAT_OUT: Scenario = Scenario {
    name: "kv-zipf flat out, scrambled",
    workload: "kv-zipf",
    args: "theta=0.99 write=0.2 scramble=1 check_every=1000000000",
};

/// A hot set that moves: `hotspot`'s region, scattered, moving on every 4M operations (20 s at
/// its pace), so its truth depends on when it is asked ([`Truth::after_ops`]).
pub const MOVING: Scenario = Scenario {
    name: "hotspot moving, scattered",
    workload: "hotspot",
    args: "rate=200000 scatter=1 move_every=4000000 check_every=1000000000",
};

/// The intended hot set of a scenario, as guest frames.
pub struct Truth {
    /// The frames that hold data pages.
    pub data: Range<u64>,
    pub hot: BTreeSet<u64>,
}

impl Truth {
    pub fn of(scenario: &Scenario) -> Result<Self> {
        Self::after_ops(scenario, 0)
    }

    /// The hot set once the guest has made `ops` operations: where a hot set that moves
    /// ([`MOVING`]) has moved to by then.
    pub fn after_ops(scenario: &Scenario, ops: u64) -> Result<Self> {
        let (first, model) = known_popularity(scenario.workload, scenario.args, MEM)
            .with_context(|| scenario.name.to_string())?;
        let model = model.after_ops(ops);
        let data = model.data_pages();
        let mut pages: Vec<(usize, f64)> = data.clone().map(|p| (p, model.weight(p))).collect();
        pages.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = pages.iter().map(|(_, w)| w).sum();
        let (mut taken, mut hot) = (0.0, BTreeSet::new());
        let mut lightest = f64::INFINITY;
        for &(page, weight) in &pages {
            if taken >= HOT_SHARE * total && weight < lightest {
                break;
            }
            taken += weight;
            lightest = weight;
            hot.insert(page);
        }
        Ok(Self {
            data: first + data.start as u64..first + data.end as u64,
            hot: hot.into_iter().map(|p| first + p as u64).collect(),
        })
    }

    /// The share of the hot set among the top ⌈SLACK × |hot|⌉ data pages of `heat` (a
    /// `migrator heat --json` object), ties in heat broken at random, in expectation.
    pub fn recall(&self, heat: &Value) -> Result<f64> {
        let listed = heat["pages"].as_array().context("no pages in the heat")?;
        let mut touched = Vec::new();
        for page in listed {
            let frame = page["page"].as_u64().context("a page number")?;
            let heat = page["heat"].as_f64().context("a page's heat")?;
            if self.data.contains(&frame) && heat > 0.0 {
                touched.push((heat, self.hot.contains(&frame)));
            }
        }
        // Untouched data pages share heat 0.
        let untouched = self.data.end - self.data.start - touched.len() as u64;
        let untouched_hot =
            self.hot.len() as u64 - touched.iter().filter(|(_, h)| *h).count() as u64;
        touched.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut levels: Vec<(u64, u64)> = Vec::new(); // (pages, hot pages) per heat, hottest first
        let mut previous = f64::NAN;
        for (heat, hot) in touched {
            if heat != previous {
                levels.push((0, 0));
                previous = heat;
            }
            let level = levels.last_mut().expect("pushed above");
            level.0 += 1;
            level.1 += u64::from(hot);
        }
        levels.push((untouched, untouched_hot));
        let mut slots = (SLACK * self.hot.len() as f64).ceil() as u64;
        let mut found = 0.0;
        for (pages, hot) in levels {
            if slots == 0 || pages == 0 {
                continue;
            }
            let taken = pages.min(slots);
            found += hot as f64 * taken as f64 / pages as f64;
            slots -= taken;
        }
        Ok(found / self.hot.len().max(1) as f64)
    }
}

/// Launches `scenario` in a partition of [`MEM`] on `daemon` and waits for its first
/// operation; its id, and when that was seen.
pub fn launch(daemon: &Daemon, scenario: &Scenario) -> Result<(String, Instant)> {
    let id = daemon.try_json(&[
        "launch",
        "--workload",
        scenario.workload,
        "--args",
        scenario.args,
        "--mem",
        MEM_ARG,
    ])?["id"]
        .as_str()
        .context("launch gave no id")?
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ops(daemon, &id)? == 0 {
        ensure!(Instant::now() < deadline, "{} never started", scenario.name);
        thread::sleep(Duration::from_millis(50));
    }
    Ok((id, Instant::now()))
}

/// Partition `id`'s operations so far; an error if it erred or does not run.
pub fn ops(daemon: &Daemon, id: &str) -> Result<u64> {
    let status = daemon.try_json(&["status", id])?;
    ensure!(status["errors"] == 0, "guest errors: {status}");
    ensure!(
        status["state"] == "running",
        "the guest does not run: {status}"
    );
    status["ops"].as_u64().context("no ops in the status")
}
