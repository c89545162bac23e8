//! The decoder against the contract's rules: every field, every bound, every reason.

use super::*;
use proptest::prelude::*;

fn code(json: &str) -> &'static str {
    match decode(Some(json.as_bytes())) {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

#[test]
fn accepts_the_contract_examples() {
    let sale = decode(Some(
        br#"{"event_id":"c0a8-0001","type":"sale","sku":"SKU-000042","quantity":3}"#,
    ))
    .unwrap();
    assert_eq!(sale.kind, EventKind::Sale);
    assert_eq!(
        sale.lines,
        vec![Line {
            sku: "SKU-000042".into(),
            quantity: 3
        }]
    );
    let adj = decode(Some(br#"{"event_id":"cycle-2026-11","type":"adjustment","sku":"SKU-000042","quantity":-2,"reason":"damaged","occurred_at":"2026-11-21T10:00:00+01:00","extra":[1]}"#)).unwrap();
    assert_eq!(adj.reason.as_deref(), Some("damaged"));
    let multi = decode(Some(br#"{"event_id":"order-9913","type":"sale","lines":[{"sku":"SKU-1","quantity":1},{"sku":"SKU-2","quantity":4}]}"#)).unwrap();
    assert_eq!(multi.lines.len(), 2);
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "a table of cases, one after the other"
)]
fn names_a_precise_reason_for_every_violation() {
    let long_id = "x".repeat(129);
    let long_sku = "S".repeat(65);
    let long_reason = "r".repeat(257);
    let too_many: Vec<String> = (0..101)
        .map(|i| format!(r#"{{"sku":"S{i}","quantity":1}}"#))
        .collect();
    let cases = [
        ("not json", "invalid_json"),
        ("[1,2]", "not_an_object"),
        (r#"{"type":"sale","sku":"A","quantity":1}"#, "missing_field"),
        (
            r#"{"event_id":7,"type":"sale","sku":"A","quantity":1}"#,
            "wrong_type",
        ),
        (
            r#"{"event_id":"","type":"sale","sku":"A","quantity":1}"#,
            "invalid_event_id",
        ),
        (
            &format!(r#"{{"event_id":"{long_id}","type":"sale","sku":"A","quantity":1}}"#),
            "invalid_event_id",
        ),
        (
            r#"{"event_id":"e","type":"gift","sku":"A","quantity":1}"#,
            "unknown_type",
        ),
        (
            r#"{"event_id":"e","type":"sale","quantity":1}"#,
            "missing_field",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A"}"#,
            "missing_field",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A","quantity":"1"}"#,
            "wrong_type",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A","quantity":1.5}"#,
            "invalid_quantity",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A","quantity":0}"#,
            "invalid_quantity",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A","quantity":-1}"#,
            "invalid_quantity",
        ),
        (
            r#"{"event_id":"e","type":"restock","sku":"A","quantity":1000000001}"#,
            "invalid_quantity",
        ),
        (
            r#"{"event_id":"e","type":"restock","sku":"A","quantity":99999999999999999999999}"#,
            "invalid_quantity",
        ),
        (
            r#"{"event_id":"e","type":"adjustment","sku":"A","quantity":0}"#,
            "invalid_quantity",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A B","quantity":1}"#,
            "invalid_sku",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A';--","quantity":1}"#,
            "invalid_sku",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"ÄPFEL","quantity":1}"#,
            "invalid_sku",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"","quantity":1}"#,
            "invalid_sku",
        ),
        (
            &format!(r#"{{"event_id":"e","type":"sale","sku":"{long_sku}","quantity":1}}"#),
            "invalid_sku",
        ),
        (
            r#"{"event_id":"e","type":"sale","lines":[]}"#,
            "invalid_line_count",
        ),
        (
            &format!(
                r#"{{"event_id":"e","type":"sale","lines":[{}]}}"#,
                too_many.join(",")
            ),
            "invalid_line_count",
        ),
        (r#"{"event_id":"e","type":"sale","lines":{}}"#, "wrong_type"),
        (
            r#"{"event_id":"e","type":"sale","lines":[1]}"#,
            "wrong_type",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A","lines":[{"sku":"A","quantity":1}]}"#,
            "ambiguous_lines",
        ),
        (
            r#"{"event_id":"e","type":"sale","lines":[{"sku":"A","quantity":1},{"sku":"B","quantity":0}]}"#,
            "invalid_quantity",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A","quantity":1,"occurred_at":"yesterday"}"#,
            "invalid_occurred_at",
        ),
        (
            &format!(
                r#"{{"event_id":"e","type":"sale","sku":"A","quantity":1,"reason":"{long_reason}"}}"#
            ),
            "reason_too_long",
        ),
        (
            r#"{"event_id":"e","type":"sale","sku":"A","quantity":1,"source":5}"#,
            "wrong_type",
        ),
        (
            r#"{"event_id":"e","type":"adjustment","sku":"a.b_c-d/9","quantity":-1000000000}"#,
            "ok",
        ),
    ];
    for (json, expected) in cases {
        assert_eq!(code(json), expected, "for {json}");
    }
    assert_eq!(decode(None).unwrap_err().code(), "empty_payload");
    assert_eq!(
        decode(Some(&[0xff, 0xfe])).unwrap_err().code(),
        "invalid_utf8"
    );
    let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
    assert_eq!(decode(Some(&big)).unwrap_err().code(), "payload_too_large");
}

#[test]
fn decodes_the_order_steps_of_the_contract() {
    let r = decode(Some(br#"{"event_id": "ord-7-r", "type": "reserve", "order_id": "ord-7",
        "lines": [{"sku": "SKU-1", "quantity": 2}, {"sku": "SKU-9", "quantity": 1}], "ttl_seconds": 900}"#)).unwrap();
    assert_eq!(r.kind, EventKind::Reserve);
    assert_eq!(r.order_id.as_deref(), Some("ord-7"));
    assert_eq!(r.expiry, Some(Expiry::Ttl(900)));
    assert_eq!(r.lines.len(), 2);
    let c = decode(Some(
        br#"{"event_id": "ord-7-c", "type": "commit", "order_id": "ord-7"}"#,
    ))
    .unwrap();
    assert_eq!((c.kind, c.lines.len()), (EventKind::Commit, 0));
    let x = decode(Some(
        br#"{"event_id": "ord-7-x", "type": "release", "order_id": "ord-7"}"#,
    ))
    .unwrap();
    assert_eq!(x.kind, EventKind::Release);
    let at = decode(Some(br#"{"event_id": "r", "type": "reserve", "order_id": "o", "sku": "A", "quantity": 1, "expires_at": "2026-12-01T14:15:00Z"}"#)).unwrap();
    assert_eq!(at.expiry, Some(Expiry::At("2026-12-01T14:15:00Z".into())));
    let default = decode(Some(
        br#"{"event_id": "r", "type": "reserve", "order_id": "o", "sku": "A", "quantity": 1}"#,
    ))
    .unwrap();
    assert_eq!(default.expiry, None, "reservations.default_ttl_s applies");
    let sale = decode(Some(
        br#"{"event_id": "s", "type": "sale", "order_id": "o", "sku": "A", "quantity": 1}"#,
    ))
    .unwrap();
    assert_eq!(
        sale.order_id, None,
        "an order id on a stock event is an unknown field"
    );

    let long_order = "o".repeat(129);
    let cases = [
        (r#"{"event_id":"e","type":"commit"}"#.to_owned(), "missing_field"),
        (r#"{"event_id":"e","type":"reserve","sku":"A","quantity":1}"#.to_owned(), "missing_field"),
        (r#"{"event_id":"e","type":"commit","order_id":""}"#.to_owned(), "invalid_order_id"),
        (r#"{"event_id":"expire:o","type":"release","order_id":"o"}"#.to_owned(), "invalid_event_id"),
        (format!(r#"{{"event_id":"e","type":"release","order_id":"{long_order}"}}"#), "invalid_order_id"),
        (r#"{"event_id":"e","type":"commit","order_id":7}"#.to_owned(), "wrong_type"),
        (r#"{"event_id":"e","type":"commit","order_id":"o","sku":"A","quantity":1}"#.to_owned(), "unexpected_lines"),
        (r#"{"event_id":"e","type":"release","order_id":"o","lines":[]}"#.to_owned(), "unexpected_lines"),
        (r#"{"event_id":"e","type":"reserve","order_id":"o"}"#.to_owned(), "missing_field"),
        (r#"{"event_id":"e","type":"reserve","order_id":"o","sku":"A","quantity":0}"#.to_owned(), "invalid_quantity"),
        (r#"{"event_id":"e","type":"reserve","order_id":"o","sku":"A","quantity":1,"ttl_seconds":0}"#.to_owned(), "invalid_ttl"),
        (r#"{"event_id":"e","type":"reserve","order_id":"o","sku":"A","quantity":1,"ttl_seconds":31536001}"#.to_owned(), "invalid_ttl"),
        (r#"{"event_id":"e","type":"reserve","order_id":"o","sku":"A","quantity":1,"ttl_seconds":1.5}"#.to_owned(), "invalid_ttl"),
        (r#"{"event_id":"e","type":"reserve","order_id":"o","sku":"A","quantity":1,"ttl_seconds":"9"}"#.to_owned(), "wrong_type"),
        (r#"{"event_id":"e","type":"reserve","order_id":"o","sku":"A","quantity":1,"expires_at":"soon"}"#.to_owned(), "invalid_expires_at"),
        (r#"{"event_id":"e","type":"reserve","order_id":"o","sku":"A","quantity":1,"ttl_seconds":5,"expires_at":"2026-12-01T14:15:00Z"}"#.to_owned(), "ambiguous_expiry"),
        (r#"{"event_id":"e","type":"reserve","order_id":"o","sku":"A","quantity":1,"ttl_seconds":604800}"#.to_owned(), "ok"),
    ];
    for (json, expected) in cases {
        assert_eq!(code(&json), expected, "for {json}");
    }
}

/// The digest as first defined: the JSON text of a `Value` tree. Recorded digests were made
/// this way, so [`Event::digest`] must give the same bytes for every event.
fn digest_of_value_tree(e: &Event) -> Vec<u8> {
    let lines: Vec<(&str, i64)> = e
        .lines
        .iter()
        .map(|l| (l.sku.as_str(), l.quantity))
        .collect();
    let mut canonical = serde_json::json!([
        e.id,
        e.kind.as_str(),
        lines,
        e.reason,
        e.occurred_at,
        e.source
    ]);
    if e.kind.is_order_step()
        && let Value::Array(fields) = &mut canonical
    {
        let expiry = match &e.expiry {
            None => Value::Null,
            Some(Expiry::Ttl(s)) => serde_json::json!(["ttl", s]),
            Some(Expiry::At(at)) => serde_json::json!(["at", at]),
        };
        fields.extend([serde_json::json!(e.order_id), expiry]);
    }
    Sha256::digest(canonical.to_string().as_bytes()).to_vec()
}

fn any_event() -> impl Strategy<Value = Event> {
    // Letters, quotes, backslashes, control characters, DEL, non-ASCII, a JSON line
    // separator and a character beyond the BMP: everything JSON escapes differently.
    let text = r#"[a-zA-Z0-9 "\\\x00-\x1f\x7f\x{e9}\x{2028}\x{1f600}]{0,12}"#;
    let kind = prop_oneof![
        Just(EventKind::Restock),
        Just(EventKind::Sale),
        Just(EventKind::Adjustment),
        Just(EventKind::Reserve),
        Just(EventKind::Commit),
        Just(EventKind::Release),
    ];
    let line = (text, any::<i64>()).prop_map(|(sku, quantity)| Line { sku, quantity });
    let expiry = prop_oneof![
        any::<i64>().prop_map(Expiry::Ttl),
        text.prop_map(Expiry::At),
    ];
    (
        (text, kind, proptest::collection::vec(line, 0..4)),
        (
            proptest::option::of(text),
            proptest::option::of(text),
            proptest::option::of(text),
            proptest::option::of(text),
            proptest::option::of(expiry),
        ),
    )
        .prop_map(
            |((id, kind, lines), (reason, occurred_at, source, order_id, expiry))| Event {
                id,
                kind,
                lines,
                reason,
                occurred_at,
                source,
                order_id,
                expiry,
            },
        )
}

proptest! {
    #[test]
    fn the_digest_is_the_same_bytes_as_when_it_was_recorded(event in any_event()) {
        prop_assert_eq!(event.digest().to_vec(), digest_of_value_tree(&event));
    }
}

#[test]
fn a_stock_events_digest_is_unchanged_by_the_order_fields() {
    // Recorded before order steps existed: a re-send must still be a duplicate.
    let sale = decode(Some(
        br#"{"event_id":"e","type":"sale","sku":"A","quantity":1}"#,
    ))
    .unwrap();
    let known = Sha256::digest(br#"["e","sale",[["A",1]],null,null,null]"#).to_vec();
    assert_eq!(sale.digest().to_vec(), known);
    let r1 = decode(Some(br#"{"event_id":"r","type":"reserve","order_id":"o","sku":"A","quantity":1,"ttl_seconds":5}"#)).unwrap();
    let r2 = decode(Some(br#"{"event_id":"r","type":"reserve","order_id":"o","sku":"A","quantity":1,"ttl_seconds":6}"#)).unwrap();
    let r3 = decode(Some(br#"{"event_id":"r","type":"reserve","order_id":"p","sku":"A","quantity":1,"ttl_seconds":5}"#)).unwrap();
    assert_ne!(r1.digest(), r2.digest(), "the expiry is meaning");
    assert_ne!(r1.digest(), r3.digest(), "so is the order");
}

#[test]
fn digest_ignores_formatting_but_not_meaning() {
    let a = decode(Some(
        br#"{"event_id":"e","type":"sale","sku":"A","quantity":1}"#,
    ))
    .unwrap();
    let b = decode(Some(
        br#"{ "quantity": 1, "sku": "A", "type": "sale", "event_id": "e", "unknown": true }"#,
    ))
    .unwrap();
    let c = decode(Some(
        br#"{"event_id":"e","type":"sale","sku":"A","quantity":2}"#,
    ))
    .unwrap();
    assert_eq!(a.digest(), b.digest());
    assert_ne!(a.digest(), c.digest());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(Some(&bytes));
    }

    #[test]
    fn every_rejection_detail_is_storable(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = decode(Some(&bytes)) {
            prop_assert!(!e.to_string().contains('\0'));
        }
    }

    #[test]
    fn arbitrary_json_shapes_never_panic(
        id in proptest::option::of("[a-z0-9-]{0,140}"),
        kind in "(sale|restock|adjustment|other)",
        sku in ".{0,70}",
        quantity in any::<i64>(),
    ) {
        let json = serde_json::json!({"event_id": id, "type": kind, "sku": sku, "quantity": quantity});
        if let Ok(event) = decode(Some(json.to_string().as_bytes())) {
            prop_assert!(event.lines.iter().all(|l| l.quantity.abs() <= MAX_ABS_QUANTITY && l.quantity != 0));
            prop_assert!(!event.id.is_empty());
        }
    }
}
