"""The ``shapes_adherence`` metric plugin, through the registry, on dataset images."""

import math

import numpy as np
from PIL import Image

from stablefused import registry
from stablefused.shapes import data


def _pil(img):
    return Image.fromarray((img * 255).round().astype(np.uint8))


def test_registered_with_doc_and_no_required_params():
    info = {p.name: p for p in registry.list_plugins("metrics")}["shapes_adherence"]
    assert info.doc and list(info.params) == ["against", "region"]  # optional: the prompt, the whole image
    registry.create("metrics", "shapes_adherence")


def test_scored_against_another_record_key():
    """img2img's faithfulness: the same image scored against its prompt and against its source text."""
    metric = registry.create("metrics", "shapes_adherence", against=["prompt", "source"])
    img = _pil(data.image_for({"color": "red", "shape": "circle", "size": "large", "background": "black"}, 0))
    recs = [{"prompt": "a blue square on a white background", "source": "a large red circle on a black background"},
            {"prompt": "a red circle", "source": None}]
    a, b = metric([img, img], recs)
    assert a["shapes_adherence/mean"] == 0 and a["shapes_adherence_source/mean"] == 1
    assert b == {k: v for k, v in b.items() if k.startswith("shapes_adherence/")} and b["shapes_adherence/color"] == 1


def test_scores_dataset_images_as_correct_and_unnamed_attributes_as_nan():
    metric = registry.create("metrics", "shapes_adherence")
    imgs, attrs, prompts, _ = data.batch(range(4_000_000, 4_000_200))
    rows = metric([_pil(i) for i in imgs], [{"prompt": p, "seed": 0, "guidance_scale": 7.5} for p in prompts])
    assert len(rows) == len(imgs)
    for row, p in zip(rows, prompts):
        assert set(row) == {f"shapes_adherence/{k}" for k in ("color", "shape", "size", "background", "mean")}
        named = [k for k in ("color", "shape", "size", "background") if k in p or (k == "color")]
        assert row["shapes_adherence/color"] == 1.0 and row["shapes_adherence/shape"] == 1.0
        assert row["shapes_adherence/mean"] == 1.0
        assert math.isnan(row["shapes_adherence/size"]) == ("small" not in p and "large" not in p)
        assert math.isnan(row["shapes_adherence/background"]) == ("background" not in p)
        assert named


def test_wrong_prompt_scores_zero():
    metric = registry.create("metrics", "shapes_adherence")
    img = data.image_for({"color": "red", "shape": "circle", "size": "large", "background": "black"}, seed=1)
    (row,) = metric([_pil(img)], [{"prompt": "a small blue square on a white background"}])
    assert row["shapes_adherence/mean"] == 0.0
    (row,) = metric([_pil(img)], [{"prompt": "a large red triangle"}])
    assert row["shapes_adherence/color"] == row["shapes_adherence/size"] == 1.0
    assert row["shapes_adherence/shape"] == 0.0 and row["shapes_adherence/mean"] == 2 / 3
    (row,) = metric([_pil(img)], [{"prompt": "an astronaut"}])
    assert all(math.isnan(v) for v in row.values())


def test_prompts_without_shapes_attributes_are_not_scored():
    import numpy as np
    from PIL import Image

    from stablefused import registry

    metric = registry.create("metrics", "shapes_adherence")
    img = Image.fromarray(np.zeros((512, 512, 3), np.uint8))
    assert metric([img], [{"prompt": "a photograph of an astronaut riding a horse"}]) == [{}]


def test_unknown_words_count_as_unmet():
    metric = registry.create("metrics", "shapes_adherence")
    img = data.image_for({"color": "purple", "shape": "circle", "size": "large", "background": "white"}, seed=1)
    (row,) = metric([_pil(img)], [{"prompt": "a purple hexagon on a grey background"}])
    # purple met; "hexagon" and "grey" are words the model cannot draw: 1 of 3 requests met, not 1.0
    assert row["shapes_adherence/color"] == 1.0 and row["shapes_adherence/mean"] == 1 / 3
    assert math.isnan(row["shapes_adherence/shape"]) and math.isnan(row["shapes_adherence/background"])
    # prompts in the model's vocabulary score as before (plurals and filler words are known)
    (row,) = metric([_pil(img)], [{"prompt": "large purple circles on a white background"}])
    assert row["shapes_adherence/mean"] == 1.0


def test_sampler_warns_once_per_prompt_about_unknown_words(caplog):
    from stablefused.models import load_components
    from stablefused.pipeline import Sampler
    from tests.conftest import compose_cfg

    cfg = compose_cfg("model=shapes")
    sampler = Sampler(load_components(cfg.model, "cpu"))
    prompts = ["a purple hexagon on a grey background", "a red circle"]
    with caplog.at_level("WARNING", logger="stablefused.pipeline"):
        for _ in range(2):
            sampler.txt2img(prompts, [0, 1], 7.5, steps=1, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "'hexagon', 'grey'" in warnings[0] and "a purple hexagon on a grey background" in warnings[0]
