"""Generated protobuf and gRPC stubs for salience.v1 (scripts/gen_proto.sh)."""
