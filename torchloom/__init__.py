"""torchloom: steer a running PyTorch distributed job live over NATS.

The shared core: protocol codec, subject names, the shared vocabulary (ids, checkpoint layout, replay
file, policy names, defaults), configuration, the NATS connection helper and the embedded nats-server.
`weaver` and `threadlet` build on it; `torchloom.app` (the CLI and launcher) sits on top of all three.
"""

from torchloom.defaults import version as _version

__version__ = _version()
