"""The weaver: the central torchloom service that validates, sequences and tracks live commands.

`weaver.state` holds the pure decisions, `weaver.service` the NATS I/O, `weaver.grpc_api` the gRPC
Control service and `weaver.app` the entry point.
"""
