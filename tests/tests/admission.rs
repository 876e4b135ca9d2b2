//! Admission under concurrency: launches and incoming migrations racing for the last room
//! of a daemon never overshoot its limits, and a refused or failed request leaks no room.
//! Real KVM partitions, the daemon in-process, its API called directly.

use std::{net::SocketAddr, time::Duration};

use heatprobe_tests::{kvm_unavailable, skip};
use migrator::{
    api::{ApiError, LaunchRequest, MigratorApi},
    daemon::server::Daemon,
    host::admission::Limits,
    migration::{Mode, control::PrepareRequest, protocol::PROTOCOL_VERSION},
    vmm::{GuestImage, PartitionConfig},
};
use tarpc::context;

const MIB: u64 = 1 << 20;

fn launch_request(mem: u64) -> LaunchRequest {
    LaunchRequest {
        name: None,
        image: GuestImage::Builtin("idle".into()),
        args: String::new(),
        mem_size: mem,
        vcpus: 1,
    }
}

fn prepare_request(mem: u64) -> PrepareRequest {
    PrepareRequest {
        protocol_min: PROTOCOL_VERSION,
        protocol_max: PROTOCOL_VERSION,
        config: PartitionConfig {
            name: None,
            mem_size: mem,
            vcpus: 1,
            image: GuestImage::Builtin("idle".into()),
            args: String::new(),
        },
        mode: Mode::Precopy,
        fault_window_ms: 0,
        connections: 1,
    }
}

/// Sends `launches` launches and `prepares` incoming migrations at once; returns how many of
/// each were admitted, checking every refusal is a limit.
async fn storm(daemon: &Daemon, launches: usize, prepares: usize, mem: u64) -> (usize, usize) {
    // Interleaved: launch, prepare, launch, prepare, ...
    let kinds = (0..launches.max(prepares))
        .flat_map(|i| {
            [
                (i < launches).then_some(true),
                (i < prepares).then_some(false),
            ]
        })
        .flatten();
    let mut tasks = Vec::new();
    for is_launch in kinds {
        let daemon = daemon.clone();
        tasks.push(tokio::spawn(async move {
            let ctx = context::current();
            if is_launch {
                (
                    true,
                    daemon.launch(ctx, launch_request(mem)).await.map(drop),
                )
            } else {
                (
                    false,
                    daemon
                        .migration_prepare(ctx, prepare_request(mem))
                        .await
                        .map(drop),
                )
            }
        }));
    }
    let (mut launched, mut prepared) = (0, 0);
    for task in tasks {
        let (is_launch, result) = task.await.expect("task");
        match result {
            Ok(()) if is_launch => launched += 1,
            Ok(()) => prepared += 1,
            Err(ApiError::Limit(_)) => {}
            Err(other) => panic!("refused for another reason than a limit: {other}"),
        }
    }
    (launched, prepared)
}

#[test]
fn racing_launches_and_migrations_never_overshoot_a_limit() {
    if let Some(why) = kvm_unavailable() {
        return skip(
            "racing_launches_and_migrations_never_overshoot_a_limit",
            &why,
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // The partition limit binds.
        let daemon = Daemon::new(listen)
            .with_peer_timeout(Duration::from_secs(30))
            .with_limits(Limits {
                max_partitions: 3,
                max_memory: u64::MAX,
                max_migrations: 4,
            });
        let (launched, prepared) = storm(&daemon, 6, 6, 4 * MIB).await;
        assert_eq!(
            launched + prepared,
            3,
            "{launched} launched, {prepared} prepared"
        );
        // The memory limit binds (five of 8 MiB would fit in 40; nine race for it).
        let daemon = Daemon::new(listen)
            .with_peer_timeout(Duration::from_secs(30))
            .with_limits(Limits {
                max_partitions: 64,
                max_memory: 40 * MIB,
                max_migrations: 4,
            });
        let (launched, prepared) = storm(&daemon, 5, 4, 8 * MIB).await;
        assert_eq!(
            launched + prepared,
            5,
            "{launched} launched, {prepared} prepared"
        );
        // Full: one more is refused; stopping one frees its room for exactly one more.
        let refused = daemon
            .clone()
            .launch(context::current(), launch_request(8 * MIB))
            .await;
        assert!(matches!(refused, Err(ApiError::Limit(_))), "{refused:?}");
        let live = daemon.clone().list(context::current()).await;
        let first = live.first().expect("a launched partition").id.clone();
        daemon
            .clone()
            .stop(context::current(), first)
            .await
            .expect("stops");
        daemon
            .clone()
            .launch(context::current(), launch_request(8 * MIB))
            .await
            .expect("the freed room is taken");
        daemon.stop_all();

        // A launch or an incoming migration that fails gives its room back.
        let daemon = Daemon::new(listen).with_limits(Limits {
            max_partitions: 1,
            max_memory: u64::MAX,
            max_migrations: 4,
        });
        let mut bad_launch = launch_request(8 * MIB);
        bad_launch.image = GuestImage::Elf(b"not an ELF image".to_vec());
        let failed = daemon.clone().launch(context::current(), bad_launch).await;
        assert!(matches!(failed, Err(ApiError::Partition(_))), "{failed:?}");
        let mut bad_prepare = prepare_request(8 * MIB);
        bad_prepare.config.vcpus = 0;
        let failed = daemon
            .clone()
            .migration_prepare(context::current(), bad_prepare)
            .await;
        assert!(matches!(failed, Err(ApiError::Migration(_))), "{failed:?}");
        daemon
            .clone()
            .launch(context::current(), launch_request(8 * MIB))
            .await
            .expect("no room leaked");
        daemon.stop_all();
    });
}
