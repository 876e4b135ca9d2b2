//! The profiler: one target, counted epoch by epoch into a [`HeatMap`].
//!
//! A fault fires on first touch only, so after the first epoch counts say little about how
//! often a page is used. Whoever owns a guest's memory can hand the profiler an
//! [`ActiveSampler`]; each epoch the profiler asks it to re-arm a slice of the guest's frames
//! so that their next access faults again. Every frame is re-armed once every
//! `1 / sample_fraction` epochs, the bounded-overhead sampling DAMON uses.
//!
//! A re-armed frame faults on its next access whenever that comes, so counting every fault
//! tells a frame used a thousand times a second from one used once in the seconds since its
//! re-arming only by the order of the faults. [`Credit::ArmedLastEpoch`] counts what DAMON's
//! accessed-bit check does instead: whether each frame re-armed at the end of one epoch was
//! touched during the next, an access within one epoch of re-arming.
//!
//! A single check cannot tell a frame in use all the time from one touched once by chance
//! in that epoch. So, with that credit, the frames found touched are checked again at once,
//! hottest first, up to `recheck_fraction` of the guest's frames an epoch: a frame in
//! constant use is found touched epoch after epoch and its heat grows, while one touched by
//! chance is rarely touched in the next epoch too and keeps the heat of one touch. This is
//! the idea behind DAMON's adaptive regions (more samples where the accesses are), at the
//! grain of frames.
//!
//! A check is worth more than one bit, too: the probes time each fault, and a frame faults
//! once after its re-arming, so the time from the re-arming to that fault is how long the
//! guest left the frame alone. For a frame used at a steady rate that wait is exponential
//! with the rate as its parameter, so its logarithm estimates the log of the rate with the
//! same spread whatever the rate. With that credit each check weighs `1 + ln(epoch / wait)`
//! ([`touch_weight`]), 1 for a touch at the epoch's end and up to about 8 for one at once,
//! instead of 1 for any touch: a frame used thousands of times a second is told from one
//! used a few times in one check.

use std::{
    collections::BTreeMap,
    fs,
    ops::Range,
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    budget::{Budget, Spend, Spent},
    heat::{HeatConfig, HeatError, HeatMap},
    pace::Pace,
    probes::{PageCounts, ProbeError, Probes, TargetId, counts_since},
};

/// What to profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// A process's own page faults; pages are virtual page numbers.
    Process { pid: u32 },
    /// The guest of a KVM VMM process; pages are guest frame numbers. With `vcpu_threads`
    /// only those threads (one VM's vCPUs) are counted; without, every thread of `pid`, which
    /// is right only where the VMM runs a single VM (as QEMU and Firecracker do).
    Vm {
        pid: u32,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        vcpu_threads: Option<Vec<u32>>,
    },
}

impl Target {
    pub fn pid(&self) -> u32 {
        match self {
            Self::Process { pid } | Self::Vm { pid, .. } => *pid,
        }
    }
}

#[derive(Debug, Error)]
pub enum ProfilerError {
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    #[error("the sample fraction must be in (0, 1], got {0}")]
    SampleFraction(f64),
    #[error("the recheck fraction must be in [0, 1], got {0}")]
    RecheckFraction(f64),
    #[error("the epoch interval must be at least 1 ms")]
    Interval,
    #[error(transparent)]
    Heat(#[from] HeatError),
    #[error(transparent)]
    Probes(#[from] ProbeError),
    #[error("the active sampler failed")]
    Sampler(#[from] SamplerError),
}

/// Failure of an [`ActiveSampler`].
#[derive(Debug, Error)]
#[error("{what}")]
pub struct SamplerError {
    pub what: String,
    #[source]
    pub source: Option<std::io::Error>,
}

/// Implemented by the owner of a guest's memory, so the profiler can keep faults flowing.
pub trait ActiveSampler: Send {
    /// Number of guest frames (frames `0..frames()` exist).
    fn frames(&self) -> u64;
    /// Makes the guest's next write to each frame of `frames` fault again (write heat), for
    /// example by write-protecting them through the KVM dirty log.
    fn rearm_writes(&mut self, frames: Range<u64>) -> Result<(), SamplerError>;
    /// Makes the guest's next access to each frame of `frames` fault again (read heat), for
    /// example by dropping the host mapping of a shared memfd (MADV_DONTNEED keeps the data).
    fn rearm_accesses(&mut self, frames: Range<u64>) -> Result<(), SamplerError>;
}

/// Which faults count as heat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Credit {
    /// Every fault: a process's faults, or a sampler that re-arms every frame each epoch.
    #[default]
    Every,
    /// Only the faults, during an epoch, of the frames re-armed at its start: a frame touched
    /// within one epoch of its re-arming. A frame re-armed long ago and touched only now is
    /// touched rarely; its late fault is not counted.
    ArmedLastEpoch,
}

/// Tunables of a profiling run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfilerConfig {
    /// Length of one epoch.
    pub interval: Duration,
    pub heat: HeatConfig,
    /// Fraction of guest frames re-armed per epoch when there is a sampler, in (0, 1].
    pub sample_fraction: f64,
    /// With [`Credit::ArmedLastEpoch`]: at most this fraction of the guest's frames, among
    /// those found touched in an epoch, re-armed again for the next, hottest first, in
    /// [0, 1]; 0 checks each frame only when the slice comes round.
    #[serde(default)]
    pub recheck_fraction: f64,
    /// The most re-arming may cost the target ([`crate::budget`]); `None`: no cap beyond
    /// `sample_fraction`.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// With a budget and [`Credit::ArmedLastEpoch`]: spend less of it while successive
    /// sweeps of memory find the same frames touched, never slowing a sweep past this long
    /// ([`crate::pace`]); `None`: always the whole budget.
    #[serde(default)]
    pub paced_sweeps: Option<Duration>,
}

impl Default for ProfilerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(200),
            heat: HeatConfig::default(),
            sample_fraction: 0.25,
            recheck_fraction: 0.0,
            budget: None,
            paced_sweeps: None,
        }
    }
}

/// Profiles one target.
pub struct Profiler {
    probes: Arc<Probes>,
    target: Target,
    id: TargetId,
    config: ProfilerConfig,
    heat: HeatMap,
    last_counts: BTreeMap<u64, PageCounts>,
    sampler: Option<Box<dyn ActiveSampler>>,
    sample_cursor: u64,
    credit: Credit,
    /// The frames re-armed at the end of the last epoch.
    armed: Vec<Range<u64>>,
    /// With [`Credit::ArmedLastEpoch`], the counted faults over the whole run.
    credited: BTreeMap<u64, PageCounts>,
    /// With [`Credit::ArmedLastEpoch`], the checks' weights ([`touch_weight`]) summed over the
    /// whole run.
    credited_weight: BTreeMap<u64, f64>,
    /// When the frames of `armed` were re-armed ([`crate::probes::monotonic_ns`]).
    armed_at_ns: u64,
    /// With [`Credit::ArmedLastEpoch`], how many checks each frame has had over the whole run
    /// (re-armed, then its epoch ended), touched or not; indexed by frame.
    checks: Vec<u32>,
    /// The budget being spent, if the config has one.
    spend: Option<Spend>,
    /// When the epoch under way began (the budget is of the time epochs really take).
    epoch_began: Instant,
    /// How much of the budget the sweeps spend, if the config paces them.
    pace: Option<Pace>,
    /// Whether the frames re-armed last reached the end of memory: the epoch that reads them
    /// ends a sweep.
    sweep_closes: bool,
}

impl Profiler {
    /// Starts tracking `target`. Counting starts now; faults before this are not seen.
    pub fn start(
        probes: Arc<Probes>,
        target: Target,
        config: ProfilerConfig,
    ) -> Result<Self, ProfilerError> {
        if config.interval < Duration::from_millis(1) {
            return Err(ProfilerError::Interval);
        }
        if !(config.sample_fraction > 0.0 && config.sample_fraction <= 1.0) {
            return Err(ProfilerError::SampleFraction(config.sample_fraction));
        }
        if !(0.0..=1.0).contains(&config.recheck_fraction) {
            return Err(ProfilerError::RecheckFraction(config.recheck_fraction));
        }
        let heat = HeatMap::new(config.heat)?;
        let pid = target.pid();
        if !process_exists(pid) {
            return Err(ProfilerError::NoSuchProcess(pid));
        }
        let id = match &target {
            Target::Process { pid } => probes.track_process(*pid)?,
            Target::Vm {
                vcpu_threads: Some(tids),
                ..
            } => probes.track_vcpus(tids)?,
            Target::Vm {
                pid,
                vcpu_threads: None,
            } => probes.track_vcpus(&threads_of(*pid))?,
        };
        Ok(Self {
            probes,
            target,
            id,
            config,
            heat,
            last_counts: BTreeMap::new(),
            sampler: None,
            sample_cursor: 0,
            credit: Credit::Every,
            armed: Vec::new(),
            credited: BTreeMap::new(),
            credited_weight: BTreeMap::new(),
            armed_at_ns: 0,
            checks: Vec::new(),
            spend: config.budget.map(|b| Spend::new(b, config.interval)),
            epoch_began: Instant::now(),
            pace: config
                .budget
                .and(config.paced_sweeps)
                .map(|longest| Pace::new(longest, Instant::now())),
            sweep_closes: false,
        })
    }

    /// Adds an active sampler; from the next epoch on, a slice of frames is re-armed each
    /// epoch.
    pub fn set_sampler(&mut self, sampler: Box<dyn ActiveSampler>) {
        self.sampler = Some(sampler);
    }

    /// Which faults count from the next epoch on.
    pub fn set_credit(&mut self, credit: Credit) {
        self.credit = credit;
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn config(&self) -> &ProfilerConfig {
        &self.config
    }

    pub fn heat(&self) -> &HeatMap {
        &self.heat
    }

    pub fn probes(&self) -> &Arc<Probes> {
        &self.probes
    }

    /// Fault counts over the whole run: every fault, or with [`Credit::ArmedLastEpoch`] the
    /// counted ones.
    pub fn totals(&self) -> &BTreeMap<u64, PageCounts> {
        match self.credit {
            Credit::Every => &self.last_counts,
            Credit::ArmedLastEpoch => &self.credited,
        }
    }

    /// With [`Credit::ArmedLastEpoch`], each credited page's checks' weights summed over the
    /// whole run ([`touch_weight`]); empty otherwise.
    pub fn weights(&self) -> &BTreeMap<u64, f64> {
        &self.credited_weight
    }

    /// With [`Credit::ArmedLastEpoch`], the checks each frame has had over the whole run,
    /// indexed by frame (frames past the end have had none); empty otherwise.
    pub fn checks(&self) -> &[u32] {
        &self.checks
    }

    /// Whether the target process still exists.
    pub fn target_alive(&self) -> bool {
        process_exists(self.target.pid())
    }

    /// Ends an epoch: reads the counts, feeds their change since the last epoch into the heat
    /// map, and re-arms the next slice of frames.
    pub fn end_epoch(&mut self) -> Result<(), ProfilerError> {
        let touched = self.record_epoch()?;
        self.rearm_next_sample(touched)
    }

    /// Reads the epoch's counts into the heat and the budget; returns the frames found
    /// touched (with [`Credit::ArmedLastEpoch`]), for the re-arming to recheck.
    fn record_epoch(&mut self) -> Result<Vec<u64>, ProfilerError> {
        if let Target::Vm {
            pid,
            vcpu_threads: None,
        } = self.target
        {
            // Threads started since the last epoch (a vCPU hot-added, say).
            for tid in threads_of(pid) {
                self.probes.add_vcpu(self.id, tid)?;
            }
        }
        let (counts, last_faults) = match self.credit {
            Credit::Every => (self.probes.counts(self.id)?, BTreeMap::new()),
            Credit::ArmedLastEpoch => self.probes.counts_and_last_faults(self.id)?,
        };
        let epoch = counts_since(&counts, &self.last_counts);
        let mut armed = std::mem::take(&mut self.armed);
        let began = std::mem::replace(&mut self.epoch_began, Instant::now());
        armed.sort_by_key(|range| range.start);
        // The faults that count: every one, or only those on the frames the epoch began by
        // re-arming.
        let credited = match self.credit {
            Credit::Every => epoch,
            Credit::ArmedLastEpoch => touched_within(epoch, &armed),
        };
        if let Some(spend) = self.spend.as_mut() {
            // The faults the re-arming caused are what the budget pays for. Crediting every
            // fault, each one counted is taken as the re-arming's (during a migration, nearly
            // all are); crediting the frames armed, only those on them are: a guest that
            // first touches its memory, or the faults of a fresh mapping, would pay them with
            // or without a profile.
            let faults = credited.iter().map(|(_, c)| c.reads + c.writes).sum();
            let frames = armed.iter().map(|r| r.end - r.start).sum();
            spend.record(began.elapsed(), frames, faults);
        }
        let mut touched = Vec::new();
        if self.credit == Credit::ArmedLastEpoch {
            let epoch_ns = self.config.interval.as_nanos() as u64;
            // These pages faulted since the re-arming, so within this long of it.
            let elapsed_ns = crate::probes::monotonic_ns().saturating_sub(self.armed_at_ns);
            let armed_at = crate::probes::fault_time(self.armed_at_ns);
            let weighted: Vec<(u64, PageCounts, f64)> = credited
                .into_iter()
                .map(|(page, c)| {
                    let wait = last_faults
                        .get(&page)
                        .and_then(|&at| crate::probes::fault_wait_ns(armed_at, at, elapsed_ns));
                    (page, c, touch_weight(wait, epoch_ns))
                })
                .collect();
            for (page, c, weight) in &weighted {
                let total = self.credited.entry(*page).or_default();
                total.reads += c.reads;
                total.writes += c.writes;
                *self.credited_weight.entry(*page).or_default() += weight;
            }
            for range in &armed {
                if let Ok(end) = usize::try_from(range.end) {
                    if self.checks.len() < end {
                        self.checks.resize(end, 0);
                    }
                    for check in &mut self.checks[range.start as usize..end] {
                        *check = check.saturating_add(1);
                    }
                }
            }
            touched = weighted.iter().map(|(page, _, _)| *page).collect();
            if let Some(pace) = self.pace.as_mut() {
                pace.touched(touched.iter().copied());
                if std::mem::take(&mut self.sweep_closes) {
                    let next = pace.sweep_ended(Instant::now());
                    if let Some(spend) = self.spend.as_mut() {
                        spend.set_pace(next);
                    }
                }
            }
            self.heat.record_weighted_epoch(weighted);
        } else {
            self.heat.record_epoch(credited);
        }
        self.last_counts = counts;
        Ok(touched)
    }

    /// Re-arms the next slice of frames, and of `touched` (the frames found touched in the
    /// epoch just ended) the hottest that fit the recheck budget and are not in the slice.
    fn rearm_next_sample(&mut self, mut touched: Vec<u64>) -> Result<(), ProfilerError> {
        let Some(sampler) = self.sampler.as_mut() else {
            return Ok(());
        };
        let frames = sampler.frames();
        if frames == 0 {
            return Ok(());
        }
        let mut wanted =
            ((frames as f64 * self.config.sample_fraction).ceil() as u64).clamp(1, frames);
        let mut budget = (frames as f64 * self.config.recheck_fraction).floor() as usize;
        if let Some(spend) = &self.spend {
            // Rechecks are frames just found touched, as likely to fault as any: the budget
            // pays for them first, out of what the slice would have had.
            let affordable = spend.frames_to_arm(wanted + budget as u64);
            budget = budget.min(affordable as usize);
            wanted = (affordable - budget as u64).min(wanted);
            if wanted == 0 && budget == 0 {
                return Ok(());
            }
        }
        let start = self.sample_cursor % frames;
        let first = start..(start + wanted).min(frames);
        let wrapped = 0..wanted - (first.end - first.start);
        touched.retain(|page| *page < frames && !first.contains(page) && !wrapped.contains(page));
        let rechecks = hottest_ranges(touched, budget, &self.heat);
        // Before the re-arming: a frame the guest touches while the call still runs has
        // waited at most this long.
        self.armed_at_ns = crate::probes::monotonic_ns();
        for range in [first, wrapped].into_iter().chain(rechecks) {
            if !range.is_empty() {
                sampler.rearm_writes(range.clone())?;
                sampler.rearm_accesses(range.clone())?;
                self.armed.push(range);
            }
        }
        self.sweep_closes = start + wanted >= frames;
        self.sample_cursor = (start + wanted) % frames;
        Ok(())
    }

    /// Runs epochs for `duration` (rounded up to whole epochs), until the target exits, or,
    /// with a budget, until the faults counted cost the budget's share of `duration`: a burst
    /// spends no more than its share of the time it was given, however soon. The last epoch
    /// re-arms nothing: no epoch would read what a re-arming found, and every frame re-armed
    /// is a fault the target takes after the profile (a dropped host mapping faulted back in,
    /// which KVM also marks dirty). Returns whether the target exited early.
    pub fn run_for(&mut self, duration: Duration) -> Result<bool, ProfilerError> {
        self.run_for_while(duration, || true)
    }

    /// As [`Self::run_for`], and ends early too once `keep_going` says no (asked after each
    /// epoch): a caller that can see the target's own progress stops a profile that costs it
    /// more than the faults show.
    pub fn run_for_while(
        &mut self,
        duration: Duration,
        mut keep_going: impl FnMut() -> bool,
    ) -> Result<bool, ProfilerError> {
        let deadline = Instant::now() + duration;
        let mut next = Instant::now() + self.config.interval;
        loop {
            thread::sleep(next.saturating_duration_since(Instant::now()));
            // The epoch is read before anything is re-armed, so one that spends the rest of
            // the budget is the last, and a burst overshoots by at most that epoch.
            let touched = self.record_epoch()?;
            if !self.target_alive() {
                return Ok(true);
            }
            let spent = self.spend.as_ref().is_some_and(|s| s.exhausted(duration));
            if spent || Instant::now() >= deadline || !keep_going() {
                return Ok(false);
            }
            self.rearm_next_sample(touched)?;
            next += self.config.interval;
        }
    }

    /// What re-arming has cost the target so far, if the profile has a budget.
    pub fn spent(&self) -> Option<Spent> {
        self.spend.as_ref().map(|spend| Spent {
            sweep_agreement: self.pace.as_ref().and_then(Pace::agreement),
            ..spend.spent()
        })
    }

    /// Faults lost to a full map so far (over all targets of these probes).
    pub fn dropped(&self) -> Result<u64, ProfilerError> {
        Ok(self.probes.stats()?.dropped)
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        // Nothing useful can be done with a failure here; the probes are torn down with their
        // owner anyway.
        let _ = self.probes.untrack(self.id);
    }
}

/// What one check of a frame is worth, given how long after its re-arming the guest first
/// touched it (`wait_ns`, if the probes timed it) in an epoch of `epoch_ns`: `1 + ln(epoch /
/// wait)`, the wait taken between a 1024th of the epoch and the whole epoch, so from 1 (a
/// touch at the epoch's end, or an untimed one) to about 7.9.
pub fn touch_weight(wait_ns: Option<u64>, epoch_ns: u64) -> f64 {
    let Some(wait) = wait_ns else {
        return 1.0;
    };
    let epoch = epoch_ns.max(1);
    let wait = wait.clamp((epoch / 1024).max(1), epoch);
    1.0 + (epoch as f64 / wait as f64).ln()
}

/// Of `pages`, the `budget` hottest by `heat`, as sorted ranges of neighbouring pages.
fn hottest_ranges(mut pages: Vec<u64>, budget: usize, heat: &HeatMap) -> Vec<Range<u64>> {
    if pages.len() > budget {
        pages.select_nth_unstable_by(budget, |a, b| heat.heat_of(*b).total_cmp(&heat.heat_of(*a)));
        pages.truncate(budget);
    }
    pages.sort_unstable();
    pages
        .chunk_by(|a, b| a + 1 == *b)
        .filter_map(|run| Some(*run.first()?..*run.last()? + 1))
        .collect()
}

/// The pages of one epoch's counts that were touched and lie in one of `armed` (disjoint
/// ranges, sorted by start).
fn touched_within(epoch: Vec<(u64, PageCounts)>, armed: &[Range<u64>]) -> Vec<(u64, PageCounts)> {
    let armed_at = |page: u64| {
        let after = armed.partition_point(|range| range.start <= page);
        after > 0 && armed[after - 1].contains(&page)
    };
    epoch
        .into_iter()
        .filter(|(page, c)| (c.reads, c.writes) != (0, 0) && armed_at(*page))
        .collect()
}

// Hand-written where a crate exists: procfs would do these two look-ups (`Process::new`,
// `tasks`), but it and procfs-core are 14,500 lines that took 11.6 s to build here, for a
// directory test and a directory listing.
fn process_exists(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Thread ids of process `pid`; empty if it is gone.
pub fn threads_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(reads: u64, writes: u64) -> PageCounts {
        PageCounts { reads, writes }
    }

    #[test]
    fn only_touched_pages_of_the_armed_slices_are_credited() {
        let epoch = vec![
            (3, counts(1, 0)),
            (4, counts(0, 0)),
            (9, counts(0, 1)),
            (10, counts(2, 1)),
            (20, counts(1, 1)),
            (41, counts(0, 1)),
        ];
        // A wrapped slice (its start of memory and its end), sorted by start.
        let armed = [0..5, 8..12];
        assert_eq!(
            touched_within(epoch.clone(), &armed),
            vec![(3, counts(1, 0)), (9, counts(0, 1)), (10, counts(2, 1))]
        );
        assert!(touched_within(epoch, &[]).is_empty());
    }

    #[test]
    fn a_sooner_touch_weighs_more_within_bounds() {
        let epoch = 200_000_000;
        assert_eq!(touch_weight(None, epoch), 1.0);
        assert_eq!(touch_weight(Some(epoch), epoch), 1.0);
        assert_eq!(touch_weight(Some(10 * epoch), epoch), 1.0);
        let at_once = 1.0 + 1024f64.ln();
        assert!((touch_weight(Some(0), epoch) - at_once).abs() < 1e-5);
        assert!((touch_weight(Some(1), epoch) - at_once).abs() < 1e-5);
        let tenth = touch_weight(Some(epoch / 10), epoch);
        assert!((tenth - (1.0 + 10f64.ln())).abs() < 1e-9, "{tenth}");
        assert!(touch_weight(Some(epoch / 100), epoch) > tenth);
        assert_eq!(touch_weight(Some(5), 0), 1.0);
    }

    #[test]
    fn rechecks_take_the_hottest_touched_pages_within_the_budget() {
        let mut heat = HeatMap::new(HeatConfig::default()).unwrap();
        heat.record_epoch([
            (7, counts(5, 0)),
            (8, counts(4, 0)),
            (2, counts(1, 0)),
            (30, counts(3, 0)),
            (9, counts(0, 2)),
        ]);
        let touched = vec![2, 7, 8, 9, 30];
        assert_eq!(
            hottest_ranges(touched.clone(), 3, &heat),
            vec![7..9, 30..31]
        );
        assert_eq!(
            hottest_ranges(touched.clone(), 4, &heat),
            vec![7..10, 30..31]
        );
        assert_eq!(
            hottest_ranges(touched.clone(), 10, &heat),
            vec![2..3, 7..10, 30..31]
        );
        assert!(hottest_ranges(touched, 0, &heat).is_empty());
        assert!(hottest_ranges(Vec::new(), 4, &heat).is_empty());
    }
}
