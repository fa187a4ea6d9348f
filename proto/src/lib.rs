//! The `switchyard.v1` gRPC contract, generated from `proto/switchyard/v1/switchyard.proto`.
//!
//! `SwitcherAdmin` is what operators and pool backends call; `ProxyControl` is what Stratum
//! proxies call. [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set that the control
//! service registers with gRPC reflection, so `grpcurl` works with no proto files at hand.

#![allow(missing_docs)] // generated code carries the proto comments; helpers below are documented

/// Generated messages, clients and servers of the `switchyard.v1` package.
pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

/// The encoded `FileDescriptorSet` of `switchyard.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_v1_descriptor.bin"));
