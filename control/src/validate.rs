//! Validation of the names that come from outside: user (sub-account) names and coins.
//!
//! A user name becomes a ZooKeeper path segment (`ZKSwitcherWatchDir` + name), so it must never
//! be able to reach another path: no `/`, no `.` or `..` segment, no character ZooKeeper refuses
//! in a path, and a bounded length. The same rules apply on the embedded store so that data can
//! move between the two.

use thiserror::Error;

/// The longest user name accepted, in bytes.
pub const MAX_USER_NAME_BYTES: usize = 128;

/// Why a user name or coin was refused. The messages are shown to API callers as they are.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidInput {
    /// The user name is empty.
    #[error("user name is empty")]
    EmptyUser,
    /// The user name is longer than [`MAX_USER_NAME_BYTES`].
    #[error("user name is {0} bytes long; at most {MAX_USER_NAME_BYTES} are allowed")]
    UserTooLong(usize),
    /// The user name contains `/`.
    #[error("user name must not contain '/'")]
    UserHasSlash,
    /// The user name contains `..` or is `.`.
    #[error("user name must not be '.' or contain '..'")]
    UserHasDots,
    /// The user name contains a control character or one ZooKeeper refuses in a path.
    #[error("user name contains a forbidden character (U+{0:04X})")]
    UserHasForbiddenChar(u32),
    /// The coin is empty.
    #[error("coin is empty")]
    EmptyCoin,
    /// The coin is not one of the configured `AvailableCoins`.
    #[error("coin {0:?} is not one of the available coins")]
    UnknownCoin(String),
}

/// Checks a user name; see the module doc for the rules.
pub fn validate_user(name: &str) -> Result<(), InvalidInput> {
    if name.is_empty() {
        return Err(InvalidInput::EmptyUser);
    }
    if name.len() > MAX_USER_NAME_BYTES {
        return Err(InvalidInput::UserTooLong(name.len()));
    }
    if name.contains('/') {
        return Err(InvalidInput::UserHasSlash);
    }
    if name == "." || name.contains("..") {
        return Err(InvalidInput::UserHasDots);
    }
    if let Some(c) = name.chars().find(|&c| forbidden_in_zk_path(c)) {
        return Err(InvalidInput::UserHasForbiddenChar(c as u32));
    }
    Ok(())
}

/// The characters ZooKeeper's `PathUtils.validatePath` refuses (U+D800..U+F8FF, whose
/// surrogate half a Rust `char` can never hold), which also covers every control character.
fn forbidden_in_zk_path(c: char) -> bool {
    matches!(c,
        '\u{0000}'..='\u{001f}'
        | '\u{007f}'..='\u{009f}'
        | '\u{e000}'..='\u{f8ff}'
        | '\u{fff0}'..='\u{ffff}')
}

/// The set of coins a switch may name (`AvailableCoins`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoinSet {
    coins: Vec<String>,
}

impl CoinSet {
    /// Builds the set; every coin must itself be a valid path segment.
    pub fn new<I, S>(coins: I) -> Result<Self, InvalidInput>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set: Vec<String> = Vec::new();
        for coin in coins {
            let coin = coin.into();
            if coin.is_empty() {
                return Err(InvalidInput::EmptyCoin);
            }
            validate_user(&coin).map_err(|_| InvalidInput::UnknownCoin(coin.clone()))?;
            if !set.contains(&coin) {
                set.push(coin);
            }
        }
        Ok(Self { coins: set })
    }

    /// Checks that `coin` is one of the set.
    pub fn check(&self, coin: &str) -> Result<(), InvalidInput> {
        if coin.is_empty() {
            return Err(InvalidInput::EmptyCoin);
        }
        if self.coins.iter().any(|c| c == coin) {
            Ok(())
        } else {
            Err(InvalidInput::UnknownCoin(excerpt(coin, 64)))
        }
    }

    /// The coins, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.coins.iter().map(String::as_str)
    }

    /// True when no coin is configured.
    pub fn is_empty(&self) -> bool {
        self.coins.is_empty()
    }
}

/// At most `max` bytes of `s`, cut on a character boundary and marked with `…` when cut: keeps
/// messages and logs bounded when a caller sends a huge value.
pub fn excerpt(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "alice",
            "Bob_btc",
            "a.b",
            "x-y:z|w^v",
            "矿工",
            &"a".repeat(128),
        ] {
            assert_eq!(validate_user(name), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn refuses_names_that_could_escape_their_node() {
        assert_eq!(validate_user(""), Err(InvalidInput::EmptyUser));
        assert_eq!(validate_user("a/b"), Err(InvalidInput::UserHasSlash));
        assert_eq!(validate_user("/"), Err(InvalidInput::UserHasSlash));
        assert_eq!(validate_user(".."), Err(InvalidInput::UserHasDots));
        assert_eq!(validate_user("a..b"), Err(InvalidInput::UserHasDots));
        assert_eq!(validate_user("."), Err(InvalidInput::UserHasDots));
        assert_eq!(
            validate_user("a\0b"),
            Err(InvalidInput::UserHasForbiddenChar(0))
        );
        assert_eq!(
            validate_user("a\nb"),
            Err(InvalidInput::UserHasForbiddenChar(10))
        );
        assert_eq!(
            validate_user("a\u{7f}"),
            Err(InvalidInput::UserHasForbiddenChar(0x7f))
        );
        assert_eq!(
            validate_user(&"a".repeat(4096)),
            Err(InvalidInput::UserTooLong(4096))
        );
        assert_eq!(
            validate_user(&"a".repeat(129)),
            Err(InvalidInput::UserTooLong(129))
        );
    }

    #[test]
    fn coins_must_be_configured() {
        let coins = CoinSet::new(["btc", "bch"]).expect("valid coins");
        assert_eq!(coins.check("btc"), Ok(()));
        assert_eq!(coins.check(""), Err(InvalidInput::EmptyCoin));
        assert_eq!(
            coins.check("doge"),
            Err(InvalidInput::UnknownCoin("doge".into()))
        );
        let long = "x".repeat(1000);
        match coins.check(&long) {
            Err(InvalidInput::UnknownCoin(shown)) => assert!(shown.len() < 100),
            other => panic!("expected UnknownCoin, got {other:?}"),
        }
        assert!(CoinSet::new(["a/b"]).is_err());
    }
}
