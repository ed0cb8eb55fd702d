//! The `multiagents` command.

mod bench;

// The bench measures the framework, not glibc's malloc: a saga step makes a
// few dozen small allocations across threads, where mimalloc is markedly faster.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// multiagents: fault-tolerant multi-step workflows (sagas) — benchmarks and operations.
#[derive(Parser, Debug)]
#[command(name = "multiagents", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a benchmark workload and report throughput, latency and memory.
    Bench {
        #[command(subcommand)]
        workload: bench::Workload,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Bench { workload } => bench::run(workload).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
