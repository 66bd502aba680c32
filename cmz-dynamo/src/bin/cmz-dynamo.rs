//! `cmz-dynamo`: table setup, checks and the legacy migration, from the command line.
//!
//! ```text
//! cmz-dynamo check-tables              check the tables as the server does at startup
//! cmz-dynamo ensure-tables             create missing tables, bring existing ones up to date
//! cmz-dynamo ensure-tables --remove-retired-indexes
//!                                      the same, and delete indexes cmz no longer reads
//! cmz-dynamo migrate [--dry-run] [--page-size N] [--pause-ms N] [--no-progress]
//! ```
//! Configuration comes from the legacy variables (`DYNAMODB_ENDPOINT_URL`, `AWS_REGION`,
//! `CONVERSATION_DYNAMO_TABLE_NAME`, ...), as in [`cmz_dynamo::DynamoSettings::from_env`].

use std::process::ExitCode;
use std::time::Duration;

use cmz_dynamo::migrate::{MigrationOptions, migrate_legacy};
use cmz_dynamo::{Dynamo, DynamoSettings, EnsureOptions, TableEvent};

const USAGE: &str = "usage: cmz-dynamo <check-tables | ensure-tables [--remove-retired-indexes] | migrate [--dry-run] [--page-size N] [--pause-ms N] [--no-progress]>";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cmz-dynamo: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<(), String> {
    let Some(command) = args.first() else {
        return Err(USAGE.into());
    };
    let settings =
        DynamoSettings::from_env(|name| std::env::var(name).ok()).map_err(|e| e.report())?;
    let dynamo = Dynamo::connect(settings).await;
    match command.as_str() {
        "check-tables" => {
            dynamo.check_tables().await.map_err(|e| e.report())?;
            println!(
                "all {} tables exist with the keys and indexes cmz needs",
                dynamo.tables().all().len()
            );
        }
        "ensure-tables" => {
            let options = match &args[1..] {
                [] => EnsureOptions::default(),
                [flag] if flag == "--remove-retired-indexes" => {
                    EnsureOptions::removing_retired_indexes()
                }
                _ => return Err(USAGE.into()),
            };
            ensure_tables(&dynamo, options).await?
        }
        "migrate" => {
            let mut options = MigrationOptions {
                progress: true,
                ..MigrationOptions::default()
            };
            let mut rest = args[1..].iter();
            while let Some(flag) = rest.next() {
                let mut value = |name: &str| -> Result<u64, String> {
                    rest.next()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| format!("{name} needs a whole number"))
                };
                match flag.as_str() {
                    "--dry-run" => options.dry_run = true,
                    "--no-progress" => options.progress = false,
                    "--page-size" => {
                        options.page_size = value("--page-size")?.clamp(1, 1000) as i32
                    }
                    "--pause-ms" => options.pause = Duration::from_millis(value("--pause-ms")?),
                    other => return Err(format!("unknown option {other:?}\n{USAGE}")),
                }
            }
            dynamo.check_tables().await.map_err(|e| e.report())?;
            let report = migrate_legacy(&dynamo, &options)
                .await
                .map_err(|e| e.report())?;
            println!(
                "{}scanned {} legacy conversations: {} migrated ({} messages), {} already migrated, {} skipped{}",
                if options.dry_run { "dry run: " } else { "" },
                report.scanned,
                report.migrated,
                report.messages,
                report.already_migrated,
                report.skipped,
                if report.resumed {
                    " (resumed a stopped run)"
                } else {
                    ""
                },
            );
        }
        other => return Err(format!("unknown command {other:?}\n{USAGE}")),
    }
    Ok(())
}

/// Creates and upgrades the tables, printing progress while DynamoDB works, then each
/// change made (or `nothing to change`); what cannot be done in place fails the command.
async fn ensure_tables(dynamo: &Dynamo, options: EnsureOptions) -> Result<(), String> {
    let report = dynamo
        .ensure_tables_with_options(options, &|event| {
            // Finished changes are listed once, below.
            if !matches!(event, TableEvent::Changed(_)) {
                println!("{event}");
            }
        })
        .await
        .map_err(|e| e.report())?;
    if report.changes.is_empty() {
        println!("nothing to change");
    }
    for change in &report.changes {
        println!("{change}");
    }
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    for problem in &report.problems {
        eprintln!("error: {problem}");
    }
    match report.problems.len() {
        0 => Ok(()),
        n => Err(format!(
            "{n} problem(s) cannot be fixed in place; nothing else is missing"
        )),
    }
}
