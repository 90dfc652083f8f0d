//! The link to a Redis server that every replica shares: per-client limits (`ratelimit`) and
//! bans (`ban`) are kept there when `[rate_limit] backend = "redis"`.
//!
//! Fails as `redis_failure` says: while Redis cannot be reached, each caller gets an error and
//! applies that policy (allow, the default, or deny); errors are counted and logged at most once
//! per hundred.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// What to do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailure {
    /// Let requests through (and count and log the error).
    #[default]
    Allow,
    /// Refuse with 429 until Redis answers again.
    Deny,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub failure: RedisFailure,
    /// Each call (and each connection attempt) takes at most this long.
    pub timeout: Duration,
}

/// One Redis server, connected lazily and reconnected by the connection manager; while it is
/// down, a new connection is tried at most once a second.
pub struct RedisLink {
    config: RedisConfig,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    last_connect_attempt: Mutex<Option<std::time::Instant>>,
    /// Calls that failed (Redis unreachable, timed out, or refused the script).
    pub errors: AtomicU64,
}

impl RedisLink {
    pub fn new(config: RedisConfig) -> Result<RedisLink, String> {
        let client =
            redis::Client::open(config.url.as_str()).map_err(|e| format!("redis_url: {e}"))?;
        Ok(RedisLink {
            config,
            client,
            conn: tokio::sync::Mutex::new(None),
            last_connect_attempt: Mutex::new(None),
            errors: AtomicU64::new(0),
        })
    }

    pub fn failure_policy(&self) -> RedisFailure {
        self.config.failure
    }

    /// Run `script` with `key` and `args`, within `redis_timeout`.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        key: &str,
        args: &[String],
    ) -> Result<T, String> {
        let Some(mut conn) = self.connection().await else {
            return Err(self.failed("no connection".into()));
        };
        let mut invocation = script.key(key);
        for a in args {
            invocation.arg(a);
        }
        let call = invocation.invoke_async::<T>(&mut conn);
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(self.failed(e.to_string())),
            Err(_) => Err(self.failed("timed out".into())),
        }
    }

    fn failed(&self, e: String) -> String {
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        // One line per hundred failures: a Redis outage must not flood the log.
        if n.is_multiple_of(100) {
            tracing::error!(event = "redis", error = %e, policy = ?self.config.failure, failures = n + 1, "Redis call failed");
        }
        e
    }

    async fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Some(c.clone());
        }
        {
            // While Redis is down, try to connect at most once a second.
            let mut last = self
                .last_connect_attempt
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return None;
            }
            *last = Some(std::time::Instant::now());
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(1);
        match tokio::time::timeout(
            self.config.timeout * 2,
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), cfg),
        )
        .await
        {
            Ok(Ok(c)) => {
                tracing::info!(
                    event = "redis",
                    "connected to Redis; shared rate limits in force"
                );
                *slot = Some(c.clone());
                Some(c)
            }
            Ok(Err(e)) => {
                tracing::warn!(event = "redis", error = %e, "cannot connect to Redis");
                None
            }
            Err(_) => {
                tracing::warn!(event = "redis", "connecting to Redis timed out");
                None
            }
        }
    }
}
