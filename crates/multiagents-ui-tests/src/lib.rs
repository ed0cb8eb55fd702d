//! Nothing but tests: `tests/ui.rs` compiles each misuse of `#[worker]` in
//! `tests/ui/` and checks the error it gives. They live in a crate of their
//! own so that the compiler checks them against `multiagents` without its
//! default features and without the main crate's dev-dependencies: a few
//! dozen crates to check instead of hundreds.
