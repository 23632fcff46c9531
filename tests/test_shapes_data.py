"""The shapes dataset, prompt parser and analytic classifier (no model weights needed)."""

import numpy as np
import pytest

from stablefused.shapes import classify, data


def test_vocabulary_is_large_enough():
    assert len(data.COLORS) >= 5 and len(data.SHAPES) >= 3 and len(data.SIZES) >= 2 and len(data.BACKGROUNDS) >= 2
    assert data.IMAGE_SIZE >= 32


def test_items_are_deterministic_by_seed():
    a, b, c = data.sample(7), data.sample(7), data.sample(8)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert not (np.array_equal(a[0], c[0]) and a[2] == c[2])
    img = a[0]
    assert img.shape == (32, 32, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1


def test_prompts_vary_in_form_and_always_parse_back():
    _, attrs, prompts, _ = data.batch(range(2000))
    forms = set()
    for a, p in zip(attrs, prompts):
        parsed = classify.parse_prompt(p)
        assert {"color", "shape"} <= parsed.keys(), p
        assert all(a[k] == v for k, v in parsed.items()), (p, a)
        forms.add(tuple(w if w not in data.VOCABULARY[len(data.FILLER_WORDS):] else "X" for w in p.replace(",", " ,").split()))
    assert len(forms) >= 6
    assert {frozenset(classify.parse_prompt(p)) for p in prompts} >= {
        frozenset({"color", "shape"}), frozenset({"color", "shape", "size", "background"})}


def test_parse_prompt_examples():
    assert classify.parse_prompt("a small blue triangle on a black background") == {
        "size": "small", "color": "blue", "shape": "triangle", "background": "black"}
    assert classify.parse_prompt("White background, a RED square, large") == {
        "background": "white", "color": "red", "shape": "square", "size": "large"}
    assert classify.parse_prompt("two green circles") == {"color": "green", "shape": "circle"}
    assert classify.parse_prompt("an astronaut") == {}


def test_classifier_is_at_least_99_percent_correct_on_fresh_items():
    imgs, attrs, _, _ = data.batch(range(3_000_000, 3_002_000))
    preds = [classify.classify_image(im) for im in imgs]
    for a in data.ATTRIBUTES:
        acc = np.mean([p[a] == t[a] for p, t in zip(preds, attrs)])
        assert acc >= 0.99, (a, acc)


def test_classifier_accepts_pil_and_uint8_and_blank_images():
    from PIL import Image

    img, attrs, _ = data.sample(3)
    u8 = (img * 255).round().astype(np.uint8)
    assert classify.classify_image(Image.fromarray(u8)) == classify.classify_image(u8) == {
        k: attrs[k] for k in data.ATTRIBUTES} | {}
    blank = classify.classify_image(np.ones((32, 32, 3), np.float32))
    assert blank == {"background": "white", "color": None, "shape": None, "size": None}


def test_score_names_only_prompted_attributes():
    s = classify.score({"color": "red", "shape": "circle", "size": "large", "background": "black"}, "a red square")
    assert s["color"] == 1.0 and s["shape"] == 0.0 and np.isnan(s["size"]) and np.isnan(s["background"])
    assert s["mean"] == pytest.approx(0.5)
