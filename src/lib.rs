//! maitre's wire contract: the Rust code generated from `proto/` by
//! `build.rs` (messages, servers and clients) and the encoded descriptor set
//! that server reflection serves. Nothing else lives here, so a client in
//! Rust depends on this crate alone.
#![forbid(unsafe_code)]

pub mod memory {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("maitre.memory.v1");
    }
}

pub mod booking {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("maitre.booking.v1");
    }
}

/// Encoded `FileDescriptorSet` of every maitre proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("maitre_descriptor");
