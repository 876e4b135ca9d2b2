//! Live migration between two daemons on loopback, real KVM: every built-in workload under each
//! strategy and mode arrives with identical digests and keeps checking itself with zero errors;
//! failures leave the partition running on the source.

use std::{net::SocketAddr, thread, time::Duration};

use heatprobe_tests::{
    ProcessMemory, bpf_unavailable, daemon::Daemon, guest_images::handmade_image, kvm_unavailable,
    skip, skip_part,
};
use migrator::vmm::memory::PAGE_SIZE;
use serde_json::Value;

fn launch(daemon: &Daemon, workload: &str, args: &str, mem: &str, vcpus: u32) -> String {
    daemon.json(&[
        "launch",
        "--workload",
        workload,
        "--args",
        args,
        "--mem",
        mem,
        "--vcpus",
        &vcpus.to_string(),
    ])["id"]
        .as_str()
        .expect("an id")
        .to_string()
}

/// Migrates `id` with a short profile window (the tests' guests warm up fast).
fn migrate(from: &Daemon, to: &Daemon, id: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["--profile-window", "200ms"];
    args.extend_from_slice(extra);
    from.migrate(to, id, &args)
}

fn checks_and_ops(status: &Value) -> (u64, u64) {
    (
        status["ops"].as_u64().unwrap_or(0),
        status["checks"].as_u64().unwrap_or(0),
    )
}

#[test]
fn every_workload_migrates_under_each_strategy_and_mode() {
    if let Some(why) = kvm_unavailable() {
        return skip("every_workload_migrates_under_each_strategy_and_mode", &why);
    }
    let strategies: Vec<&str> = match bpf_unavailable() {
        None => vec!["heat", "address"],
        Some(why) => {
            skip_part(
                "the heat strategy of every_workload_migrates_under_each_strategy_and_mode",
                &why,
            );
            vec!["address"]
        }
    };
    let source = Daemon::start();
    let destination = Daemon::start();
    let workloads = [
        ("kv-zipf", "keys=4096 check_every=20000", 2),
        ("scan", "", 1),
        ("rw-mix", "check_every=20000", 1),
        ("uniform-write", "check_every=20000", 1),
        ("hotspot", "scatter=1 check_every=20000", 1),
        ("graded", "scatter=1 check_every=20000", 1),
        ("idle", "", 1),
    ];
    for (workload, args, vcpus) in workloads {
        for strategy in &strategies {
            for mode in ["precopy", "hybrid"] {
                let case = format!("{workload} {strategy} {mode}");
                let id = launch(&source, workload, args, "32M", vcpus);
                let checks = if workload == "idle" { 0 } else { 1 };
                source.wait_progress(&id, 5, checks);
                let mut args = vec!["--profile-window", "200ms"];
                args.extend(["--strategy", strategy, "--mode", mode]);
                let (report, new_id) = source.migrate_checked(&destination, &id, &args, &case);
                assert_eq!(report["strategy"], *strategy);
                assert_eq!(report["mode"], mode);
                assert_eq!(report["pages_total"], 32 * 256);
                assert!(
                    report["pages_sent"].as_u64().unwrap() >= 32 * 256,
                    "{case}: {report}"
                );
                // The source released its copy; the destination's keeps checking itself.
                assert_eq!(source.json(&["status", &id])["state"], "stopped", "{case}");
                destination.runs_clean(&new_id, 5, checks, &case);
                destination.json(&["stop", &new_id]);
            }
        }
    }
}

#[test]
fn a_guest_the_project_never_saw_migrates_under_each_strategy_and_mode() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_guest_the_project_never_saw_migrates_under_each_strategy_and_mode",
            &why,
        );
    }
    let strategies: Vec<&str> = match bpf_unavailable() {
        None => vec!["heat", "address"],
        Some(why) => {
            skip_part(
                "the heat strategy of a_guest_the_project_never_saw_migrates",
                &why,
            );
            vec!["address"]
        }
    };
    let dir = std::env::temp_dir().join(format!("migrator-migrate-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("handmade.elf");
    std::fs::write(&image, handmade_image()).unwrap();
    let image = image.to_str().unwrap().to_string();
    let source = Daemon::start();
    let destination = Daemon::start();
    for strategy in &strategies {
        for mode in ["precopy", "hybrid"] {
            let case = format!("handmade {strategy} {mode}");
            let id = source.json(&["launch", "--image", &image, "--mem", "16M"])["id"]
                .as_str()
                .unwrap()
                .to_string();
            source.wait_progress(&id, 1_000_000, 0);
            let (code, report) = migrate(
                &source,
                &destination,
                &id,
                &["--strategy", strategy, "--mode", mode],
            );
            assert_eq!(code, 0, "{case}: {report}");
            assert_eq!(
                report["source_digest"], report["dest_digest"],
                "{case}: {report}"
            );
            let new_id = report["id_on_destination"].as_str().unwrap().to_string();
            let status = destination.json(&["status", &new_id]);
            assert!(
                status["console"]
                    .as_str()
                    .unwrap()
                    .contains("handmade guest up"),
                "{case}"
            );
            let (ops, _) = checks_and_ops(&status);
            destination.wait_progress(&new_id, ops + 1_000_000, 0);
            destination.json(&["stop", &new_id]);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether `migrator migrations --json` shows a migration sending round 0.
fn in_round_0(migrations: &Value) -> bool {
    migrations.as_array().is_some_and(|all| {
        all.iter().any(|m| {
            m["phase"] == "precopy"
                && m["progress"]["round"] == 0
                && m["progress"]["bytes_sent"].as_u64() > Some(0)
        })
    })
}

#[test]
fn killing_the_destination_in_round_0_leaves_the_source_running() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "killing_the_destination_in_round_0_leaves_the_source_running",
            &why,
        );
    }
    let source = Daemon::start();
    let mut destination = Daemon::start();
    let id = launch(&source, "kv-zipf", "check_every=200000", "256M", 1);
    source.wait_progress(&id, 1000, 1);
    // The destination's host dies (its daemon and the partition process receiving) once the
    // source says round 0 is under way: kv-zipf fills three quarters of 256 MiB with values,
    // so at 40 MB/s round 0 lasts about five seconds.
    let kill = destination.host_killer();
    let (code, report) = thread::scope(|s| {
        s.spawn(|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !in_round_0(&source.json(&["migrations"])) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round 0 never started"
                );
                thread::sleep(Duration::from_millis(50));
            }
            kill();
        });
        migrate(
            &source,
            &destination,
            &id,
            &["--strategy", "address", "--bandwidth-limit", "40M"],
        )
    });
    let _ = destination.child.wait();
    assert_ne!(code, 0, "{report}");
    assert_eq!(report["status"], "failed", "{report}");
    assert!(
        report["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{report}"
    );
    assert_eq!(report["rounds"], 0, "the kill landed in round 0: {report}");
    // Nothing lost: the partition runs on the source and keeps passing its self-checks.
    let status = source.json(&["status", &id]);
    assert_eq!(status["state"], "running", "{status}");
    let (ops, checks) = checks_and_ops(&status);
    source.wait_progress(&id, ops + 1000, checks + 1);
}

#[test]
fn a_peer_with_an_incompatible_version_is_refused() {
    if let Some(why) = kvm_unavailable() {
        return skip("a_peer_with_an_incompatible_version_is_refused", &why);
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (addr, serving) = runtime
        .block_on(migrator::api::listener::listen_and_serve(
            migrator::daemon::server::Daemon::with_api_version(listen, 99),
            migrator::tls::Security::Plain,
            listen,
        ))
        .unwrap();
    runtime.spawn(serving);
    let source = Daemon::start();
    let id = launch(&source, "idle", "", "8M", 1);
    let output = std::process::Command::new(heatprobe_tests::workspace_bin("migrator"))
        .args([
            "migrate",
            "--from",
            &source.addr,
            "--to",
            &addr.to_string(),
            &id,
        ])
        .output()
        .unwrap();
    assert_ne!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("API version 99"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(source.json(&["status", &id])["state"], "running");
}

#[test]
fn migrating_an_unknown_id_fails_cleanly() {
    if let Some(why) = kvm_unavailable() {
        return skip("migrating_an_unknown_id_fails_cleanly", &why);
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    let (code, stdout, stderr) = {
        let output = std::process::Command::new(heatprobe_tests::workspace_bin("migrator"))
            .args([
                "migrate",
                "--from",
                &source.addr,
                "--to",
                &destination.addr,
                "p-nope",
            ])
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_ne!(code, Some(0));
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("no partition with id `p-nope`"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn zero_pages_arrive_without_becoming_resident() {
    if let Some(why) = kvm_unavailable() {
        return skip("zero_pages_arrive_without_becoming_resident", &why);
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    // An idle guest touches a few pages of its 256 MiB: nearly every page travels as a zero
    // marker. Writing those would make all 256 MiB resident on the destination.
    let id = launch(&source, "idle", "", "256M", 1);
    source.wait_progress(&id, 1, 0);
    let (code, report) = migrate(&source, &destination, &id, &["--strategy", "address"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["source_digest"], report["dest_digest"], "{report}");
    let zero_pages = report["zero_pages"].as_u64().unwrap_or(0);
    assert!(zero_pages > 60_000, "{report}");
    // The partition's own process holds its guest memory, and nothing else does.
    let moved = report["id_on_destination"]
        .as_str()
        .expect("an id on the destination");
    let status = destination.json(&["status", moved]);
    let pid = status["pid"].as_u64().expect("the partition's process") as u32;
    let grown = ProcessMemory::of(pid).rss_shmem;
    assert!(
        grown < 32 << 20,
        "the destination made {} MiB of a mostly zero 256 MiB guest resident",
        grown >> 20
    );
}

#[test]
fn pages_striped_across_connections_arrive_whole_in_each_mode_plain_and_tls() {
    use heatprobe_tests::daemon::{DaemonConfig, make_certs};
    if let Some(why) = kvm_unavailable() {
        return skip(
            "pages_striped_across_connections_arrive_whole_in_each_mode_plain_and_tls",
            &why,
        );
    }
    let certs = make_certs(&["127.0.0.1"]).expect("certificates");
    for tls in [false, true] {
        let config = || DaemonConfig::default().tls(tls.then(|| certs.dir()));
        let source = Daemon::try_start(config()).expect("source daemon");
        let destination = Daemon::try_start(config()).expect("destination daemon");
        for mode in ["precopy", "hybrid"] {
            let case = format!("3 connections, {mode}, tls {tls}");
            // Written as fast as it can: pages go again, and the newest copy must be the one
            // that stays. (That every copy keeps to its page's connection, which is what
            // makes it so, is the unit test in `source::stripes`: on loopback the receivers
            // keep up, and copies sent on the wrong connections still arrived in order here.)
            let id = launch(&source, "uniform-write", "check_every=20000", "64M", 1);
            source.wait_progress(&id, 5, 1);
            // Compressed in hybrid mode: each connection compresses its own frames.
            let compress = if mode == "hybrid" { "lz4" } else { "none" };
            let args = [
                "--strategy",
                "address",
                "--mode",
                mode,
                "--connections",
                "3",
                "--compress",
                compress,
            ];
            let (report, new_id) = migrate_and_check(&source, &destination, &id, &args, &case);
            assert!(
                report["pages_resent"].as_u64() > Some(0),
                "{case}: {report}"
            );
            destination.runs_clean(&new_id, 5, 1, &case);
            destination.json(&["stop", &new_id]);
        }
    }
}

fn migrate_and_check(
    source: &Daemon,
    destination: &Daemon,
    id: &str,
    args: &[&str],
    case: &str,
) -> (Value, String) {
    let mut all = vec!["--profile-window", "200ms"];
    all.extend_from_slice(args);
    source.migrate_checked(destination, id, &all, case)
}

#[test]
fn a_bad_number_of_connections_is_refused_and_changes_nothing() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_bad_number_of_connections_is_refused_and_changes_nothing",
            &why,
        );
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    let id = launch(&source, "idle", "", "8M", 1);
    for bad in ["0", "17"] {
        let (code, report) = migrate(&source, &destination, &id, &["--connections", bad]);
        assert_ne!(code, 0, "--connections {bad}: {report}");
        assert_eq!(source.json(&["status", &id])["state"], "running");
    }
}

#[test]
fn a_compressible_guest_migrates_compressed_with_each_codec() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_compressible_guest_migrates_compressed_with_each_codec",
            &why,
        );
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    // (content, --compress, mode, the least and the most compression ratio expected)
    let cases = [
        ("text", "lz4", "precopy", 2.0, 4.0),
        ("text", "zstd", "precopy", 3.0, 6.0),
        ("text", "zstd:-3", "hybrid", 2.0, 6.0),
        ("text", "lz4", "hybrid", 2.0, 4.0),
        ("text", "none", "precopy", 1.0, 1.0),
        // Random pages do not save an eighth: they travel as they are.
        ("random", "zstd", "precopy", 1.0, 1.05),
        ("random", "lz4", "precopy", 1.0, 1.05),
        // On loopback the link may outrun LZ4: auto compresses what it finds worth it.
        ("text", "auto", "precopy", 1.0, 4.0),
        ("text", "auto", "hybrid", 1.0, 4.0),
    ];
    for (content, compress, mode, least, most) in cases {
        let case = format!("fill content={content} --compress {compress} --mode {mode}");
        let args = format!("content={content} check_every=20000 rate=20000");
        let id = launch(&source, "fill", &args, "32M", 1);
        source.wait_progress(&id, 5, 1);
        let (report, new_id) = source.migrate_checked(
            &destination,
            &id,
            &[
                "--strategy",
                "address",
                "--mode",
                mode,
                "--compress",
                compress,
            ],
            &case,
        );
        let sent = report["bytes_sent"].as_u64().expect("bytes_sent");
        let uncompressed = report["bytes_uncompressed"]
            .as_u64()
            .expect("bytes_uncompressed");
        let ratio = report["compression_ratio"].as_f64().expect("a ratio");
        // Every page went at least once. A zero page travels as its 8-byte entry alone, so
        // the uncompressed bytes are every entry and every data page sent, plus each frame's
        // header (one a page at most), not all 32 MiB: where few pages go again (hybrid)
        // the guest's zero pages left them short of it.
        let count = |field: &str| report[field].as_u64().expect(field);
        let (pages, zeros) = (count("pages_sent"), count("zero_pages"));
        assert_eq!(count("pages_total"), (32 << 20) / PAGE_SIZE, "{case}");
        assert!(pages >= count("pages_total"), "{case}: {report}");
        let entries_and_data = 8 * pages + PAGE_SIZE * (pages - zeros);
        assert!(
            (entries_and_data..=entries_and_data + 24 * pages).contains(&uncompressed),
            "{case}: {uncompressed} bytes for {pages} pages, {zeros} of them zero: {report}"
        );
        assert!(
            (ratio - uncompressed as f64 / sent as f64).abs() < 1e-9,
            "{case}: {report}"
        );
        assert!((least..=most).contains(&ratio), "{case}: ratio {ratio}");
        if compress == "none" {
            assert_eq!(sent, uncompressed, "{case}");
        }
        // Round 0's effective rate is its wire rate times what compression saved there. In
        // pre-copy round 0 is nearly all that was sent, so the two ratios agree within a
        // tenth; in hybrid the demanded pages go uncompressed on the urgent connection, so
        // the whole migration's ratio is the lower.
        let (effective, wire) = (
            report["round0_mbps"].as_f64().unwrap(),
            report["round0_wire_mbps"].as_f64().unwrap(),
        );
        let round0_ratio = effective / wire;
        let agrees = match mode {
            "precopy" => (round0_ratio - ratio).abs() <= 0.1 * ratio,
            _ => round0_ratio >= 0.9 * ratio && round0_ratio <= most * 1.1,
        };
        assert!(agrees, "{case}: {effective} over {wire}, ratio {ratio}");
        eprintln!(
            "{case}: {uncompressed} bytes as {sent} ({ratio:.2}x), {pages} pages ({zeros} zero), \
             round 0 {effective:.0} Mbit/s over {wire:.0}"
        );
        // The destination's guest checks every word of every page.
        destination.runs_clean(&new_id, 5, 1, &case);
        destination.json(&["stop", &new_id]);
    }
}

#[test]
fn a_bad_compression_is_refused_with_one_clear_error() {
    let source = Daemon::start();
    let destination = Daemon::start();
    for bad in ["gzip", "zstd:99", "zstd:", "lz4:1"] {
        let (code, report) = source.migrate(&destination, "p0", &["--compress", bad]);
        assert_ne!(code, 0, "{bad}");
        let stderr = report.as_str().unwrap_or_default();
        assert!(
            stderr.contains(&format!(
                "`{bad}` is not a compression: none, lz4, zstd or zstd:LEVEL"
            )),
            "{bad}: {stderr}"
        );
    }
}

/// A hybrid session that finished answers `finish` again with the same digest, for a source
/// whose first answer was lost; a session that never was is refused.
#[test]
fn a_finished_hybrid_session_answers_finish_again() {
    use migrator::{
        api::client::{Connection, context_with},
        tls::Security,
    };
    if let Some(why) = kvm_unavailable() {
        return skip("a_finished_hybrid_session_answers_finish_again", &why);
    }
    let source = Daemon::start();
    let destination = Daemon::start();
    let id = launch(&source, "rw-mix", "", "16M", 1);
    source.wait_progress(&id, 1_000, 0);
    let (code, report) = migrate(
        &source,
        &destination,
        &id,
        &["--strategy", "address", "--mode", "hybrid"],
    );
    assert_eq!(code, 0, "{report}");
    let digest = report["dest_digest"]
        .as_str()
        .expect("a digest")
        .to_string();
    // The session the partition arrived by, as its process's record in the destination's
    // runtime directory says.
    let moved = report["id_on_destination"].as_str().unwrap();
    let record: Value = serde_json::from_slice(
        &std::fs::read(
            destination
                .runtime_dir()
                .unwrap()
                .join(format!("{moved}.json")),
        )
        .expect("the arrived partition's record"),
    )
    .unwrap();
    let arrived_by = record["session"].as_u64().expect("a session");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answers: Vec<String> = runtime.block_on(async {
        let addr: SocketAddr = destination.addr.parse().unwrap();
        let connection = Connection::open(addr, &Security::Plain).await.unwrap();
        let mut answers = Vec::new();
        // The session's answer again, and no answer for sessions it never had.
        for session in [arrived_by, arrived_by ^ 1, 0] {
            let answer = connection
                .client
                .migration_finish(context_with(Duration::from_secs(10)), session)
                .await
                .unwrap();
            if let Ok(finished) = answer {
                answers.push(finished.dest_digest);
            }
        }
        answers
    });
    assert_eq!(answers, vec![digest]);
    destination.json(&["stop", moved]);
}
