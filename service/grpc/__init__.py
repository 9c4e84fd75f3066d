"""The gRPC transport: `segserve.v1.Segmentation` (segserve.proto), the standard health service and reflection.

`service.grpc.server.GrpcServer` runs it beside HTTP; the stubs in `service.grpc.gen` are generated from
`segserve.proto` by `scripts/gen_grpc.sh` and committed (`tests/service/grpc/test_grpc_stubs.py` checks they match).
"""
