"""Training frameworks steered by torchloom in one line: `threadlet.integrations.transformers` (the
Hugging Face Trainer) and `threadlet.integrations.lightning` (Lightning) each give a
`TorchloomCallback` that attaches a threadlet to the framework's own model, optimizer and scheduler.
Accelerate needs no callback: `threadlet.attach` takes what `accelerator.prepare` returns.

The framework modules import their framework; this package and `common` do not, so importing one
never requires the other framework to be installed (extras `torchloom[hf]`, `torchloom[lightning]`).
"""
