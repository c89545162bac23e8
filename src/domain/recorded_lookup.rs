//! When a batch reads which of its event ids are already recorded before planning.
//!
//! Exactly-once does not depend on that read: `processed_events.event_id` is the primary key,
//! and a batch that inserts an id already there fails and rolls back whole. The read only lets
//! a batch holding duplicates commit on the first try, and it costs an index probe per event.
//! So a partition's worker reads while duplicates are around and skips the read once they are
//! gone: a new owner starts by reading (redeliveries cluster after a takeover), stops after
//! [`QUIET_LOOKUPS`] reads in a row that found nothing, and starts again as soon as a batch
//! that skipped it hits a recorded id (that batch is re-run at once, with the read).

/// Reads in a row that must find nothing recorded before a partition stops reading.
pub const QUIET_LOOKUPS: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedLookup {
    quiet: u32,
}

impl Default for RecordedLookup {
    fn default() -> Self {
        RecordedLookup::new()
    }
}

impl RecordedLookup {
    pub fn new() -> Self {
        RecordedLookup { quiet: 0 }
    }

    /// Whether the next batch should read its recorded ids first.
    pub fn needed(&self) -> bool {
        self.quiet < QUIET_LOOKUPS
    }

    /// A batch that read its recorded ids committed; `found`: some were recorded.
    pub fn looked_up(&mut self, found: bool) {
        self.quiet = if found { 0 } else { self.quiet + 1 };
    }

    /// A batch that skipped the read inserted an id already recorded (and rolled back).
    pub fn missed(&mut self) {
        self.quiet = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_until_quiet_and_again_after_a_miss() {
        let mut lookup = RecordedLookup::new();
        assert!(lookup.needed(), "a new owner reads first");
        lookup.looked_up(true);
        for _ in 0..QUIET_LOOKUPS {
            assert!(lookup.needed());
            lookup.looked_up(false);
        }
        assert!(!lookup.needed(), "quiet for {QUIET_LOOKUPS} reads in a row");
        lookup.missed();
        assert!(lookup.needed(), "a batch hit a recorded id");
        lookup.looked_up(false);
        lookup.looked_up(true);
        assert!(lookup.needed(), "a find starts the count again");
    }
}
