//! The order steps of docs/contract.md section 7, pure like [`super::rules`]: `reserve`, `commit`,
//! `release`, and the expiry of a reservation, over the same [`StockBook`] plus the
//! [`OrderBook`] of the orders in play.
//!
//! - **reserve**: every line must fit the available stock (on hand minus reserved), all or
//!   nothing; the lines' reserved stock grows and the reservation is active until its expiry.
//!   An order reserves once: a second reserve of it is `order_exists`.
//! - **commit**: an active reservation whose expiry is still ahead (by the clock the caller
//!   passes: the database's) sells its units: on hand and reserved shrink together.
//! - **release**: an active reservation gives its units back to the available stock.
//! - **expiry**: an active reservation past its expiry is released by the service itself.
//!
//! A reservation thus leaves `active` once, to exactly one of committed, released or expired,
//! and its units leave the reserved stock exactly once.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};

use super::event::{Event, EventKind, Expiry, Line};
use super::rules::{Change, Movement, RejectReason, StockBook, move_lines};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationStatus {
    Active,
    Committed,
    Released,
    Expired,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Active => "active",
            ReservationStatus::Committed => "committed",
            ReservationStatus::Released => "released",
            ReservationStatus::Expired => "expired",
        }
    }
}

/// One order's reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The `reserve` event that made it.
    pub event_id: String,
    pub lines: Vec<Line>,
    pub status: ReservationStatus,
    pub expires_at: DateTime<Utc>,
}

impl Reservation {
    fn is_active(&self) -> bool {
        self.status == ReservationStatus::Active
    }
}

/// The reservations of the orders in play, by order id. Absent: never reserved.
pub type OrderBook = HashMap<String, Reservation>;

/// What a step is decided against: the database's clock, the expiry of a reserve that gives
/// none (`reservations.default_ttl_s`), and the longest a reservation may hold stock
/// (`reservations.max_ttl_s`).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: DateTime<Utc>,
    pub default_ttl: TimeDelta,
    pub max_ttl: TimeDelta,
}

/// Applies one order step to `stock` and `orders`: on success they hold the new state and the
/// movements are returned in line order; on rejection both are left exactly as they were.
/// Stock events go to [`super::rules::apply_event`] instead.
pub fn apply_order_step(
    event: &Event,
    stock: &mut StockBook,
    orders: &mut OrderBook,
    clock: Clock,
) -> Result<Vec<Movement>, RejectReason> {
    let Some(order_id) = event.order_id.as_deref() else {
        // Decoding guarantees an order id for every order step.
        return Err(RejectReason::NoActiveReservation);
    };
    match event.kind {
        EventKind::Reserve => reserve(event, order_id, stock, orders, clock),
        EventKind::Commit => {
            let reservation = orders
                .get_mut(order_id)
                .filter(|r| r.is_active() && r.expires_at > clock.now)
                .ok_or(RejectReason::NoActiveReservation)?;
            let movements = move_lines(stock, &reservation.lines, change(-1, -1))?;
            reservation.status = ReservationStatus::Committed;
            Ok(movements)
        }
        EventKind::Release => end(orders, order_id, stock, ReservationStatus::Released, |_| {
            true
        }),
        EventKind::Restock | EventKind::Sale | EventKind::Adjustment => {
            Err(RejectReason::NoActiveReservation)
        }
    }
}

/// Releases the reservation of `order_id` if it is active and its expiry has passed at `now`;
/// `None` (nothing changed) otherwise.
pub fn expire(
    order_id: &str,
    stock: &mut StockBook,
    orders: &mut OrderBook,
    now: DateTime<Utc>,
) -> Option<Vec<Movement>> {
    end(orders, order_id, stock, ReservationStatus::Expired, |r| {
        r.expires_at <= now
    })
    .ok()
}

/// The instant a reserve applied at `clock.now` expires, or why it may not hold stock that
/// long: further ahead than `clock.max_ttl`. An `expires_at` already past is allowed (the
/// reservation expires at the next sweep).
pub fn expiry_of(event: &Event, clock: Clock) -> Result<DateTime<Utc>, RejectReason> {
    let latest = clock.now + clock.max_ttl;
    match &event.expiry {
        Some(Expiry::Ttl(seconds)) => TimeDelta::try_seconds(*seconds)
            .and_then(|ttl| clock.now.checked_add_signed(ttl))
            .filter(|at| *at <= latest)
            .ok_or(RejectReason::TtlTooLong),
        // Validated by decoding; an unreadable instant could only mean "already passed".
        Some(Expiry::At(at)) => Ok(DateTime::parse_from_rfc3339(at)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(clock.now))
        .and_then(|at| {
            if at <= latest {
                Ok(at)
            } else {
                Err(RejectReason::ExpiryTooFar)
            }
        }),
        None => Ok(clock.now + clock.default_ttl),
    }
}

fn reserve(
    event: &Event,
    order_id: &str,
    stock: &mut StockBook,
    orders: &mut OrderBook,
    clock: Clock,
) -> Result<Vec<Movement>, RejectReason> {
    if orders.contains_key(order_id) {
        return Err(RejectReason::OrderExists);
    }
    let expires_at = expiry_of(event, clock)?;
    let movements = move_lines(stock, &event.lines, change(0, 1))?;
    orders.insert(
        order_id.to_owned(),
        Reservation {
            event_id: event.id.clone(),
            lines: event.lines.clone(),
            status: ReservationStatus::Active,
            expires_at,
        },
    );
    Ok(movements)
}

/// An order step moves the stock of SKUs that exist: a reservation names restocked ones only.
fn change(on_hand: i64, reserved: i64) -> Change {
    Change {
        on_hand,
        reserved,
        creates: false,
    }
}

/// Ends an active reservation that `allowed` admits with `status`, giving its units back.
fn end(
    orders: &mut OrderBook,
    order_id: &str,
    stock: &mut StockBook,
    status: ReservationStatus,
    allowed: impl Fn(&Reservation) -> bool,
) -> Result<Vec<Movement>, RejectReason> {
    let reservation = orders
        .get_mut(order_id)
        .filter(|r| r.is_active() && allowed(r))
        .ok_or(RejectReason::NoActiveReservation)?;
    let movements = move_lines(stock, &reservation.lines, change(0, -1))?;
    reservation.status = status;
    Ok(movements)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::rules::{Stock, apply_event};
    use proptest::prelude::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap_or_default()
    }

    fn clock(seconds: i64) -> Clock {
        Clock {
            now: at(seconds),
            default_ttl: TimeDelta::seconds(900),
            max_ttl: TimeDelta::days(7),
        }
    }

    fn step(kind: EventKind, id: &str, order: &str, lines: &[(&str, i64)]) -> Event {
        Event {
            id: id.into(),
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
            order_id: (!order.is_empty()).then(|| order.to_owned()),
            expiry: None,
        }
    }

    fn stocked(skus: &[(&str, i64)]) -> StockBook {
        skus.iter()
            .map(|(sku, n)| ((*sku).to_owned(), Stock::on_hand(*n)))
            .collect()
    }

    #[test]
    fn reserve_then_commit_sells_the_reserved_units() {
        let mut stock = stocked(&[("A", 5), ("B", 1)]);
        let mut orders = OrderBook::new();
        let r = step(EventKind::Reserve, "o1-r", "o1", &[("A", 2), ("B", 1)]);
        let m = apply_order_step(&r, &mut stock, &mut orders, clock(0)).unwrap();
        assert_eq!(
            m.iter()
                .map(|m| (m.delta, m.reserved_delta, m.reserved_after))
                .collect::<Vec<_>>(),
            [(0, 2, 2), (0, 1, 1)]
        );
        assert_eq!(stock["A"].available(), 3);
        assert_eq!(orders["o1"].expires_at, at(900), "the default TTL");
        let sale = step(EventKind::Sale, "s", "", &[("B", 1)]);
        assert_eq!(
            apply_event(&sale, &mut stock),
            Err(RejectReason::InsufficientStock),
            "B's only unit is reserved"
        );
        let c = step(EventKind::Commit, "o1-c", "o1", &[]);
        apply_order_step(&c, &mut stock, &mut orders, clock(10)).unwrap();
        assert_eq!(
            stock["A"],
            Stock {
                on_hand: 3,
                reserved: 0
            }
        );
        assert_eq!(stock["B"], Stock::default());
        assert_eq!(orders["o1"].status, ReservationStatus::Committed);
        let again = step(EventKind::Release, "o1-x", "o1", &[]);
        assert_eq!(
            apply_order_step(&again, &mut stock, &mut orders, clock(11)),
            Err(RejectReason::NoActiveReservation)
        );
    }

    #[test]
    fn a_reserve_is_all_or_nothing_and_once_per_order() {
        let mut stock = stocked(&[("A", 1)]);
        let mut orders = OrderBook::new();
        let too_much = step(EventKind::Reserve, "r1", "o1", &[("A", 1), ("A", 1)]);
        assert_eq!(
            apply_order_step(&too_much, &mut stock, &mut orders, clock(0)),
            Err(RejectReason::InsufficientStock)
        );
        assert_eq!(stock["A"], Stock::on_hand(1));
        assert!(orders.is_empty());
        let unknown = step(EventKind::Reserve, "r2", "o2", &[("Z", 1)]);
        assert_eq!(
            apply_order_step(&unknown, &mut stock, &mut orders, clock(0)),
            Err(RejectReason::UnknownSku)
        );
        let ok = step(EventKind::Reserve, "r3", "o3", &[("A", 1)]);
        apply_order_step(&ok, &mut stock, &mut orders, clock(0)).unwrap();
        let twice = step(EventKind::Reserve, "r4", "o3", &[("A", 1)]);
        assert_eq!(
            apply_order_step(&twice, &mut stock, &mut orders, clock(0)),
            Err(RejectReason::OrderExists)
        );
    }

    #[test]
    fn a_late_commit_is_rejected_and_the_expiry_releases() {
        let mut stock = stocked(&[("A", 4)]);
        let mut orders = OrderBook::new();
        let mut r = step(EventKind::Reserve, "r", "o", &[("A", 3)]);
        r.expiry = Some(Expiry::Ttl(2));
        apply_order_step(&r, &mut stock, &mut orders, clock(0)).unwrap();
        assert!(
            expire("o", &mut stock, &mut orders, at(1)).is_none(),
            "not yet"
        );
        let c = step(EventKind::Commit, "c", "o", &[]);
        assert_eq!(
            apply_order_step(&c, &mut stock, &mut orders, clock(2)),
            Err(RejectReason::NoActiveReservation),
            "the expiry has come"
        );
        let m = expire("o", &mut stock, &mut orders, at(2)).unwrap();
        assert_eq!(m[0].reserved_delta, -3);
        assert_eq!(stock["A"], Stock::on_hand(4));
        assert_eq!(orders["o"].status, ReservationStatus::Expired);
        assert!(
            expire("o", &mut stock, &mut orders, at(3)).is_none(),
            "once"
        );
    }

    #[test]
    fn an_expires_at_is_taken_as_given() {
        let mut r = step(EventKind::Reserve, "r", "o", &[("A", 1)]);
        r.expiry = Some(Expiry::At("2027-01-15T12:00:00+01:00".into()));
        assert_eq!(
            expiry_of(&r, clock(0)).map(|t| t.to_rfc3339()),
            Ok("2027-01-15T11:00:00+00:00".to_owned())
        );
    }

    #[test]
    fn no_reservation_may_hold_stock_longer_than_the_maximum() {
        let week = 7 * 86_400;
        let reserve = |expiry: Expiry| {
            let mut r = step(EventKind::Reserve, "r", "o", &[("A", 1)]);
            r.expiry = Some(expiry);
            r
        };
        let mut stock = StockBook::from([("A".to_owned(), Stock::on_hand(5))]);
        let mut orders = OrderBook::new();
        for (expiry, outcome) in [
            (Expiry::Ttl(week + 1), Err(RejectReason::TtlTooLong)),
            (Expiry::Ttl(i64::MAX), Err(RejectReason::TtlTooLong)),
            (
                Expiry::At("9999-12-31T00:00:00Z".into()),
                Err(RejectReason::ExpiryTooFar),
            ),
            // 2027-01-22T08:00:01Z: a second past a week after `clock(0)`.
            (
                Expiry::At("2027-01-22T08:00:01Z".into()),
                Err(RejectReason::ExpiryTooFar),
            ),
        ] {
            let r = reserve(expiry.clone());
            assert_eq!(
                apply_order_step(&r, &mut stock, &mut orders, clock(0)).map(|_| ()),
                outcome,
                "{expiry:?}"
            );
            assert_eq!(stock["A"], Stock::on_hand(5), "a rejection changes nothing");
            assert!(orders.is_empty());
        }
        // Exactly the maximum, and an instant already past, are allowed.
        for (order, expiry) in [
            ("o1", Expiry::Ttl(week)),
            ("o2", Expiry::At("2027-01-22T08:00:00Z".into())),
            ("o3", Expiry::At("2020-01-01T00:00:00Z".into())),
        ] {
            let mut r = reserve(expiry);
            r.order_id = Some(order.into());
            assert!(apply_order_step(&r, &mut stock, &mut orders, clock(0)).is_ok());
        }
    }

    /// One step of a random saga.
    #[derive(Debug, Clone)]
    enum Op {
        Restock(usize, i64),
        Sale(usize, i64),
        Reserve(usize, Vec<(usize, i64)>, i64),
        Commit(usize),
        Release(usize),
        Expire(usize),
        Tick(i64),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let sku = 0usize..3;
        let order = 0usize..6;
        prop_oneof![
            (sku.clone(), 1i64..10).prop_map(|(s, q)| Op::Restock(s, q)),
            (sku.clone(), 1i64..6).prop_map(|(s, q)| Op::Sale(s, q)),
            (
                order.clone(),
                proptest::collection::vec((sku, 1i64..5), 1..4),
                1i64..30
            )
                .prop_map(|(o, lines, ttl)| Op::Reserve(o, lines, ttl)),
            order.clone().prop_map(Op::Commit),
            order.clone().prop_map(Op::Release),
            order.prop_map(Op::Expire),
            (1i64..15).prop_map(Op::Tick),
        ]
    }

    const SKUS: [&str; 3] = ["A", "B", "C"];

    proptest! {
        /// Whatever the interleaving of stock events, reserves, commits, releases, expiries
        /// and time: reserved stock is never negative nor above the stock on hand, it always
        /// equals the units of the active reservations, the ledger adds up to both columns,
        /// and each reservation ends at most once.
        #[test]
        fn every_reserved_unit_is_accounted_for_exactly_once(
            ops in proptest::collection::vec(arb_op(), 0..80)
        ) {
            let mut stock = StockBook::new();
            let mut orders = OrderBook::new();
            let mut now = 0i64;
            let mut ledger: HashMap<String, (i64, i64)> = HashMap::new();
            let mut endings: HashMap<String, u32> = HashMap::new();
            for (n, op) in ops.iter().enumerate() {
                let id = format!("e{n}");
                let order = |o: &usize| format!("o{o}");
                let before = (stock.clone(), orders.clone());
                let result = match op {
                    Op::Restock(s, q) => apply_event(&step(EventKind::Restock, &id, "", &[(SKUS[*s], *q)]), &mut stock),
                    Op::Sale(s, q) => apply_event(&step(EventKind::Sale, &id, "", &[(SKUS[*s], *q)]), &mut stock),
                    Op::Reserve(o, lines, ttl) => {
                        let lines: Vec<(&str, i64)> = lines.iter().map(|(s, q)| (SKUS[*s], *q)).collect();
                        let mut e = step(EventKind::Reserve, &id, &order(o), &lines);
                        e.expiry = Some(Expiry::Ttl(*ttl));
                        apply_order_step(&e, &mut stock, &mut orders, clock(now))
                    }
                    Op::Commit(o) => apply_order_step(&step(EventKind::Commit, &id, &order(o), &[]), &mut stock, &mut orders, clock(now)),
                    Op::Release(o) => apply_order_step(&step(EventKind::Release, &id, &order(o), &[]), &mut stock, &mut orders, clock(now)),
                    Op::Expire(o) => expire(&order(o), &mut stock, &mut orders, at(now)).ok_or(RejectReason::NoActiveReservation),
                    Op::Tick(s) => { now += s; Err(RejectReason::NoActiveReservation) }
                };
                match result {
                    Ok(movements) => {
                        if let Op::Commit(o) | Op::Release(o) | Op::Expire(o) = op {
                            *endings.entry(order(o)).or_default() += 1;
                        }
                        for m in movements {
                            let entry = ledger.entry(m.sku.clone()).or_default();
                            entry.0 += m.delta;
                            entry.1 += m.reserved_delta;
                            prop_assert_eq!((m.stock_after, m.reserved_after), *entry);
                        }
                    }
                    // All or nothing: a rejected step changes nothing.
                    Err(_) => prop_assert_eq!(&before, &(stock.clone(), orders.clone())),
                }
                let mut active: HashMap<&str, i64> = HashMap::new();
                for r in orders.values().filter(|r| r.status == ReservationStatus::Active) {
                    for l in &r.lines {
                        *active.entry(l.sku.as_str()).or_default() += l.quantity;
                    }
                }
                for (sku, s) in &stock {
                    prop_assert!(0 <= s.reserved && s.reserved <= s.on_hand, "{sku}: {s:?}");
                    prop_assert_eq!(s.reserved, active.get(sku.as_str()).copied().unwrap_or(0));
                    prop_assert_eq!((s.on_hand, s.reserved), ledger.get(sku).copied().unwrap_or_default());
                }
            }
            prop_assert!(endings.values().all(|&n| n == 1), "{endings:?}");
        }
    }
}
