//! What each client command asks of a daemon, and prints.

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use migrator::{
    api::MigrateRequest,
    api::PartitionInfo,
    api::client::Connection,
    api::client::context_with,
    api::heat_report::{self, PlanPreview},
    migration::{Strategy, plan_choice, source::MigrationOptions},
    tls::Security,
};
use tarpc::context;

use super::{args::Target, render};

/// The pages of heat file `path`, checked as far as they can be without the partition (the
/// daemon checks their frames against it before anything starts).
pub(crate) fn read_heat_file(path: &std::path::Path) -> Result<Vec<heatprobe::PageHeat>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    migrator::migration::heat_file::parse(&bytes)
        .with_context(|| format!("refusing {}", path.display()))
}

/// `migrate --detach`: starts the migration and prints its id.
pub(crate) async fn detached(
    from: SocketAddr,
    request: Option<MigrateRequest>,
    json: bool,
    security: &Security,
) -> Result<()> {
    let Some(request) = request else {
        bail!("--detach needs --to");
    };
    let connection = Connection::open(from, security).await?;
    let migration = start_detached(&connection, request).await?;
    if json {
        println!("{}", serde_json::json!({ "migration": migration }));
    } else {
        println!("{migration}");
    }
    Ok(())
}

/// Starts the migration `request` asks for on the source `connection` is to; its id.
pub(crate) async fn start_detached(
    connection: &Connection,
    request: MigrateRequest,
) -> Result<String> {
    let started = connection
        .client
        .migrate_detached(context_with(Duration::from_secs(60)), request)
        .await;
    Ok(connection.rpc(started)??)
}

pub(crate) type RpcResult =
    Result<Result<PartitionInfo, migrator::api::ApiError>, tarpc::client::RpcError>;

/// Runs one per-partition call and prints the partition it returns.
pub(crate) async fn one<F, Fut>(target: Target, security: &Security, call: F) -> Result<()>
where
    F: FnOnce(migrator::api::MigratorApiClient, context::Context, String) -> Fut,
    Fut: Future<Output = RpcResult>,
{
    let connection = Connection::open(target.host.host, security).await?;
    let ctx = context_with(Duration::from_secs(30));
    let info = connection.rpc(call(connection.client.clone(), ctx, target.id).await)??;
    if target.host.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        print!("{}", render::info_text(&info));
    }
    Ok(())
}

pub(crate) async fn reconcile(
    target: Target,
    resume_here: bool,
    security: &Security,
) -> Result<()> {
    let connection = Connection::open(target.host.host, security).await?;
    // Asking the destination is bounded by the daemon's peer timeout, plus its answer; a
    // paused post-copy's pages go too, as long as `migrate` may take.
    let ctx = context_with(Duration::from_secs(3600));
    let id = target.id.clone();
    let settled = connection.rpc(
        connection
            .client
            .reconcile(ctx, target.id, resume_here)
            .await,
    )??;
    if target.host.json {
        println!("{}", serde_json::to_string(&settled)?);
    } else {
        match settled {
            migrator::api::Reconciled::MovedTo { id_on_destination } => println!(
                "partition {id} runs on the destination as {}; the copy here is stopped",
                id_on_destination.as_deref().unwrap_or("?")
            ),
            migrator::api::Reconciled::ResumedHere => {
                println!("partition {id} runs here again; nothing of it runs on the destination")
            }
        }
    }
    Ok(())
}

/// How long past a window a call may take (connecting, the epoch that ends it, the answer).
pub(crate) const WINDOW_SLACK: Duration = Duration::from_secs(30);

pub(crate) async fn heat(
    target: Target,
    duration: Duration,
    warm: bool,
    security: &Security,
) -> Result<()> {
    let connection = Connection::open(target.host.host, security).await?;
    let heat = match warm {
        true => connection.rpc(
            connection
                .client
                .warm_heat(context_with(WINDOW_SLACK), target.id)
                .await,
        )??,
        false => {
            let ctx = context_with(duration.saturating_add(WINDOW_SLACK));
            connection.rpc(connection.client.page_heat(ctx, target.id, duration).await)??
        }
    };
    if target.host.json {
        /// `heatprobe record --json`'s object, with the partition and its size added.
        #[derive(serde::Serialize)]
        struct Json<'a> {
            partition: &'a str,
            frames: u64,
            duration_ms: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            spent: Option<heatprobe::budget::Spent>,
            #[serde(flatten)]
            record: &'a heatprobe::report::RecordReport,
        }
        let json = Json {
            partition: &heat.id,
            frames: heat.frames,
            duration_ms: heat.duration_ms,
            spent: heat.spent,
            record: &heat.record,
        };
        println!("{}", serde_json::to_string(&json)?);
    } else {
        print!("{}", heat_report::render_heat(&heat));
    }
    Ok(())
}

pub(crate) async fn plan(
    target: Target,
    strategy: Strategy,
    duration: Duration,
    security: &Security,
) -> Result<()> {
    let connection = Connection::open(target.host.host, security).await?;
    let ctx = context_with(duration.saturating_add(WINDOW_SLACK));
    let preview = connection.rpc(
        connection
            .client
            .plan(ctx, target.id, strategy, duration)
            .await,
    )??;
    if target.host.json {
        println!("{}", serde_json::to_string(&preview)?);
    } else {
        print!("{}", heat_report::render_plan(&preview));
    }
    Ok(())
}

/// `plan --warm`: the plan a migration would make from the warm heat now, decided as the
/// migration decides it (`plan_choice::unusable`), without profiling anything.
pub(crate) async fn warm_plan(target: Target, security: &Security) -> Result<()> {
    let connection = Connection::open(target.host.host, security).await?;
    let heat = connection.rpc(
        connection
            .client
            .warm_heat(context_with(WINDOW_SLACK), target.id)
            .await,
    )??;
    let fallback = plan_choice::unusable(&heat.record.pages, heat.frames);
    let preview = match fallback {
        Some(_) => PlanPreview::address(&heat.id, heat.frames),
        None => PlanPreview::heat(&heat.id, heat.frames, heat.duration_ms, &heat.record)
            .context("planning from the warm heat")?,
    };
    if target.host.json {
        /// `plan --json`'s object, with where its heat came from and what it cost.
        #[derive(serde::Serialize)]
        struct Json<'a> {
            #[serde(flatten)]
            preview: &'a PlanPreview,
            plan_heat: &'static str,
            /// Why the pages would go in address order after all, as the report's field.
            order_fallback: Option<String>,
            spent: Option<heatprobe::budget::Spent>,
        }
        let json = Json {
            preview: &preview,
            plan_heat: "warm",
            order_fallback: fallback,
            spent: heat.spent,
        };
        println!("{}", serde_json::to_string(&json)?);
    } else {
        println!(
            "warm heat over the last {:.1} s{}",
            heat.duration_ms as f64 / 1000.0,
            heat.spent.map_or(String::new(), |s| format!(
                ", which cost the guest {:.2}% of its time ({} faults{})",
                s.share * 100.0,
                s.faults,
                if s.pace < 1.0 {
                    format!(
                        "; its sweeps agree, so it spends {:.0}% of its budget now",
                        s.pace * 100.0
                    )
                } else {
                    String::new()
                }
            ))
        );
        if let Some(why) = &fallback {
            println!("address order: the warm heat {why}");
        }
        print!("{}", heat_report::render_plan(&preview));
    }
    Ok(())
}

pub(crate) async fn dash(
    host: SocketAddr,
    id: Option<String>,
    peer: Option<SocketAddr>,
    once: bool,
    json: bool,
    security: Security,
) -> Result<()> {
    use migrator::dash::{App, terminal};
    if once {
        let snapshot = terminal::once(host, id, &security).await?;
        if json {
            println!("{}", serde_json::to_string(&snapshot)?);
        } else {
            let mut app = App::new(peer.map(|p| p.to_string()));
            app.apply(snapshot);
            let (width, height) = ratatui::crossterm::terminal::size().unwrap_or((100, 30));
            print!(
                "{}",
                terminal::render_text(&app, width.max(80), height.max(24))
            );
        }
        return Ok(());
    }
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || terminal::run(handle, host, id, peer, security))
        .await
        .context("the dashboard panicked")??;
    Ok(())
}

/// Migrates partition `id` of `from` as `request` says, or with no request resumes its
/// paused post-copy.
pub(crate) async fn migrate(
    from: SocketAddr,
    id: String,
    request: Option<MigrateRequest>,
    options: MigrationOptions,
    json: bool,
    security: &Security,
) -> Result<()> {
    use std::io::IsTerminal;
    let connection = Connection::open(from, security).await?;
    let ctx = context_with(Duration::from_secs(3600));
    let call = async {
        match request {
            Some(request) => connection.client.migrate(ctx, request).await,
            None => {
                connection
                    .client
                    .migrate_resume(ctx, id.clone(), options)
                    .await
            }
        }
    };
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    });
    let watch = async {
        let Some(bar) = &bar else {
            return std::future::pending::<()>().await;
        };
        loop {
            if let Ok(Some(p)) = connection
                .client
                .migration_progress(context::current(), id.clone())
                .await
            {
                bar.set_message(render::progress_line(&p));
            }
            bar.tick();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // Ctrl-C cancels the migration, as `virsh migrate` does, and waits for its report: the
    // guest runs on here if it was before the handover. Past it, the migration goes on and
    // this waits for it to end.
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            return std::future::pending::<()>().await;
        }
        super::jobs::ask_cancel(&connection.client, id.clone()).await;
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        result = call => result,
        () = watch => unreachable!("the watcher never ends"),
        () = interrupt => unreachable!("the interrupt never ends"),
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = connection.rpc(result)??;
    render::print_report(&report, json)?;
    super::jobs::outcome(&report)
}
