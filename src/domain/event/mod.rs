//! Decoding and validation of one event, `bytes -> Result<Event, InvalidEvent>`, exactly as
//! docs/contract.md section 1 states it. Every rejection names a stable reason code (stored in
//! `dead_letters.error`) and a human detail, because an operator looking at a dead letter must
//! be able to tell the producer what to fix without reading this code.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Largest accepted message value, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
pub const MAX_EVENT_ID_CHARS: usize = 128;
pub const MAX_SKU_CHARS: usize = 64;
pub const MAX_LINES: usize = 100;
pub const MAX_ABS_QUANTITY: i64 = 1_000_000_000;
pub const MAX_REASON_CHARS: usize = 256;
pub const MAX_ORDER_ID_CHARS: usize = 128;
/// The event ids the service records its expiries under: `expire:<order_id>`.
pub const EXPIRY_PREFIX: &str = "expire:";
/// The ceiling of `reservations.max_ttl_s` (a year): what a reservation could ever be allowed
/// to hold. A longer `ttl_seconds` is not even read as a duration; one within it but past the
/// configured maximum is a business rejection ([`super::orders`]), answered with a reply.
pub const MAX_TTL_SECONDS: i64 = 31_536_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Restock,
    Sale,
    Adjustment,
    /// The steps of an order saga (docs/contract.md section 7): they name an `order_id`.
    Reserve,
    Commit,
    Release,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Restock => "restock",
            EventKind::Sale => "sale",
            EventKind::Adjustment => "adjustment",
            EventKind::Reserve => "reserve",
            EventKind::Commit => "commit",
            EventKind::Release => "release",
        }
    }

    /// Whether this is a step of an order (reserve, commit, release) rather than a stock event.
    pub fn is_order_step(self) -> bool {
        matches!(
            self,
            EventKind::Reserve | EventKind::Commit | EventKind::Release
        )
    }

    /// The signed change of `current_stock` a line of a stock event makes; order steps move
    /// stock through their reservation instead ([`super::rules`]).
    pub fn delta(self, quantity: i64) -> i64 {
        match self {
            EventKind::Sale => -quantity,
            EventKind::Restock | EventKind::Adjustment => quantity,
            EventKind::Reserve | EventKind::Commit | EventKind::Release => 0,
        }
    }
}

/// When a reservation ends, as its `reserve` event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// `ttl_seconds`: counted from the moment the reservation is applied, by the database clock.
    Ttl(i64),
    /// `expires_at`: an instant (RFC 3339), kept as sent: the digest is of the text.
    At(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
}

/// A valid event. Constructed only by [`decode`], so its fields hold the contract's invariants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub kind: EventKind,
    pub lines: Vec<Line>,
    pub reason: Option<String>,
    pub occurred_at: Option<String>,
    pub source: Option<String>,
    /// The order of a reserve, commit or release; `None` for stock events.
    pub order_id: Option<String>,
    /// A reserve's expiry when it gives one (else the configured default TTL applies).
    pub expiry: Option<Expiry>,
}

impl Event {
    /// SHA-256 of the event's meaning: the known fields in a fixed order. Whitespace, key
    /// order and unknown fields do not change it, any known field does; it is what tells a
    /// harmless re-send (same digest) from a reused event id (`event_id_conflict`).
    pub fn digest(&self) -> [u8; 32] {
        // Serialized straight from borrowed fields into the hash (no `Value` tree, no buffer:
        // this runs for every event), as the same bytes as the JSON array the digests were first
        // recorded of: `[id, kind, [[sku, quantity], ...], reason, occurred_at, source]`.
        let lines = Lines(&self.lines);
        let head = (
            &self.id,
            self.kind.as_str(),
            &lines,
            &self.reason,
            &self.occurred_at,
            &self.source,
        );
        let mut hasher = Sha256::new();
        let written = if self.kind.is_order_step() {
            // Order steps add their fields; stock events keep the digest they were recorded with.
            let expiry = self.expiry.as_ref().map(|e| match e {
                Expiry::Ttl(s) => ExpiryField::Ttl("ttl", *s),
                Expiry::At(at) => ExpiryField::At("at", at),
            });
            let (id, kind, lines, reason, occurred_at, source) = head;
            serde_json::to_writer(
                &mut hasher,
                &(
                    id,
                    kind,
                    lines,
                    reason,
                    occurred_at,
                    source,
                    &self.order_id,
                    expiry,
                ),
            )
        } else {
            serde_json::to_writer(&mut hasher, &head)
        };
        // Writing plain strings and integers into a hash cannot fail; were it ever to, the digest
        // of the partial text would still be a digest of this event alone.
        debug_assert!(written.is_ok());
        hasher.finalize().into()
    }
}

/// An event's lines as `[[sku, quantity], ...]`.
struct Lines<'a>(&'a [Line]);

impl serde::Serialize for Lines<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|l| (l.sku.as_str(), l.quantity)))
    }
}

/// A reserve's expiry in the digest: `["ttl", seconds]` or `["at", text]`.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum ExpiryField<'a> {
    Ttl(&'static str, i64),
    At(&'static str, &'a str),
}

/// Why a message is not a valid event. `code()` is the stable reason stored with the dead
/// letter; `Display` is the detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("message has no value")]
    EmptyPayload,
    #[error("message value is {size} bytes, more than the limit of {MAX_PAYLOAD_BYTES}")]
    TooLarge { size: usize },
    #[error("message value is not valid UTF-8 (at byte {valid_up_to})")]
    InvalidUtf8 { valid_up_to: usize },
    #[error("message value is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("message value is JSON but not an object")]
    NotAnObject,
    #[error("field `{0}` is required")]
    MissingField(&'static str),
    #[error("field `{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("event_id must be 1..={MAX_EVENT_ID_CHARS} characters, got {chars}")]
    InvalidEventId { chars: usize },
    /// `expire:<order_id>` names the service's own expiries (docs/contract.md section 7).
    #[error("event_id `{0}` starts with `{EXPIRY_PREFIX}`, which names the service's expiries")]
    ReservedEventId(String),
    #[error("type `{0}` is not one of restock, sale, adjustment, reserve, commit, release")]
    UnknownType(String),
    #[error("order_id must be 1..={MAX_ORDER_ID_CHARS} characters, got {chars}")]
    InvalidOrderId { chars: usize },
    #[error("a {0} names its order only: it carries no lines")]
    UnexpectedLines(&'static str),
    #[error("ttl_seconds must be an integer 1..={MAX_TTL_SECONDS}")]
    InvalidTtl,
    #[error("expires_at `{0}` is not an RFC 3339 timestamp")]
    InvalidExpiresAt(String),
    #[error("give at most one of `ttl_seconds` and `expires_at`")]
    AmbiguousExpiry,
    #[error("give either `sku` and `quantity` or `lines`, not both")]
    AmbiguousLines,
    #[error("`lines` must hold 1..={MAX_LINES} lines, got {count}")]
    LineCount { count: usize },
    #[error("line {line}: sku {detail}")]
    InvalidSku { line: usize, detail: String },
    #[error("line {line}: quantity {detail}")]
    InvalidQuantity { line: usize, detail: String },
    #[error("occurred_at `{0}` is not an RFC 3339 timestamp")]
    InvalidOccurredAt(String),
    #[error("reason is {chars} characters, more than {MAX_REASON_CHARS}")]
    ReasonTooLong { chars: usize },
    /// PostgreSQL text cannot hold NUL, so such an event could never be recorded.
    #[error("field `{0}` contains a NUL character")]
    NulCharacter(&'static str),
    /// Not produced by [`decode`]: the id was recorded earlier with another digest.
    #[error("event_id `{0}` was already used by an event with a different body")]
    EventIdConflict(String),
    /// Not produced by [`decode`]: the database refused a value the event carries (e.g. a
    /// character its encoding lacks); the database's words.
    #[error("the database cannot store this event: {0}")]
    Unstorable(String),
}

impl InvalidEvent {
    pub fn code(&self) -> &'static str {
        match self {
            InvalidEvent::EmptyPayload => "empty_payload",
            InvalidEvent::TooLarge { .. } => "payload_too_large",
            InvalidEvent::InvalidUtf8 { .. } => "invalid_utf8",
            InvalidEvent::InvalidJson(_) => "invalid_json",
            InvalidEvent::NotAnObject => "not_an_object",
            InvalidEvent::MissingField(_) => "missing_field",
            InvalidEvent::WrongType { .. } => "wrong_type",
            InvalidEvent::InvalidEventId { .. } | InvalidEvent::ReservedEventId(_) => {
                "invalid_event_id"
            }
            InvalidEvent::UnknownType(_) => "unknown_type",
            InvalidEvent::InvalidOrderId { .. } => "invalid_order_id",
            InvalidEvent::UnexpectedLines(_) => "unexpected_lines",
            InvalidEvent::InvalidTtl => "invalid_ttl",
            InvalidEvent::InvalidExpiresAt(_) => "invalid_expires_at",
            InvalidEvent::AmbiguousExpiry => "ambiguous_expiry",
            InvalidEvent::AmbiguousLines => "ambiguous_lines",
            InvalidEvent::LineCount { .. } => "invalid_line_count",
            InvalidEvent::InvalidSku { .. } => "invalid_sku",
            InvalidEvent::InvalidQuantity { .. } => "invalid_quantity",
            InvalidEvent::InvalidOccurredAt(_) => "invalid_occurred_at",
            InvalidEvent::ReasonTooLong { .. } => "reason_too_long",
            InvalidEvent::NulCharacter(_) => "nul_character",
            InvalidEvent::EventIdConflict(_) => "event_id_conflict",
            InvalidEvent::Unstorable(_) => "unstorable",
        }
    }
}

/// Decodes and validates one message value.
pub fn decode(payload: Option<&[u8]>) -> Result<Event, InvalidEvent> {
    let bytes = payload.ok_or(InvalidEvent::EmptyPayload)?;
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(InvalidEvent::TooLarge { size: bytes.len() });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| InvalidEvent::InvalidUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| InvalidEvent::InvalidJson(e.to_string()))?;
    let object = value.as_object().ok_or(InvalidEvent::NotAnObject)?;

    let id = required_str(object, "event_id")?;
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_EVENT_ID_CHARS {
        return Err(InvalidEvent::InvalidEventId { chars });
    }
    if id.starts_with(EXPIRY_PREFIX) {
        return Err(InvalidEvent::ReservedEventId(truncate(id, 64)));
    }
    let kind = match required_str(object, "type")? {
        "restock" => EventKind::Restock,
        "sale" => EventKind::Sale,
        "adjustment" => EventKind::Adjustment,
        "reserve" => EventKind::Reserve,
        "commit" => EventKind::Commit,
        "release" => EventKind::Release,
        other => return Err(InvalidEvent::UnknownType(truncate(other, 64))),
    };
    // `order_id` belongs to the order steps; on a stock event it is an unknown field, ignored.
    let order_id = if kind.is_order_step() {
        let order_id = required_str(object, "order_id")?;
        let chars = order_id.chars().count();
        if chars == 0 || chars > MAX_ORDER_ID_CHARS {
            return Err(InvalidEvent::InvalidOrderId { chars });
        }
        Some(order_id.to_owned())
    } else {
        None
    };
    let lines = match kind {
        EventKind::Commit | EventKind::Release => {
            if ["lines", "sku", "quantity"]
                .iter()
                .any(|f| object.get(*f).is_some_and(|v| !v.is_null()))
            {
                return Err(InvalidEvent::UnexpectedLines(kind.as_str()));
            }
            Vec::new()
        }
        _ => decode_lines(object, kind)?,
    };
    let expiry = match kind {
        EventKind::Reserve => decode_expiry(object)?,
        _ => None,
    };

    let reason = optional_str(object, "reason")?;
    if let Some(reason) = reason {
        let chars = reason.chars().count();
        if chars > MAX_REASON_CHARS {
            return Err(InvalidEvent::ReasonTooLong { chars });
        }
    }
    let occurred_at = optional_str(object, "occurred_at")?;
    if let Some(ts) = occurred_at {
        chrono::DateTime::parse_from_rfc3339(ts)
            .map_err(|_| InvalidEvent::InvalidOccurredAt(truncate(ts, 64)))?;
    }
    let source = optional_str(object, "source")?;

    Ok(Event {
        id: id.to_owned(),
        kind,
        lines,
        reason: reason.map(str::to_owned),
        occurred_at: occurred_at.map(str::to_owned),
        source: source.map(str::to_owned),
        order_id,
        expiry,
    })
}

/// A reserve's `ttl_seconds` or `expires_at`, at most one of them.
fn decode_expiry(object: &Map<String, Value>) -> Result<Option<Expiry>, InvalidEvent> {
    let ttl = match object.get("ttl_seconds") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(s) if (1..=MAX_TTL_SECONDS).contains(&s) => Some(s),
            _ => return Err(InvalidEvent::InvalidTtl),
        },
        Some(_) => {
            return Err(InvalidEvent::WrongType {
                field: "ttl_seconds",
                expected: "an integer",
            });
        }
    };
    let at = optional_str(object, "expires_at")?;
    if let Some(at) = at {
        chrono::DateTime::parse_from_rfc3339(at)
            .map_err(|_| InvalidEvent::InvalidExpiresAt(truncate(at, 64)))?;
    }
    match (ttl, at) {
        (Some(_), Some(_)) => Err(InvalidEvent::AmbiguousExpiry),
        (Some(s), None) => Ok(Some(Expiry::Ttl(s))),
        (None, Some(at)) => Ok(Some(Expiry::At(at.to_owned()))),
        (None, None) => Ok(None),
    }
}

fn decode_lines(object: &Map<String, Value>, kind: EventKind) -> Result<Vec<Line>, InvalidEvent> {
    let has_single = object.contains_key("sku") || object.contains_key("quantity");
    match object.get("lines") {
        Some(_) if has_single => Err(InvalidEvent::AmbiguousLines),
        Some(Value::Array(items)) => {
            if items.is_empty() || items.len() > MAX_LINES {
                return Err(InvalidEvent::LineCount { count: items.len() });
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let line = item.as_object().ok_or(InvalidEvent::WrongType {
                        field: "lines",
                        expected: "an array of objects",
                    })?;
                    decode_line(line, kind, i + 1)
                })
                .collect()
        }
        Some(_) => Err(InvalidEvent::WrongType {
            field: "lines",
            expected: "an array",
        }),
        None => Ok(vec![decode_line(object, kind, 1)?]),
    }
}

fn decode_line(
    object: &Map<String, Value>,
    kind: EventKind,
    line: usize,
) -> Result<Line, InvalidEvent> {
    let sku = required_str(object, "sku")?;
    validate_sku(sku).map_err(|detail| InvalidEvent::InvalidSku { line, detail })?;
    let quantity = match object.get("quantity") {
        None | Some(Value::Null) => return Err(InvalidEvent::MissingField("quantity")),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| InvalidEvent::InvalidQuantity {
            line,
            detail: format!("must be an integer within ±{MAX_ABS_QUANTITY}, got {n}"),
        })?,
        Some(_) => {
            return Err(InvalidEvent::WrongType {
                field: "quantity",
                expected: "an integer",
            });
        }
    };
    validate_quantity(kind, quantity).map_err(|detail| InvalidEvent::InvalidQuantity {
        line,
        detail: detail.to_owned(),
    })?;
    Ok(Line {
        sku: sku.to_owned(),
        quantity,
    })
}

fn validate_sku(sku: &str) -> Result<(), String> {
    let chars = sku.chars().count();
    if chars == 0 || chars > MAX_SKU_CHARS {
        return Err(format!(
            "must be 1..={MAX_SKU_CHARS} characters, got {chars}"
        ));
    }
    match sku
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        Some(c) => Err(format!("contains {c:?}; allowed are A-Z a-z 0-9 . _ - /")),
        None => Ok(()),
    }
}

fn validate_quantity(kind: EventKind, quantity: i64) -> Result<(), &'static str> {
    if quantity.unsigned_abs() > MAX_ABS_QUANTITY.unsigned_abs() {
        return Err("must be within ±1000000000");
    }
    match kind {
        EventKind::Restock | EventKind::Sale | EventKind::Reserve if quantity <= 0 => {
            Err("must be > 0 for restock, sale and reserve")
        }
        EventKind::Adjustment if quantity == 0 => Err("must not be 0 for adjustment"),
        _ => Ok(()),
    }
}

fn required_str<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, InvalidEvent> {
    optional_str(object, field)?.ok_or(InvalidEvent::MissingField(field))
}

/// A missing field and an explicit `null` are treated alike.
fn optional_str<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, InvalidEvent> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.contains('\0') => Err(InvalidEvent::NulCharacter(field)),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(InvalidEvent::WrongType {
            field,
            expected: "a string",
        }),
    }
}

/// Keeps details short and storable (no NUL) when echoing producer input into a dead letter.
fn truncate(s: &str, max_chars: usize) -> String {
    s.chars()
        .take(max_chars)
        .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect()
}

#[cfg(test)]
mod tests;
