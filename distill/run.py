"""Run directories: the files a training run or ``memplan student --out`` writes, and loading them back."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from memplan.errors import MemplanError

RUN_LAYOUT = (
    "config.yaml (teacher, teacher_kwargs, factor or recipe) + recipe.json (passes Recipe, red_placement) + "
    "student.pt or best.pt"
)


def load_run(run_dir: str | Path) -> tuple[nn.Module, tuple[int, ...]]:
    """Rebuild the derived student a training run directory holds, with its weights, and its input shape.

    Layout: :data:`RUN_LAYOUT` (what :func:`distill.trainer.train` writes for ``factor``/``recipe``
    runs). The model comes from :func:`distill.trainer.load_student` (``student.pt``, else
    ``best.pt``); the input shape is the recipe's.

    Example:
        >>> import tempfile
        >>> from distill.trainer import TrainConfig, train
        >>> run = Path(tempfile.mkdtemp()) / "run"
        >>> _ = train(TrainConfig(teacher="zoo:resnet_tiny", factor=2, method="red-blocks", data="digits",
        ...                       train_subset=100, epochs=1, batch_size=50, out_dir=str(run), device="cpu"))
        >>> model, shape = load_run(run)
        >>> shape, model(torch.zeros(shape)).shape
        ((1, 1, 8, 8), torch.Size([1, 10]))
    """
    from distill.trainer import ConfigError, load_student
    from passes import PassError, Recipe

    run = Path(run_dir)
    weights = next((n for n in ("student.pt", "best.pt") if (run / n).is_file()), None)
    if not (run / "recipe.json").is_file() or weights is None or not (run / "config.yaml").is_file():
        raise MemplanError(f"run directory '{run}' is not supported: it needs {RUN_LAYOUT}")
    try:
        return load_student(run, weights), tuple(Recipe.load(run / "recipe.json").input_shape)
    except (ConfigError, PassError) as e:
        raise MemplanError(f"cannot rebuild the student of run directory '{run}': {e}") from e
