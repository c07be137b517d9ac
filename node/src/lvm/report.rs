//! Typed reports of volume groups and logical volumes, parsed from the JSON that
//! `lvm fullreport --reportformat json --units b --nosuffix` prints with the columns
//! [`VG_COLUMNS`], [`LV_COLUMNS`] and [`SEG_COLUMNS`].
//!
//! lvm's JSON carries every value as a string: sizes in bytes ("1069547520"), percentages
//! with two decimals ("12.50"), and "" where a value does not apply (the data% of a linear
//! LV, the path of a thin pool, any percentage of an inactive LV). fullreport prints one
//! object per VG, holding that VG's `vg`, `pv`, `lv`, `pvseg` and `seg` rows; only `vg`,
//! `lv` and `seg` are read here (`segtype` is a segment column, so it comes from `seg`,
//! joined to its LV by `lv_uuid`). Hidden LVs (a thin pool's `[pool_tdata]`) are not listed.

use serde::Deserialize;

use super::names::Tag;

/// The `vg` subreport's columns, as `--configreport vg -o` takes them.
pub const VG_COLUMNS: &str = "vg_name,vg_size,vg_free,vg_extent_size";

/// The `lv` subreport's columns, as `--configreport lv -o` takes them.
pub const LV_COLUMNS: &str = "vg_name,lv_name,lv_uuid,lv_size,lv_attr,lv_tags,pool_lv,origin,data_percent,\
                              metadata_percent,lv_active,lv_path,lv_dm_path";

/// The `seg` subreport's columns, as `--configreport seg -o` takes them.
pub const SEG_COLUMNS: &str = "lv_uuid,segtype";

/// Why lvm's output could not be read as a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("not the JSON lvm fullreport prints: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{object}: {field} is {value:?}, expected {expected}")]
    Field { object: String, field: &'static str, value: String, expected: &'static str },
    #[error("{object}: no row in the seg subreport has its lv_uuid {uuid:?}")]
    NoSegment { object: String, uuid: String },
}

/// One volume group.
#[derive(Debug, Clone, PartialEq)]
pub struct VgReport {
    pub name: String,
    pub size_bytes: u64,
    pub free_bytes: u64,
    /// LVs are allocated in whole extents: sizes round up to a multiple of this.
    pub extent_size_bytes: u64,
}

/// One visible logical volume.
#[derive(Debug, Clone, PartialEq)]
pub struct LvReport {
    pub vg: String,
    pub name: String,
    pub uuid: String,
    /// For a thin volume its virtual size; for a thin pool the size of its data.
    pub size_bytes: u64,
    /// `lv_attr`, the ten characters lvs(8) documents (type, permissions, ..., skip flag).
    pub attr: String,
    /// The type of the LV's first segment: "linear", "striped", "thin-pool", "thin", ...
    pub segtype: String,
    /// As lvm lists them: sorted, without duplicates.
    pub tags: Vec<String>,
    /// The thin pool of a thin volume.
    pub pool: Option<String>,
    /// The origin of a snapshot.
    pub origin: Option<String>,
    /// How full a thin pool or thin volume is, in percent; `None` when not applicable or
    /// not known (the LV is inactive).
    pub data_percent: Option<f64>,
    /// How full a thin pool's metadata is, in percent.
    pub metadata_percent: Option<f64>,
    /// Whether its device-mapper device exists (`lv_active` is "active").
    pub active: bool,
    /// `/dev/<vg>/<lv>`; `None` for LVs without a device of their own (thin pools).
    pub path: Option<String>,
    /// `/dev/mapper/<vg>-<lv>`: exists while the LV is active, whether or not the
    /// `/dev/<vg>` symlinks were made (udev makes them).
    pub dm_path: Option<String>,
}

impl LvReport {
    pub fn is_thin_pool(&self) -> bool {
        self.segtype == "thin-pool"
    }

    /// A thin volume, snapshots of thin volumes included.
    pub fn is_thin_volume(&self) -> bool {
        self.segtype == "thin"
    }

    pub fn is_linear(&self) -> bool {
        self.segtype == "linear"
    }

    pub fn has_tag(&self, tag: &Tag) -> bool {
        self.tags.iter().any(|t| t == tag.as_str())
    }
}

/// Volume groups and their visible logical volumes, in lvm's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub vgs: Vec<VgReport>,
    pub lvs: Vec<LvReport>,
}

impl Report {
    /// Parses the standard output of `lvm fullreport` run with the columns above.
    pub fn from_fullreport_json(json: &str) -> Result<Report, ReportError> {
        let raw: RawFullReport = serde_json::from_str(json)?;
        let mut report = Report::default();
        for block in raw.report {
            for vg in block.vg {
                report.vgs.push(vg.parse()?);
            }
            for lv in block.lv {
                let object = format!("logical volume {}/{}", lv.vg_name, lv.lv_name);
                // An LV has one row per segment. Its segments share a type except where
                // linear and striped ones mix; the first one's type stands for the LV.
                let segtype = block
                    .seg
                    .iter()
                    .find(|seg| seg.lv_uuid == lv.lv_uuid)
                    .map(|seg| seg.segtype.clone())
                    .ok_or_else(|| ReportError::NoSegment { object: object.clone(), uuid: lv.lv_uuid.clone() })?;
                report.lvs.push(lv.parse(object, segtype)?);
            }
        }
        Ok(report)
    }

    pub fn vg(&self, name: &str) -> Option<&VgReport> {
        self.vgs.iter().find(|vg| vg.name == name)
    }

    pub fn lv(&self, vg: &str, name: &str) -> Option<&LvReport> {
        self.lvs.iter().find(|lv| lv.vg == vg && lv.name == name)
    }

    /// The LVs of one VG.
    pub fn lvs_of<'a>(&'a self, vg: &'a str) -> impl Iterator<Item = &'a LvReport> + 'a {
        self.lvs.iter().filter(move |lv| lv.vg == vg)
    }
}

// The raw rows, every value a string as lvm prints it. Missing subreports default to empty;
// unknown fields and subreports (pv, pvseg, a "log" section) are ignored.

#[derive(Deserialize)]
struct RawFullReport {
    report: Vec<RawVgBlock>,
}

#[derive(Deserialize)]
struct RawVgBlock {
    #[serde(default)]
    vg: Vec<RawVg>,
    #[serde(default)]
    lv: Vec<RawLv>,
    #[serde(default)]
    seg: Vec<RawSeg>,
}

#[derive(Deserialize)]
struct RawVg {
    vg_name: String,
    vg_size: String,
    vg_free: String,
    vg_extent_size: String,
}

#[derive(Deserialize)]
struct RawLv {
    vg_name: String,
    lv_name: String,
    lv_uuid: String,
    lv_size: String,
    lv_attr: String,
    lv_tags: String,
    pool_lv: String,
    origin: String,
    data_percent: String,
    metadata_percent: String,
    lv_active: String,
    lv_path: String,
    lv_dm_path: String,
}

#[derive(Deserialize)]
struct RawSeg {
    lv_uuid: String,
    segtype: String,
}

impl RawVg {
    fn parse(self) -> Result<VgReport, ReportError> {
        let object = format!("volume group {}", self.vg_name);
        Ok(VgReport {
            size_bytes: bytes(&object, "vg_size", &self.vg_size)?,
            free_bytes: bytes(&object, "vg_free", &self.vg_free)?,
            extent_size_bytes: bytes(&object, "vg_extent_size", &self.vg_extent_size)?,
            name: self.vg_name,
        })
    }
}

impl RawLv {
    fn parse(self, object: String, segtype: String) -> Result<LvReport, ReportError> {
        let active = match self.lv_active.as_str() {
            "active" => true,
            "" => false,
            // "unknown" when lvm runs with activation disabled: the state cannot be read.
            other => return Err(field_error(&object, "lv_active", other, "\"active\" or \"\"")),
        };
        if self.lv_attr.len() != 10 || !self.lv_attr.is_ascii() {
            return Err(field_error(&object, "lv_attr", &self.lv_attr, "10 characters"));
        }
        Ok(LvReport {
            size_bytes: bytes(&object, "lv_size", &self.lv_size)?,
            data_percent: percent(&object, "data_percent", &self.data_percent)?,
            metadata_percent: percent(&object, "metadata_percent", &self.metadata_percent)?,
            // Tags cannot contain ','; the separator is pinned by the report command's --config.
            tags: self.lv_tags.split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect(),
            pool: non_empty(self.pool_lv),
            origin: non_empty(self.origin),
            path: non_empty(self.lv_path),
            dm_path: non_empty(self.lv_dm_path),
            active,
            segtype,
            attr: self.lv_attr,
            uuid: self.lv_uuid,
            vg: self.vg_name,
            name: self.lv_name,
        })
    }
}

fn field_error(object: &str, field: &'static str, value: &str, expected: &'static str) -> ReportError {
    ReportError::Field { object: object.to_owned(), field, value: value.to_owned(), expected }
}

fn bytes(object: &str, field: &'static str, value: &str) -> Result<u64, ReportError> {
    value.parse().map_err(|_| field_error(object, field, value, "a whole number of bytes"))
}

fn percent(object: &str, field: &'static str, value: &str) -> Result<Option<f64>, ReportError> {
    if value.is_empty() {
        return Ok(None);
    }
    match value.parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(Some(p)),
        _ => Err(field_error(object, field, value, "a percentage or \"\"")),
    }
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Printed by lvm 2.03.16 on the dev host (no device-mapper, so every LV's state is "X"
    /// and `lv_active` is ""): VG `lvmexp` with a linear LV of two segments and a thin pool,
    /// thin volume and thin snapshot written into its metadata with vgcfgrestore, and VG
    /// `lvmexp_empty` without LVs.
    const HOST_NO_DM: &str = include_str!("testdata/fullreport-host-no-dm.json");
    /// Printed by lvm 2.03.16 for a VG without LVs.
    const EMPTY_VG: &str = include_str!("testdata/fullreport-empty-vg.json");
    /// Written by hand in the format above, with the values active LVs show on a machine with
    /// device-mapper (attr state 'a', lv_active "active", data% of thin pool and volume).
    const ACTIVE: &str = include_str!("testdata/fullreport-active-handwritten.json");

    #[test]
    fn vg_without_lvs() {
        let report = Report::from_fullreport_json(EMPTY_VG).unwrap();
        assert_eq!(
            report.vgs,
            vec![VgReport {
                name: "lvmexp_empty".into(),
                size_bytes: 535822336,
                free_bytes: 535822336,
                extent_size_bytes: 1048576
            }]
        );
        assert!(report.lvs.is_empty());
    }

    #[test]
    fn host_report_with_thin_pool_volume_and_snapshot() {
        let report = Report::from_fullreport_json(HOST_NO_DM).unwrap();
        assert_eq!(report.vgs.len(), 2);
        let vg = report.vg("lvmexp").unwrap();
        assert_eq!((vg.size_bytes, vg.free_bytes, vg.extent_size_bytes), (1069547520, 943718400, 4194304));
        assert_eq!(report.vg("lvmexp_empty").unwrap().extent_size_bytes, 1048576);
        assert_eq!(report.lvs_of("lvmexp_empty").count(), 0);
        let names: Vec<_> = report.lvs_of("lvmexp").map(|lv| lv.name.as_str()).collect();
        assert_eq!(names, ["lin1", "pool0", "snap1", "thin1"]);

        let lin = report.lv("lvmexp", "lin1").unwrap();
        assert!(lin.is_linear() && !lin.is_thin_pool() && !lin.is_thin_volume());
        assert_eq!(lin.size_bytes, 12582912);
        assert_eq!(lin.tags, ["ferrovol.a=1"]);
        assert_eq!(lin.attr, "-wi-XX----");
        assert_eq!((lin.pool.as_deref(), lin.origin.as_deref()), (None, None));
        assert_eq!((lin.data_percent, lin.metadata_percent), (None, None));
        assert!(!lin.active);
        assert_eq!(lin.path.as_deref(), Some("/dev/lvmexp/lin1"));
        assert_eq!(lin.dm_path.as_deref(), Some("/dev/mapper/lvmexp-lin1"));

        let pool = report.lv("lvmexp", "pool0").unwrap();
        assert!(pool.is_thin_pool() && !pool.is_linear());
        assert_eq!((pool.path.as_deref(), pool.size_bytes), (None, 104857600));
        assert!(pool.tags.is_empty());

        let thin = report.lv("lvmexp", "thin1").unwrap();
        assert!(thin.is_thin_volume());
        assert_eq!(thin.pool.as_deref(), Some("pool0"));
        assert_eq!(thin.tags, ["ferrovol.owner", "ferrovol.volume=pvc-1"]);
        assert!(thin.has_tag(&Tag::parse("ferrovol.owner").unwrap()));
        assert!(!thin.has_tag(&Tag::parse("ferrovol").unwrap()));

        let snap = report.lv("lvmexp", "snap1").unwrap();
        assert!(snap.is_thin_volume());
        assert_eq!((snap.origin.as_deref(), snap.pool.as_deref()), (Some("thin1"), Some("pool0")));
        assert_eq!(snap.attr.as_bytes()[9], b'k', "activation skip flag");
    }

    #[test]
    fn active_thin_pool_and_volumes() {
        let report = Report::from_fullreport_json(ACTIVE).unwrap();
        let pool = report.lv("ferrovol", "pool").unwrap();
        assert!(pool.active && pool.is_thin_pool());
        assert_eq!((pool.data_percent, pool.metadata_percent), (Some(12.5), Some(10.53)));
        let pvc = report.lv("ferrovol", "pvc-1").unwrap();
        assert!(pvc.active && pvc.is_thin_volume());
        assert_eq!((pvc.data_percent, pvc.metadata_percent), (Some(24.99), None));
        assert_eq!(pvc.dm_path.as_deref(), Some("/dev/mapper/ferrovol-pvc--1"));
        let snap = report.lv("ferrovol", "snap-1").unwrap();
        assert!(!snap.active);
        assert_eq!(snap.data_percent, None);
        let lin = report.lv("ferrovol", "lin-1").unwrap();
        assert!(lin.active && lin.is_linear());
        assert_eq!(report.vg("spare").unwrap().free_bytes, 535822336);
        assert!(report.lv("spare", "pvc-1").is_none());
    }

    #[test]
    fn empty_output_of_a_failed_report_is_empty() {
        // What fullreport prints for a VG it cannot find (exit code 5, message on stderr).
        let report = Report::from_fullreport_json("  {\n      \"report\": [\n      ]\n  }\n").unwrap();
        assert_eq!(report, Report::default());
    }

    fn replaced(from: &str, to: &str) -> String {
        assert!(ACTIVE.contains(from), "{from}");
        ACTIVE.replacen(from, to, 1)
    }

    #[test]
    fn bad_values_name_the_object_field_and_value() {
        let err =
            Report::from_fullreport_json(&replaced("\"vg_free\":\"5360320512\"", "\"vg_free\":\"5.00g\"")).unwrap_err();
        assert_eq!(err.to_string(), "volume group ferrovol: vg_free is \"5.00g\", expected a whole number of bytes");

        let err = Report::from_fullreport_json(&replaced("\"data_percent\":\"12.50\"", "\"data_percent\":\"x\""))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "logical volume ferrovol/pool: data_percent is \"x\", expected a percentage or \"\""
        );

        for (from, to, field) in [
            ("\"lv_size\":\"1073741824\"", "\"lv_size\":\"-1\"", "lv_size"),
            ("\"metadata_percent\":\"10.53\"", "\"metadata_percent\":\"NaN\"", "metadata_percent"),
            ("\"data_percent\":\"24.99\"", "\"data_percent\":\"-3.00\"", "data_percent"),
            ("\"lv_active\":\"active\"", "\"lv_active\":\"unknown\"", "lv_active"),
            ("\"lv_attr\":\"-wi-ao----\"", "\"lv_attr\":\"-wi\"", "lv_attr"),
        ] {
            let err = Report::from_fullreport_json(&replaced(from, to)).unwrap_err();
            assert!(matches!(&err, ReportError::Field { field: f, .. } if *f == field), "{err}");
        }
    }

    #[test]
    fn malformed_output_is_an_error_not_a_panic() {
        for bad in
            ["", "{", "[]", "{\"report\": {}}", "{\"report\": [{\"vg\": [{\"vg_name\": 1}]}]}", "  WARNING: x\n{}"]
        {
            assert!(matches!(Report::from_fullreport_json(bad), Err(ReportError::Json(_))), "{bad:?}");
        }
        // A column we asked for and did not get (report/compact_output drops empty ones).
        let err = Report::from_fullreport_json(&replaced("\"pool_lv\":\"\", ", "")).unwrap_err();
        assert!(err.to_string().contains("missing field `pool_lv`"), "{err}");
        // An LV whose segment row is missing.
        let err = Report::from_fullreport_json(&replaced(
            "{\"lv_uuid\":\"a1Pvc1-0000-1111-2222-3333-4444-555503\", \"segtype\":\"thin\"},",
            "",
        ))
        .unwrap_err();
        assert!(matches!(err, ReportError::NoSegment { .. }), "{err}");
    }

    #[test]
    fn log_section_and_unknown_columns_are_ignored() {
        let json = r#"{"report": [{"vg": [{"vg_name":"v", "vg_size":"8", "vg_free":"0", "vg_extent_size":"4", "vg_attr":"wz--n-"}]}],
                       "log": [{"log_seq_num":"1", "log_type":"status", "log_message":"success"}]}"#;
        let report = Report::from_fullreport_json(json).unwrap();
        assert_eq!(report.vgs[0].size_bytes, 8);
    }
}
