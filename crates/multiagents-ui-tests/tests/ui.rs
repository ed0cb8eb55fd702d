//! `#[worker]` misused: each case in `tests/ui/` must fail to compile with
//! the error in its `.stderr` file.

#[test]
fn misuse_is_refused_with_a_clear_message() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
