//! The runtime directory: what a supervisor leaves for its successor. For each partition
//! process, `ID.json` (a [`Record`]: which process, started when, hosting what), `ID.sock`
//! (its API) and `ID.log` (what it printed).
//!
//! A record names its process by pid *and* start time, so a pid the kernel reused for
//! another process is never taken for a partition.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::SupervisorError;

/// A partition process as the runtime directory records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The partition's id, which is also the name of its files.
    pub id: String,
    /// The incoming migration session it was started for, if any.
    pub session: Option<u64>,
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`, field 22).
    pub start_time: u64,
    /// What it hosts, for the record of a process that ended unseen.
    pub name: Option<String>,
    pub image: String,
    pub mem_bytes: u64,
    pub vcpus: u32,
}

/// A supervisor's runtime directory.
#[derive(Clone, Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Opens `path`, creating it owner-only if needed.
    pub fn open(path: &Path) -> Result<Self, SupervisorError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let failed = |source| SupervisorError::RuntimeDir {
            path: path.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(failed)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn socket(&self, id: &str) -> PathBuf {
        self.path.join(format!("{id}.sock"))
    }

    pub fn log(&self, id: &str) -> PathBuf {
        self.path.join(format!("{id}.log"))
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.path.join(format!("{id}.json"))
    }

    /// Writes `record` whole or not at all (a new file renamed over the old).
    pub fn write(&self, record: &Record) -> Result<(), SupervisorError> {
        let path = self.record_path(&record.id);
        let temporary = self.path.join(format!(".{}.json.new", record.id));
        let failed = |source| SupervisorError::RuntimeDir {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(record).map_err(|e| failed(io::Error::other(e)))?;
        std::fs::write(&temporary, bytes).map_err(failed)?;
        std::fs::rename(&temporary, &path).map_err(failed)
    }

    /// Forgets partition `id`: its record and socket, and its log unless `keep_log`.
    pub fn remove(&self, id: &str, keep_log: bool) {
        let _ = std::fs::remove_file(self.record_path(id));
        let _ = std::fs::remove_file(self.socket(id));
        if !keep_log {
            let _ = std::fs::remove_file(self.log(id));
        }
    }

    /// Every record left in the directory. A file that does not parse is skipped with a
    /// warning: it cannot name a process to adopt.
    pub fn records(&self) -> Result<Vec<Record>, SupervisorError> {
        let entries =
            std::fs::read_dir(&self.path).map_err(|source| SupervisorError::RuntimeDir {
                path: self.path.clone(),
                source,
            })?;
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
            {
                Ok(record) => records.push(record),
                Err(e) => tracing::warn!("ignoring {}: {e}", path.display()),
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// The last lines of partition `id`'s log, for the report of a process that died.
    pub fn log_tail(&self, id: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log(id)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The start time of live process `pid` in clock ticks since boot, or `None` if there is no
/// such process or it is a zombie (dead, not yet reaped).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, field 2, is in parentheses and may hold spaces: count from after it.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // Field 3 (the state) is fields[0]; field 22 (the start time) is fields[19].
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether `record` names a process that still runs: the same pid, started at the same time.
pub fn is_alive(record: &Record) -> bool {
    start_time(record.pid) == Some(record.start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_start_time_and_a_record_of_it_is_alive() {
        let pid = std::process::id();
        let started = start_time(pid).expect("our own start time");
        let mut record = Record {
            id: "p0-000000".into(),
            session: None,
            pid,
            start_time: started,
            name: None,
            image: "workload idle".into(),
            mem_bytes: 1 << 20,
            vcpus: 1,
        };
        assert!(is_alive(&record));
        record.start_time += 1;
        assert!(
            !is_alive(&record),
            "a reused pid is not the recorded process"
        );
    }

    #[test]
    fn records_round_trip_and_bad_files_are_skipped() {
        let path = std::env::temp_dir().join(format!("migrator-rundir-{}", std::process::id()));
        let dir = RuntimeDir::open(&path).unwrap();
        let record = Record {
            id: "p1-abcdef".into(),
            session: Some(7),
            pid: 1,
            start_time: 2,
            name: Some("web".into()),
            image: "image".into(),
            mem_bytes: 4096,
            vcpus: 2,
        };
        dir.write(&record).unwrap();
        std::fs::write(path.join("junk.json"), b"{not json").unwrap();
        assert_eq!(dir.records().unwrap(), vec![record]);
        dir.remove("p1-abcdef", false);
        assert!(dir.records().unwrap().is_empty());
        std::fs::remove_dir_all(&path).unwrap();
    }
}
