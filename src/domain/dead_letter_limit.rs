//! The poison-pill guard of a partition. One bad message is dead-lettered and the partition
//! moves on; but when most of a partition's recent messages are bad, a producer is probably
//! broken (a bad deploy), and dead-lettering everything would bury the stream in `dead_letters`.
//! Past the limit the partition is halted instead, for an operator to look at (as Sentry's
//! arroyo does with its dead-letter limits).

use std::collections::VecDeque;

/// The share of malformed messages among a partition's last `window` messages above which the
/// partition halts. Judged once at least a tenth of the window has been seen.
#[derive(Debug, Clone)]
pub struct DeadLetterLimit {
    max_share: f64,
    window: usize,
    /// Whether each recent message was malformed, oldest first.
    recent: VecDeque<bool>,
    malformed: usize,
}

/// The limit was crossed at the batch's message `at`: with it, `malformed` of the last `seen`
/// messages were bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitExceeded {
    pub at: usize,
    pub malformed: usize,
    pub seen: usize,
}

impl DeadLetterLimit {
    /// `max_share` 1.0 never halts.
    pub fn new(max_share: f64, window: usize) -> Self {
        let window = window.max(1);
        DeadLetterLimit {
            max_share,
            window,
            recent: VecDeque::with_capacity(window),
            malformed: 0,
        }
    }

    /// Records the messages of a batch in order (`true`: malformed), unless one of them takes
    /// the share over the limit: then nothing is recorded, and only the messages before it may
    /// be applied.
    pub fn admit(&mut self, batch: impl IntoIterator<Item = bool>) -> Result<(), LimitExceeded> {
        let mut trial = self.clone();
        for (at, malformed) in batch.into_iter().enumerate() {
            trial.push(malformed);
            let seen = trial.recent.len();
            if seen * 10 >= trial.window && trial.malformed as f64 > trial.max_share * seen as f64 {
                return Err(LimitExceeded {
                    at,
                    malformed: trial.malformed,
                    seen,
                });
            }
        }
        *self = trial;
        Ok(())
    }

    fn push(&mut self, malformed: bool) {
        if self.recent.len() == self.window && self.recent.pop_front() == Some(true) {
            self.malformed -= 1;
        }
        self.recent.push_back(malformed);
        self.malformed += usize::from(malformed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_bad_messages_pass_a_bad_streak_halts() {
        let mut limit = DeadLetterLimit::new(0.5, 100);
        // 30% bad, for a long time: fine.
        for i in 0..1_000 {
            assert_eq!(limit.admit([i % 10 < 3]), Ok(()));
        }
        // Then a producer breaks: everything bad. Halts once more than half of the last 100 are.
        let mut admitted = 0;
        let exceeded = loop {
            match limit.admit([true]) {
                Ok(()) => admitted += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(exceeded.seen, 100);
        assert_eq!(exceeded.malformed, 51);
        assert!((25..=40).contains(&admitted), "{admitted}");
        // A refused batch leaves nothing recorded: the same batch is refused again.
        assert!(limit.admit([true]).is_err());
    }

    #[test]
    fn waits_for_a_tenth_of_the_window_and_refuses_from_the_crossing_message() {
        let mut limit = DeadLetterLimit::new(0.5, 100);
        assert_eq!(limit.admit([true; 9]), Ok(()), "9 seen: too few to judge");
        let mut limit = DeadLetterLimit::new(0.5, 100);
        assert_eq!(
            limit.admit([false, false, false, false, false, true, true, true, true]),
            Ok(())
        );
        assert_eq!(
            limit.admit([true, true, false]).map_err(|e| e.at),
            Err(1),
            "10 seen with 5 bad is at the limit; 11 with 6 is over it"
        );
        assert_eq!(
            limit.admit([false, false]),
            Ok(()),
            "the refused batch was not recorded: 11 seen, 4 bad"
        );
    }

    #[test]
    fn a_share_of_one_never_halts() {
        let mut limit = DeadLetterLimit::new(1.0, 10);
        assert_eq!(limit.admit([true; 1_000]), Ok(()));
    }
}
