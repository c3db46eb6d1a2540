//! Generates the gRPC code from our own .proto files, with a vendored protoc (no system
//! package needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let root = ".".to_string();
    let files = [
        "apache/rocketmq/v2/definition.proto".to_string(),
        "apache/rocketmq/v2/service.proto".to_string(),
        "sluice/admin/v1/admin.proto".to_string(),
        "sluice/store/v1/stored.proto".to_string(),
    ];
    tonic_prost_build::configure().build_server(true).build_client(true).compile_protos(&files, &[root])?;
    Ok(())
}
