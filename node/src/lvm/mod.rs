//! The LVM family: linear and thin logical volumes in volume groups the node serves.
//! `cli`, `report` and `names` wrap the lvm2 CLI with typed commands and JSON reports;
//! `tags` keeps each volume's state on its LV; `groups` caches the report of the served
//! VGs; `agent` is the family's node agent.

pub mod agent;
pub mod cli;
pub mod groups;
pub mod names;
pub mod report;
pub mod tags;

use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::LocalName;

use names::LvName;

/// The LV of a volume: `fv-<local name>` (at most 66 bytes, within LVM's limits; the local
/// name's charset `[a-z0-9_-]` is LVM-safe and never forms a reserved suffix).
pub fn volume_lv(local: &LocalName) -> Result<LvName> {
    lv(format!("fv-{local}"))
}

/// The LV of a snapshot: `fvs-<local name>`.
pub fn snapshot_lv(local: &LocalName) -> Result<LvName> {
    lv(format!("fvs-{local}"))
}

fn lv(name: String) -> Result<LvName> {
    LvName::parse(&name).map_err(|e| Error::system("name logical volume", &name, e))
}
