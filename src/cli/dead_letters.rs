//! `dead-letters`: list, show and redrive the bad messages kept in `dead_letters`.
//!
//! A redrive publishes a dead letter again to the topic and partition it was read from (with
//! its original key; its payload as it was, or replaced from a file once the producer's
//! mistake is understood) and marks it as redriven, with when and where it went, in a
//! transaction of its own per message. The published message takes the normal path: dedupe
//! by event id, the rules, dead-lettering again if still bad. A dead letter already redriven
//! is refused unless `--again` says so; the row lock makes two concurrent redrives take turns.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::cli::{EXIT_CONFIG, runtime};
use crate::config::Settings;
use crate::store;
use crate::store::dead_letters::{self, DeadLetter, Filter};

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    #[command(subcommand)]
    pub command: DeadLettersCommand,
}

impl DeadLettersCommand {
    /// Whether it talks to Kafka (and so needs its settings).
    pub fn sends(&self) -> bool {
        matches!(self, DeadLettersCommand::Redrive { .. })
    }
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Dead letters, newest first: id, position, reason, when, and whether redriven.
    List {
        /// Only this partition's.
        #[arg(long)]
        partition: Option<i32>,
        /// Only this reason (`invalid_json`, `wrong_type`, `invalid_quantity`, `event_id_conflict`, ...).
        #[arg(long)]
        error: Option<String>,
        /// Also those already redriven.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// One dead letter in full: position, reason, detail, raw key and payload.
    Show { id: i64 },
    /// Publish dead letters again, each to the topic and partition it was read from, and mark
    /// each with when and where it went.
    Redrive {
        /// Ids from `list`.
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Send this file's bytes as the payload instead of the kept one (one id only).
        #[arg(long, value_name = "FILE")]
        payload: Option<PathBuf>,
        /// Send ones already redriven once more (their event ids dedupe what was applied).
        #[arg(long)]
        again: bool,
        /// Print what would be sent, send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// How long one message may take to be acknowledged (librdkafka's `message.timeout.ms`).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn main(settings: &Settings, args: &DeadLettersArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        match &args.command {
            DeadLettersCommand::List {
                partition,
                error,
                all,
                limit,
            } => {
                let db = store::connect(&settings.database.url).await?;
                let filter = Filter {
                    partition: *partition,
                    error: error.clone(),
                    redriven_too: *all,
                    limit: *limit,
                };
                let found = dead_letters::list(&db, &filter).await?;
                println!(
                    "{:>8}  {:<24} {:<20} {:<24} redriven",
                    "id", "position", "error", "received"
                );
                for d in &found {
                    println!(
                        "{:>8}  {:<24} {:<20} {:<24} {}",
                        d.id,
                        position(d),
                        d.error,
                        d.received_at,
                        d.redriven
                            .as_ref()
                            .map_or("-".to_owned(), |(at, to)| format!("{at} to {to}"))
                    );
                }
                println!("{} dead letter(s)", found.len());
                Ok(ExitCode::SUCCESS)
            }
            DeadLettersCommand::Show { id } => {
                let db = store::connect(&settings.database.url).await?;
                let Some(d) = dead_letters::get(&db, *id).await? else {
                    eprintln!("no dead letter {id}");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                };
                print!("{}", describe(&d));
                Ok(ExitCode::SUCCESS)
            }
            DeadLettersCommand::Redrive {
                ids,
                payload,
                again,
                dry_run,
            } => redrive(settings, ids, payload.as_ref(), *again, *dry_run).await,
        }
    })
}

async fn redrive(
    settings: &Settings,
    ids: &[i64],
    payload: Option<&PathBuf>,
    again: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    if payload.is_some() && ids.len() != 1 {
        eprintln!("--payload replaces one dead letter's payload: name exactly one id");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let replacement = match payload {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let mut db = store::connect(&settings.database.url).await?;
    // Checked before anything is sent, so that a refusal sends nothing: a schema a newer
    // release made, then the dead letters named.
    store::migrate::refuse_newer(&db).await?;
    let Some(found) = find_all(&db, ids).await? else {
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    if !again && already_redriven(&found) {
        eprintln!("nothing sent: pass --again to send them once more");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    if dry_run {
        for d in &found {
            print_would_send(d, replacement.as_deref());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let producer: FutureProducer = settings
        .kafka
        .producer_config()
        // Bounds the wait for each acknowledgement, which a transaction spends idle.
        .set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        )
        .create()
        .context("creating the producer")?;
    let mut skipped = 0;
    for d in &found {
        if !send_one(&mut db, &producer, d, replacement.as_deref(), again).await? {
            skipped += 1;
        }
    }
    Ok(if skipped == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Every dead letter named, or `None` (said on stderr) if one of them does not exist.
async fn find_all(
    db: &tokio_postgres::Client,
    ids: &[i64],
) -> anyhow::Result<Option<Vec<DeadLetter>>> {
    let mut found = Vec::with_capacity(ids.len());
    for id in ids {
        match dead_letters::get(db, *id).await? {
            Some(d) => found.push(d),
            None => {
                eprintln!("no dead letter with id {id}: nothing sent");
                return Ok(None);
            }
        }
    }
    Ok(Some(found))
}

/// Whether some of them were redriven before; says which, and where to.
fn already_redriven(found: &[DeadLetter]) -> bool {
    let mut any = false;
    for d in found {
        if let Some((at, to)) = &d.redriven {
            eprintln!("dead letter {} was already redriven at {at} to {to}", d.id);
            any = true;
        }
    }
    any
}

fn print_would_send(d: &DeadLetter, replacement: Option<&[u8]>) {
    let bytes = replacement.or(d.payload.as_deref());
    println!(
        "would send dead letter {} to {}/{}: {} bytes{}",
        d.id,
        d.topic,
        d.partition,
        bytes.map_or(0, <[u8]>::len),
        if replacement.is_some() {
            " (replaced payload)"
        } else {
            ""
        }
    );
}

/// Sends one dead letter back where it was read and marks it, in one transaction: the mark
/// commits right after the send, so a failure later on leaves every message sent so far
/// marked. `false`: not sent (gone, or redriven meanwhile by someone else).
async fn send_one(
    db: &mut tokio_postgres::Client,
    producer: &FutureProducer,
    d: &DeadLetter,
    replacement: Option<&[u8]>,
    again: bool,
) -> anyhow::Result<bool> {
    let tx = db.transaction().await?;
    tx.batch_execute("SET LOCAL idle_in_transaction_session_timeout = '60s'")
        .await?;
    let Some(current) = dead_letters::lock(&tx, &[d.id]).await?.pop() else {
        eprintln!(
            "dead letter {} is gone (retention dropped it): not sent",
            d.id
        );
        return Ok(false);
    };
    if current.redriven.is_some() && !again {
        eprintln!(
            "dead letter {} was redriven meanwhile by someone else: not sent",
            d.id
        );
        return Ok(false);
    }
    // Back where it was read: its partition keeps it in order with its key's other events.
    let mut record = FutureRecord::<[u8], [u8]>::to(&d.topic).partition(d.partition);
    // A message kept without a payload is sent without one.
    if let Some(bytes) = replacement.or(d.payload.as_deref()) {
        record = record.payload(bytes);
    }
    if let Some(key) = d.key.as_deref() {
        record = record.key(key);
    }
    let delivered = producer
        .send(record, DELIVERY_TIMEOUT)
        .await
        .map_err(|(e, _)| anyhow::anyhow!("sending dead letter {}: {e}", d.id))?;
    let to = format!("{}/{}@{}", d.topic, delivered.partition, delivered.offset);
    dead_letters::mark_redriven(&tx, d.id, &to).await?;
    tx.commit().await.with_context(|| {
        format!(
            "dead letter {} was sent to {to} but could not be marked",
            d.id
        )
    })?;
    println!("redrove dead letter {} ({}) to {to}", d.id, position(d));
    Ok(true)
}

fn position(d: &DeadLetter) -> String {
    format!("{}/{}@{}", d.topic, d.partition, d.offset)
}

/// A dead letter in full, for `show`.
fn describe(d: &DeadLetter) -> String {
    let redriven = d
        .redriven
        .as_ref()
        .map_or("no".to_owned(), |(at, to)| format!("at {at} to {to}"));
    format!(
        "id:        {}\nposition:  {}\nreceived:  {}\nerror:     {}\ndetail:    {}\nredriven:  {}\nkey:       {}\npayload:   {}\n",
        d.id,
        position(d),
        d.received_at,
        d.error,
        d.detail,
        redriven,
        bytes(d.key.as_deref()),
        bytes(d.payload.as_deref()),
    )
}

/// Raw bytes as text when they are UTF-8, else as hex (`\x...`, as psql prints bytea).
fn bytes(b: Option<&[u8]>) -> String {
    match b {
        None => "(none)".to_owned(),
        Some(b) => match std::str::from_utf8(b) {
            Ok(text) => text.to_owned(),
            Err(_) => {
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                format!("\\x{hex} ({} bytes, not UTF-8)", b.len())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_text_when_they_can_be() {
        assert_eq!(bytes(None), "(none)");
        assert_eq!(bytes(Some(b"{\"a\":1}")), "{\"a\":1}");
        assert_eq!(bytes(Some(&[0xff, 0x00])), "\\xff00 (2 bytes, not UTF-8)");
    }
}
