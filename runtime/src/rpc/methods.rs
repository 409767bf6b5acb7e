//! The RPC paths a server really serves, read from the descriptor sets, so
//! metrics label only those and everything else as `unknown`.

use std::collections::HashSet;

use prost::Message;

/// `package.Service/Method` for every method in the given descriptor sets.
pub fn known_methods(descriptor_sets: &[&[u8]]) -> HashSet<String> {
    let mut methods = HashSet::new();
    for bytes in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    methods.insert(format!(
                        "{package}.{service_name}/{}",
                        method.name.unwrap_or_default()
                    ));
                }
            }
        }
    }
    methods.insert("grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
    methods.insert("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".into());
    methods
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_our_methods_and_health() {
        let methods = super::known_methods(&[
            maitre_api::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ]);
        assert!(methods.contains("maitre.memory.v1.MemoryService/StoreMessage"));
        assert!(methods.contains("maitre.booking.v1.BookingService/CreateBooking"));
        assert!(methods.contains("grpc.health.v1.Health/Check"));
    }
}
