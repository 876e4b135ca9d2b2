//! Hostile bytes at a live destination daemon: an oversized frame, a page beyond the
//! partition, a stream cut inside a header, a saved state that is garbage or zeroed. Each
//! fails its session with a clean error, and the daemon keeps serving: afterwards it answers,
//! and a real migration into it completes.

use std::{io::Write, net::TcpStream, time::Duration};

use heatprobe_tests::{daemon::Daemon, kvm_unavailable, skip};
use migrator::{
    api::client::{Connection, context_with},
    migration::{
        Mode,
        control::{CommitRequest, PrepareReply, PrepareRequest},
        protocol::{FrameHeader, FrameKind, MAX_PAGES_PER_FRAME, PROTOCOL_VERSION, ZERO_PAGE},
    },
    tls::Security,
    vmm::{GuestImage, PartitionConfig, state},
};

const MEM: u64 = 4 << 20;
const FRAMES: u64 = MEM / 4096;

fn config() -> PartitionConfig {
    PartitionConfig {
        name: None,
        mem_size: MEM,
        vcpus: 1,
        image: GuestImage::Builtin("idle".into()),
        args: String::new(),
    }
}

async fn prepare(connection: &Connection) -> PrepareReply {
    prepare_mode(connection, Mode::Precopy).await
}

async fn prepare_mode(connection: &Connection, mode: Mode) -> PrepareReply {
    prepare_striped(connection, mode, 1)
        .await
        .expect("a session")
}

async fn prepare_striped(
    connection: &Connection,
    mode: Mode,
    connections: u32,
) -> Result<PrepareReply, String> {
    let request = PrepareRequest {
        protocol_min: PROTOCOL_VERSION,
        protocol_max: PROTOCOL_VERSION,
        config: config(),
        mode,
        fault_window_ms: 0,
        connections,
    };
    connection
        .client
        .migration_prepare(context_with(Duration::from_secs(30)), request)
        .await
        .expect("the daemon answers")
        .map_err(|e| e.to_string())
}

/// Sends `bytes` on the session's data connection, then closes it.
fn send(connection: &Connection, reply: &PrepareReply, bytes: &[u8]) {
    drop(send_and_hold(connection, reply, bytes));
}

/// Sends `bytes` on the session's data connection and keeps it open.
fn send_and_hold(connection: &Connection, reply: &PrepareReply, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect((connection.addr.ip(), reply.data_port)).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

async fn commit(connection: &Connection, session: u64, snapshot: Vec<u8>) -> Result<(), String> {
    let request = CommitRequest {
        snapshot,
        stale_pages: Vec::new(),
    };
    match connection
        .client
        .migration_commit(context_with(Duration::from_secs(30)), session, request)
        .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => panic!("the daemon stopped answering: {e}"),
    }
}

fn header(kind: FrameKind, count: u32, payload_len: u64) -> Vec<u8> {
    FrameHeader {
        kind,
        count,
        payload_len,
    }
    .encode()
    .to_vec()
}

/// Every page as a zero marker, then Done: a complete, valid page stream.
fn all_zero_pages() -> Vec<u8> {
    let mut bytes = header(FrameKind::Pages, FRAMES as u32, 8 * FRAMES);
    for page in 0..FRAMES {
        bytes.extend_from_slice(&(page | ZERO_PAGE).to_le_bytes());
    }
    bytes.extend_from_slice(&header(FrameKind::Done, 0, 0));
    bytes
}

#[test]
fn a_destination_refuses_hostile_bytes_and_keeps_serving() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_destination_refuses_hostile_bytes_and_keeps_serving",
            &why,
        );
    }
    let destination = Daemon::start();
    let source = Daemon::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let addr = destination.addr.parse().unwrap();
        let connection = Connection::open(addr, &Security::Plain).await.unwrap();

        let mut oversized = header(FrameKind::Pages, 1, 8 + 4096);
        oversized[8..12].copy_from_slice(&(MAX_PAGES_PER_FRAME + 1).to_le_bytes());
        let mut beyond = header(FrameKind::Pages, 1, 8);
        beyond.extend_from_slice(&(FRAMES | ZERO_PAGE).to_le_bytes());
        let huge_payload = header(FrameKind::Pages, 1, u64::MAX / 2);
        let cut_in_header = all_zero_pages()[..10].to_vec();
        let streams: [(&str, Vec<u8>); 4] = [
            ("an oversized frame", oversized),
            ("a page beyond the partition", beyond),
            ("a payload length no frame can have", huge_payload),
            ("a stream cut inside a header", cut_in_header),
        ];
        for (what, bytes) in streams {
            let reply = prepare(&connection).await;
            send(&connection, &reply, &bytes);
            // A well-formed state, so the commit goes on to wait for the pages.
            let valid_state = state::encode(&state::sample_snapshot(config()));
            let committed = commit(&connection, reply.session, valid_state).await;
            println!("{what}: {committed:?}");
            let error = committed.expect_err(what);
            // The session failed on the stream (or was already dropped for failing).
            assert!(
                ["frame", "page", "ended", "session"]
                    .iter()
                    .any(|word| error.contains(word)),
                "{what}: {error}"
            );
            assert!(!error.contains("saved state"), "{what}: {error}");
        }

        // A complete page stream, then a saved state that is garbage, one of zeros, one for
        // another partition, and one whose vCPU states do not match the partition.
        let garbage = state::wrap(b"not a saved state");
        let other = state::encode(&state::sample_snapshot(PartitionConfig {
            vcpus: 2,
            ..config()
        }));
        let mut shape = state::sample_snapshot(config());
        shape.vcpus.clear();
        let shape = state::encode(&shape);
        let states = [
            ("garbage", garbage),
            ("zeros", vec![0u8; 256]),
            ("another partition", other),
            ("no vCPU state", shape),
        ];
        for (what, snapshot) in states {
            let reply = prepare(&connection).await;
            send(&connection, &reply, &all_zero_pages());
            let error = commit(&connection, reply.session, snapshot)
                .await
                .expect_err(what);
            println!("a saved state of {what}: {error}");
            assert!(error.contains("state"), "{what}: {error}");
        }

        // Still serving, with nothing left behind.
        let list = connection
            .client
            .list(context_with(Duration::from_secs(10)))
            .await
            .expect("the daemon answers");
        assert!(list.is_empty(), "{list:?}");
    });

    // And a real migration into it completes.
    let id = source.json(&["launch", "--workload", "kv-zipf", "--mem", "16M"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    source.wait_progress(&id, 1_000, 1);
    let (code, report) = source.migrate(&destination, &id, &["--strategy", "address"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["source_digest"], report["dest_digest"], "{report}");
}

/// A session's data connections are as many as it was prepared for: a count out of range
/// is refused, and a second `Done` on one connection before the others ended the phase fails
/// the session instead of ending the phase with pages still on their way.
#[test]
fn striped_sessions_refuse_bad_counts_and_a_connection_that_ends_a_phase_twice() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "striped_sessions_refuse_bad_counts_and_a_connection_that_ends_a_phase_twice",
            &why,
        );
    }
    let destination = Daemon::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let addr = destination.addr.parse().unwrap();
        let connection = Connection::open(addr, &Security::Plain).await.unwrap();
        for bad in [0, 17, u32::MAX] {
            let refused = prepare_striped(&connection, Mode::Precopy, bad).await;
            let error = refused.expect_err("a count out of range");
            assert!(error.contains("connections"), "{bad}: {error}");
        }
        let reply = prepare_striped(&connection, Mode::Precopy, 2)
            .await
            .expect("a session of two connections");
        let mut twice = all_zero_pages();
        twice.extend_from_slice(&header(FrameKind::Done, 0, 0));
        let _first = send_and_hold(&connection, &reply, &twice);
        let _second = send_and_hold(&connection, &reply, &[]);
        let valid_state = state::encode(&state::sample_snapshot(config()));
        let error = commit(&connection, reply.session, valid_state)
            .await
            .expect_err("a phase ended twice on one connection");
        println!("a second Done on one connection: {error}");
        assert!(!error.contains("saved state"), "{error}");
        let list = connection
            .client
            .list(context_with(Duration::from_secs(10)))
            .await
            .expect("the daemon answers");
        assert!(list.is_empty(), "{list:?}");
    });
}

/// The CPU this host gives a guest, as a partition launched here would have saved it.
fn this_hosts_cpu() -> migrator::vmm::cpu::GuestCpu {
    use migrator::vmm::cpu;
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let cpuid = cpu::host_cpuid(&kvm).expect("the host's CPUID");
    let vm = kvm.create_vm().expect("a VM");
    let vcpu = vm.create_vcpu(0).expect("a vCPU");
    let tsc = cpu::host_tsc_khz(&vcpu).expect("the host's TSC rate");
    cpu::GuestCpu::new(&cpuid, tsc)
}

/// The destination's session phases hold at a live daemon: a hybrid session that committed
/// holds its partition parked until the handover, refuses a second commit, answers a second
/// handover as the first, and an abort after the handover stops the partition it restored
/// instead of leaving it running beside the source's copy.
#[test]
fn a_committed_hybrid_session_runs_only_at_the_handover_and_an_abort_stops_its_copy() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_committed_hybrid_session_runs_only_at_the_handover_and_an_abort_stops_its_copy",
            &why,
        );
    }
    let destination = Daemon::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let addr = destination.addr.parse().unwrap();
        let connection = Connection::open(addr, &Security::Plain).await.unwrap();
        let reply = prepare_mode(&connection, Mode::Hybrid).await;
        // Every page, the end of pre-copy, and the connection held open for the push.
        let _data = send_and_hold(&connection, &reply, &all_zero_pages());
        // And the urgent connection a hybrid session needs for its demands.
        let _urgent = send_and_hold(&connection, &reply, &header(FrameKind::Urgent, 0, 0));
        // Made-up registers, but this host's CPU and TSC rate, which a restore checks.
        let host_cpu = this_hosts_cpu();
        let snapshot = || {
            let mut snapshot = state::sample_snapshot(config());
            snapshot.cpu = host_cpu;
            state::encode(&snapshot)
        };
        commit(&connection, reply.session, snapshot())
            .await
            .expect("the first commit restores");
        let listed = connection
            .client
            .list(context_with(Duration::from_secs(10)))
            .await
            .unwrap();
        let [arrived] = listed.as_slice() else {
            panic!("{listed:?}");
        };
        // Restored, parked: it runs only on the source's word.
        assert_eq!(arrived.state, migrator::vmm::PartitionState::Paused);
        let second = commit(&connection, reply.session, snapshot())
            .await
            .expect_err("a second commit");
        assert!(second.contains("second commit"), "{second}");
        for _ in 0..2 {
            let handed = connection
                .client
                .migration_handover(context_with(Duration::from_secs(10)), reply.session)
                .await
                .unwrap()
                .expect("the handover runs it");
            assert_eq!(handed.id_on_destination, arrived.id);
            let running = connection
                .client
                .status(context_with(Duration::from_secs(10)), arrived.id.clone())
                .await
                .unwrap()
                .expect("listed");
            // It ran: on made-up registers it may have crashed since, but it left `paused`.
            assert!(
                matches!(
                    running.state,
                    migrator::vmm::PartitionState::Running | migrator::vmm::PartitionState::Crashed
                ),
                "{running:?}"
            );
        }
        connection
            .client
            .migration_abort(context_with(Duration::from_secs(10)), reply.session)
            .await
            .unwrap();
        let after = connection
            .client
            .status(context_with(Duration::from_secs(10)), arrived.id.clone())
            .await
            .unwrap()
            .expect("still listed");
        assert_eq!(after.state, migrator::vmm::PartitionState::Stopped);
        // The session is gone with it.
        let gone = connection
            .client
            .migration_finish(context_with(Duration::from_secs(10)), reply.session)
            .await
            .unwrap();
        assert!(gone.is_err(), "{gone:?}");
    });
}

/// A handover for a session whose commit never came (a reconcile after the commit was lost
/// on its way) is refused, and the session is dropped with it: a late commit cannot restore
/// anything any more, so the source may resume.
#[test]
fn a_handover_before_any_commit_is_refused_and_ends_the_session() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_handover_before_any_commit_is_refused_and_ends_the_session",
            &why,
        );
    }
    let destination = Daemon::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let addr = destination.addr.parse().unwrap();
        let connection = Connection::open(addr, &Security::Plain).await.unwrap();
        let reply = prepare(&connection).await;
        let refused = connection
            .client
            .migration_handover(context_with(Duration::from_secs(10)), reply.session)
            .await
            .unwrap()
            .expect_err("nothing to hand over");
        assert!(refused.to_string().contains("Handover"), "{refused}");
        let state = state::encode(&state::sample_snapshot(config()));
        let late = commit(&connection, reply.session, state)
            .await
            .expect_err("the session is gone");
        assert!(late.contains("session"), "{late}");
        let listed = connection
            .client
            .list(context_with(Duration::from_secs(10)))
            .await
            .unwrap();
        assert!(listed.is_empty(), "{listed:?}");
    });
}

/// A post-copy recovery asked of a session whose guest does not run here on missing pages
/// (prepared, no commit yet) is refused, and the session stays: asked again it is refused the
/// same way, and an abort ends it. One asked of a session that does not exist is refused.
#[test]
fn a_recovery_before_the_guest_runs_there_is_refused_and_changes_nothing() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "a_recovery_before_the_guest_runs_there_is_refused_and_changes_nothing",
            &why,
        );
    }
    let destination = Daemon::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let addr = destination.addr.parse().unwrap();
        let connection = Connection::open(addr, &Security::Plain).await.unwrap();
        let unknown = connection
            .client
            .migration_recover(context_with(Duration::from_secs(10)), 999)
            .await
            .unwrap()
            .expect_err("no such session");
        assert!(unknown.to_string().contains("999"), "{unknown}");
        let reply = prepare(&connection).await;
        let refused = connection
            .client
            .migration_recover(context_with(Duration::from_secs(10)), reply.session)
            .await
            .unwrap()
            .expect_err("nothing runs here yet");
        assert!(refused.to_string().contains("Recover"), "{refused}");
        // Still there: a second recovery is refused the same way, and an abort ends it.
        let again = connection
            .client
            .migration_recover(context_with(Duration::from_secs(10)), reply.session)
            .await
            .unwrap();
        assert!(again.is_err(), "{again:?}");
        connection
            .client
            .migration_abort(context_with(Duration::from_secs(10)), reply.session)
            .await
            .unwrap();
        let gone = connection
            .client
            .migration_recover(context_with(Duration::from_secs(10)), reply.session)
            .await
            .unwrap();
        assert!(gone.is_err(), "{gone:?}");
    });
}
