//! The advisory-lock key of a SKU.
//!
//! Every transaction that touches a SKU first takes `pg_advisory_xact_lock(lock_key(sku))`, so
//! that no two replicas work on one SKU at once. The key must be identical in every replica of
//! every version that may run side by side, so it is defined here, not by PostgreSQL's
//! `hashtext` (32 bits, undocumented, free to change between releases):
//!
//! `lock_key(sku) = first 8 bytes, big-endian, as i64, of SHA-256("inventory-consumer/sku-lock/v1\0" ‖ sku)`
//!
//! The namespace prefix keeps our keys apart from other users of single-`bigint` advisory locks
//! in the same database; with 64 bits, two SKUs sharing a key is practically impossible, and if
//! it happened it would only serialize them, never break correctness. Changing this function
//! is a breaking change: replicas on both sides of it would no longer exclude each other.

use sha2::{Digest, Sha256};

pub const LOCK_NAMESPACE: &[u8] = b"inventory-consumer/sku-lock/v1\0";

pub fn lock_key(sku: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(LOCK_NAMESPACE)
        .chain_update(sku.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_across_versions() {
        // Pinned values: if these change, replicas of different versions stop excluding each
        // other. Do not update them; version the namespace and plan a full stop instead.
        assert_eq!(lock_key("SKU-000042"), lock_key("SKU-000042"));
        assert_eq!(lock_key("SKU-000042"), PINNED_SKU_000042);
        assert_eq!(lock_key("A"), PINNED_A);
        assert_ne!(lock_key("A"), lock_key("B"));
    }

    const PINNED_SKU_000042: i64 = 8_042_405_190_675_425_749;
    const PINNED_A: i64 = 2_538_680_352_877_402_714;
}
