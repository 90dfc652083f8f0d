//! [`Snapshot`]: everything a request reads that a reload may replace, built before it is
//! swapped in. Requests load one snapshot once and use it to the end.

use crate::auth::api_key::KeySet;
use crate::config::Config;

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub keys: KeySet,
}

impl Snapshot {
    pub fn from_config(config: &Config) -> Snapshot {
        Snapshot {
            keys: config.auth.keys.clone(),
        }
    }
}
