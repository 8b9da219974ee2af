//! The RoPE tables a model holds, built for the positions in use: they start small and grow (to the next
//! power of two, at most `max_position_embeddings`) when a longer sequence arrives, so a 128k-context
//! checkpoint costs no table memory for the short sequences it usually runs, and a config with an
//! absurd context costs nothing until it is used. Every entry is computed on its own (`cos(p·f)` in f32),
//! so a grown table holds the same values as a table built at full length: growing never changes a bit.

use std::sync::{Arc, RwLock};

use candle_core::Device;

use crate::error::{LmError, Result};
use crate::fused::RopeTables;
use crate::ops::Rope;

/// The smallest table built (positions).
const MIN_POSITIONS: usize = 256;

/// A model's RoPE tables for the fused path ([`RopeTables`]) and the reference path ([`Rope`]), grown on demand.
#[derive(Debug)]
pub(crate) struct RopeCache {
    theta: f64,
    d: usize,
    max: usize,
    fused: RwLock<Option<Arc<RopeTables>>>,
    reference: RwLock<Option<Arc<Rope>>>,
}

impl RopeCache {
    /// Tables for head width `d` and base `theta`, for positions up to `max` (none built yet).
    pub fn new(theta: f64, d: usize, max: usize) -> Self {
        RopeCache { theta, d, max, fused: RwLock::new(None), reference: RwLock::new(None) }
    }

    /// The most positions a sequence may use (the config's `max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.max
    }

    fn size_for(&self, needed: usize) -> Result<usize> {
        if needed > self.max {
            return Err(LmError::invalid(
                "sequence length",
                needed,
                format!("longer than the model's context (max_position_embeddings = {})", self.max),
            ));
        }
        Ok(needed.next_power_of_two().max(MIN_POSITIONS).min(self.max))
    }

    /// Fused-path tables covering positions `0..needed` at least.
    pub fn fused(&self, needed: usize) -> Result<Arc<RopeTables>> {
        if let Some(t) = self.fused.read().unwrap_or_else(|e| e.into_inner()).as_ref().filter(|t| t.max_positions() >= needed) {
            return Ok(t.clone());
        }
        let n = self.size_for(needed)?;
        let mut slot = self.fused.write().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref().filter(|t| t.max_positions() >= needed) {
            Some(t) => Ok(t.clone()),
            None => Ok(slot.insert(Arc::new(RopeTables::new(self.theta, self.d, n))).clone()),
        }
    }

    /// Reference-path tables covering positions `0..needed` at least.
    pub fn reference(&self, needed: usize) -> Result<Arc<Rope>> {
        if let Some(t) = self.reference.read().unwrap_or_else(|e| e.into_inner()).as_ref().filter(|t| t.max_positions() >= needed) {
            return Ok(t.clone());
        }
        let n = self.size_for(needed)?;
        let mut slot = self.reference.write().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref().filter(|t| t.max_positions() >= needed) {
            Some(t) => Ok(t.clone()),
            None => Ok(slot.insert(Arc::new(Rope::new(self.theta, self.d, n, &Device::Cpu)?)).clone()),
        }
    }

    /// Positions the fused tables cover now (0 before first use).
    #[cfg(test)]
    pub fn built(&self) -> usize {
        self.fused.read().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |t| t.max_positions())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_grow_to_the_positions_in_use_and_hold_the_values_of_a_full_table() {
        let c = RopeCache::new(10_000.0, 8, 1_000_000_000);
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
        let capped = RopeCache::new(10_000.0, 8, 300);
        assert_eq!(capped.fused(290).unwrap().max_positions(), 300, "never past the context");
        assert_eq!(capped.reference(5).unwrap().max_positions(), 256);
    }
}
