"""memplan: peak activation memory of CNNs, where it happens, and students that need less.

Example:
    >>> import memplan
    >>> from memplan.zoo import create_model
    >>> memplan.analyze(create_model("resnet18"), (1, 3, 224, 224)).peak_bytes
    4014080
"""

from memplan.analyze import MemoryReport, analyze, report_from_graph
from memplan.capture import CapturedGraph, capture
from memplan.errors import CaptureError, MemplanError
from memplan.graph import MemGraph, build_graph

__all__ = [
    "CaptureError", "CapturedGraph", "MemGraph", "MemoryReport", "MemplanError", "analyze", "build_graph",
    "capture", "report_from_graph",
]
