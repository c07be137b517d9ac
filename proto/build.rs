//! Compiles `csi.proto` and `agent.proto` with protox (pure Rust), so no system protoc is
//! needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=csi.proto");
    println!("cargo:rerun-if-changed=agent.proto");
    let fds = protox::compile(["csi.proto", "agent.proto"], ["."])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
