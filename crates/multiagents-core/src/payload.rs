//! JSON payloads carried without re-parsing: a payload is validated JSON text
//! behind an `Arc`, so cloning an event or a state is cheap and a step's
//! output travels byte for byte from the worker to the steps that read it.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A JSON value kept as text.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(Arc<RawValue>);

impl Payload {
    /// Serializes a value into a payload.
    pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(|raw| Self(Arc::from(raw)))
    }

    /// Validates JSON text and wraps it.
    pub fn from_json_str(text: impl Into<String>) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text.into()).map(|raw| Self(Arc::from(raw)))
    }

    /// JSON `null`.
    pub fn null() -> Self {
        static NULL: std::sync::OnceLock<Payload> = std::sync::OnceLock::new();
        NULL.get_or_init(|| Self::from_raw(RawValue::NULL.to_owned()))
            .clone()
    }

    /// Wraps an already parsed raw value.
    pub fn from_raw(raw: Box<RawValue>) -> Self {
        Self(Arc::from(raw))
    }

    /// Decodes the payload into a typed value.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The raw value, for embedding in other documents without re-encoding.
    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }

    /// Length of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.0.get().len()
    }

    /// The SHA-256 of the JSON text, in lowercase hex: what a store keeps a
    /// large payload under, once however many steps hold it.
    ///
    /// ```
    /// use multiagents_core::Payload;
    ///
    /// let a = Payload::from_json_str(r#"{"a":1}"#).expect("json");
    /// let b = Payload::from_json_str(r#"{"a":1}"#).expect("json");
    /// assert_eq!(a.digest(), b.digest());
    /// assert_eq!(a.digest().len(), 64);
    /// ```
    pub fn digest(&self) -> String {
        use sha2::Digest as _;
        let hash = sha2::Sha256::digest(self.as_str().as_bytes());
        let mut hex = String::with_capacity(64);
        for b in hash {
            use fmt::Write as _;
            let _ = write!(hex, "{b:02x}");
        }
        hex
    }

    /// True when both are the very same text in memory (a clone), without
    /// comparing it.
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Where the text lives: equal for clones of one payload.
    pub fn address(&self) -> usize {
        Arc::as_ptr(&self.0) as *const u8 as usize
    }

    /// True for an empty text (never the case for a valid payload).
    pub fn is_empty(&self) -> bool {
        self.0.get().is_empty()
    }
}

/// For `Option<Payload>` fields: a present `null` is `Some(null)` (a step
/// that returned `null` has an output), an absent field is `None`. Use with
/// `#[serde(default, deserialize_with = "…")]`.
pub fn deserialize_present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Payload>, D::Error> {
    Payload::deserialize(d).map(Some)
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.as_str() == other.as_str()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for Payload {
    fn default() -> Self {
        Self::null()
    }
}

/// Applies an RFC 7386 JSON merge patch to `target`: members of an object
/// patch replace (or, when `null`, remove) the target's, recursively; any
/// other patch replaces the target whole.
///
/// ```
/// use serde_json::json;
/// let mut order = json!({"id": 7, "card": {"number": "4000", "cvc": "1"}});
/// multiagents_core::payload::merge_patch(&mut order, &json!({"card": {"cvc": null, "number": "4242"}}));
/// assert_eq!(order, json!({"id": 7, "card": {"number": "4242"}}));
/// ```
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (key, value) in members {
            if value.is_null() {
                t.remove(key);
            } else {
                merge_patch(t.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}
