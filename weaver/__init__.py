"""The weaver: the central torchloom service that validates, sequences and tracks live commands.

`weaver.model` holds the state; `weaver.liveness`, `weaver.submits`, `weaver.outcomes`,
`weaver.health_plan` and `weaver.recovery` the decisions over it (each says what is pure and what
mutates); `weaver.service` the NATS I/O (JetStream through `weaver.streams`); `weaver.grpc_api` the
gRPC Control service over a started weaver; `weaver.app` composes them and is the entry point.
"""
