//! Shared limits: places (calls at once) and rates (calls per period) in
//! sorted sets, taken by one script on the server's clock so that every
//! process sees the same count.

use std::time::Duration;

use async_trait::async_trait;

use super::bus::RedisStreamsBus;
use crate::bus::{BusError, PlaceLimits, Places, SharedLimits};

/// Takes places of a worker type under shared limits, on the server's clock.
/// KEYS: held leases (zset lease → expiry ms), recent starts (zset member →
/// start ms), lease counter. ARGV: want, concurrency (0: none), rate calls
/// (0: none), rate period ms, lease ms, holder. Returns {granted, first lease
/// number, wait ms}.
pub(super) static TAKE_PLACES: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| {
        redis::Script::new(
            r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grant = tonumber(ARGV[1])
local conc = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local period = tonumber(ARGV[4])
local wait = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local free = conc - redis.call('ZCARD', KEYS[1])
  if free < grant then grant = free end
  if grant <= 0 then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    wait = math.min(50, math.max(1, tonumber(first[2]) - now))
  end
end
if rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - period)
  local left = rate - redis.call('ZCARD', KEYS[2])
  if left < grant then grant = left end
  if left <= 0 then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + period - now)
  end
end
if grant <= 0 then return {0, 0, wait} end
local last = redis.call('INCRBY', KEYS[3], grant)
local first = last - grant + 1
for i = first, last do
  local lease = ARGV[6] .. ':' .. i
  if conc > 0 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), lease) end
  if rate > 0 then redis.call('ZADD', KEYS[2], now, lease) end
end
if conc > 0 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]) * 2) end
if rate > 0 then redis.call('PEXPIRE', KEYS[2], period * 2) end
return {grant, first, 0}
",
        )
    });

#[async_trait]
impl SharedLimits for RedisStreamsBus {
    async fn take_places(
        &self,
        key: &str,
        want: u32,
        limits: &PlaceLimits,
        holder: &str,
    ) -> Result<Places, BusError> {
        let tag = format!("{{{}:limits:{key}}}", self.inner.config.prefix);
        let (rate, period) = limits
            .rate
            .map_or((0, 0), |(n, per)| (n, per.as_millis().max(1) as u64));
        let mut invocation = TAKE_PLACES.key(format!("{tag}held"));
        invocation
            .key(format!("{tag}starts"))
            .key(format!("{tag}seq"))
            .arg(want)
            .arg(limits.concurrency.unwrap_or(0))
            .arg(rate)
            .arg(period)
            .arg(limits.lease.as_millis().max(1) as u64)
            .arg(holder);
        let mut conn = self.inner.conn.get();
        let (granted, first, wait): (u64, u64, u64) = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Places {
            leases: (first..first + granted)
                .map(|i| format!("{holder}:{i}"))
                .collect(),
            retry_after: (granted == 0).then(|| Duration::from_millis(wait.max(1))),
        })
    }

    async fn give_back(&self, key: &str, leases: &[String]) -> Result<(), BusError> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM")
            .arg(format!("{{{}:limits:{key}}}held", self.inner.config.prefix))
            .arg(leases)
            .ignore();
        self.run(&pipe).await
    }
}
