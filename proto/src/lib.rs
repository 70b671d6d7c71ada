//! exfilguard gRPC contract (see the gRPC/controller issue).
