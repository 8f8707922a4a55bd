//! `node fence`: an operator's fence decision (the primary's executor carries it out).

use serde_json::{json, Value};

use herd_storage::model::Command;

use super::{write_one, AdminError};
use crate::daemon::Daemon;

/// Powers `name` off through its BMC now (needs `yes`): a manual decision, written like the
/// primary's own and executed by it.
pub(super) async fn fence(d: &Daemon, name: String, yes: bool) -> Result<Value, AdminError> {
    if !yes {
        return Err(AdminError::invalid(format!("fencing powers {name} off at once: confirm with --yes")));
    }
    let reason = "asked for by an operator (herd node fence)".to_string();
    write_one(d, Command::DecideFence { name: name.clone(), reason, manual: true }).await?;
    Ok(json!({ "node": name, "fence": "decided" }))
}
