//! What a drain reports: one entry per partition of the source, moved or not and why, with
//! its migration's report when it had one.

use migrator::migration::{MigrationReport, MigrationStatus};
use serde::Serialize;

/// How one partition fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Fate {
    /// It runs on its destination.
    Moved,
    /// Its migration ended without moving it (failed, cancelled, refused): where it runs is
    /// the report's `guest_location`, on the source but for a migration past its handover.
    Failed,
    /// No migration was started for it: it stays where it was.
    NotMoved,
}

/// One partition of the source, as the drain left it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) name: Option<String>,
    pub(crate) mem_bytes: u64,
    pub(crate) fate: Fate,
    /// The destination it was sent to, if it was.
    pub(crate) to: Option<String>,
    /// Its id there, once it runs there.
    pub(crate) id_on_destination: Option<String>,
    /// Why it did not move.
    pub(crate) why: Option<String>,
    /// Its share of `--bandwidth` when its migration started, bytes per second.
    pub(crate) bandwidth_limit: Option<u64>,
    /// When its migration started and ended, in ms from the drain's start.
    pub(crate) started_ms: Option<u64>,
    pub(crate) ended_ms: Option<u64>,
    pub(crate) report: Option<MigrationReport>,
}

impl Entry {
    /// A partition no migration was started for.
    pub(crate) fn not_moved(id: String, name: Option<String>, mem_bytes: u64, why: String) -> Self {
        Self {
            id,
            name,
            mem_bytes,
            fate: Fate::NotMoved,
            to: None,
            id_on_destination: None,
            why: Some(why),
            bandwidth_limit: None,
            started_ms: None,
            ended_ms: None,
            report: None,
        }
    }

    /// Settles the entry with what its migration came to.
    pub(crate) fn settle(&mut self, outcome: anyhow::Result<MigrationReport>, ended_ms: u64) {
        self.ended_ms = Some(ended_ms);
        match outcome {
            Ok(report) => {
                if report.status == MigrationStatus::Completed {
                    self.fate = Fate::Moved;
                    self.id_on_destination = report.id_on_destination.clone();
                } else {
                    self.fate = Fate::Failed;
                    let why = report
                        .error
                        .clone()
                        .unwrap_or_else(|| report.status.to_string());
                    self.why = Some(format!("{why}; {}", report.guest_location));
                }
                self.report = Some(report);
            }
            Err(e) => {
                self.fate = Fate::Failed;
                self.why = Some(format!("{e:#}"));
            }
        }
    }
}

/// The one JSON object `drain --json` prints.
#[derive(Debug, Serialize)]
pub(crate) struct Drain {
    pub(crate) from: String,
    pub(crate) to: Vec<String>,
    pub(crate) parallel: usize,
    pub(crate) bandwidth: Option<u64>,
    pub(crate) cancelled: bool,
    pub(crate) elapsed_ms: u64,
    pub(crate) moved: usize,
    pub(crate) not_moved: usize,
    pub(crate) partitions: Vec<Entry>,
}

impl Drain {
    /// Counts what moved and what did not.
    pub(crate) fn tally(&mut self) {
        self.moved = self
            .partitions
            .iter()
            .filter(|e| e.fate == Fate::Moved)
            .count();
        self.not_moved = self.partitions.len() - self.moved;
    }

    /// The partitions that did not move, by id.
    pub(crate) fn left_behind(&self) -> Vec<&str> {
        self.partitions
            .iter()
            .filter(|e| e.fate != Fate::Moved)
            .map(|e| e.id.as_str())
            .collect()
    }

    pub(crate) fn text(&self) -> String {
        let mut out = format!(
            "drained {} of {} partitions from {} in {:.1} s{}\n",
            self.moved,
            self.partitions.len(),
            self.from,
            self.elapsed_ms as f64 / 1e3,
            if self.cancelled { " (cancelled)" } else { "" }
        );
        for e in &self.partitions {
            let line = match e.fate {
                Fate::Moved => {
                    let downtime = e.report.as_ref().map_or(0, |r| r.downtime_ms);
                    format!(
                        "  {:<20} moved to {} as {} (downtime {downtime} ms)",
                        e.id,
                        e.to.as_deref().unwrap_or("?"),
                        e.id_on_destination.as_deref().unwrap_or("?"),
                    )
                }
                Fate::Failed | Fate::NotMoved => format!(
                    "  {:<20} NOT MOVED{}: {}",
                    e.id,
                    e.to.as_deref()
                        .map(|to| format!(" (to {to})"))
                        .unwrap_or_default(),
                    e.why.as_deref().unwrap_or("?")
                ),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use migrator::migration::{Mode, Strategy};

    use super::*;

    #[test]
    fn every_partition_is_named_with_its_fate() {
        let mut moved = Entry::not_moved("p0".into(), None, 1 << 26, String::new());
        moved.to = Some("10.0.0.2:7700".into());
        let mut report = MigrationReport::new(Strategy::Address, Mode::Precopy);
        report.status = MigrationStatus::Completed;
        report.id_on_destination = Some("p7".into());
        moved.settle(Ok(report), 900);
        let mut failed = Entry::not_moved("p1".into(), None, 1 << 26, String::new());
        failed.settle(Err(anyhow::anyhow!("this daemon is full")), 1000);
        let too_big =
            Entry::not_moved("p2".into(), None, 1 << 30, "no destination has room".into());
        let mut drain = Drain {
            from: "10.0.0.1:7700".into(),
            to: vec!["10.0.0.2:7700".into()],
            parallel: 2,
            bandwidth: None,
            cancelled: false,
            elapsed_ms: 1500,
            moved: 0,
            not_moved: 0,
            partitions: vec![moved, failed, too_big],
        };
        drain.tally();
        assert_eq!((drain.moved, drain.not_moved), (1, 2));
        assert_eq!(drain.left_behind(), ["p1", "p2"]);
        let text = drain.text();
        assert!(text.starts_with("drained 1 of 3 partitions"), "{text}");
        assert!(text.contains("p0") && text.contains("as p7"), "{text}");
        assert!(
            text.contains("p1                   NOT MOVED: this daemon is full"),
            "{text}"
        );
        assert!(text.contains("no destination has room"), "{text}");
        let json = serde_json::to_value(&drain).unwrap();
        assert_eq!(json["partitions"][0]["fate"], "moved");
        assert_eq!(json["partitions"][2]["fate"], "not-moved");
    }
}
