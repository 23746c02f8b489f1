"""make_canvas_dataset: determinism, shapes, item placement, clutter, validation (tiny synthetic items)."""

from __future__ import annotations

import doctest

import pytest
import torch

from distill import canvas as canvas_module
from distill.canvas import make_canvas_dataset


def items(n=6, side=8, seed=0):
    """Distinct random items: a bright random-texture square on a black border."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, side, side, dtype=torch.uint8)
    x[:, 1:-1, 1:-1] = torch.randint(100, 256, (n, side - 2, side - 2), generator=g, dtype=torch.uint8)
    return x, torch.arange(n) % 3


def find(canvas, item):
    """Top-left positions where ``item``'s non-zero pixels appear unchanged in 2-D ``canvas``."""
    h, w = item.shape
    mask = item > 0
    hits = []
    for y in range(canvas.shape[0] - h + 1):
        for x in range(canvas.shape[1] - w + 1):
            if torch.equal(canvas[y : y + h, x : x + w][mask], item[mask]):
                hits.append((y, x))
    return hits


def test_shapes_dtypes_and_labels_preserved():
    x, y = items()
    out, labels = make_canvas_dataset(x, y, canvas=20, seed=0, clutter=3, clutter_size=(2, 4))
    assert out.shape == (6, 1, 20, 20) and out.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == y.tolist()
    # (N, 1, H, W) input gives the same result as (N, H, W).
    again, _ = make_canvas_dataset(x[:, None], y, canvas=20, seed=0, clutter=3, clutter_size=(2, 4))
    assert torch.equal(out, again)


def test_deterministic_for_a_seed_and_independent_of_chunking():
    x, y = items(n=10)
    kwargs = {"canvas": 24, "clutter": 2, "scale": (0.75, 1.5), "clutter_size": (3, 5)}
    a, _ = make_canvas_dataset(x, y, seed=3, **kwargs)
    b, _ = make_canvas_dataset(x, y, seed=3, chunk=3, **kwargs)
    assert torch.equal(a, b)


def test_different_seeds_differ():
    x, y = items()
    a, _ = make_canvas_dataset(x, y, canvas=24, seed=0)
    b, _ = make_canvas_dataset(x, y, canvas=24, seed=1)
    assert not torch.equal(a, b)


def test_clean_canvas_holds_exactly_the_item():
    x, y = items(n=5)
    out, _ = make_canvas_dataset(x, y, canvas=16, seed=0, clutter=0)
    for image, item in zip(out[:, 0], x):
        (top, left), *_ = find(image, item)
        assert image.sum() == item.sum()  # nothing else on the canvas
        assert torch.equal(image[top : top + 8, left : left + 8], item)
    positions = {find(image, item)[0] for image, item in zip(out[:, 0], x)}
    assert len(positions) > 1  # random placement


def test_item_is_on_top_of_dimmer_clutter_from_other_items():
    x, y = items(n=6)
    out, _ = make_canvas_dataset(
        x, y, canvas=20, seed=0, clutter=4, clutter_size=(3, 4), clutter_intensity=(0.5, 0.5)
    )
    clean, _ = make_canvas_dataset(x, y, canvas=20, seed=0, clutter=0)
    for image, item, plain in zip(out[:, 0], x, clean[:, 0]):
        assert find(image, item)  # every item pixel present, unchanged
        clutter = image[(plain == 0) & (image > 0)]
        assert clutter.numel() > 0 and int(clutter.max()) <= 128  # half intensity, at most 255 / 2
    assert (out > 0).sum() > (clean > 0).sum()


def test_clutter_never_copies_the_canvas_own_item():
    x = torch.zeros(4, 4, 4, dtype=torch.uint8)
    x[0] = 200  # one bright item; the others are blank, so item 0's canvas gets no clutter
    out, _ = make_canvas_dataset(x, torch.zeros(4), canvas=12, seed=0, clutter=5, clutter_size=(2, 4))
    assert int((out[0] > 0).sum()) == 16
    assert all(int((out[i] > 0).sum()) > 0 for i in (1, 2, 3))  # fragments of item 0 elsewhere


def test_rescaled_item_fits_the_canvas():
    x = torch.full((20, 4, 4), 255, dtype=torch.uint8)
    out, _ = make_canvas_dataset(x, torch.zeros(20), canvas=9, seed=0, clutter=0, scale=(2.0, 2.0))
    # A flat item scaled 2x covers an 8x8 square at full intensity, inside the canvas.
    assert ((out == 255).sum(dim=(1, 2, 3)) == 64).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canvas": 6}, "cannot hold"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"clutter": -1}, "clutter"),
        ({"clutter_size": (0, 3)}, "clutter_size"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    x, y = items()
    with pytest.raises(ValueError, match=match):
        make_canvas_dataset(x, y, **kwargs)


def test_bad_inputs_raise():
    x, y = items()
    with pytest.raises(ValueError, match="uint8"):
        make_canvas_dataset(x.float(), y)
    with pytest.raises(ValueError, match="labels"):
        make_canvas_dataset(x, y[:2])
    with pytest.raises(ValueError, match="at least 2 items"):
        make_canvas_dataset(x[:1], y[:1], canvas=16, clutter=1)


def test_docstring_examples_run():
    results = doctest.testmod(canvas_module)
    assert results.attempted > 0 and results.failed == 0
