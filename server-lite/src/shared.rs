//! The state every connection shares: configuration, store, hub, rate limiters, the memory
//! budget and the counters the accept loop and shutdown use. Its own module, so that the
//! request handlers (`handler`) and the connection loop (`server`) both depend on it and not
//! on each other.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use opaque_ke::ServerSetup;
use qpq_core::opaque::Suite;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::budget::Budget;
use crate::config::Config;
use crate::hub::Hub;
use crate::rate::RateLimiter;
use crate::store::Store;

/// State shared by every connection.
pub struct Shared {
    /// The loaded configuration.
    pub config: Config,
    /// The database.
    pub store: Store,
    /// Connected clients.
    pub hub: Hub,
    /// The OPAQUE server keys, persisted in the database.
    pub opaque: ServerSetup<Suite>,
    /// Auth attempts per client address.
    pub auth_per_ip: RateLimiter<IpAddr>,
    /// Login attempts per username.
    pub auth_per_user: RateLimiter<String>,
    /// KeyPackage fetches per requesting identity.
    pub key_package_fetch_per_user: RateLimiter<[u8; 32]>,
    /// KeyPackage fetches per target identity (whose packages are fetched).
    pub key_package_fetch_per_target: RateLimiter<[u8; 32]>,
    /// When the server started.
    pub started: Instant,
    /// The memory budget.
    pub budget: Arc<Budget>,
    pub(crate) conns: Mutex<ConnCounts>,
    pub(crate) handshakes: AtomicUsize,
    pub(crate) busy: AtomicUsize,
    pub(crate) next_conn_id: AtomicU64,
    pub(crate) inflight: AtomicUsize,
    pub(crate) idle: Notify,
    pub(crate) draining: std::sync::atomic::AtomicBool,
    pub(crate) drain_started: Notify,
}

impl Shared {
    /// State for a server with this configuration, database and OPAQUE keys, before any
    /// connection.
    pub(crate) fn new(config: Config, store: Store, opaque: ServerSetup<Suite>) -> Self {
        let l = &config.limits;
        let budget =
            Arc::new(Budget::for_this_process(l.memory_budget_bytes, l.db_cache_bytes as u64));
        info!(
            budget_kib = l.memory_budget_bytes >> 10,
            base_kib = budget.base() >> 10,
            "memory budget (base: resident size now plus the database cache)"
        );
        if budget.base() > l.memory_budget_bytes / 2 {
            warn!("the memory budget is less than twice the base; few connections will fit");
        }
        Self {
            auth_per_ip: RateLimiter::new(l.auth_per_ip_burst, l.auth_per_ip_per_min, 10_000),
            auth_per_user: RateLimiter::new(l.auth_per_user_burst, l.auth_per_user_per_min, 10_000),
            key_package_fetch_per_user: RateLimiter::new(
                l.key_package_fetch_per_user_burst,
                l.key_package_fetch_per_user_per_min,
                10_000,
            ),
            key_package_fetch_per_target: RateLimiter::new(
                l.key_package_fetch_per_target_burst,
                l.key_package_fetch_per_target_per_min,
                10_000,
            ),
            config,
            store,
            hub: Hub::with_budget(budget.clone()),
            opaque,
            started: Instant::now(),
            budget,
            conns: Mutex::default(),
            handshakes: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            next_conn_id: AtomicU64::new(1),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            drain_started: Notify::new(),
        }
    }

    /// Whether shutdown has begun (new calls are refused, long polls end).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Resolves when shutdown begins. Create it before checking [`Shared::is_draining`].
    pub fn drain_started(&self) -> tokio::sync::futures::Notified<'_> {
        self.drain_started.notified()
    }
}

#[derive(Default)]
pub(crate) struct ConnCounts {
    pub(crate) total: u32,
    pub(crate) per_ip: HashMap<IpAddr, u32>,
}
