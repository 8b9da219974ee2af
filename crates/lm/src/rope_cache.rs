//! The RoPE tables a model holds, built for the positions in use: they start small and grow (to the next
//! power of two, at most the model's context) when a longer sequence arrives, so a 128k-context
//! checkpoint costs no table memory for the short sequences it usually runs, and a config with an
//! absurd context costs nothing until it is used. Every entry is computed on its own (`cos(p·f)` in f32),
//! so a grown table holds the same values as a table built at full length: growing never changes a bit.
//!
//! A sequence of n positions (its largest position + 1) takes the table its RoPE scaling gives that length
//! ([`crate::rope_scaling`]): one shared table for most scalings, LongRoPE's long table past its original
//! context, and dynamic NTK's table of exactly n positions past `max_position_embeddings` (the last one
//! built is kept). The fused path and the reference path read the same tables.

use std::sync::{Arc, RwLock};

use crate::error::{LmError, Result};
use crate::fused::RopeTables;
use crate::rope_scaling::{RopeScaling, TableKey};

/// The smallest table built (positions).
const MIN_POSITIONS: usize = 256;

/// A model's RoPE tables, grown on demand.
#[derive(Debug)]
pub(crate) struct RopeCache {
    theta: f64,
    rot: usize,
    max_position_embeddings: usize,
    context: usize,
    scaling: RopeScaling,
    tables: RwLock<Vec<(TableKey, Arc<RopeTables>)>>,
}

impl RopeCache {
    /// Tables for rotary width `rot`, base `theta`, `scaling`, for sequences up to the scaling's context.
    pub fn new(theta: f64, rot: usize, max_position_embeddings: usize, scaling: RopeScaling) -> Self {
        let context = scaling.context(max_position_embeddings);
        RopeCache { theta, rot, max_position_embeddings, context, scaling, tables: RwLock::new(Vec::new()) }
    }

    /// The most positions a sequence may use.
    pub fn max_positions(&self) -> usize {
        self.context
    }

    /// The table for a sequence of `needed` positions (its largest position + 1), covering `0..needed`.
    pub fn fused(&self, needed: usize) -> Result<Arc<RopeTables>> {
        if needed > self.context {
            return Err(LmError::invalid(
                "sequence length",
                needed,
                format!("longer than the model's context (max_position_embeddings = {})", self.context),
            ));
        }
        let key = self.scaling.table_key(needed, self.max_position_embeddings);
        let find =
            |v: &Vec<(TableKey, Arc<RopeTables>)>| v.iter().find(|(k, t)| *k == key && t.max_positions() >= needed).map(|(_, t)| t.clone());
        if let Some(t) = find(&self.tables.read().unwrap_or_else(|e| e.into_inner())) {
            return Ok(t);
        }
        let mut slot = self.tables.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = find(&slot) {
            return Ok(t);
        }
        let size = match key {
            TableKey::Dynamic(n) => n,
            _ => needed.next_power_of_two().max(MIN_POSITIONS).min(self.context),
        };
        let (inv, af) = self.scaling.frequencies(self.theta, self.rot, self.max_position_embeddings, needed);
        let table = Arc::new(RopeTables::from_frequencies(&inv, af, size));
        // One table per key (a grown one replaces the smaller), and one dynamic table at a time.
        slot.retain(|(k, _)| *k != key && !matches!((k, key), (TableKey::Dynamic(_), TableKey::Dynamic(_))));
        slot.push((key, table.clone()));
        Ok(table)
    }

    /// Positions the shared table covers now (0 before first use).
    #[cfg(test)]
    pub fn built(&self) -> usize {
        let v = self.tables.read().unwrap_or_else(|e| e.into_inner());
        v.iter().find(|(k, _)| *k == TableKey::Static).map_or(0, |(_, t)| t.max_positions())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_grow_to_the_positions_in_use_and_hold_the_values_of_a_full_table() {
        let c = RopeCache::new(10_000.0, 8, 1_000_000_000, RopeScaling::Default);
        assert_eq!(c.built(), 0, "nothing is built before use, whatever the context");
        let small = c.fused(10).unwrap();
        assert_eq!(small.max_positions(), 256);
        assert!(Arc::ptr_eq(&small, &c.fused(200).unwrap()), "a shorter use reuses the table");
        let grown = c.fused(300).unwrap();
        assert_eq!(grown.max_positions(), 512);
        let full = RopeTables::new(10_000.0, 8, 512);
        assert_eq!(format!("{grown:?}"), format!("{full:?}"), "a grown table holds the same bits");
        let e = c.fused(1_000_000_001).unwrap_err().to_string();
        assert!(e.contains("max_position_embeddings = 1000000000"), "{e}");
        let capped = RopeCache::new(10_000.0, 8, 300, RopeScaling::Default);
        assert_eq!(capped.fused(290).unwrap().max_positions(), 300, "never past the context");
    }

    #[test]
    fn dynamic_and_long_tables_follow_the_sequence_length() {
        let dynamic = RopeCache::new(500.0, 8, 16, RopeScaling::Dynamic { factor: 2.0 });
        assert_eq!(dynamic.max_positions(), 32, "dynamic NTK goes past max_position_embeddings, up to factor times it");
        let within = dynamic.fused(16).unwrap();
        assert_eq!(format!("{within:?}"), format!("{:?}", RopeTables::new(500.0, 8, 32)), "within the context: unscaled");
        let past = dynamic.fused(20).unwrap();
        assert_eq!(past.max_positions(), 20);
        assert_ne!(past.row(5), within.row(5), "past the context θ grows");
        assert!(Arc::ptr_eq(&past, &dynamic.fused(20).unwrap()));
        let long = RopeScaling::LongRope {
            short_factor: vec![1.0; 4],
            long_factor: vec![2.0; 4],
            factor: None,
            attention_factor: None,
            original_max_position_embeddings: 8,
        };
        let c = RopeCache::new(500.0, 8, 64, long);
        assert!(!Arc::ptr_eq(&c.fused(8).unwrap(), &c.fused(9).unwrap()), "past the original context: the long table");
    }
}
