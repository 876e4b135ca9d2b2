//! The migrator daemon and CLI as a user drives them: real processes, real KVM, loopback.

use std::{path::Path, thread, time::Duration};

use heatprobe_tests::{daemon::Daemon, guest_images::handmade_image, kvm_unavailable, skip};

#[test]
fn launch_status_pause_resume_stop_over_the_cli() {
    if let Some(why) = kvm_unavailable() {
        return skip("launch_status_pause_resume_stop_over_the_cli", &why);
    }
    let daemon = Daemon::start();
    let launched = daemon.json(&[
        "launch",
        "--workload",
        "rw-mix",
        "--mem",
        "32M",
        "--vcpus",
        "2",
        "--name",
        "demo",
        "--args",
        "check_every=5000",
    ]);
    let id = launched["id"].as_str().expect("an id").to_string();
    let status = daemon.wait_progress(&id, 1000, 1);
    for key in [
        "id",
        "state",
        "ops",
        "errors",
        "checks",
        "mem_bytes",
        "vcpus",
        "console",
    ] {
        assert!(status.get(key).is_some(), "missing {key}: {status}");
    }
    assert_eq!(status["state"], "running");
    assert_eq!(status["mem_bytes"], 32 << 20);
    assert_eq!(status["vcpus"], 2);
    assert!(status["console"].as_str().unwrap().contains("rw-mix"));

    let paused = daemon.json(&["pause", &id]);
    assert_eq!(paused["state"], "paused");
    let frozen = daemon.json(&["status", &id])["ops"].clone();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(daemon.json(&["status", &id])["ops"], frozen);
    assert_eq!(daemon.json(&["resume", &id])["state"], "running");
    daemon.wait_progress(&id, frozen.as_u64().unwrap() + 1000, 2);

    let list = daemon.json(&["list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == id.as_str())
    );
    let (code, text, _) = daemon.cli(&["list"]);
    assert_eq!(code, 0);
    assert!(text.contains(&id) && text.contains("demo"), "{text}");
    // Nothing to settle: one clear error, and it runs on.
    let (code, _, err) = daemon.cli(&["reconcile", &id]);
    assert_ne!(code, 0);
    assert!(err.contains("awaits no handover"), "{err}");
    assert_eq!(daemon.json(&["status", &id])["state"], "running");
    assert!(daemon.json(&["status", &id])["awaiting_handover"].is_null());

    assert_eq!(daemon.json(&["stop", &id])["state"], "stopped");
    assert_eq!(daemon.json(&["status", &id])["state"], "stopped");
}

#[test]
fn an_image_the_project_never_saw_launches_runs_pauses_and_resumes() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "an_image_the_project_never_saw_launches_runs_pauses_and_resumes",
            &why,
        );
    }
    let dir = std::env::temp_dir().join(format!("migrator-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("handmade.elf");
    std::fs::write(&image, handmade_image()).unwrap();
    let daemon = Daemon::start();
    let id = daemon.json(&["launch", "--image", path(&image), "--mem", "16M"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = daemon.wait_progress(&id, 1_000_000, 0);
    assert!(
        status["console"]
            .as_str()
            .unwrap()
            .contains("handmade guest up")
    );
    assert_eq!(daemon.json(&["pause", &id])["state"], "paused");
    let ops = daemon.json(&["status", &id])["ops"].as_u64().unwrap();
    assert_eq!(daemon.json(&["resume", &id])["state"], "running");
    daemon.wait_progress(&id, ops + 1_000_000, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn bad_input_gets_one_clear_error_and_the_daemon_keeps_serving() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "bad_input_gets_one_clear_error_and_the_daemon_keeps_serving",
            &why,
        );
    }
    let dir = std::env::temp_dir().join(format!("migrator-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.elf");
    std::fs::write(&garbage, b"\x7fELF but not really").unwrap();
    let daemon = Daemon::start();
    let survivor = daemon.json(&["launch", "--workload", "idle", "--mem", "8M"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let cases: [(&[&str], &str); 7] = [
        (&["launch", "--workload", "no-such"], "unknown workload"),
        (
            &["launch", "--workload", "idle", "--mem", "1000001"],
            "multiple of 4096",
        ),
        (
            &["launch", "--workload", "idle", "--mem", "2000G"],
            "guest memory",
        ),
        (
            &["launch", "--image", "/nonexistent/guest.elf"],
            "cannot read the image",
        ),
        (&["launch", "--image", path(&garbage)], "bad guest image"),
        (&["status", "p-unknown"], "no partition with id"),
        (&["pause", "p-unknown"], "no partition with id"),
    ];
    for (args, expected) in cases {
        let (code, stdout, stderr) = daemon.cli(args);
        assert_ne!(code, 0, "{args:?} succeeded");
        assert!(stdout.is_empty(), "{args:?} printed {stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].contains(expected),
            "{args:?}: {stderr} (wanted {expected})"
        );
    }
    // The daemon and its partition are unharmed.
    daemon.wait_progress(&survivor, 5, 0);
    assert_eq!(daemon.json(&["list"]).as_array().unwrap().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn limits_refuse_clearly_past_them() {
    if let Some(why) = kvm_unavailable() {
        return skip("limits_refuse_clearly_past_them", &why);
    }
    let daemon = Daemon::start_with(&["--max-partitions", "2", "--max-memory", "48M"]);
    let first = daemon.json(&["launch", "--workload", "idle", "--mem", "32M"]);
    assert!(first["id"].is_string());
    let (code, stdout, stderr) = daemon.cli(&["launch", "--workload", "idle", "--mem", "32M"]);
    assert_ne!(code, 0);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("exceed this daemon's limit of 48 MiB"),
        "{stderr}"
    );
    daemon.json(&["launch", "--workload", "idle", "--mem", "8M"]);
    let (code, _, stderr) = daemon.cli(&["launch", "--workload", "idle", "--mem", "4M"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("maximum of 2 partitions"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // Stopping one frees its place.
    daemon.json(&["stop", first["id"].as_str().unwrap()]);
    daemon.json(&["launch", "--workload", "idle", "--mem", "8M"]);
}

#[test]
fn a_long_lived_daemon_remembers_a_bounded_number_of_stopped_partitions() {
    use migrator::{
        api::{
            LaunchRequest,
            client::{Connection, context_with},
            listener::listen_and_serve,
        },
        daemon::server,
        host::KEEP_STOPPED,
        tls::Security,
        vmm::GuestImage,
    };
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_long_lived_daemon_remembers_a_bounded_number_of_stopped_partitions",
            &why,
        );
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listen = "127.0.0.1:0".parse().unwrap();
        let (addr, serving) =
            listen_and_serve(server::Daemon::new(listen), Security::Plain, listen)
                .await
                .unwrap();
        tokio::spawn(serving);
        let connection = Connection::open(addr, &Security::Plain).await.unwrap();
        let ctx = || context_with(std::time::Duration::from_secs(30));
        let mut ids = Vec::new();
        for _ in 0..KEEP_STOPPED + 8 {
            let request = LaunchRequest {
                name: None,
                image: GuestImage::Builtin("idle".into()),
                args: String::new(),
                mem_size: 4 << 20,
                vcpus: 1,
            };
            let id = connection
                .client
                .launch(ctx(), request)
                .await
                .unwrap()
                .unwrap();
            connection
                .client
                .stop(ctx(), id.clone())
                .await
                .unwrap()
                .unwrap();
            ids.push(id);
        }
        let list = connection.client.list(ctx()).await.unwrap();
        assert_eq!(list.len(), KEEP_STOPPED, "{} entries kept", list.len());
        // The oldest are forgotten, the newest remembered.
        let status = |id: String| connection.client.status(ctx(), id);
        assert!(status(ids[0].clone()).await.unwrap().is_err());
        let last = status(ids[ids.len() - 1].clone()).await.unwrap().unwrap();
        assert_eq!(serde_json::to_value(last.state).unwrap(), "stopped");
    });
}
