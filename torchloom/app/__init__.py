"""The torchloom application: the `torchloom` CLI, the launcher and restart supervisor, and the output
formatting. It sits on top of the shared core (`torchloom`), `weaver` and `threadlet`, and is the only
code that may import all three.
"""
