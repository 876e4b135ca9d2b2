//! The daemon side of the API. Partition operations that block (launch, pause) run on the
//! blocking pool so one slow partition never stalls the others' requests.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::{StreamExt, future};
use tarpc::{
    context::Context,
    serde_transport::tcp,
    server::{self, Channel},
    tokio_serde::formats::Bincode,
};
use tracing::{info, warn};

use super::api::{
    API_VERSION, ApiError, DaemonInfo, LaunchRequest, MAX_FRAME, MAX_IMAGE, MigratorApi,
    PartitionInfo,
};
use crate::vmm::{GuestImage, Partition, PartitionConfig, PartitionState};

enum Entry {
    Live(Arc<Partition>),
    /// What a stopped partition last looked like; its memory is freed.
    Stopped(PartitionInfo),
}

/// The daemon's partitions.
#[derive(Clone, Default)]
pub struct Daemon {
    partitions: Arc<Mutex<BTreeMap<String, Entry>>>,
    next_id: Arc<AtomicU64>,
}

fn info_of(id: &str, partition: &Partition) -> PartitionInfo {
    let status = partition.status();
    let config = partition.config();
    PartitionInfo {
        id: id.to_string(),
        name: config.name.clone(),
        image: match &config.image {
            GuestImage::Builtin(name) => format!("workload {name}"),
            GuestImage::Elf(_) => "image".into(),
        },
        state: status.state,
        ops: status.progress.ops,
        errors: status.progress.errors,
        checks: status.progress.checks,
        mem_bytes: config.mem_size,
        vcpus: config.vcpus,
        console: status.console,
        crash_reason: status.crash_reason,
        check_failures: status.check_failures,
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    heatprobe::probes::error_chain(error)
}

impl Daemon {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, id: &str) -> Result<Arc<Partition>, ApiError> {
        match self.lock().get(id) {
            Some(Entry::Live(partition)) => Ok(Arc::clone(partition)),
            Some(Entry::Stopped(_)) => {
                Err(ApiError::Partition(format!("partition `{id}` is stopped")))
            }
            None => Err(ApiError::UnknownPartition(id.to_string())),
        }
    }

    /// Runs `operation` on the blocking pool and returns the partition's info afterwards.
    async fn operate(
        &self,
        id: String,
        operation: fn(&Partition) -> Result<(), crate::vmm::PartitionError>,
    ) -> Result<PartitionInfo, ApiError> {
        let partition = self.live(&id)?;
        tokio::task::spawn_blocking(move || {
            operation(&partition).map_err(|e| ApiError::Partition(error_chain(&e)))?;
            Ok(info_of(&id, &partition))
        })
        .await
        .map_err(|e| ApiError::Partition(format!("the operation panicked: {e}")))?
    }

    fn new_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let salt = xxhash_rust::xxh3::xxh3_64(
            format!(
                "{}-{n}-{:?}",
                std::process::id(),
                std::time::SystemTime::now()
            )
            .as_bytes(),
        );
        format!("p{n}-{:06x}", salt & 0xff_ffff)
    }

    /// Stops every partition (on shutdown).
    pub fn stop_all(&self) {
        let live: Vec<Arc<Partition>> = self
            .lock()
            .values()
            .filter_map(|e| match e {
                Entry::Live(p) => Some(Arc::clone(p)),
                Entry::Stopped(_) => None,
            })
            .collect();
        for partition in live {
            partition.stop();
        }
    }
}

impl MigratorApi for Daemon {
    async fn hello(self, _: Context, min: u32, max: u32) -> Result<DaemonInfo, ApiError> {
        if !(min..=max).contains(&API_VERSION) {
            return Err(ApiError::Version {
                ours: API_VERSION,
                min,
                max,
            });
        }
        Ok(DaemonInfo::new(self.lock().len()))
    }

    async fn launch(self, _: Context, request: LaunchRequest) -> Result<String, ApiError> {
        if let GuestImage::Elf(bytes) = &request.image
            && bytes.len() > MAX_IMAGE
        {
            return Err(ApiError::ImageTooLarge(bytes.len()));
        }
        let config = PartitionConfig {
            name: request.name,
            mem_size: request.mem_size,
            vcpus: request.vcpus,
            image: request.image,
            args: request.args,
        };
        let partition = tokio::task::spawn_blocking(move || Partition::launch(config))
            .await
            .map_err(|e| ApiError::Partition(format!("launch panicked: {e}")))?
            .map_err(|e| ApiError::Partition(error_chain(&e)))?;
        let id = self.new_id();
        info!("launched partition {id}");
        self.lock()
            .insert(id.clone(), Entry::Live(Arc::new(partition)));
        Ok(id)
    }

    async fn list(self, _: Context) -> Vec<PartitionInfo> {
        self.lock()
            .iter()
            .map(|(id, entry)| match entry {
                Entry::Live(partition) => info_of(id, partition),
                Entry::Stopped(info) => info.clone(),
            })
            .collect()
    }

    async fn status(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        match self.lock().get(&id) {
            Some(Entry::Live(partition)) => Ok(info_of(&id, partition)),
            Some(Entry::Stopped(info)) => Ok(info.clone()),
            None => Err(ApiError::UnknownPartition(id)),
        }
    }

    async fn pause(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        self.operate(id, Partition::pause).await
    }

    async fn resume(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        self.operate(id, Partition::resume).await
    }

    async fn stop(self, _: Context, id: String) -> Result<PartitionInfo, ApiError> {
        let partition = self.live(&id)?;
        let stopped = tokio::task::spawn_blocking(move || {
            partition.stop();
            partition
        })
        .await
        .map_err(|e| ApiError::Partition(format!("stop panicked: {e}")))?;
        let mut info = info_of(&id, &stopped);
        info.state = PartitionState::Stopped;
        // Dropping the last reference frees the partition's memory.
        self.lock().insert(id.clone(), Entry::Stopped(info.clone()));
        info!("stopped partition {id}");
        Ok(info)
    }
}

/// Serves the API on `listen` until the task is dropped. Returns the bound address.
pub async fn serve(
    daemon: Daemon,
    listen: SocketAddr,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let mut listener = tcp::listen(listen, Bincode::default).await?;
    listener.config_mut().max_frame_length(MAX_FRAME);
    let local = listener.local_addr();
    let serving = listener
        .filter_map(|conn| {
            if let Err(e) = &conn {
                warn!("accepting a connection failed: {e}");
            }
            future::ready(conn.ok())
        })
        .map(server::BaseChannel::with_defaults)
        .for_each_concurrent(None, move |channel| {
            let daemon = daemon.clone();
            channel
                .execute(daemon.serve())
                .for_each_concurrent(None, |response| async move {
                    tokio::spawn(response);
                })
        });
    Ok((local, serving))
}
