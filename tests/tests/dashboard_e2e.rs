//! The demo as a newcomer meets it: `cargo xtask run`'s dashboard under tmux, `m` migrates the
//! partition with the convergence chart filling in, `q` quits and leaves nothing running.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use heatprobe_tests::{bpf_unavailable, kvm_unavailable, skip, workspace_bin};

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux").args(args).output().expect("tmux runs")
}

fn screen(session: &str) -> String {
    String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", session]).stdout).into_owned()
}

fn wait_for(session: &str, what: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = screen(session);
        if text.contains(what) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "waited for {what:?}; the screen shows:\n{text}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Processes whose environment carries `mark`.
fn marked_processes(mark: &str) -> Vec<String> {
    let needle = format!("HPDEMO_MARK={mark}");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| {
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|v| v == needle.as_bytes())
                .then(|| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

#[test]
fn the_demo_migrates_on_m_and_quits_clean_on_q() {
    if let Some(why) = kvm_unavailable().or_else(bpf_unavailable) {
        return skip("the_demo_migrates_on_m_and_quits_clean_on_q", &why);
    }
    if Command::new("tmux").arg("-V").output().is_err() {
        panic!("tmux is missing; `cargo xtask setup` installs it");
    }
    let mark = format!(
        "{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let session = format!("hpdemo-{}", std::process::id());
    let command = format!(
        "HPDEMO_MARK={mark} {} run --skip-build",
        workspace_bin("xtask").display()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "120",
        "-y",
        "40",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    let first = wait_for(&session, "workload rw-mix", Duration::from_secs(60));
    assert!(first.contains("memory heat"), "{first}");
    // Heat fills in once the daemon's profiler has a few epochs.
    wait_for(&session, "K/cell", Duration::from_secs(30));
    tmux(&["send-keys", "-t", &session, "m"]);
    let migrated = wait_for(&session, "migrated in", Duration::from_secs(120));
    assert!(migrated.contains("dirty pages per round"), "{migrated}");
    assert!(migrated.contains("errors 0"), "{migrated}");
    println!("{migrated}");
    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tmux(&["has-session", "-t", &session]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the demo did not quit:\n{}",
            screen(&session)
        );
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(500));
    let left = marked_processes(&mark);
    assert!(left.is_empty(), "left running: {left:?}");
}
