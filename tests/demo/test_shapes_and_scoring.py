"""The embedded shapes dataset and its GenEval-style score."""
import numpy as np
import pytest

from twinflow.demo.scoring import detect, score_batch, score_image
from twinflow.demo.shapes import Prompt, ShapesDataset, all_prompts, draw_shape, render


def test_prompts_cover_every_attribute_once():
    prompts = all_prompts()
    assert len(prompts) == len({p.text for p in prompts}) == 60
    assert Prompt("circle", "red", 1, "left").text == "a red circle on the left"
    assert Prompt("square", "blue", 2).text == "two blue squares"


def test_items_are_deterministic():
    a, b = ShapesDataset(length=70, size=32), ShapesDataset(length=70, size=32)
    for i in (0, 13, 69):
        assert np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert not np.array_equal(a[0][0], ShapesDataset(length=70, size=32, seed=1)[0][0])
    with pytest.raises(IndexError):
        a[70]


def test_scorer_passes_ground_truth_and_fails_wrong_images():
    ds = ShapesDataset(length=256, size=32)
    images = [ds[i][0] for i in range(256)]
    prompts = [ds.prompt(i) for i in range(256)]
    truth = score_batch(images, prompts)
    assert truth["overall"] >= 0.97 and truth["color"] == 1.0 and truth["position"] == 1.0
    # shifting by one prompt block (5 prompts per shape and colour) pairs every image with another colour
    shifted = score_batch(images[5:] + images[:5], prompts)
    assert shifted["overall"] == 0.0 and shifted["color"] == 0.0
    # shifting within a block keeps colour and shape, so only count and position can catch it
    within = score_batch(images[1:] + images[:1], prompts)
    assert within["color"] > 0.75 and within["overall"] < 0.2
    blank = score_batch([np.zeros_like(images[0])] * 8, prompts[:8])
    assert blank["overall"] == 0.0 and blank["count"] == 0.0


def test_each_criterion_detects_its_own_error():
    img = render(Prompt("square", "green", 1, "left"), 32, seed=3)
    assert score_image(img, Prompt("square", "green", 1, "left"))["overall"]
    assert not score_image(img, Prompt("square", "green", 1, "right"))["position"]
    assert not score_image(img, Prompt("square", "red", 1, "left"))["color"]
    assert not score_image(img, Prompt("circle", "green", 1, "left"))["object"]
    assert not score_image(img, Prompt("square", "green", 2))["count"]


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_detector_classifies_shapes(shape):
    canvas = np.zeros((48, 48, 3), dtype=np.uint8)
    draw_shape(canvas, shape, (235, 220, 40), 24, 24, 9)
    (found,) = detect(canvas)
    assert found.shape == shape and found.color == "yellow"
    assert abs(found.cx - 24) < 1.5 and abs(found.cy - 24) < 2.5
