use multiagents::{WorkerError, worker};

struct Opaque;

#[worker("opaque")]
async fn opaque(_input: Opaque) -> Result<u32, WorkerError> {
    Ok(1)
}

fn main() {}
