//! Our `csi.proto` must carry exactly the wire contract of the CSI v1.12.0 specification:
//! the same package, services, methods, messages, fields (names, numbers, types, labels),
//! enums and values, and options such as `csi_secret`. Both files are compiled and their
//! descriptors compared with comments and source positions stripped.

use std::path::{Path, PathBuf};

use prost_types::FileDescriptorProto;

fn spec_dir() -> PathBuf {
    // shared/ sits beside the checkout (CI lays it there too); CSI_SPEC_DIR overrides.
    let dir = std::env::var_os("CSI_SPEC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/csi-spec-v1.12.0"));
    assert!(
        dir.join("csi.proto").is_file(),
        "the specification's csi.proto is not at {} (the shared/ folder sits beside the checkout)",
        dir.display()
    );
    dir
}

fn compile(dir: &Path) -> FileDescriptorProto {
    let set = protox::compile(["csi.proto"], [dir]).expect("csi.proto compiles");
    let mut file = set.file.into_iter().find(|f| f.name() == "csi.proto").expect("csi.proto in the set");
    // Comments and line numbers are not part of the wire contract.
    file.source_code_info = None;
    file
}

#[test]
fn our_proto_matches_the_specification() {
    let ours = compile(Path::new(env!("CARGO_MANIFEST_DIR")));
    let spec = compile(&spec_dir());
    assert_eq!(ours.package(), "csi.v1");
    assert_eq!(ours.dependency, spec.dependency, "imports differ");
    assert_eq!(ours.options, spec.options, "file options differ");
    assert_eq!(ours.extension, spec.extension, "option extensions (csi_secret, alpha_*) differ");
    assert_eq!(ours.service, spec.service, "services differ");
    assert_eq!(ours.enum_type, spec.enum_type, "top-level enums differ");
    assert_eq!(ours.message_type.len(), spec.message_type.len(), "message count differs");
    for (o, s) in ours.message_type.iter().zip(&spec.message_type) {
        assert_eq!(o, s, "message {} differs", s.name());
    }
    assert_eq!(ours, spec);
}

#[test]
fn secrets_fields_are_marked() {
    // The csi_secret option (1059) is what tells every tool that a field must not be logged.
    let ours = compile(Path::new(env!("CARGO_MANIFEST_DIR")));
    let marked: Vec<String> = ours
        .message_type
        .iter()
        .flat_map(|m| m.field.iter().map(move |f| (m.name().to_owned(), f)))
        .filter(|(_, f)| f.name() == "secrets")
        .filter(|(_, f)| f.options.is_some())
        .map(|(m, _)| m)
        .collect();
    assert!(marked.iter().any(|m| m == "CreateVolumeRequest"), "{marked:?}");
    assert!(marked.iter().any(|m| m == "NodeStageVolumeRequest"), "{marked:?}");
}
