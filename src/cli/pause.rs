//! `pause` and `resume`: stop applying a partition's events (or the whole topic's) across all
//! replicas for a maintenance window, and start again. The state is in the database
//! ([`crate::store::pauses`]), so whichever replica owns a partition, now or after a
//! rebalance, honours it. A paused partition's lag grows; nothing is skipped.

use std::process::ExitCode;

use clap::Args;

use crate::cli::runtime;
use crate::config::Settings;
use crate::store::{self, pauses};

#[derive(Debug, Args)]
pub struct PauseArgs {
    /// A partition to pause (repeat for more); none: the whole topic.
    #[arg(long = "partition", value_name = "P")]
    pub partitions: Vec<i32>,
    /// Why, for whoever looks (`status` shows it).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// A partition to resume (repeat for more); none: every pause of the topic.
    #[arg(long = "partition", value_name = "P")]
    pub partitions: Vec<i32>,
}

pub fn pause(settings: &Settings, args: &PauseArgs) -> anyhow::Result<ExitCode> {
    let (group, topic) = (&settings.kafka.group_id, &settings.kafka.topic);
    let partitions = if args.partitions.is_empty() {
        vec![pauses::WHOLE_TOPIC]
    } else {
        args.partitions.clone()
    };
    if let Some(bad) = partitions
        .iter()
        .find(|p| **p < 0 && **p != pauses::WHOLE_TOPIC)
    {
        eprintln!("no partition {bad}");
        return Ok(ExitCode::from(crate::cli::EXIT_CONFIG));
    }
    runtime()?.block_on(async {
        let mut db = store::connect(&settings.database.url).await?;
        store::migrate::refuse_newer(&db).await?;
        pauses::pause(
            &mut db,
            group,
            topic,
            &partitions,
            &operator(),
            args.reason.as_deref(),
        )
        .await?;
        anyhow::Ok(())
    })?;
    println!(
        "paused {} of {topic} for group {group}: no batch of it is in flight, and none applies until `resume`",
        describe(&args.partitions)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn resume(settings: &Settings, args: &ResumeArgs) -> anyhow::Result<ExitCode> {
    let (group, topic) = (&settings.kafka.group_id, &settings.kafka.topic);
    let chosen = (!args.partitions.is_empty()).then_some(args.partitions.as_slice());
    let (lifted, left) = runtime()?.block_on(async {
        let db = store::connect(&settings.database.url).await?;
        store::migrate::refuse_newer(&db).await?;
        let lifted = pauses::resume(&db, group, topic, chosen).await?;
        anyhow::Ok((lifted, pauses::list(&db, group, topic).await?))
    })?;
    println!(
        "resumed {} of {topic} for group {group} ({lifted} pause(s) lifted)",
        describe(&args.partitions)
    );
    if left.iter().any(|p| p.partition == pauses::WHOLE_TOPIC) {
        println!("the whole topic is still paused: `resume` without --partition lifts that");
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(partitions: &[i32]) -> String {
    if partitions.is_empty() {
        "the whole topic".to_owned()
    } else {
        let list: Vec<String> = partitions.iter().map(i32::to_string).collect();
        format!("partition(s) {}", list.join(", "))
    }
}

/// Who is pausing, as far as this process can tell: user and host.
fn operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("{user}@{host}")
}
