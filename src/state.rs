//! [`Snapshot`]: everything a request reads that a reload may replace, built before it is
//! swapped in. Requests load one snapshot once and use it to the end.

use std::sync::Arc;

use crate::auth::api_key::KeySet;
use crate::auth::htpasswd::Htpasswd;
use crate::config::Config;

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub keys: KeySet,
    pub htpasswd: Option<Arc<Htpasswd>>,
}

impl Snapshot {
    pub fn from_config(config: &Config) -> Snapshot {
        Snapshot {
            keys: config.auth.keys.clone(),
            htpasswd: config.auth.htpasswd.clone(),
        }
    }
}
