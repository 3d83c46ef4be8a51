//! Reassembly of one flow direction from chunks arriving on several lanes (sans-IO).
//!
//! Chunks arrive in offset order on each lane but interleaved arbitrarily across lanes. The
//! buffer holds out-of-order chunks up to a byte budget. The chunk that continues the delivered
//! prefix is always admitted, so a full buffer can never block the chunk everyone is waiting
//! for: lanes carry increasing offsets, so that chunk is at the head of some lane whose reader is
//! not blocked (every blocked reader holds a chunk beyond it).

use std::collections::BTreeMap;

use bytes::Bytes;
use ferry_codec::WireOffset;

/// A chunk that contradicts what the flow already received.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReorderError {
    /// A chunk overlaps data already delivered or buffered.
    #[error("chunk at offset {offset} (+{len}) overlaps data already received")]
    Overlap {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u64,
    },
    /// A chunk extends past the length announced by the sender's Fin.
    #[error("chunk at offset {offset} (+{len}) extends past the announced end {end}")]
    PastEnd {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// Announced length.
        end: u64,
    },
}

/// Outcome of offering a chunk to the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Stored; deliverable data may now be available.
    Accepted,
    /// Would exceed the budget; offer it again after some data was taken.
    Full,
}

/// Out-of-order buffer for one flow direction.
#[derive(Debug)]
pub struct Reassembler {
    /// Offset of the first byte not yet handed out.
    delivered: u64,
    /// Buffered chunks by offset; none overlaps another or lies below `delivered`.
    chunks: BTreeMap<u64, Bytes>,
    buffered: u64,
    budget: u64,
    end: Option<u64>,
}

impl Reassembler {
    /// An empty buffer that holds at most `budget` out-of-order bytes.
    pub fn new(budget: u64) -> Self {
        Self { delivered: 0, chunks: BTreeMap::new(), buffered: 0, budget, end: None }
    }

    /// Offers a chunk. The chunk continuing the delivered prefix is always accepted.
    pub fn offer(&mut self, offset: WireOffset, data: Bytes) -> Result<Admission, ReorderError> {
        let offset = offset.get();
        let len = data.len() as u64;
        let end = offset + len;
        if let Some(fin) = self.end {
            if end > fin {
                return Err(ReorderError::PastEnd { offset, len, end: fin });
            }
        }
        let overlaps_prev = self
            .chunks
            .range(..=offset)
            .next_back()
            .is_some_and(|(o, c)| o + c.len() as u64 > offset);
        let overlaps_next = self.chunks.range(offset..end).next().is_some();
        if offset < self.delivered || overlaps_prev || overlaps_next {
            return Err(ReorderError::Overlap { offset, len });
        }
        if offset != self.delivered && self.buffered + len > self.budget {
            return Ok(Admission::Full);
        }
        self.buffered += len;
        self.chunks.insert(offset, data);
        Ok(Admission::Accepted)
    }

    /// Takes the next in-order bytes, if any.
    pub fn take(&mut self) -> Option<Bytes> {
        let entry = self.chunks.first_entry()?;
        if *entry.key() != self.delivered {
            return None;
        }
        let data = entry.remove();
        self.delivered += data.len() as u64;
        self.buffered -= data.len() as u64;
        Some(data)
    }

    /// Records the sender's announced total length.
    pub fn set_end(&mut self, length: WireOffset) -> Result<(), ReorderError> {
        let length = length.get();
        let highest = self.chunks.last_key_value().map_or(self.delivered, |(o, c)| o + c.len() as u64);
        if length < highest {
            return Err(ReorderError::PastEnd { offset: highest, len: 0, end: length });
        }
        self.end = Some(length);
        Ok(())
    }

    /// Bytes handed out so far.
    pub fn delivered(&self) -> WireOffset {
        WireOffset::new(self.delivered)
    }

    /// Bytes held out of order.
    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// True once the announced length has been handed out entirely.
    pub fn is_complete(&self) -> bool {
        self.end == Some(self.delivered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; n])
    }

    #[test]
    fn reorders_and_completes() {
        let mut r = Reassembler::new(100);
        assert_eq!(r.offer(WireOffset::new(10), b(10, 2)).unwrap(), Admission::Accepted);
        assert!(r.take().is_none());
        assert_eq!(r.offer(WireOffset::new(0), b(10, 1)).unwrap(), Admission::Accepted);
        assert_eq!(r.take().unwrap()[0], 1);
        assert_eq!(r.take().unwrap()[0], 2);
        r.set_end(WireOffset::new(20)).unwrap();
        assert!(r.is_complete());
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn budget_never_blocks_the_next_chunk() {
        let mut r = Reassembler::new(15);
        assert_eq!(r.offer(WireOffset::new(10), b(10, 0)).unwrap(), Admission::Accepted);
        assert_eq!(r.offer(WireOffset::new(20), b(10, 0)).unwrap(), Admission::Full);
        assert_eq!(r.offer(WireOffset::new(0), b(10, 0)).unwrap(), Admission::Accepted);
        assert_eq!(r.delivered(), WireOffset::ZERO);
    }

    #[test]
    fn rejects_overlaps_and_overruns() {
        let mut r = Reassembler::new(100);
        r.offer(WireOffset::new(0), b(10, 0)).unwrap();
        assert!(r.offer(WireOffset::new(5), b(10, 0)).is_err());
        r.offer(WireOffset::new(20), b(10, 0)).unwrap();
        assert!(r.offer(WireOffset::new(15), b(10, 0)).is_err());
        assert!(r.offer(WireOffset::new(25), b(1, 0)).is_err());
        r.take();
        assert!(r.offer(WireOffset::new(0), b(1, 0)).is_err());
        assert!(r.set_end(WireOffset::new(25)).is_err());
        r.set_end(WireOffset::new(30)).unwrap();
        assert!(r.offer(WireOffset::new(30), b(1, 0)).is_err());
    }
}
