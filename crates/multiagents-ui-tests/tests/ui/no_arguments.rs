use multiagents::{WorkerError, worker};

#[worker("nothing")]
async fn nothing() -> Result<u32, WorkerError> {
    Ok(1)
}

fn main() {}
