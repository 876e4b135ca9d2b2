//! Authentication: daemons off loopback run only with mutual TLS; clients and peers without a
//! certificate from the daemons' CA are refused, and authenticated peers migrate over TLS.

use heatprobe_tests::{
    daemon::{Daemon, DaemonConfig, make_certs, migrator_command},
    kvm_unavailable,
    netns::{HostPair, netns_unavailable},
    skip,
};

fn hosts(test: &str) -> Option<HostPair> {
    if let Some(why) = netns_unavailable() {
        skip(test, &why);
        return None;
    }
    Some(HostPair::create().expect("create the two hosts"))
}

#[test]
fn a_daemon_off_loopback_refuses_to_start_without_tls() {
    let Some(pair) = hosts("a_daemon_off_loopback_refuses_to_start_without_tls") else {
        return;
    };
    let error = Daemon::try_start(DaemonConfig::in_namespace(&pair.a.ns, pair.a.addr))
        .err()
        .expect("a plain daemon on a non-loopback address must not start");
    let message = format!("{error:#}");
    assert!(message.contains("needs mutual TLS"), "{message}");

    // Credentials that do not load are one clear error too.
    let missing = std::env::temp_dir().join("heatprobe-tests-no-such-credentials");
    let error = Daemon::try_start(
        DaemonConfig::in_namespace(&pair.a.ns, pair.a.addr).tls(Some(missing.clone())),
    )
    .err()
    .expect("missing credentials must stop the daemon");
    let message = format!("{error:#}");
    assert!(message.contains("ca.pem"), "{message}");
}

#[test]
fn only_authenticated_peers_get_in_and_they_migrate_over_tls() {
    let test = "only_authenticated_peers_get_in_and_they_migrate_over_tls";
    if let Some(why) = kvm_unavailable() {
        skip(test, &why);
        return;
    }
    let Some(pair) = hosts(test) else {
        return;
    };
    let a_addr = pair.a.addr.to_string();
    let b_addr = pair.b.addr.to_string();
    let certs = make_certs(&[&a_addr, &b_addr]).expect("make certificates");
    let strangers = make_certs(&[&a_addr]).expect("make a second, unrelated CA");
    let a = Daemon::start_config(
        DaemonConfig::in_namespace(&pair.a.ns, pair.a.addr).tls(Some(certs.dir())),
    );
    let b = Daemon::start_config(
        DaemonConfig::in_namespace(&pair.b.ns, pair.b.addr).tls(Some(certs.dir())),
    );

    // Refused: no TLS at all, and TLS with a certificate from another CA. Both from the
    // other host, across the link.
    let attempt = |tls: Option<std::path::PathBuf>| {
        let output = migrator_command(Some(&pair.b.ns), tls.as_deref())
            .args(["list", "--json", "--host", &a.addr])
            .output()
            .expect("run migrator list");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = attempt(None);
    assert_ne!(code, Some(0), "a plain client got in: {stdout}");
    assert!(stdout.is_empty(), "a plain client got an answer: {stdout}");
    assert!(stderr.contains("--tls"), "{stderr}");
    let (code, stdout, stderr) = attempt(Some(strangers.join("client")));
    assert_ne!(code, Some(0), "a stranger's certificate got in: {stdout}");
    assert!(stdout.is_empty(), "a stranger got an answer: {stdout}");
    assert!(stderr.contains("TLS handshake"), "{stderr}");
    // A daemon's own certificate from the other CA is no better than a client's.
    let (code, _, _) = attempt(Some(strangers.join(&a_addr)));
    assert_ne!(code, Some(0), "a stranger's host certificate got in");

    // The daemon kept serving, and an authenticated client gets in.
    let (code, stdout, stderr) = attempt(Some(certs.join("client")));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "[]");

    // Authenticated peers migrate: the API calls between daemons and the data connection run
    // over TLS, across the link. Hybrid mode also sends the destination's demands back.
    let launched = a.json(&[
        "launch",
        "--workload",
        "kv-zipf",
        "--mem",
        "64M",
        "--args",
        "keys=8192",
    ]);
    let id = launched["id"].as_str().expect("an id").to_string();
    a.wait_progress(&id, 10_000, 2);
    let (code, report) = a.migrate(&b, &id, &["--strategy", "address", "--mode", "hybrid"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["source_digest"], report["dest_digest"], "{report}");
    println!("migrated over TLS: {report}");
    let moved = report["id_on_destination"].as_str().expect("the new id");
    let status = b.wait_progress(moved, 10_000, 2);
    assert_eq!(status["errors"], 0, "{status}");
}
