//! The reply to an order step or an expiry (docs/contract.md section 7), as published to
//! `kafka.results_topic` with the order id as key (and, with `results.all_events`, to a stock
//! event, keyed by its first SKU, with a null `order_id`):
//!
//! ```json
//! {"event_id": "ord-7-r", "order_id": "ord-7", "type": "reserve", "outcome": "applied",
//!  "reason": null, "lines": [{"sku": "SKU-1", "quantity": 2}], "expires_at": "2026-12-01T14:15:00Z"}
//! ```
//!
//! `lines` and `expires_at` are the request's lines and its reservation's expiry for a reserve,
//! and the reservation's for a commit, a release or an expiry (none when there is none).

use chrono::SecondsFormat;
use serde_json::{Value, json};

use super::event::{Event, EventKind, Line};
use super::orders::Reservation;
use super::rules::Outcome;

/// A reply ready to be recorded and published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub event_id: String,
    /// The order it answers; none for a stock event's outcome.
    pub order_id: Option<String>,
    /// Its Kafka key: the order id; for a stock event's outcome (`results.all_events`), the
    /// event's first SKU, which keeps one SKU's outcomes in order.
    pub key: String,
    /// The JSON value, as published.
    pub payload: String,
}

/// The reply to `event` (an order step, or a stock event when all outcomes are published),
/// decided as `outcome`; `reservation` is its order's reservation after the step, if any.
pub fn reply_to(event: &Event, outcome: Outcome, reservation: Option<&Reservation>) -> Reply {
    let key = match &event.order_id {
        Some(order_id) => order_id.clone(),
        None => event
            .lines
            .first()
            .map(|l| l.sku.clone())
            .unwrap_or_default(),
    };
    // A reserve rejected because the order was reserved before must not show the other
    // event's reservation.
    let own = reservation.filter(|r| event.kind != EventKind::Reserve || r.event_id == event.id);
    let lines = match (event.kind, own) {
        (EventKind::Reserve, _) | (_, None) => &event.lines,
        (_, Some(r)) => &r.lines,
    };
    let expires_at = own.map(|r| r.expires_at.to_rfc3339_opts(SecondsFormat::AutoSi, true));
    let payload = json!({
        "event_id": event.id,
        "order_id": event.order_id,
        "type": event.kind.as_str(),
        "outcome": outcome.as_str(),
        "reason": outcome.reason(),
        "lines": lines_json(lines),
        "expires_at": expires_at,
    });
    Reply {
        event_id: event.id.clone(),
        order_id: event.order_id.clone(),
        key,
        payload: payload.to_string(),
    }
}

/// The reply announcing that the service released `order_id`'s reservation at its expiry.
pub fn expiry_reply(event_id: &str, order_id: &str, reservation: &Reservation) -> Reply {
    let payload = json!({
        "event_id": event_id,
        "order_id": order_id,
        "type": "expire",
        "outcome": "applied",
        "reason": Value::Null,
        "lines": lines_json(&reservation.lines),
        "expires_at": reservation.expires_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    });
    Reply {
        event_id: event_id.to_owned(),
        order_id: Some(order_id.to_owned()),
        key: order_id.to_owned(),
        payload: payload.to_string(),
    }
}

fn lines_json(lines: &[Line]) -> Value {
    lines
        .iter()
        .map(|l| json!({"sku": l.sku, "quantity": l.quantity}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::orders::ReservationStatus;
    use crate::domain::{RejectReason, decode};

    fn reservation(event_id: &str) -> Reservation {
        Reservation {
            event_id: event_id.into(),
            lines: vec![Line {
                sku: "SKU-1".into(),
                quantity: 2,
            }],
            status: ReservationStatus::Active,
            expires_at: chrono::DateTime::from_timestamp(1_796_134_500, 0).unwrap_or_default(),
        }
    }

    fn value(reply: &Reply) -> Value {
        serde_json::from_str(&reply.payload).unwrap_or_default()
    }

    #[test]
    fn a_reserve_reply_has_the_contracts_shape() {
        let e = decode(Some(br#"{"event_id":"ord-7-r","type":"reserve","order_id":"ord-7","sku":"SKU-1","quantity":2}"#)).unwrap();
        let r = reply_to(&e, Outcome::Applied, Some(&reservation("ord-7-r")));
        assert_eq!(r.key, "ord-7");
        assert_eq!(
            value(&r),
            json!({"event_id": "ord-7-r", "order_id": "ord-7", "type": "reserve",
                   "outcome": "applied", "reason": null,
                   "lines": [{"sku": "SKU-1", "quantity": 2}],
                   "expires_at": "2026-12-01T14:15:00Z"})
        );
    }

    #[test]
    fn a_stock_events_outcome_is_keyed_by_its_first_sku() {
        let e = decode(Some(
            br#"{"event_id":"s-1","type":"sale","lines":[{"sku":"B","quantity":1},{"sku":"A","quantity":2}]}"#,
        ))
        .unwrap();
        let r = reply_to(&e, Outcome::Rejected(RejectReason::InsufficientStock), None);
        assert_eq!(r.key, "B");
        assert_eq!(
            value(&r),
            json!({"event_id": "s-1", "order_id": null, "type": "sale",
                   "outcome": "rejected", "reason": "insufficient_stock",
                   "lines": [{"sku": "B", "quantity": 1}, {"sku": "A", "quantity": 2}],
                   "expires_at": null})
        );
    }

    #[test]
    fn rejections_carry_their_reason_and_no_one_elses_reservation() {
        let e = decode(Some(br#"{"event_id":"again","type":"reserve","order_id":"ord-7","sku":"SKU-1","quantity":5}"#)).unwrap();
        let r = value(&reply_to(
            &e,
            Outcome::Rejected(RejectReason::OrderExists),
            Some(&reservation("ord-7-r")),
        ));
        assert_eq!(r["reason"], "order_exists");
        assert_eq!(r["expires_at"], Value::Null);
        assert_eq!(r["lines"][0]["quantity"], 5, "the request's own lines");
        let c = decode(Some(
            br#"{"event_id":"c","type":"commit","order_id":"nobody"}"#,
        ))
        .unwrap();
        let r = value(&reply_to(
            &c,
            Outcome::Rejected(RejectReason::NoActiveReservation),
            None,
        ));
        assert_eq!(r["outcome"], "rejected");
        assert_eq!(r["lines"], json!([]));
    }

    #[test]
    fn an_expiry_reply_names_the_reservation() {
        let r = value(&expiry_reply(
            "expire:ord-7",
            "ord-7",
            &reservation("ord-7-r"),
        ));
        assert_eq!(r["type"], "expire");
        assert_eq!(r["event_id"], "expire:ord-7");
        assert_eq!(r["lines"][0]["sku"], "SKU-1");
    }
}
