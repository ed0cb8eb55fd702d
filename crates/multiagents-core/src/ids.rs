//! Identifiers: newtypes so that a step name can never be passed where a
//! worker name is expected, and so that ids print the same everywhere.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A UUIDv7: the current Unix time in milliseconds and 74 random bits from
/// a per-thread generator seeded once from the OS. `Uuid::now_v7` asks the OS
/// for randomness on every call, which showed up as 5% of a benchmark run.
fn fast_v7(ms: u64) -> Uuid {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let (a, b) = Uuid::new_v4().as_u64_pair();
            a ^ b.rotate_left(29)
        });
    }
    fn next(state: &Cell<u64>) -> u64 {
        let s = state.get();
        state.set(s.wrapping_add(crate::hash::GOLDEN));
        crate::hash::splitmix64(s)
    }
    let (r1, r2) = STATE.with(|s| (next(s), next(s)));
    let mut bytes = [0u8; 10];
    bytes[..8].copy_from_slice(&r1.to_le_bytes());
    bytes[8..].copy_from_slice(&r2.to_le_bytes()[..2]);
    uuid::Builder::from_unix_timestamp_millis(ms, &bytes).into_uuid()
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered (UUIDv7) id.
            pub fn new() -> Self {
                Self::at(crate::time::Timestamp::now())
            }

            /// A new UUIDv7 id for the given time (saves a clock read when
            /// the caller has one).
            pub fn at(now: crate::time::Timestamp) -> Self {
                Self(fast_v7(now.as_millis()))
            }

            /// The underlying UUID.
            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// One workflow instance (one saga), from start to its terminal state.
    TransactionId
);
uuid_id!(
    /// The request chain that caused a workflow; carried across sub-workflows.
    CorrelationId
);
uuid_id!(
    /// One event on the bus.
    EventId
);

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a name. Emptiness is checked where names are validated
            /// (the workflow builder), not here.
            pub fn new(name: impl AsRef<str>) -> Self {
                Self(Arc::from(name.as_ref()))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::new(s)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }
    };
}

name_id!(
    /// The name of a workflow definition, e.g. `ecommerce_order`.
    WorkflowName
);
name_id!(
    /// The name of a step inside one workflow definition, e.g. `charge`.
    StepName
);
name_id!(
    /// The name of a worker type, e.g. `process_payment`. Commands for a worker
    /// go to the bus topic of that name.
    WorkerName
);
