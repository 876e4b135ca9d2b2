//! `migrator`: the daemon and its command-line client.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use migrator::{
    api::LaunchRequest,
    api::MigrateRequest,
    api::client::Connection,
    api::client::context_with,
    certs,
    host::admission::Limits,
    migration::{Strategy, source::MigrationOptions},
    supervisor::process::ProcessConfig,
    tls::Security,
    vmm::GuestImage,
};
use tarpc::context;

use self::cli::{
    args::{Cli, Command, MigrationTarget},
    calls::{dash, detached, heat, migrate, one, plan, read_heat_file, reconcile, warm_plan},
    jobs::Steer,
    partition_process::{self, PartitionProcess},
    render,
    serve::{Daemon, run_daemon},
};

mod cli;

/// `cancel`, `limits` and `postcopy`: steers the migration `target` names.
async fn steer(target: MigrationTarget, how: Steer, security: &Security) -> Result<()> {
    let host = target.host;
    cli::jobs::steer(host.host, target.migration, how, host.json, security).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. } | Command::Vmm { .. }) {
        heatprobe::console::end_quietly_on_closed_pipe();
    }
    heatprobe::console::init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("migrator: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, cli.tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrator: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, tls: Option<PathBuf>) -> Result<()> {
    if let Command::Certs { out, hosts } = &command {
        for dir in certs::generate(out, hosts)? {
            println!("{}", dir.display());
        }
        return Ok(());
    }
    let security = Security::from_dir(tls.as_deref()).context("cannot load the TLS credentials")?;
    match command {
        Command::Certs { .. } => Ok(()),
        Command::Serve {
            listen,
            max_partitions,
            max_memory,
            max_migrations,
            peer_timeout,
            heat,
            runtime_dir,
            on_exit,
            metrics,
        } => {
            let limits = Limits {
                max_partitions,
                max_memory: max_memory.unwrap_or(u64::MAX),
                max_migrations,
            };
            let process = ProcessConfig {
                listen,
                peer_timeout,
                sampling: heat.sampling()?,
                tls,
            };
            let daemon = Daemon {
                runtime_dir,
                on_exit,
                metrics,
            };
            run_daemon(process, limits, security, daemon).await
        }
        Command::Vmm {
            runtime_dir,
            id,
            session,
            listen,
            peer_timeout,
            heat,
        } => Ok(partition_process::run(PartitionProcess {
            runtime_dir,
            id,
            session,
            listen,
            peer_timeout,
            sampling: heat.sampling()?,
            security,
        })
        .await?),
        Command::Launch {
            host,
            workload,
            image,
            args,
            mem,
            vcpus,
            name,
        } => {
            let image = match (workload, image) {
                (Some(workload), _) => GuestImage::Builtin(workload),
                (None, Some(path)) => GuestImage::Elf(
                    std::fs::read(&path)
                        .with_context(|| format!("cannot read the image {}", path.display()))?,
                ),
                (None, None) => bail!("give --workload NAME or --image FILE"),
            };
            let connection = Connection::open(host.host, &security).await?;
            let request = LaunchRequest {
                name,
                image,
                args,
                mem_size: mem,
                vcpus,
            };
            let id = connection.rpc(
                connection
                    .client
                    .launch(context_with(Duration::from_secs(120)), request)
                    .await,
            )??;
            if host.json {
                println!("{}", serde_json::json!({ "id": id }));
            } else {
                println!("{id}");
            }
            Ok(())
        }
        Command::List { host } => {
            let connection = Connection::open(host.host, &security).await?;
            let list = connection.rpc(connection.client.list(context::current()).await)?;
            if host.json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                print!("{}", render::table_text(&list));
            }
            Ok(())
        }
        Command::Status(target) => {
            one(target, &security, |c, ctx, id| async move {
                c.status(ctx, id).await
            })
            .await
        }
        Command::Pause(target) => {
            one(target, &security, |c, ctx, id| async move {
                c.pause(ctx, id).await
            })
            .await
        }
        Command::Resume(target) => {
            one(target, &security, |c, ctx, id| async move {
                c.resume(ctx, id).await
            })
            .await
        }
        Command::Reconcile {
            target,
            resume_here,
        } => reconcile(target, resume_here, &security).await,
        Command::Stop(target) => {
            one(target, &security, |c, ctx, id| async move {
                c.stop(ctx, id).await
            })
            .await
        }
        Command::Heat {
            target,
            duration,
            warm,
        } => heat(target, duration, warm, &security).await,
        Command::Plan {
            target,
            strategy,
            duration,
            warm: false,
        } => plan(target, strategy, duration, &security).await,
        Command::Plan {
            target, warm: true, ..
        } => warm_plan(target, &security).await,
        Command::Dash {
            host,
            id,
            peer,
            once,
            json,
        } => dash(host, id, peer, once, json, security).await,
        Command::Migrate {
            from,
            to,
            id,
            options,
            resume,
            json,
            detach,
            heat_file,
        } => {
            let strategy = options.strategy;
            let options = MigrationOptions::from(options);
            // Refused here with the flags' names, before anything is asked of a daemon.
            if !resume {
                options.validate()?;
            }
            let heat = match heat_file {
                Some(path) if strategy == Strategy::Heat => Some(read_heat_file(&path)?),
                Some(_) => bail!("--heat-file orders by heat: it needs --strategy heat"),
                None => None,
            };
            let request = to.map(|to| MigrateRequest {
                id: id.clone(),
                to,
                options: options.clone(),
                heat,
            });
            if detach {
                return detached(from, request, json, &security).await;
            }
            migrate(from, id, request, options, json, &security).await
        }
        Command::Migrations { hosts, json } => cli::jobs::list(&hosts, json, &security).await,
        Command::Wait(target) => {
            let report = cli::jobs::wait(target.host.host, target.migration, &security).await?;
            render::print_report(&report, target.host.json)?;
            cli::jobs::outcome(&report)
        }
        Command::Cancel(target) => steer(target, Steer::Cancel, &security).await,
        Command::Limits {
            target,
            downtime_limit,
            bandwidth_limit,
        } => {
            let limits = migrator::migration::job::LiveLimits {
                downtime_limit,
                bandwidth_limit,
            };
            steer(target, Steer::Limits(limits), &security).await
        }
        Command::Postcopy(target) => steer(target, Steer::Postcopy, &security).await,
        Command::Drain(args) => cli::drain::run(args, &security).await,
    }
}
