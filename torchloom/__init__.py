"""torchloom: steer a running PyTorch distributed job live over NATS.

The shared core: protocol codec, subject names, the shared vocabulary (ids, checkpoint layout, replay
file, policy names, defaults), configuration, the NATS connection helper and the embedded nats-server.
`weaver` and `threadlet` build on it; `torchloom.app` (the CLI and launcher) sits on top of all three.
"""


def __getattr__(name: str) -> str:
    # `__version__` is looked up when read: importlib.metadata and the distribution lookup cost every
    # process that imports torchloom (each CLI call, each rank) about 60 ms, and few read it.
    if name == "__version__":
        from torchloom.defaults import version

        return version()
    raise AttributeError(f"module 'torchloom' has no attribute {name!r}")
