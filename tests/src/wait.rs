//! Waiting for conditions, never for time: poll until a condition holds or a deadline passes,
//! and report what was last seen.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

/// Polls `check` every 20 ms until it returns `Ok` or `timeout` passes. On timeout the error
/// says what was awaited and the last thing `check` saw.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(seen) if Instant::now() >= deadline => {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; last seen: {seen}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The bytes the socket at `local`, connected to `remote`, has received and its process not
/// read yet (`rx_queue` of `/proc/net/tcp`, IPv4); `None` when no such socket is listed.
pub fn unread_bytes(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<u64> {
    let hex = |addr: std::net::SocketAddr| match addr {
        std::net::SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )),
        std::net::SocketAddr::V6(_) => None,
    };
    let (local, remote) = (hex(local)?, hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (_, rx) = fields.get(4)?.split_once(':')?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// Waits until the peer of the connection `ours` → `theirs` has read everything sent to it
/// (its socket's receive queue is empty): what was written is in the peer process now.
pub async fn peer_read_all(
    ours: std::net::SocketAddr,
    theirs: std::net::SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    wait_until(timeout, "the peer to read what was sent", || async move {
        match unread_bytes(theirs, ours) {
            Some(0) => Ok(()),
            seen => Err(format!("unread bytes: {seen:?}")),
        }
    })
    .await
}
