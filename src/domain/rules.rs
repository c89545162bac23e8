//! The inventory rules: what one valid stock event does to the stock of the SKUs it names.
//! (The order steps, reserve, commit and release, are in [`super::orders`].)
//!
//! An event is all-or-nothing: every line is checked against a scratch copy of the stock, in
//! line order, and only if every line holds is the scratch copy made real. Stock never goes
//! below zero; a SKU that was never restocked cannot be sold or adjusted. Units reserved for
//! an order are not for sale: a sale or a negative adjustment may take only the available
//! stock, on hand minus reserved.

use std::collections::HashMap;

use super::event::{Event, EventKind, Line};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// A sale or negative adjustment would take a line below zero.
    InsufficientStock,
    /// A sale or adjustment of a SKU that was never restocked.
    UnknownSku,
    /// The stock would exceed what a 64-bit counter holds; never expected in practice.
    StockOverflow,
    /// A reserve for an order that was reserved already, by another event.
    OrderExists,
    /// A commit or release of an order without an active reservation (none, already ended,
    /// or, for a commit, past its expiry).
    NoActiveReservation,
    /// A reserve whose `ttl_seconds` is longer than `reservations.max_ttl_s`.
    TtlTooLong,
    /// A reserve whose `expires_at` lies further ahead than `reservations.max_ttl_s`.
    ExpiryTooFar,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InsufficientStock => "insufficient_stock",
            RejectReason::UnknownSku => "unknown_sku",
            RejectReason::StockOverflow => "stock_overflow",
            RejectReason::OrderExists => "order_exists",
            RejectReason::NoActiveReservation => "no_active_reservation",
            RejectReason::TtlTooLong => "invalid_ttl",
            RejectReason::ExpiryTooFar => "invalid_expires_at",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Rejected(RejectReason),
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Rejected(_) => "rejected",
        }
    }

    pub fn reason(self) -> Option<&'static str> {
        match self {
            Outcome::Applied => None,
            Outcome::Rejected(r) => Some(r.as_str()),
        }
    }
}

/// One ledger row: the change of one line to the stock on hand and the reserved stock, and
/// what each was left at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    pub sku: String,
    pub delta: i64,
    pub stock_after: i64,
    pub reserved_delta: i64,
    pub reserved_after: i64,
}

/// One SKU's stock: on hand (`current_stock`) and reserved for orders (`reserved_stock`),
/// with `0 <= reserved <= on_hand`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stock {
    pub on_hand: i64,
    pub reserved: i64,
}

impl Stock {
    pub fn on_hand(on_hand: i64) -> Self {
        Stock {
            on_hand,
            reserved: 0,
        }
    }

    /// What a sale, a negative adjustment or a reservation may take.
    pub fn available(self) -> i64 {
        self.on_hand - self.reserved
    }
}

/// Current stock of the SKUs in play. A SKU that is absent has never been restocked.
pub type StockBook = HashMap<String, Stock>;

/// Applies one stock event to `book`: on success the book holds the new stock and the
/// movements are returned in line order; on rejection the book is left exactly as it was.
pub fn apply_event(event: &Event, book: &mut StockBook) -> Result<Vec<Movement>, RejectReason> {
    let change = Change {
        on_hand: event.kind.delta(1),
        reserved: 0,
        creates: event.kind == EventKind::Restock,
    };
    move_lines(book, &event.lines, change)
}

/// How every line of a step moves its SKU: `on_hand` and `reserved` times its quantity.
#[derive(Debug, Clone, Copy)]
pub(super) struct Change {
    pub on_hand: i64,
    pub reserved: i64,
    /// A SKU never restocked starts at zero (a restock creates it) instead of being refused.
    pub creates: bool,
}

/// The one mechanism every step moves stock by (stock events here, order steps in
/// [`super::orders`]): every line in order against a scratch overlay of the book, all or
/// nothing, keeping `0 <= reserved <= on_hand`. Reserved units stay on hand: a sale may take
/// only what is above them.
pub(super) fn move_lines(
    book: &mut StockBook,
    lines: &[Line],
    change: Change,
) -> Result<Vec<Movement>, RejectReason> {
    // Only the lines' SKUs change, so a small overlay is cheaper than cloning the book.
    let mut scratch: Vec<(&str, Stock)> = Vec::with_capacity(lines.len());
    let mut movements = Vec::with_capacity(lines.len());
    for line in lines {
        let current = match scratch.iter().rev().find(|(sku, _)| *sku == line.sku) {
            Some((_, stock)) => Some(*stock),
            None => book.get(&line.sku).copied(),
        };
        let current = match current {
            Some(stock) => stock,
            None if change.creates => Stock::default(),
            None => return Err(RejectReason::UnknownSku),
        };
        let (delta, reserved_delta) = (
            change.on_hand * line.quantity,
            change.reserved * line.quantity,
        );
        let after = Stock {
            on_hand: current
                .on_hand
                .checked_add(delta)
                .ok_or(RejectReason::StockOverflow)?,
            reserved: current
                .reserved
                .checked_add(reserved_delta)
                .ok_or(RejectReason::StockOverflow)?,
        };
        if after.reserved < 0 || after.reserved > after.on_hand {
            return Err(RejectReason::InsufficientStock);
        }
        scratch.push((&line.sku, after));
        movements.push(Movement {
            sku: line.sku.clone(),
            delta,
            stock_after: after.on_hand,
            reserved_delta,
            reserved_after: after.reserved,
        });
    }
    for (sku, stock) in scratch {
        // Most SKUs are in the book already: no new key to allocate.
        match book.get_mut(sku) {
            Some(kept) => *kept = stock,
            None => {
                book.insert(sku.to_owned(), stock);
            }
        }
    }
    Ok(movements)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{EventKind, Line};
    use proptest::prelude::*;

    fn event(kind: EventKind, lines: &[(&str, i64)]) -> Event {
        Event {
            id: "e".into(),
            kind,
            lines: lines
                .iter()
                .map(|(sku, quantity)| Line {
                    sku: (*sku).into(),
                    quantity: *quantity,
                })
                .collect(),
            reason: None,
            occurred_at: None,
            source: None,
            order_id: None,
            expiry: None,
        }
    }

    #[test]
    fn restock_creates_and_sale_removes() {
        let mut book = StockBook::new();
        let m = apply_event(&event(EventKind::Restock, &[("A", 5)]), &mut book).unwrap();
        assert_eq!(
            m,
            vec![Movement {
                sku: "A".into(),
                delta: 5,
                stock_after: 5,
                reserved_delta: 0,
                reserved_after: 0,
            }]
        );
        apply_event(&event(EventKind::Sale, &[("A", 5)]), &mut book).unwrap();
        assert_eq!(book["A"].on_hand, 0);
        assert_eq!(
            apply_event(&event(EventKind::Sale, &[("A", 1)]), &mut book),
            Err(RejectReason::InsufficientStock)
        );
    }

    #[test]
    fn unknown_skus_cannot_be_sold_or_adjusted() {
        let mut book = StockBook::new();
        for kind in [EventKind::Sale, EventKind::Adjustment] {
            assert_eq!(
                apply_event(&event(kind, &[("A", 1)]), &mut book),
                Err(RejectReason::UnknownSku)
            );
        }
        assert!(book.is_empty());
    }

    #[test]
    fn multi_line_is_all_or_nothing_and_sees_its_own_lines() {
        let mut book = StockBook::from([
            ("A".to_owned(), Stock::on_hand(3)),
            ("B".to_owned(), Stock::on_hand(1)),
        ]);
        // The second line of A sees the first: 3 - 2 - 2 < 0.
        assert_eq!(
            apply_event(
                &event(EventKind::Sale, &[("A", 2), ("B", 1), ("A", 2)]),
                &mut book
            ),
            Err(RejectReason::InsufficientStock)
        );
        assert_eq!(book["A"].on_hand, 3);
        assert_eq!(book["B"].on_hand, 1);
        let m = apply_event(
            &event(EventKind::Sale, &[("A", 2), ("B", 1), ("A", 1)]),
            &mut book,
        )
        .unwrap();
        assert_eq!(
            m.iter().map(|m| m.stock_after).collect::<Vec<_>>(),
            [1, 0, 0]
        );
        assert_eq!((book["A"].on_hand, book["B"].on_hand), (0, 0));
    }

    #[test]
    fn reserved_units_are_not_for_sale() {
        let reserved = Stock {
            on_hand: 5,
            reserved: 3,
        };
        let mut book = StockBook::from([("A".to_owned(), reserved)]);
        assert_eq!(
            apply_event(&event(EventKind::Sale, &[("A", 3)]), &mut book),
            Err(RejectReason::InsufficientStock)
        );
        assert_eq!(
            apply_event(&event(EventKind::Adjustment, &[("A", -3)]), &mut book),
            Err(RejectReason::InsufficientStock)
        );
        apply_event(&event(EventKind::Sale, &[("A", 2)]), &mut book).unwrap();
        assert_eq!(
            book["A"],
            Stock {
                on_hand: 3,
                reserved: 3
            }
        );
        apply_event(&event(EventKind::Restock, &[("A", 1)]), &mut book).unwrap();
        assert_eq!(book["A"].available(), 1);
    }

    #[test]
    fn overflow_is_rejected_not_wrapped() {
        let mut book = StockBook::from([("A".to_owned(), Stock::on_hand(i64::MAX - 1))]);
        assert_eq!(
            apply_event(&event(EventKind::Restock, &[("A", 2)]), &mut book),
            Err(RejectReason::StockOverflow)
        );
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let kind = prop_oneof![
            Just(EventKind::Restock),
            Just(EventKind::Sale),
            Just(EventKind::Adjustment)
        ];
        let line = ("[ABCD]", 1i64..20, any::<bool>());
        (kind, proptest::collection::vec(line, 1..5)).prop_map(|(kind, lines)| Event {
            id: "e".into(),
            kind,
            lines: lines
                .into_iter()
                .map(|(sku, q, negative)| Line {
                    sku,
                    quantity: if kind == EventKind::Adjustment && negative {
                        -q
                    } else {
                        q
                    },
                })
                .collect(),
            reason: None,
            occurred_at: None,
            source: None,
            order_id: None,
            expiry: None,
        })
    }

    proptest! {
        #[test]
        fn any_sequence_never_goes_negative_and_the_ledger_adds_up(
            events in proptest::collection::vec(arb_event(), 0..60)
        ) {
            let mut book = StockBook::new();
            let mut ledger: HashMap<String, i64> = HashMap::new();
            for e in &events {
                let before = book.clone();
                match apply_event(e, &mut book) {
                    Ok(movements) => {
                        prop_assert_eq!(movements.len(), e.lines.len());
                        for m in movements {
                            prop_assert!(m.stock_after >= 0);
                            *ledger.entry(m.sku).or_default() += m.delta;
                        }
                    }
                    // All-or-nothing: a rejected event leaves every line untouched.
                    Err(_) => prop_assert_eq!(&before, &book),
                }
                prop_assert!(book.values().all(|s| s.on_hand >= 0 && s.reserved == 0));
            }
            let on_hand: HashMap<String, i64> =
                book.into_iter().map(|(sku, s)| (sku, s.on_hand)).collect();
            prop_assert_eq!(ledger, on_hand);
        }
    }
}
