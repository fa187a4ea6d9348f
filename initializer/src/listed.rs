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
        self.page_after(coin, last_id, usize::MAX)
    }

    /// The first `limit` entries of [`ListedUsers::after`] (at least one), and more only to
    /// finish the group of the last puid (several coins' lists may hold the same puid), so that
    /// a reader that continues after the largest puid it got misses nothing. The work done is
    /// bounded by the page, not by the lists: every coin's list is walked in puid order and
    /// merged, only as far as the page needs.
    pub fn page_after(&self, coin: Option<&str>, last_id: u64, limit: usize) -> Vec<(String, u64)> {
        let limit = limit.max(1);
        let by_coin = self.by_coin.read().unwrap_or_else(|e| e.into_inner());
        let from = last_id.saturating_add(1);
        match coin {
            Some(coin) => by_coin
                .get(coin)
                .map(|list| {
                    list.range(from..)
                        .take(limit)
                        .map(|(puid, name)| (name.clone(), *puid))
                        .collect()
                })
                .unwrap_or_default(),
            None => {
                // A k-way merge of the coins' lists in puid order.
                let mut lists: Vec<_> = by_coin
                    .values()
                    .map(|list| list.range(from..).peekable())
                    .collect();
                let mut seen = HashSet::new();
                let mut page = Vec::new();
                loop {
                    let next = lists
                        .iter_mut()
                        .enumerate()
                        .filter_map(|(i, list)| list.peek().map(|(puid, _)| (**puid, i)))
                        .min();
                    let Some((puid, i)) = next else { break };
                    if page.len() >= limit && page.last().is_some_and(|(_, p)| *p != puid) {
                        break;
                    }
                    if let Some((_, name)) = lists.get_mut(i).and_then(Iterator::next)
                        && seen.insert(name)
                    {
                        page.push((name.clone(), puid));
                    }
                }
                page
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

    /// Reading page after page from the largest puid of the last page gets every entry of
    /// every list, whatever the page size, even when lists share puids.
    #[test]
    fn pages_cover_every_entry() {
        let listed = ListedUsers::new();
        listed.record("btc", (1..=40).map(|i| (i, format!("b{i}"))));
        listed.record("bch", (1..=40).step_by(3).map(|i| (i, format!("c{i}"))));
        listed.record("ltc", [(7, "b7".to_owned())]);
        for coin in [None, Some("btc")] {
            let whole = listed.after(coin, 0);
            for limit in [1, 2, 5, 100] {
                let mut got = Vec::new();
                let mut last_id = 0;
                loop {
                    let page = listed.page_after(coin, last_id, limit);
                    let Some(max) = page.iter().map(|(_, puid)| *puid).max() else {
                        break;
                    };
                    assert!(page.len() <= limit + 2, "{coin:?}/{limit}: {page:?}");
                    last_id = max;
                    got.extend(page);
                }
                assert_eq!(got, whole, "{coin:?} in pages of {limit}");
            }
        }
    }
}
