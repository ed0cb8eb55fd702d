use multiagents::{WorkerError, worker};

#[worker("echo")]
async fn echo<T>(input: T) -> Result<T, WorkerError> {
    Ok(input)
}

fn main() {}
