//! The commands about running migrations: `migrations`, `cancel`, `wait`, `limits` and
//! `postcopy` (libvirt's `domjobinfo`, `domjobabort`, `migrate-setmaxdowntime` and
//! `migrate-setspeed`, `migrate-postcopy`), and rendering what they answer.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, bail};
use migrator::{
    api::MigrationInfo,
    api::client::Connection,
    api::client::context_with,
    migration::{MigrationReport, MigrationStatus, job::LiveLimits},
    tls::Security,
};
use tarpc::context;

/// How long `wait` waits for a migration (a post-copy may take its whole recover window).
const WAIT: Duration = Duration::from_secs(24 * 3600);

/// `migrator migrations`: every migration each host runs or recently ran.
pub async fn list(hosts: &[SocketAddr], json: bool, security: &Security) -> Result<()> {
    let mut all = Vec::new();
    for &host in hosts {
        let connection = Connection::open(host, security).await?;
        let migrations = connection.rpc(connection.client.migrations(context::current()).await)?;
        all.extend(migrations.into_iter().map(|m| (host, m)));
    }
    if json {
        let rows: Vec<_> = all
            .iter()
            .map(|(host, m)| {
                let mut row = serde_json::to_value(m).unwrap_or_default();
                row["host"] = serde_json::Value::String(host.to_string());
                row
            })
            .collect();
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        print!("{}", table(&all));
    }
    Ok(())
}

/// The migrations as a table, one row each.
pub fn table(migrations: &[(SocketAddr, MigrationInfo)]) -> String {
    let mut out = format!(
        "{:<22} {:<16} {:<11} {:<21} {:<7} {:<16} {:>6} {:>10} {:<9}\n",
        "MIGRATION", "HOST", "SIDE", "PEER", "MODE", "PHASE", "ROUND", "LEFT", "STATUS"
    );
    for (host, m) in migrations {
        let (round, left) = match &m.progress {
            Some(p) => (p.round.to_string(), format!("{}M", p.remaining_bytes >> 20)),
            None => ("-".into(), "-".into()),
        };
        let status = m
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "running".into());
        out.push_str(&format!(
            "{:<22} {:<16} {:<11} {:<21} {:<7} {:<16} {:>6} {:>10} {:<9}\n",
            m.id,
            host.to_string(),
            m.side,
            m.peer.as_deref().unwrap_or("-"),
            format!("{:?}", m.mode).to_lowercase(),
            m.phase,
            round,
            left,
            status
        ));
    }
    out
}

/// What a steering call answered: the migration as it is now.
fn print_info(info: &MigrationInfo, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(info)?);
    } else {
        println!(
            "{}: {} of partition {}, phase {}{}",
            info.id,
            info.side,
            info.partition,
            info.phase,
            if info.cancellable {
                " (cancellable)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// What an operator asks of a running migration.
pub enum Steer {
    /// `migrator cancel MIGRATION`.
    Cancel,
    /// `migrator limits MIGRATION`.
    Limits(LiveLimits),
    /// `migrator postcopy MIGRATION`.
    Postcopy,
}

/// Asks the daemon at `host` to steer `migration` as `how` says, and prints the migration as
/// it is then.
pub async fn steer(
    host: SocketAddr,
    migration: String,
    how: Steer,
    json: bool,
    security: &Security,
) -> Result<()> {
    if let Steer::Limits(limits) = &how {
        if *limits == LiveLimits::default() {
            bail!("give --downtime-limit, --bandwidth-limit or both");
        }
        limits.validate()?;
    }
    let connection = Connection::open(host, security).await?;
    let ctx = context_with(Duration::from_secs(30));
    let client = &connection.client;
    let answer = match how {
        Steer::Cancel => client.migration_cancel(ctx, migration).await,
        Steer::Limits(limits) => client.migration_set_limits(ctx, migration, limits).await,
        Steer::Postcopy => client.migration_postcopy(ctx, migration).await,
    };
    print_info(&connection.rpc(answer)??, json)
}

/// Ctrl-C during a migration: asks its source to cancel it (a migration id, or a
/// partition's for its running migration), and says what came of that on stderr.
pub async fn ask_cancel(client: &migrator::api::MigratorApiClient, migration: String) {
    let cancel = client
        .migration_cancel(context_with(Duration::from_secs(30)), migration.clone())
        .await;
    match cancel {
        Ok(Ok(_)) => eprintln!("migrator: cancelling {migration}"),
        Ok(Err(refused)) => {
            eprintln!("migrator: {migration} not cancelled: {refused}; waiting for it")
        }
        Err(e) => eprintln!("migrator: could not ask for a cancel of {migration}: {e}"),
    }
}

/// `migrator wait MIGRATION`: the report, once the migration has ended.
pub async fn wait(
    host: SocketAddr,
    migration: String,
    security: &Security,
) -> Result<MigrationReport> {
    let connection = Connection::open(host, security).await?;
    let report = connection.rpc(
        connection
            .client
            .migration_wait(context_with(WAIT), migration)
            .await,
    )??;
    Ok(report)
}

/// The error a migration that did not complete ends the command with.
pub fn outcome(report: &MigrationReport) -> Result<()> {
    match report.status {
        MigrationStatus::Completed => Ok(()),
        MigrationStatus::Cancelled => {
            bail!("the migration was cancelled; {}", report.guest_location)
        }
        MigrationStatus::Failed => match &report.error {
            // The one error line says why, with `--json` too.
            Some(why) => bail!("the migration failed: {why}; {}", report.guest_location),
            None => bail!("the migration failed; {}", report.guest_location),
        },
    }
}

#[cfg(test)]
mod tests {
    use migrator::migration::{MigrationProgress, Mode, Strategy};

    use super::*;

    #[test]
    fn a_failed_migration_ends_the_command_with_its_cause_and_where_the_guest_is() {
        let mut report = MigrationReport::new(Strategy::Address, Mode::Precopy);
        report.error = Some("the destination did not prepare: full".into());
        let error = outcome(&report).unwrap_err().to_string();
        assert!(
            error.contains("failed: the destination did not prepare: full"),
            "{error}"
        );
        assert!(error.contains("keeps running on the source"), "{error}");
        report.status = MigrationStatus::Completed;
        assert!(outcome(&report).is_ok());
    }

    #[test]
    fn the_table_has_a_row_per_migration_with_what_is_known() {
        let host: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let source = MigrationInfo {
            id: "p0-abc.m1".into(),
            partition: "p0-abc".into(),
            peer: Some("127.0.0.1:7701".into()),
            side: "source".into(),
            mode: Mode::Hybrid,
            strategy: Some(Strategy::Heat),
            phase: "precopy".into(),
            cancellable: true,
            progress: Some(MigrationProgress {
                round: 3,
                remaining_bytes: 8 << 20,
                ..MigrationProgress::default()
            }),
            started_unix_ms: Some(1),
            status: None,
        };
        let destination = MigrationInfo {
            id: "session 42".into(),
            partition: String::new(),
            peer: None,
            side: "destination".into(),
            mode: Mode::Precopy,
            strategy: None,
            phase: "Receiving".into(),
            cancellable: false,
            progress: None,
            started_unix_ms: None,
            status: Some(MigrationStatus::Completed),
        };
        let text = table(&[(host, source), (host, destination)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].starts_with("p0-abc.m1"), "{text}");
        assert!(
            lines[1].contains("hybrid") && lines[1].contains("8M"),
            "{text}"
        );
        assert!(lines[1].contains("running"), "{text}");
        // What a destination does not know shows as `-`, never as a made-up figure.
        assert!(
            lines[2].contains(" - ") && lines[2].contains("completed"),
            "{text}"
        );
    }
}
