from google.protobuf import descriptor_pool  # type: ignore[import-untyped]

default_google_proto_descriptor_pool = descriptor_pool.DescriptorPool()
