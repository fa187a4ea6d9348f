//! The users seen in each coin's user list, with their puids: what the user-list API serves to
//! sservers (SPEC §7). Filled by the pullers as they ingest; kept in memory, like the Go
//! initUserCoin (after a restart the pullers read the lists from the start again).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::RwLock,
};

/// Users seen per coin: coin → puid → name as listed.
#[derive(Debug, Default)]
pub struct ListedUsers {
    by_coin: RwLock<HashMap<String, BTreeMap<u64, String>>>,
}

impl ListedUsers {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `(puid, name)` entries of `coin`'s list.
    pub fn record(&self, coin: &str, entries: impl IntoIterator<Item = (u64, String)>) {
        let mut by_coin = self.by_coin.write().unwrap_or_else(|e| e.into_inner());
        by_coin.entry(coin.to_owned()).or_default().extend(entries);
    }

    /// The entries with a puid above `last_id`, in ascending puid: of `coin`, or of every coin
    /// when `coin` is `None` (a name in several lists appears once, with its lowest puid).
    pub fn after(&self, coin: Option<&str>, last_id: u64) -> Vec<(String, u64)> {
        let by_coin = self.by_coin.read().unwrap_or_else(|e| e.into_inner());
        let from = last_id.saturating_add(1);
        match coin {
            Some(coin) => by_coin
                .get(coin)
                .map(|list| {
                    list.range(from..)
                        .map(|(puid, name)| (name.clone(), *puid))
                        .collect()
                })
                .unwrap_or_default(),
            None => {
                let mut merged: Vec<(u64, &String)> = by_coin
                    .values()
                    .flat_map(|list| list.range(from..).map(|(puid, name)| (*puid, name)))
                    .collect();
                merged.sort();
                let mut seen = HashSet::new();
                merged
                    .into_iter()
                    .filter(|(_, name)| seen.insert(*name))
                    .map(|(puid, name)| (name.clone(), puid))
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_in_puid_order_above_the_cursor() {
        let listed = ListedUsers::new();
        listed.record("btc", [(5, "e".into()), (1, "a".into()), (3, "c".into())]);
        listed.record("bch", [(2, "b".into()), (4, "a".into())]);
        assert_eq!(
            listed.after(Some("btc"), 1),
            vec![("c".to_owned(), 3), ("e".to_owned(), 5)]
        );
        assert_eq!(
            listed.after(None, 0),
            vec![
                ("a".to_owned(), 1),
                ("b".to_owned(), 2),
                ("c".to_owned(), 3),
                ("e".to_owned(), 5)
            ]
        );
        assert!(listed.after(Some("ltc"), 0).is_empty());
    }
}
