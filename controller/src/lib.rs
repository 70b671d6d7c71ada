//! exfilguard controller (see the gRPC/controller issue).
