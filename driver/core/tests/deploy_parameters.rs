//! Keeps deploy/, the docs and the StorageClass parameter parser in step: every StorageClass
//! of ferrovol and every inline volume under deploy/ must be accepted by the parser the driver
//! uses, and every parameter key and storage family the parser knows must be documented. The
//! orchestrator's keys (`csi.storage.k8s.io/...`), which the parser accepts whatever they are,
//! must be ones the sidecars know, with the secrets every S3 operation needs.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferrovol_core::ids::Family;
use ferrovol_core::params::{parse_quantity, VolumeParams, CO_PREFIX, KNOWN_PARAMETERS};
use ferrovol_core::volume::FsType;
use ferrovol_core::DEFAULT_DRIVER_NAME;
use yaml_rust2::{Yaml, YamlLoader};

/// The key through which the external-provisioner passes a StorageClass's filesystem.
const FSTYPE_KEY: &str = "csi.storage.k8s.io/fstype";

/// The volume attributes an inline ephemeral volume takes (node/src/stage.rs).
const EPHEMERAL_ATTRIBUTES: &[&str] = &["size", "fsType"];

/// The secrets a StorageClass can name for csi-provisioner, which passes them on (and
/// refuses any other `csi.storage.k8s.io/` key): each is `<prefix>-name` and
/// `<prefix>-namespace`.
const STORAGE_CLASS_SECRETS: &[&str] = &[
    "csi.storage.k8s.io/provisioner-secret",
    "csi.storage.k8s.io/controller-publish-secret",
    "csi.storage.k8s.io/node-stage-secret",
    "csi.storage.k8s.io/node-publish-secret",
    "csi.storage.k8s.io/controller-expand-secret",
    "csi.storage.k8s.io/node-expand-secret",
];

/// The secrets every operation on an S3 volume needs (node-expand: S3 volumes grow on the
/// controller only; node-publish: the node plugin binds the staged mount).
const S3_STORAGE_CLASS_SECRETS: &[&str] = &[
    "csi.storage.k8s.io/provisioner-secret",
    "csi.storage.k8s.io/controller-publish-secret",
    "csi.storage.k8s.io/node-stage-secret",
    "csi.storage.k8s.io/controller-expand-secret",
];

/// The secrets a VolumeSnapshotClass can name for csi-snapshotter (the only
/// `csi.storage.k8s.io/` keys it accepts there).
const SNAPSHOT_CLASS_SECRETS: &[&str] =
    &["csi.storage.k8s.io/snapshotter-secret", "csi.storage.k8s.io/snapshotter-list-secret"];

/// Where the parameters are documented for operators.
const DOCS: &[&str] = &["README.md", "docs/LVM.md", "deploy/README.md"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `*.yaml` / `*.yml` file under `dir`, recursively, in a stable order.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every YAML document under deploy/, with the file it came from.
fn deploy_documents() -> Vec<(PathBuf, Yaml)> {
    let files = yaml_files(&repo_root().join("deploy"));
    assert!(!files.is_empty(), "no YAML file under deploy/");
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let parsed = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()).map(|d| (file.clone(), d)));
    }
    docs
}

/// A string-to-string map (StorageClass parameters, volume attributes). Kubernetes wants
/// strings: an unquoted `2` or `true` would be refused by the API server, so it fails here.
fn string_map(node: &Yaml, what: &str) -> HashMap<String, String> {
    match node {
        Yaml::BadValue | Yaml::Null => HashMap::new(),
        Yaml::Hash(h) => h
            .iter()
            .map(|(k, v)| match (k, v) {
                (Yaml::String(k), Yaml::String(v)) => (k.clone(), v.clone()),
                _ => panic!("{what}: {k:?}: {v:?} is not a string key with a quoted string value"),
            })
            .collect(),
        other => panic!("{what}: expected a map, found {other:?}"),
    }
}

fn name_of(doc: &Yaml) -> String {
    doc["metadata"]["name"].as_str().unwrap_or("<no name>").to_owned()
}

/// The secrets named by the `csi.storage.k8s.io/` keys of `params` (as their prefixes, e.g.
/// `csi.storage.k8s.io/provisioner-secret`). Every such key must be `known` (or `also`
/// allowed), and each secret must have both its name and its namespace.
fn named_secrets(params: &HashMap<String, String>, known: &[&str], also: &[&str], what: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    for key in params.keys().filter(|k| k.starts_with(CO_PREFIX)) {
        if also.contains(&key.as_str()) {
            continue;
        }
        let prefix = key
            .strip_suffix("-name")
            .or_else(|| key.strip_suffix("-namespace"))
            .filter(|p| known.contains(p))
            .unwrap_or_else(|| {
                panic!("{what}: {key:?} is not a key the sidecars accept (known: {known:?} -name/-namespace, {also:?})")
            });
        for half in ["-name", "-namespace"] {
            let k = format!("{prefix}{half}");
            assert!(params.get(&k).is_some_and(|v| !v.is_empty()), "{what}: {key} without {k}");
        }
        if key.ends_with("-name") {
            secrets.push(prefix.to_owned());
        }
    }
    secrets.sort();
    secrets
}

#[test]
fn storage_classes_in_deploy_are_accepted_by_the_parser() {
    let mut checked = Vec::new();
    for (file, doc) in deploy_documents() {
        if doc["kind"].as_str() != Some("StorageClass") || doc["provisioner"].as_str() != Some(DEFAULT_DRIVER_NAME) {
            continue;
        }
        let what = format!("StorageClass {} in {}", name_of(&doc), file.display());
        let params = string_map(&doc["parameters"], &what);
        let parsed = VolumeParams::parse(&params).unwrap_or_else(|e| panic!("{what}: refused by the driver: {e}"));

        // The provisioner hands csi.storage.k8s.io/fstype over as the capability's fs type:
        // it must be one ferrovol makes, and agree with a `fsType` parameter if both are set.
        if let Some(fs) = params.get(FSTYPE_KEY) {
            let fs =
                FsType::parse(fs, "csi.storage.k8s.io/fstype").unwrap_or_else(|e| panic!("{what}: {FSTYPE_KEY}: {e}"));
            if params.contains_key("fsType") {
                assert_eq!(fs, parsed.fs_type, "{what}: fsType and {FSTYPE_KEY} disagree");
            }
        }
        let secrets = named_secrets(&params, STORAGE_CLASS_SECRETS, &[FSTYPE_KEY], &what);
        if parsed.family == Family::S3 {
            // Reachable from every node; mounted through FUSE, so no filesystem to name.
            assert!(!params.contains_key(FSTYPE_KEY), "{what}: {FSTYPE_KEY} does not apply to type s3");
            for needed in S3_STORAGE_CLASS_SECRETS {
                assert!(
                    secrets.iter().any(|s| s == needed),
                    "{what}: an s3 class must name the S3 secret as {needed}-name/-namespace"
                );
            }
        } else {
            // Volumes are local to a node: binding must wait for the pod's node.
            assert_eq!(
                doc["volumeBindingMode"].as_str(),
                Some("WaitForFirstConsumer"),
                "{what}: local volumes need volumeBindingMode WaitForFirstConsumer"
            );
        }
        checked.push(what);
    }
    assert!(!checked.is_empty(), "deploy/ has no StorageClass with provisioner {DEFAULT_DRIVER_NAME}");
    eprintln!("{} StorageClasses checked:\n  {}", checked.len(), checked.join("\n  "));
}

#[test]
fn snapshot_classes_in_deploy_name_only_secrets() {
    let (mut checked, mut with_secret) = (Vec::new(), 0);
    let mut s3_classes = 0;
    for (file, doc) in deploy_documents() {
        match (doc["kind"].as_str(), doc["provisioner"].as_str(), doc["driver"].as_str()) {
            (Some("StorageClass"), Some(DEFAULT_DRIVER_NAME), _)
                if doc["parameters"]["type"].as_str() == Some("s3") =>
            {
                s3_classes += 1;
            }
            (Some("VolumeSnapshotClass"), _, Some(DEFAULT_DRIVER_NAME)) => {
                let what = format!("VolumeSnapshotClass {} in {}", name_of(&doc), file.display());
                let params = string_map(&doc["parameters"], &what);
                // CreateSnapshot takes no parameters of the driver's own: only the secrets,
                // which csi-snapshotter takes out and passes as the request's secrets.
                if let Some(k) = params.keys().find(|k| !k.starts_with(CO_PREFIX)) {
                    panic!("{what}: {k:?}: ferrovol's snapshots take no parameters");
                }
                if !named_secrets(&params, SNAPSHOT_CLASS_SECRETS, &[], &what).is_empty() {
                    with_secret += 1;
                }
                checked.push(what);
            }
            _ => {}
        }
    }
    assert!(!checked.is_empty(), "deploy/ has no VolumeSnapshotClass of {DEFAULT_DRIVER_NAME}");
    // S3 snapshots are copies made with the volume's credentials.
    assert!(
        s3_classes == 0 || with_secret > 0,
        "deploy/ has s3 StorageClasses but no VolumeSnapshotClass with a secret"
    );
    eprintln!("{} VolumeSnapshotClasses checked:\n  {}", checked.len(), checked.join("\n  "));
}

/// Collects every inline CSI volume of this driver (`csi: {driver: ...}`) in `node`.
fn inline_volumes<'a>(node: &'a Yaml, out: &mut Vec<&'a Yaml>) {
    match node {
        Yaml::Hash(h) => {
            for (k, v) in h {
                if k.as_str() == Some("csi") && v["driver"].as_str() == Some(DEFAULT_DRIVER_NAME) {
                    out.push(v);
                }
                inline_volumes(v, out);
            }
        }
        Yaml::Array(a) => a.iter().for_each(|v| inline_volumes(v, out)),
        _ => {}
    }
}

#[test]
fn inline_volumes_in_deploy_have_valid_attributes() {
    let mut checked = 0;
    for (file, doc) in deploy_documents() {
        let mut found = Vec::new();
        inline_volumes(&doc, &mut found);
        for volume in found {
            let what = format!(
                "inline volume of {} {} in {}",
                doc["kind"].as_str().unwrap_or("?"),
                name_of(&doc),
                file.display()
            );
            for (k, v) in string_map(&volume["volumeAttributes"], &what) {
                match k.as_str() {
                    "size" => {
                        parse_quantity(&v, "size").unwrap_or_else(|e| panic!("{what}: size: {e}"));
                    }
                    "fsType" => {
                        FsType::parse(&v, "fsType").unwrap_or_else(|e| panic!("{what}: fsType: {e}"));
                    }
                    _ if k.starts_with(CO_PREFIX) => {}
                    _ => panic!("{what}: unknown attribute {k:?} (known: {EPHEMERAL_ATTRIBUTES:?})"),
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "deploy/ has no inline ephemeral volume example");
}

/// The storage families the parser accepts, as its own error for an unknown one lists them.
fn known_families() -> Vec<String> {
    let bogus = HashMap::from([("type".to_owned(), "no-such-family".to_owned())]);
    let err = VolumeParams::parse(&bogus).expect_err("an unknown type must be refused").to_string();
    let list = err
        .split_once("known: ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(list, _)| list)
        .unwrap_or_else(|| panic!("the error for an unknown type no longer lists the known ones: {err}"));
    let families: Vec<String> = list.split(", ").map(str::to_owned).collect();
    assert!(!families.is_empty(), "{err}");
    families
}

#[test]
fn every_parameter_and_family_is_documented() {
    let root = repo_root();
    let docs: String = DOCS
        .iter()
        .map(|d| std::fs::read_to_string(root.join(d)).unwrap_or_else(|e| panic!("reading {d}: {e}")))
        .collect::<Vec<_>>()
        .join("\n");

    let mut missing = Vec::new();
    for (key, meaning) in KNOWN_PARAMETERS {
        assert!(!meaning.is_empty(), "KNOWN_PARAMETERS: {key} has no description");
        if !docs.contains(&format!("`{key}`")) && !docs.contains(&format!("{key}:")) {
            missing.push(format!("parameter `{key}`"));
        }
    }
    let families = known_families();
    for family in &families {
        // Each one parses on its own (with what it requires), so the list is the parser's.
        let mut params = HashMap::from([("type".to_owned(), family.clone())]);
        if family.starts_with("lvm") {
            params.insert("volumeGroup".to_owned(), "vg0".to_owned());
            params.insert("thinPool".to_owned(), "pool0".to_owned());
        }
        if family == "lvm" {
            params.remove("thinPool");
        }
        VolumeParams::parse(&params).unwrap_or_else(|e| panic!("type {family} is listed as known but refused: {e}"));
        if !docs.contains(&format!("`{family}`")) && !docs.contains(&format!("type: {family}")) {
            missing.push(format!("type `{family}`"));
        }
    }
    assert!(missing.is_empty(), "not documented in {DOCS:?}: {missing:?}");
    assert!(families.len() >= 3, "expected loop, lvm and lvm-thin at least: {families:?}");
}
