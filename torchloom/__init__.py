"""torchloom: steer a running PyTorch distributed job live over NATS.

The shared core: protocol codec, subject names, knob validation, configuration, the NATS connection
helper, the embedded nats-server and the CLI. `weaver` and `threadlet` build on it.
"""

__version__ = "0.1.0"
