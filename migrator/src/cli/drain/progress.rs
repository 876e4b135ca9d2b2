//! A drain's progress bars: one line for the drain, one for each migration in flight, on
//! stderr when it is a terminal and the output is not JSON; nothing otherwise.

use std::collections::BTreeMap;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub(crate) struct Progress {
    bars: Option<Bars>,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    flights: BTreeMap<String, ProgressBar>,
}

impl Progress {
    /// Bars for a drain of `partitions`, if `shown`.
    pub(crate) fn new(partitions: usize, shown: bool) -> Self {
        let bars = shown.then(|| {
            let multi = MultiProgress::new();
            let overall = multi.add(ProgressBar::new(partitions as u64));
            overall.set_style(
                ProgressStyle::with_template("{elapsed:>4} [{bar:24}] {pos}/{len} settled {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            Bars {
                multi,
                overall,
                flights: BTreeMap::new(),
            }
        });
        Self { bars }
    }

    /// A migration of `partition` to `to` started.
    pub(crate) fn started(&mut self, partition: &str, to: &str) {
        let Some(bars) = &mut self.bars else { return };
        let bar = bars.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(format!("{partition} → {to}"));
        bars.flights.insert(partition.to_string(), bar);
    }

    /// What partition `partition`'s migration says of itself now.
    pub(crate) fn update(&self, partition: &str, line: String) {
        if let Some(bar) = self.bars.as_ref().and_then(|b| b.flights.get(partition)) {
            bar.set_message(line);
            bar.tick();
        }
    }

    /// Partition `partition` is settled, moved or not.
    pub(crate) fn settled(&mut self, partition: &str) {
        let Some(bars) = &mut self.bars else { return };
        if let Some(bar) = bars.flights.remove(partition) {
            bar.finish_and_clear();
            bars.multi.remove(&bar);
        }
        bars.overall.inc(1);
    }

    pub(crate) fn say(&self, what: &str) {
        if let Some(bars) = &self.bars {
            bars.overall.set_message(what.to_string());
        }
    }

    pub(crate) fn finish(self) {
        if let Some(bars) = self.bars {
            for bar in bars.flights.values() {
                bar.finish_and_clear();
            }
            bars.overall.finish_and_clear();
        }
    }
}
