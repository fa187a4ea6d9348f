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
