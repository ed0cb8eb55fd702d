use multiagents::worker;

#[worker("fire")]
async fn fire(input: u32) {
    let _ = input;
}

fn main() {}
