//! gRPC server reflection (v1, and v1alpha for grpcurl before 1.9) that lists
//! the services this port serves — its own, health and reflection — and
//! nothing else, so grpcurl never shows a service that would only answer
//! UNIMPLEMENTED. The descriptors of the google.rpc error details are
//! registered too, so grpcurl decodes `BadRequest` and `ErrorInfo`.

use tonic_reflection::server::{
    Builder, Error,
    v1::{ServerReflection as V1, ServerReflectionServer as V1Server},
    v1alpha::{ServerReflection as V1Alpha, ServerReflectionServer as V1AlphaServer},
};

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

fn builder(service_name: &'static str) -> Builder<'static> {
    Builder::configure()
        .register_encoded_file_descriptor_set(maitre_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service_name)
        .with_service_name(HEALTH)
        .with_service_name(REFLECTION_V1)
        .with_service_name(REFLECTION_V1ALPHA)
}

/// Both reflection versions for the port serving `service_name`.
pub fn services(
    service_name: &'static str,
) -> Result<(V1Server<impl V1>, V1AlphaServer<impl V1Alpha>), Error> {
    Ok((
        builder(service_name).build_v1()?,
        builder(service_name).build_v1alpha()?,
    ))
}
