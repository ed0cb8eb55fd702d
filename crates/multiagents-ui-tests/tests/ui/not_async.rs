use multiagents::{WorkerContext, WorkerError, worker};

#[worker("sync_one")]
fn sync_one(input: u32, _ctx: WorkerContext) -> Result<u32, WorkerError> {
    Ok(input)
}

fn main() {}
