//! exfilguard's gRPC contract, `exfilguard.v1`, generated from `proto/exfilguard/v1/*.proto`.
//!
//! The `.proto` files are the source of truth (every message and field is
//! documented there, and the comments carry over to the generated code);
//! this crate only compiles them and exposes the file descriptor set for
//! server reflection.

/// `exfilguard.v1`: agent stream (`AgentGateway`) and security-team API (`Incidents`).
pub mod v1 {
    #![expect(
        unused_qualifications,
        reason = "generated code; the .proto comments are the documentation"
    )]
    tonic::include_proto!("exfilguard.v1");
}

/// Encoded `FileDescriptorSet` of `exfilguard.v1`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("exfilguard_v1_descriptor");
