use multiagents::{WorkerError, worker};

#[worker(charge)]
async fn charge(input: u32) -> Result<u32, WorkerError> {
    Ok(input)
}

fn main() {}
