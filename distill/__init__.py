"""Memory-reduced students and their accuracy recovery (ReDistill, arXiv 2406.03744).

Modules: ``red`` (RED block), ``losses`` (method registry and objective), ``features`` (fx feature
taps), ``data`` (offline datasets), ``run`` (run directories), ``trainer`` (training loop,
checkpoints, torchrun/DDP).

Example:
    >>> import torch
    >>> from distill.red import REDBlock
    >>> REDBlock(8)(torch.zeros(1, 8, 4, 4)).shape
    torch.Size([1, 8, 4, 4])
"""
