//! Session IDs (SPEC §3): the extranonce1 a proxy gives each miner, `server_id << INDEX_BITS |
//! index`, unique among the sessions of one proxy and, through the server ID, among the live
//! proxies of one chain type.
//!
//! - Bitcoin-like chains use 24 index bits (the server ID fills the top byte); Ethereum uses 16
//!   (the server ID sits in bits 16..23, the top byte is 0).
//! - Allocation starts at index 128 and moves round-robin to the next free index, so a freed ID
//!   is not handed out again while others are free (the Go switcher reused it at once).
//! - Ethereum moves by a stride of 256, so that NiceHash clients, which see only the first four
//!   hex digits of the six-digit text, get distinct extranonces.

#![forbid(unsafe_code)]

use std::fmt;

use thiserror::Error;

/// The chain types a proxy can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ChainType {
    /// Bitcoin and its forks.
    Bitcoin,
    /// Decred, miners that take the padded little-endian extranonce.
    DecredNormal,
    /// Decred, gominer.
    DecredGominer,
    /// Ethereum and its forks.
    Ethereum,
}

/// A chain type name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown chain type {0:?}: expected bitcoin, decred-normal, decred-gominer or ethereum")]
pub struct UnknownChainType(pub String);

impl std::str::FromStr for ChainType {
    type Err = UnknownChainType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bitcoin" => Ok(Self::Bitcoin),
            "decred-normal" => Ok(Self::DecredNormal),
            "decred-gominer" => Ok(Self::DecredGominer),
            "ethereum" => Ok(Self::Ethereum),
            other => Err(UnknownChainType(other.chars().take(32).collect())),
        }
    }
}

impl ChainType {
    /// The name used in configs and leases.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bitcoin => "bitcoin",
            Self::DecredNormal => "decred-normal",
            Self::DecredGominer => "decred-gominer",
            Self::Ethereum => "ethereum",
        }
    }

    /// Bits of the session ID that number sessions.
    pub fn index_bits(self) -> u32 {
        match self {
            Self::Ethereum => 16,
            _ => 24,
        }
    }
}

/// A session ID.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SessionId(pub u32);

impl SessionId {
    /// The ID as the miner sees it, for `chain`: bitcoin 8 hex digits big-endian;
    /// decred-normal 16 zeros then 8 hex little-endian; decred-gominer 8 hex little-endian;
    /// ethereum the last 6 hex digits of the big-endian form.
    pub fn text(self, chain: ChainType) -> String {
        match chain {
            ChainType::Bitcoin => format!("{:08x}", self.0),
            ChainType::DecredNormal => format!("0000000000000000{:08x}", self.0.swap_bytes()),
            ChainType::DecredGominer => format!("{:08x}", self.0.swap_bytes()),
            ChainType::Ethereum => format!("{:06x}", self.0 & 0x00ff_ffff),
        }
    }

    /// The ID as sent to an sserver in the subscribe request: 8 hex digits big-endian, for
    /// every chain type (SPEC §2).
    pub fn hex(self) -> String {
        format!("{:08x}", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// A server ID outside 1..255.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("server ID {0} is outside 1..255")]
pub struct BadServerId(pub u32);

/// Hands out the session IDs of one proxy; see the module doc.
#[derive(Debug)]
pub struct SessionIdAllocator {
    chain: ChainType,
    server_id: u8,
    /// One bit per index.
    used: Vec<u64>,
    in_use: usize,
    /// The position the next search starts at.
    next: u32,
}

/// The first index handed out (sservers' own allocation starts elsewhere, so an sserver built
/// without switcher support shows at once).
const FIRST_INDEX: u32 = 128;

impl SessionIdAllocator {
    /// An allocator for `server_id` (1..255) on `chain`.
    pub fn new(server_id: u32, chain: ChainType) -> Result<Self, BadServerId> {
        let id = u8::try_from(server_id)
            .ok()
            .filter(|&id| id != 0)
            .ok_or(BadServerId(server_id))?;
        let slots = 1usize << chain.index_bits();
        let mut this = Self {
            chain,
            server_id: id,
            used: vec![0; slots / 64],
            in_use: 0,
            next: 0,
        };
        this.next = this.position_of(FIRST_INDEX);
        Ok(this)
    }

    /// The server ID.
    pub fn server_id(&self) -> u8 {
        self.server_id
    }

    /// Sessions holding an ID.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    fn slots(&self) -> u32 {
        1u32 << self.chain.index_bits()
    }

    /// The index at search position `p`: the identity for bitcoin-like chains; for Ethereum
    /// the high byte of the index moves fastest (a stride of 256).
    fn index_at(&self, p: u32) -> u32 {
        match self.chain {
            ChainType::Ethereum => ((p & 0xff) << 8) | (p >> 8),
            _ => p,
        }
    }

    fn position_of(&self, index: u32) -> u32 {
        match self.chain {
            ChainType::Ethereum => ((index & 0xff) << 8) | (index >> 8),
            _ => index,
        }
    }

    fn is_used(&self, index: u32) -> bool {
        self.used[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Takes the next free ID after the last one handed out; `None` when every ID is taken.
    pub fn allocate(&mut self) -> Option<SessionId> {
        let slots = self.slots();
        if self.in_use >= slots as usize {
            return None;
        }
        for step in 0..slots {
            let p = (self.next + step) % slots;
            let index = self.index_at(p);
            if !self.is_used(index) {
                self.used[(index / 64) as usize] |= 1 << (index % 64);
                self.in_use += 1;
                self.next = (p + 1) % slots;
                let sid = (u32::from(self.server_id) << self.chain.index_bits()) | index;
                return Some(SessionId(sid));
            }
        }
        None
    }

    /// Takes `sid` itself (a session carried over by a hot upgrade); false when it is of
    /// another server ID or taken already.
    pub fn claim(&mut self, sid: SessionId) -> bool {
        let bits = self.chain.index_bits();
        if sid.0 >> bits != u32::from(self.server_id) {
            return false;
        }
        let index = sid.0 & ((1 << bits) - 1);
        if self.is_used(index) {
            return false;
        }
        self.used[(index / 64) as usize] |= 1 << (index % 64);
        self.in_use += 1;
        true
    }

    /// Where the round-robin search stands (carried over by a hot upgrade, so that the new
    /// process does not hand out at once the IDs the old one just freed).
    pub fn cursor(&self) -> u32 {
        self.next
    }

    /// Moves the round-robin search to `cursor` (from [`Self::cursor`] of the old process).
    pub fn set_cursor(&mut self, cursor: u32) {
        self.next = cursor % self.slots();
    }

    /// Gives an ID back. IDs of another server ID, or not handed out, are ignored.
    pub fn free(&mut self, sid: SessionId) {
        let bits = self.chain.index_bits();
        if sid.0 >> bits != u32::from(self.server_id) {
            return;
        }
        let index = sid.0 & ((1 << bits) - 1);
        if self.is_used(index) {
            self.used[(index / 64) as usize] &= !(1 << (index % 64));
            self.in_use -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_id_is_not_handed_out_and_the_cursor_carries_over() {
        let mut old = SessionIdAllocator::new(3, ChainType::Bitcoin).expect("server id");
        let a = old.allocate().expect("free");
        let b = old.allocate().expect("free");
        let mut new = SessionIdAllocator::new(3, ChainType::Bitcoin).expect("server id");
        assert!(new.claim(b));
        assert!(!new.claim(b), "taken twice");
        assert!(!new.claim(SessionId(0x0400_0080)), "another server ID");
        new.set_cursor(old.cursor());
        let c = new.allocate().expect("free");
        assert_ne!(c, a, "a freed ID is not reused at once");
        assert_ne!(c, b);
        assert_eq!(new.in_use(), 2);
    }

    #[test]
    fn bitcoin_ids_start_at_128_and_move_round_robin() {
        let mut ids = SessionIdAllocator::new(3, ChainType::Bitcoin).expect("server id");
        let a = ids.allocate().expect("free");
        assert_eq!(a, SessionId(0x0300_0080));
        assert_eq!(a.text(ChainType::Bitcoin), "03000080");
        let b = ids.allocate().expect("free");
        assert_eq!(b, SessionId(0x0300_0081));
        ids.free(a);
        // The freed ID is not handed out again while others are free.
        assert_eq!(ids.allocate(), Some(SessionId(0x0300_0082)));
        assert_eq!(ids.in_use(), 2);
    }

    #[test]
    fn ethereum_ids_move_by_256_so_nicehash_prefixes_differ() {
        let mut ids = SessionIdAllocator::new(5, ChainType::Ethereum).expect("server id");
        let a = ids.allocate().expect("free");
        let b = ids.allocate().expect("free");
        assert_eq!(a, SessionId(0x0005_0080));
        assert_eq!(b, SessionId(0x0005_0180));
        assert_eq!(a.text(ChainType::Ethereum), "050080");
        assert_ne!(
            a.text(ChainType::Ethereum)[..4],
            b.text(ChainType::Ethereum)[..4],
            "NiceHash clients see the first four hex digits"
        );
    }

    #[test]
    fn decred_texts_are_little_endian() {
        let sid = SessionId(0x0102_0304);
        assert_eq!(sid.text(ChainType::DecredGominer), "04030201");
        assert_eq!(
            sid.text(ChainType::DecredNormal),
            "000000000000000004030201"
        );
        assert_eq!(sid.hex(), "01020304");
    }

    #[test]
    fn every_ethereum_index_is_handed_out_once_then_none() {
        let mut ids = SessionIdAllocator::new(1, ChainType::Ethereum).expect("server id");
        let mut seen = std::collections::HashSet::new();
        while let Some(sid) = ids.allocate() {
            assert!(seen.insert(sid), "{sid} handed out twice");
            assert_eq!(sid.0 >> 16, 1);
        }
        assert_eq!(seen.len(), 65_536);
        ids.free(SessionId(0x0001_1234));
        assert_eq!(ids.allocate(), Some(SessionId(0x0001_1234)));
    }

    #[test]
    fn bad_server_ids_and_foreign_frees_are_refused() {
        assert!(SessionIdAllocator::new(0, ChainType::Bitcoin).is_err());
        assert!(SessionIdAllocator::new(256, ChainType::Bitcoin).is_err());
        let mut ids = SessionIdAllocator::new(2, ChainType::Bitcoin).expect("server id");
        ids.allocate();
        ids.free(SessionId(0x0300_0080));
        assert_eq!(ids.in_use(), 1);
        assert!("dogecoin".parse::<ChainType>().is_err());
        assert_eq!("decred-gominer".parse(), Ok(ChainType::DecredGominer));
    }
}
