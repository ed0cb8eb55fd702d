//! Expressions over a workflow's context, in [CEL] (the Common Expression
//! Language of Kubernetes and Google Cloud): step conditions (`when`) and the
//! lists a step fans out over (`for_each`).
//!
//! An expression sees two variables:
//!
//! * `input` — the workflow input;
//! * `steps` — the outputs of the steps completed so far, by step name.
//!
//! ```text
//! input.gift_wrap == true
//! steps.fraud_check.score < 0.8 && input.total > 100.0
//! has(input.coupon) && input.coupon != ""
//! input.items.filter(i, i.qty > 0)
//! ```
//!
//! Expressions are checked when the definition is built: a syntax error, a
//! variable other than `input` and `steps`, or `steps.X` where `X` is not a
//! step that always finishes before this one, is refused with its line and
//! column. A field a step may leave out is tested with `has(steps.x.field)`.
//!
//! [CEL]: https://github.com/google/cel-spec

use std::fmt;
use std::sync::Arc;

use cel_interpreter::{Context, Value};
use cel_parser::{Expression, Member};

/// A parsed expression, kept with its source text.
#[derive(Clone)]
pub struct Expr {
    source: String,
    ast: Arc<Expression>,
}

impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Why an expression was refused, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExprError {
    /// 1-based line in the expression.
    pub line: usize,
    /// 1-based column in the expression.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}:{}", self.message, self.line, self.column)
    }
}

/// A reference an expression makes: `input…` or `steps.<name>…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// The workflow input.
    Input,
    /// All step outputs (`steps` used as a whole, or with a computed key).
    AllSteps,
    /// One step's output.
    Step(String),
    /// Any other variable (an error in a definition).
    Other(String),
}

impl Expr {
    /// Parses `source`. Only the syntax is checked here; see
    /// [`Expr::references`] for what it refers to.
    pub fn parse(source: &str) -> Result<Self, ExprError> {
        if source.trim().is_empty() {
            return Err(ExprError {
                line: 1,
                column: 1,
                message: "the expression is empty".into(),
            });
        }
        check_literals(source)?;
        // The parser unwraps inside some of its rules; a literal it would
        // choke on is refused above, and anything else it panics on is
        // refused here rather than taking the process down.
        let parsed =
            std::panic::catch_unwind(|| cel_parser::parse(source)).map_err(|_| ExprError {
                line: 1,
                column: 1,
                message: "the expression cannot be parsed".into(),
            })?;
        match parsed {
            Ok(ast) => {
                if let Some((name, given, takes)) = short_call(&ast) {
                    let (line, column) = position_of(source, &name);
                    return Err(ExprError {
                        line,
                        column,
                        message: format!(
                            "`{name}` takes {takes} argument{}, and is given {given}",
                            if takes == 1 { "" } else { "s" }
                        ),
                    });
                }
                Ok(Self {
                    source: source.to_string(),
                    ast: Arc::new(ast),
                })
            }
            Err(e) => {
                let (line, column) = e
                    .span
                    .start
                    .as_ref()
                    .map(|l| (l.line + 1, l.column + 1))
                    .unwrap_or((1, 1));
                let msg = match e.msg.as_str() {
                    "unrecognized eof" => "the expression ends too early".to_string(),
                    other => other.to_string(),
                };
                let mut message = format!("syntax error: {msg}");
                // lalrpop lists tokens as quoted literals or raw regexes: keep the literals.
                let mut expected: Vec<&str> = e
                    .expected
                    .iter()
                    .map(String::as_str)
                    .filter(|t| t.starts_with('"') && t.ends_with('"') && t.len() > 2)
                    .collect();
                if expected.len() < e.expected.len() {
                    expected.insert(0, "a value");
                }
                if !expected.is_empty() {
                    message.push_str(&format!("; expected {}", expected.join(", ")));
                }
                Err(ExprError {
                    line,
                    column,
                    message,
                })
            }
        }
    }

    /// The source text.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Every variable the expression reads, in order of appearance, with
    /// the position of its first mention.
    pub fn references(&self) -> Vec<(Reference, usize, usize)> {
        let mut out = Vec::new();
        let mut bound = Vec::new();
        walk(&self.ast, &mut bound, &mut out);
        let mut refs: Vec<(Reference, usize, usize)> = Vec::new();
        for r in out {
            if refs.iter().any(|(x, _, _)| *x == r) {
                continue;
            }
            let (line, column) = match &r {
                Reference::Input => position_of(&self.source, "input"),
                Reference::AllSteps => position_of(&self.source, "steps"),
                Reference::Step(s) => [
                    format!("steps.{s}"),
                    format!("steps[\"{s}\"]"),
                    format!("steps['{s}']"),
                ]
                .iter()
                .find_map(|n| position_in(&self.source, n))
                .unwrap_or_else(|| position_of(&self.source, s)),
                Reference::Other(s) => position_of(&self.source, s),
            };
            refs.push((r, line, column));
        }
        refs
    }

    /// Evaluates the expression against the workflow input and the step
    /// outputs (a JSON object by step name).
    pub fn eval(
        &self,
        input: &serde_json::Value,
        steps: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let mut ctx = Context::default();
        ctx.add_variable("input", input)
            .map_err(|e| format!("cannot read the input: {e}"))?;
        ctx.add_variable("steps", steps)
            .map_err(|e| format!("cannot read the step outputs: {e}"))?;
        // The interpreter panics on some values (`x % 0`, `x / 0`): that
        // fails the step, with the reason, and not the process.
        let value = quietly(|| Value::resolve(&self.ast, &ctx))
            .map_err(|why| format!("the expression could not be evaluated: {why}"))?
            .map_err(|e| e.to_string())?;
        value
            .json()
            .map_err(|e| format!("the result cannot be turned into JSON: {e:?}"))
    }

    /// Evaluates a condition: it must give a boolean.
    pub fn eval_bool(
        &self,
        input: &serde_json::Value,
        steps: &serde_json::Value,
    ) -> Result<bool, String> {
        match self.eval(input, steps)? {
            serde_json::Value::Bool(b) => Ok(b),
            other => Err(format!("gave {other}, not true or false")),
        }
    }

    /// Evaluates a fan-out list: it must give a list.
    pub fn eval_list(
        &self,
        input: &serde_json::Value,
        steps: &serde_json::Value,
    ) -> Result<Vec<serde_json::Value>, String> {
        match self.eval(input, steps)? {
            serde_json::Value::Array(items) => Ok(items),
            other => Err(format!("gave {other}, not a list")),
        }
    }
}

thread_local! {
    /// Set while [`quietly`] runs its closure on this thread.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into its message. The panic is not printed:
/// the panic hook in place is wrapped once so that it stays silent for
/// panics inside `f` (and is called as before for every other one).
fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    out.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the CEL interpreter failed".into())
    })
}

/// Refuses the literals the CEL parser cannot hold (an integer beyond 64
/// bits, an unsigned one with a minus, a string with a bad escape), naming
/// the literal and where it is. It follows the parser's tokens: identifiers,
/// quoted strings and bytes (with an `r`/`b` prefix), and numbers.
fn check_literals(source: &str) -> Result<(), ExprError> {
    let bytes = source.as_bytes();
    let refuse = |at: usize, end: usize, why: &str| {
        let (line, column) = line_column(source, at);
        Err(ExprError {
            line,
            column,
            message: format!("`{}`: {why}", &source[at..end]),
        })
    };
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let prefix = &source[start..i];
            let quote = bytes.get(i).copied().filter(|q| *q == b'"' || *q == b'\'');
            if let (Some(quote), "r" | "R" | "b" | "B") = (quote, prefix) {
                let is_bytes = matches!(prefix, "b" | "B");
                let Some(end) = string_end(bytes, i, quote, is_bytes) else {
                    // Not a literal to the lexer either: the parser reports it.
                    continue;
                };
                let ok = if is_bytes {
                    cel_parser::parse_bytes(&source[i + 1..end - 1]).is_ok()
                } else {
                    cel_parser::parse_string(&source[start..end]).is_ok()
                };
                if !ok {
                    return refuse(start, end, "the literal has an invalid escape sequence");
                }
                i = end;
            }
            continue;
        }
        if c == b'"' || c == b'\'' {
            let Some(end) = string_end(bytes, i, c, false) else {
                return Ok(());
            };
            if cel_parser::parse_string(&source[i..end]).is_err() {
                return refuse(i, end, "the string has an invalid escape sequence");
            }
            i = end;
            continue;
        }
        let negative = c == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
        if !(c.is_ascii_digit() || negative) {
            i += 1;
            continue;
        }
        let start = i;
        let digits_at = if negative { i + 1 } else { i };
        let run = |from: usize, hex: bool| {
            let mut j = from;
            while j < bytes.len()
                && (bytes[j].is_ascii_digit() || (hex && bytes[j].is_ascii_hexdigit()))
            {
                j += 1;
            }
            j
        };
        let is_hex = bytes[digits_at] == b'0'
            && matches!(bytes.get(digits_at + 1), Some(b'x' | b'X'))
            && bytes.get(digits_at + 2).is_some_and(u8::is_ascii_hexdigit);
        if is_hex {
            let end = run(digits_at + 2, true);
            let unsigned = matches!(bytes.get(end), Some(b'u' | b'U'));
            let digits = &source[digits_at + 2..end];
            let fits = if unsigned {
                !negative && u64::from_str_radix(digits, 16).is_ok()
            } else {
                let signed = if negative {
                    format!("-{digits}")
                } else {
                    digits.to_string()
                };
                i64::from_str_radix(&signed, 16).is_ok()
            };
            let end = end + usize::from(unsigned);
            if !fits {
                return refuse(start, end, "the number does not fit in 64 bits");
            }
            i = end;
            continue;
        }
        let end = run(digits_at, false);
        let exponent = |at: usize| {
            matches!(bytes.get(at), Some(b'e' | b'E')) && {
                let k = at + 1 + usize::from(matches!(bytes.get(at + 1), Some(b'+' | b'-')));
                bytes.get(k).is_some_and(u8::is_ascii_digit)
            }
        };
        let fraction =
            bytes.get(end) == Some(&b'.') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit);
        if fraction || exponent(end) {
            // A float: any size parses (to infinity at worst).
            let mut j = if fraction { run(end + 1, false) } else { end };
            if exponent(j) {
                j += 1;
                j += usize::from(matches!(bytes.get(j), Some(b'+' | b'-')));
                j = run(j, false);
            }
            i = j;
            continue;
        }
        let unsigned = !negative && matches!(bytes.get(end), Some(b'u' | b'U'));
        let fits = if unsigned {
            source[digits_at..end].parse::<u64>().is_ok()
        } else {
            source[start..end].parse::<i64>().is_ok()
        };
        let end = end + usize::from(unsigned);
        if !fits {
            return refuse(start, end, "the number does not fit in 64 bits");
        }
        i = end;
    }
    Ok(())
}

/// The index just past the closing quote of a string literal opening at
/// `open`, as the CEL lexer finds it; `None` when there is none. In a string
/// a backslash escapes the next character (not a newline). A bytes literal
/// (`(\\.|[^"\n])*`) may also take a backslash as a plain character and
/// ends at no newline; the lexer takes its longest match, so its end is the
/// last quote on the line that some reading reaches.
fn string_end(bytes: &[u8], open: usize, quote: u8, is_bytes: bool) -> Option<usize> {
    if !is_bytes {
        let mut j = open + 1;
        while j < bytes.len() {
            match bytes[j] {
                b'\\' if bytes.get(j + 1).is_some_and(|n| *n != b'\n') => j += 2,
                b'\\' => return None,
                q if q == quote => return Some(j + 1),
                _ => j += 1,
            }
        }
        return None;
    }
    // reach[k]: some reading of the body stands at byte `open + 1 + k`.
    let body = open + 1;
    let line_end = bytes[body..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(bytes.len(), |p| body + p);
    let mut reach = vec![false; line_end - body + 1];
    reach[0] = true;
    let mut end = None;
    for j in body..line_end {
        if !reach[j - body] {
            continue;
        }
        if bytes[j] == quote {
            end = Some(j + 1);
            continue;
        }
        reach[j + 1 - body] = true;
        if bytes[j] == b'\\' && j + 1 < line_end {
            reach[j + 2 - body] = true;
        }
    }
    end
}

/// The 1-based line and column of byte `at` in `source`.
fn line_column(source: &str, at: usize) -> (usize, usize) {
    let before = &source[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The built-in functions and how many arguments each needs at least,
/// counting the target of a method call (`x.size()` is `size(x)`). The
/// interpreter reads a macro's missing arguments unchecked (and panics);
/// the others would fail every evaluation.
const ARITY: [(&str, usize); 15] = [
    ("contains", 2),
    ("size", 1),
    ("has", 1),
    ("map", 3),
    ("filter", 3),
    ("all", 3),
    ("exists", 3),
    ("exists_one", 3),
    ("startsWith", 2),
    ("endsWith", 2),
    ("string", 1),
    ("bytes", 1),
    ("double", 1),
    ("int", 1),
    ("uint", 1),
];

/// The first call to a built-in function with too few arguments: its name,
/// the arguments given and those it takes (both without the target of a
/// method call).
fn short_call(e: &Expression) -> Option<(String, usize, usize)> {
    let children: Vec<&Expression> = match e {
        Expression::Arithmetic(a, _, b)
        | Expression::Relation(a, _, b)
        | Expression::Or(a, b)
        | Expression::And(a, b) => vec![a, b],
        Expression::Ternary(a, b, c) => vec![a, b, c],
        Expression::Unary(_, a) => vec![a],
        Expression::Member(target, member) => {
            let mut out: Vec<&Expression> = vec![target];
            match &**member {
                Member::Attribute(_) => {}
                Member::Index(key) => out.push(key),
                Member::Fields(fields) => out.extend(fields.iter().map(|(_, v)| v)),
            }
            out
        }
        Expression::FunctionCall(name, target, args) => {
            if let Expression::Ident(name) = &**name
                && let Some((_, least)) = ARITY.iter().find(|(n, _)| *n == name.as_str())
            {
                let on = usize::from(target.is_some());
                if args.len() + on < *least {
                    return Some((name.to_string(), args.len(), least - on));
                }
            }
            let mut out: Vec<&Expression> = vec![name];
            out.extend(target.as_deref());
            out.extend(args.iter());
            out
        }
        Expression::List(items) => items.iter().collect(),
        Expression::Map(entries) => entries.iter().flat_map(|(k, v)| [k, v]).collect(),
        Expression::Atom(_) | Expression::Ident(_) => Vec::new(),
    };
    children.into_iter().find_map(short_call)
}

/// Macros whose first argument names a variable bound in the second.
const BINDING_MACROS: [&str; 5] = ["all", "exists", "exists_one", "map", "filter"];

fn walk(e: &Expression, bound: &mut Vec<String>, out: &mut Vec<Reference>) {
    match e {
        Expression::Arithmetic(a, _, b)
        | Expression::Relation(a, _, b)
        | Expression::Or(a, b)
        | Expression::And(a, b) => {
            walk(a, bound, out);
            walk(b, bound, out);
        }
        Expression::Ternary(a, b, c) => {
            walk(a, bound, out);
            walk(b, bound, out);
            walk(c, bound, out);
        }
        Expression::Unary(_, a) => walk(a, bound, out),
        Expression::Member(target, member) => {
            // `steps.name` and `steps["name"]` name one step.
            if let Expression::Ident(root) = &**target
                && root.as_str() == "steps"
                && !bound.iter().any(|b| b == "steps")
            {
                match &**member {
                    Member::Attribute(name) => {
                        out.push(Reference::Step(name.to_string()));
                        return;
                    }
                    Member::Index(key) => {
                        if let Expression::Atom(cel_parser::Atom::String(name)) = &**key {
                            out.push(Reference::Step(name.to_string()));
                            return;
                        }
                    }
                    Member::Fields(_) => {}
                }
            }
            walk(target, bound, out);
            match &**member {
                Member::Attribute(_) => {}
                Member::Index(key) => walk(key, bound, out),
                Member::Fields(fields) => {
                    for (_, v) in fields {
                        walk(v, bound, out);
                    }
                }
            }
        }
        Expression::FunctionCall(name, target, args) => {
            let binds =
                matches!(&**name, Expression::Ident(n) if BINDING_MACROS.contains(&n.as_str()));
            if let Some(t) = target {
                walk(t, bound, out);
            }
            match (binds, args.as_slice()) {
                (true, [Expression::Ident(var), rest @ ..]) => {
                    bound.push(var.to_string());
                    for a in rest {
                        walk(a, bound, out);
                    }
                    bound.pop();
                }
                _ => {
                    for a in args {
                        walk(a, bound, out);
                    }
                }
            }
        }
        Expression::List(items) => {
            for i in items {
                walk(i, bound, out);
            }
        }
        Expression::Map(entries) => {
            for (k, v) in entries {
                walk(k, bound, out);
                walk(v, bound, out);
            }
        }
        Expression::Atom(_) => {}
        Expression::Ident(name) => {
            if bound.iter().any(|b| b == name.as_str()) {
                return;
            }
            out.push(match name.as_str() {
                "input" => Reference::Input,
                "steps" => Reference::AllSteps,
                other => Reference::Other(other.to_string()),
            });
        }
    }
}

/// The 1-based line and column of the first whole-word occurrence of
/// `needle` in `source` ((1, 1) when not found).
fn position_of(source: &str, needle: &str) -> (usize, usize) {
    position_in(source, needle).unwrap_or((1, 1))
}

fn position_in(source: &str, needle: &str) -> Option<(usize, usize)> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(found) = source[from..].find(needle) {
        let start = from + found;
        let end = start + needle.len();
        let before = source[..start].chars().next_back();
        let after = source[end..].chars().next();
        if !before.is_some_and(is_word) && !after.is_some_and(is_word) {
            let line = source[..start].matches('\n').count() + 1;
            let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
            return Some((line, source[line_start..start].chars().count() + 1));
        }
        from = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_references_and_their_positions() {
        let e = Expr::parse("input.gift && steps.fraud.score < 0.5 && steps[\"x\"].ok")
            .expect("parses");
        let refs = e.references();
        assert_eq!(
            refs,
            vec![
                (Reference::Input, 1, 1),
                (Reference::Step("fraud".into()), 1, 15),
                (Reference::Step("x".into()), 1, 42),
            ]
        );
    }

    #[test]
    fn literals_the_parser_cannot_hold_are_refused_with_their_position() {
        // Each of these made the CEL parser panic (found by fuzzing).
        let cases = [
            // A bytes literal may take a backslash as a plain character:
            // the second one here ends at the quote after seven backslashes.
            (
                "\"[b\"[b\":E?\\\\\\\\\\\\\\\":b\\ \\\\\\\n?<!b]\u{12}",
                1,
                6,
                "invalid escape",
            ),
            (
                "input.n > 111111111111111111111",
                1,
                11,
                "`111111111111111111111`",
            ),
            (
                "input.n == 0xFFFFFFFFFFFFFFFFFF",
                1,
                12,
                "`0xFFFFFFFFFFFFFFFFFF`",
            ),
            (
                "input.n == 99999999999999999999u",
                1,
                12,
                "`99999999999999999999u`",
            ),
            ("input.n == -0x1u", 1, 12, "`-0x1u`"),
            ("input.s == 'a\\qb'", 1, 12, "invalid escape"),
            (
                "input.s == r\"x\" &&\n  input.b == b'\\xZZ'",
                2,
                14,
                "invalid escape",
            ),
        ];
        for (source, line, column, says) in cases {
            let e = Expr::parse(source).expect_err(source);
            assert_eq!((e.line, e.column), (line, column), "{source}: {e}");
            assert!(e.message.contains(says), "{source}: {e}");
        }
        // The edges still parse.
        for source in [
            "input.n > -9223372036854775808 && input.n < 9223372036854775807",
            "input.n < 18446744073709551615u && input.n > 0x7FFFFFFFFFFFFFFF",
            "input.f < 1e999 && input.f > -1.5e-999 && input.s == 'it\\'s' && input.id1 == 2",
        ] {
            Expr::parse(source).expect(source);
        }
    }

    #[test]
    fn calls_with_too_few_arguments_are_refused() {
        // The interpreter panicked on the macros (found by fuzzing); the
        // others would fail every time they ran.
        let cases = [
            (
                "steps.all(l, ) && true",
                "`all` takes 2 arguments, and is given 1",
            ),
            (
                "input.items.map(x)",
                "`map` takes 2 arguments, and is given 1",
            ),
            (
                "input.s.startsWith()",
                "`startsWith` takes 1 argument, and is given 0",
            ),
            ("size() > 0", "`size` takes 1 argument, and is given 0"),
            ("[1].exists_one(x)", "`exists_one` takes 2 arguments"),
        ];
        for (source, says) in cases {
            let e = Expr::parse(source).expect_err(source);
            assert!(e.message.contains(says), "{source}: {e}");
        }
        for source in [
            "size(input.items) > 0",
            "input.items.size() > 0",
            "max(1, 2, 3) == 3",
        ] {
            Expr::parse(source).expect(source);
        }
    }

    #[test]
    fn a_division_by_zero_fails_the_evaluation_and_says_so() {
        // The interpreter panicked on it (found by fuzzing).
        for source in ["9 % 0 == 1", "input.n / input.zero > 1"] {
            let e = Expr::parse(source).expect(source);
            let err = e
                .eval_bool(&json!({"n": 4, "zero": 0}), &json!({}))
                .expect_err(source);
            assert!(err.contains("could not be evaluated"), "{source}: {err}");
            assert!(err.contains("zero"), "{source}: {err}");
        }
        let e = Expr::parse("10 / 5 == 2 && input.n / input.two == 2u").expect("parses");
        assert_eq!(
            e.eval_bool(&json!({"n": 4, "two": 2}), &json!({})),
            Ok(true)
        );
    }

    #[test]
    fn macro_variables_are_not_references() {
        let e =
            Expr::parse("input.items.all(i, i.qty > 0) && size(input.items) > 0").expect("parses");
        assert_eq!(
            e.references().into_iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![Reference::Input]
        );
        let e = Expr::parse("order.total > 3").expect("parses");
        assert_eq!(e.references()[0], (Reference::Other("order".into()), 1, 1));
    }

    #[test]
    fn syntax_errors_say_where() {
        let err = Expr::parse("input.a == ").expect_err("incomplete");
        assert_eq!((err.line, err.column), (1, 11), "{err}");
        assert!(err.message.contains("ends too early"), "{err}");
        let err = Expr::parse("input.a &&\n  ) ").expect_err("bad");
        assert_eq!(err.line, 2, "{err}");
        assert!(Expr::parse("  ").is_err());
    }

    #[test]
    fn evaluates_conditions_and_lists() {
        let input =
            json!({"gift_wrap": true, "items": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 0}]});
        let steps = json!({"fraud": {"score": 0.2}});
        let when = Expr::parse("input.gift_wrap && steps.fraud.score < 0.5").expect("parses");
        assert_eq!(when.eval_bool(&input, &steps), Ok(true));
        let list = Expr::parse("input.items.filter(i, i.qty > 0)").expect("parses");
        assert_eq!(
            list.eval_list(&input, &steps),
            Ok(vec![json!({"sku": "a", "qty": 2})])
        );
        let not_bool = Expr::parse("input.items").expect("parses");
        assert!(not_bool.eval_bool(&input, &steps).is_err());
        let missing = Expr::parse("input.coupon == 'x'").expect("parses");
        assert!(missing.eval_bool(&input, &steps).is_err());
        let has = Expr::parse("has(input.coupon) && input.coupon == 'x'").expect("parses");
        assert_eq!(has.eval_bool(&input, &steps), Ok(false));
    }
}
