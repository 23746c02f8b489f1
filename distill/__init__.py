"""Memory-reduced students and their accuracy recovery (ReDistill, arXiv 2406.03744).

Modules: ``red`` (RED block and loss), ``losses`` (method registry and objective), ``features``
(fx feature taps), ``data`` (offline datasets), ``trainer`` (training loop, checkpoints, torchrun).
"""
