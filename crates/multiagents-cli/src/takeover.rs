//! `multiagents bench takeover`: how soon a live consumer takes over the
//! deliveries of a process killed with SIGKILL, on Redis.
//!
//! Each trial publishes a batch of events to a fresh stream; a child process
//! (this command with `--hold`) takes them all and extends their leases at
//! the beat a worker manager uses, then is killed at a random moment of its
//! beat. This process measures the time from the kill to the moment it has
//! been handed every one of them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use multiagents::Error;
use multiagents::bus::{Consumer, RedisBusConfig, RedisStreamsBus, Topics};
use multiagents::core::{CorrelationId, Event, EventKind, Payload, TransactionId, WorkflowName};

use crate::error::{CliError, Result};

#[derive(clap::Args, Debug)]
pub struct TakeoverArgs {
    /// The Redis server.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// A PEM file of CA certificates to trust, for a `rediss://` server.
    #[arg(long, env = "REDIS_CA_FILE", value_name = "PEM")]
    redis_ca_file: Option<PathBuf>,
    /// Key prefix in Redis.
    #[arg(long, default_value = "takeover")]
    prefix: String,
    /// The bus's visibility timeout (the beat is five eighths of it).
    #[arg(long, default_value = "1500ms", value_parser = super::bench::parse_duration)]
    visibility_timeout: Duration,
    /// Trials, each with a process of its own killed.
    #[arg(long, default_value_t = 10)]
    trials: u32,
    /// Deliveries the killed process holds in each trial.
    #[arg(long, default_value_t = 20)]
    entries: u32,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// (internal) Hold the entries of this stream until killed.
    #[arg(long, hide = true)]
    hold: Option<String>,
}

impl TakeoverArgs {
    async fn bus(&self) -> Result<RedisStreamsBus, Error> {
        let mut config = RedisBusConfig::new(&self.redis_url)
            .prefix(&self.prefix)
            .visibility_timeout(self.visibility_timeout);
        config.ca_file = self.redis_ca_file.clone();
        Ok(RedisStreamsBus::connect(config).await?)
    }
}

const GROUP: &str = "takeover";

fn io(e: std::io::Error) -> CliError {
    CliError::process("the holder process", e)
}

pub async fn run(args: TakeoverArgs) -> Result<ExitCode> {
    let bus = args.bus().await?;
    if let Some(topic) = &args.hold {
        return hold(&bus, topic, args.entries).await;
    }
    let run_id = std::process::id();
    let mut first = Vec::new();
    let mut last = Vec::new();
    let mut beat = Duration::ZERO;
    for trial in 0..args.trials {
        let topic = format!("trial-{run_id}-{trial}");
        let events = (0..args.entries)
            .map(|i| {
                let event = Event::new(
                    EventKind::Command,
                    TransactionId::new(),
                    CorrelationId::new(),
                    WorkflowName::from("takeover"),
                    Payload::from_json_str(i.to_string()).unwrap_or_default(),
                );
                (topic.clone(), event)
            })
            .collect();
        bus.publish_many(events).await?;
        let mut child = std::process::Command::new(std::env::current_exe().map_err(io)?)
            .args(["bench", "takeover", "--hold", &topic])
            .args(["--redis-url", &args.redis_url, "--prefix", &args.prefix])
            .args(["--entries", &args.entries.to_string()])
            .arg("--visibility-timeout")
            .arg(format!("{}ms", args.visibility_timeout.as_millis()))
            .args(
                args.redis_ca_file
                    .iter()
                    .flat_map(|p| [PathBuf::from("--redis-ca-file"), p.clone()]),
            )
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .map_err(io)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| CliError::process("the holder process", "no stdout"))?;
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .map_err(|e| CliError::process("reading the holder's stdout", e))?
        .map_err(io)?;
        if line.trim() != "held" {
            let _ = child.kill();
            return Err(CliError::process(
                "the holder process",
                format!("it said {read:?}, not `held`", read = line.trim()),
            ));
        }
        let taker = bus
            .consumer(&topic, GROUP, &format!("taker-{run_id}"))
            .await?;
        beat = taker.extend_every();
        // Kill at a random moment of the holder's beat.
        let noise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()) / 1000);
        let phase = noise % (beat.as_micros().max(1) as u64);
        tokio::time::sleep(Duration::from_micros(phase)).await;
        child.kill().map_err(io)?;
        let killed = Instant::now();
        child.wait().map_err(io)?;
        let (mut got, mut at_first) = (0u32, None);
        while got < args.entries {
            let batch = taker
                .next_batch(args.entries as usize, Duration::from_millis(50))
                .await?;
            if batch.is_empty() {
                if killed.elapsed() > args.visibility_timeout * 10 {
                    return Err(CliError::Check(format!(
                        "trial {trial}: {got} of {} taken over after {:?}",
                        args.entries,
                        killed.elapsed()
                    )));
                }
                continue;
            }
            at_first.get_or_insert_with(|| killed.elapsed());
            got += batch.len() as u32;
            let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
            taker.ack(&ids).await?;
        }
        let done = killed.elapsed();
        first.push(at_first.unwrap_or(done));
        last.push(done);
        eprintln!(
            "trial {}/{}: killed {:.0} ms into its beat; first taken over after {:.0} ms, all {} after {:.0} ms ({:.2} beats)",
            trial + 1,
            args.trials,
            phase as f64 / 1000.0,
            at_first.unwrap_or(done).as_secs_f64() * 1000.0,
            args.entries,
            done.as_secs_f64() * 1000.0,
            done.as_secs_f64() / beat.as_secs_f64()
        );
    }
    last.sort();
    first.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0).round();
    let median = |v: &[Duration]| v[v.len() / 2];
    let report = serde_json::json!({
        "trials": args.trials,
        "entries": args.entries,
        "visibility_timeout_ms": ms(args.visibility_timeout),
        "beat_ms": ms(beat),
        "takeover_all_ms": {"min": ms(last[0]), "median": ms(median(&last)), "max": ms(last[last.len() - 1])},
        "takeover_first_ms": {"min": ms(first[0]), "median": ms(median(&first)), "max": ms(first[first.len() - 1])},
        "max_in_beats": (last[last.len() - 1].as_secs_f64() / beat.as_secs_f64() * 100.0).round() / 100.0,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "takeover of a killed process's {} deliveries, {} trials: median {} ms, max {} ms = {} beats of {} ms",
            args.entries,
            args.trials,
            report["takeover_all_ms"]["median"],
            report["takeover_all_ms"]["max"],
            report["max_in_beats"],
            report["beat_ms"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Takes every entry of `topic`, says `held`, and extends them at the beat
/// until killed.
async fn hold(bus: &RedisStreamsBus, topic: &str, entries: u32) -> Result<ExitCode> {
    let consumer: Arc<dyn Consumer> = bus
        .consumer(topic, GROUP, &format!("holder-{}", std::process::id()))
        .await?;
    let mut ids = Vec::new();
    while ids.len() < entries as usize {
        let batch = consumer
            .next_batch(entries as usize - ids.len(), Duration::from_millis(100))
            .await?;
        ids.extend(batch.into_iter().map(|d| d.id));
    }
    println!("held");
    let every = consumer.extend_every();
    loop {
        tokio::time::sleep(every).await;
        consumer.extend(&ids).await?;
    }
}
