"""The Python API (``import stablefused as sf``) against the CLI it must equal: the same PNGs byte for byte, the
same manifest and run dir, the same one-line errors; the Result read back from the run dir; the model cached in
the process; the lower level (load_model, sampler, plugin objects) on the same code path."""

import base64
import io
import json
import re
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stablefused as sf
from stablefused.errors import ConfigError, PluginError
from tests.test_app import cli

# The bundled model, small: 4 prompts x 1 seed x 3 scales, 6 steps, apg with momentum under a cosine schedule
# (a rule with state and a schedule with parameters: what a Python object must reproduce exactly).
CLI_ARGS = ["experiment=negative_guidance", "guidance=cosine", "guidance.rule=apg", "+guidance.rule_params.momentum=-0.5",
            "seeds=[0]", "steps=6", "guidance_scales=[-5,0,5]", "logger=none"]  # sf.run's order: strings, then keywords


def manifest(run_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "manifest.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("wall_s", None)  # the run record's wall time
    return recs


def pngs(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One CLI run and two sf.run calls that must equal it: the same override strings, and Python objects."""
    tmp = tmp_path_factory.mktemp("api")
    res = cli(*CLI_ARGS, f"hydra.run.dir={tmp / 'cli'}", cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    strings = sf.run("negative_guidance", "guidance=cosine", "guidance.rule=apg", "+guidance.rule_params.momentum=-0.5",
                     seeds=[0], steps=6, guidance_scales=[-5, 0, 5], logger="none", run_dir=tmp / "strings")
    rule = sf.plugins.guidance_rule.apg(momentum=-0.5)
    objects = sf.run("negative_guidance", seeds=[0], steps=6, guidance_scales=[-5, 0, 5], logger="none",
                     guidance=sf.Guidance(sf.plugins.guidance_schedule.cosine(start=0.0, end=2.0), rule),
                     recorders=[sf.plugins.recorders.x0(every=2), "stats"], run_dir=tmp / "objects")
    return {"cli": tmp / "cli", "strings": strings, "objects": objects, "rule": rule}


def test_sf_run_equals_cli_png_for_png_and_manifest(runs):
    cli_dir, res = runs["cli"], runs["strings"]
    assert len(pngs(cli_dir)) == 12
    assert pngs(res.dir) == pngs(cli_dir)  # byte-identical PNGs (pixels and their parameters text)
    assert manifest(res.dir) == manifest(cli_dir)
    for name in ("run.json", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (res.dir / name).read_text() == (cli_dir / name).read_text(), name
    a, b = json.loads((res.dir / "status.json").read_text()), json.loads((cli_dir / "status.json").read_text())
    assert a["status"] == b["status"] == "ok" and a["overrides"] == b["overrides"] == CLI_ARGS
    assert (res.dir / "app.log").read_text().count("12/12 images") == 1  # the CLI's log file, too


def test_plugin_objects_are_the_ones_that_run(runs):
    """Objects given to sf.run are used as they are (the rule's momentum state was filled by the run) and
    written into the config, so the images are the CLI's and the run dir's config says how they were made."""
    cli_dir, res = runs["cli"], runs["objects"]
    assert pngs(res.dir) == pngs(cli_dir)
    assert runs["rule"]._avg is not None  # this very object guided the run
    assert res.config.guidance.rule_params == {"momentum": -0.5} and res.config.guidance.schedule == "cosine"
    assert res.config.recorders.x0.every == 2
    assert res.records.steps("x0") == [0, 2, 4, 5]  # every=2 (and the last step) from the object's parameters
    with pytest.raises(TypeError, match="not a registered recorders plugin"):
        sf.run(recorders=[object()])


def test_result_reads_the_run_dir(runs):
    res, cli_dir = runs["strings"], runs["cli"]
    rows = [r for r in manifest(cli_dir) if r["type"] == "image"]
    assert res.images.records == [r for r in res.manifest if r["type"] == "image"] and len(res.images) == 12
    for img, rec in res.images.items():
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(res.dir / rec["path"]).convert("RGB")))
    low = res.images.where(guidance_scale=-5.0)
    assert len(low) == 4 and {r["guidance_scale"] for r in low.records} == {-5.0}
    t = res.table
    assert len(t) == 12 and list(t.index) == list(range(12))
    assert list(t["seed"]) == [r["seed"] for r in rows]
    assert t["shapes_adherence/color"].notna().all()  # the metric's scores are columns
    assert t.groupby("guidance_scale")["shapes_adherence/color"].mean().loc[5.0] > \
        t.groupby("guidance_scale")["shapes_adherence/color"].mean().loc[-5.0]
    assert np.array_equal(np.asarray(res.grid), np.asarray(Image.open(cli_dir / "grid.png").convert("RGB")))
    (video,) = res.videos
    assert video.path.name == "denoise.mp4"
    import imageio.v3 as iio

    assert iio.imread(video.path).shape[0] == video.record["frames"]  # the MP4 decodes, every frame
    assert res.records["x0"].shape[:2] == (12, 6)
    assert res.stats["images"] == 12 and res.status["status"] == "ok"
    assert res.config.steps == 6 and "hydra" not in res.config
    # Jupyter: the grid as PNG, and HTML with the grid, the video and the table
    assert Image.open(io.BytesIO(res._repr_png_())).size == res.grid.size
    page = res._repr_html_()
    assert page.count("<img") == 1 and page.count("<video") == 1 and "<table" in page
    src = re.search(r'src="data:video/mp4;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(src) == video.path.read_bytes()
    assert Image.open(io.BytesIO(res.images._repr_png_())).width > 0
    again = sf.load(res.dir)  # a run dir read back later: the same Result
    assert again.images.records == res.images.records and again.config == res.config


def test_finished_run_dir_is_not_run_again(runs):
    res = runs["strings"]
    before = (res.dir / "status.json").read_text()
    again = sf.run("negative_guidance", "guidance=cosine", "guidance.rule=apg", "+guidance.rule_params.momentum=-0.5",
                   seeds=[0], steps=6, guidance_scales=[-5, 0, 5], logger="none", run_dir=res.dir)
    assert (res.dir / "status.json").read_text() == before  # skipped, as a CLI rerun skips it
    assert again.images.records == res.images.records


LOG_LINE = re.compile(r"\[[^]]*\]\[[^]]*\]\[(\w+)\] - (.*)")


def cli_error_lines(res: subprocess.CompletedProcess) -> list[str]:
    """What the CLI printed as its error: ``error: `` lines (checks of the override names), the ERROR log record
    with its continuation lines (validation, on stdout through Hydra's log), Hydra's own message (stderr)
    without its HYDRA_FULL_ERROR advice."""
    out, error = [], False
    for line in res.stdout.splitlines():
        if m := LOG_LINE.match(line):
            error = m.group(1) == "ERROR"
            line = m.group(2)
        if error and line.strip():
            out.append(line)
    out += [line.removeprefix("error: ") for line in res.stderr.splitlines()
            if line.strip() and "HYDRA_FULL_ERROR" not in line]
    return out


BAD = {  # CLI arguments; the same through sf.run (override strings, keyword values)
    "validation": (["seeds=[-1]", "steps=0", "eta=2"], [], {"seeds": [-1], "steps": 0, "eta": 2}),
    "names": (["experiment=negative_guidnce", "stepz=3", "scheduler=eulr"], ["negative_guidnce"],
              {"stepz": 3, "scheduler": "eulr"}),
    "plugin": (["recorders=[x0]", "+recorders.x0.evry=2"], [], {"recorders": {"x0": {"evry": 2}}}),
    "hydra": (["guidance.rule_params.momentum=-0.5"], [], {"guidance": {"rule_params": {"momentum": -0.5}}}),
    "grammar": (["prompts=[a"], [None, "prompts=[a"], {}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_errors_are_the_cli_lines(case, tmp_path):
    args, api_args, kwargs = BAD[case]
    res = cli(*args, "logger=none", f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert res.returncode != 0
    expected = cli_error_lines(res)
    assert expected, (res.stdout, res.stderr)
    with pytest.raises((ConfigError, PluginError)) as info:
        sf.run(*api_args, logger="none", run_dir=tmp_path / "api", **kwargs)
    assert [x for x in str(info.value).splitlines() if x.strip()] == expected
    # raised from sf.run itself: no traceback through Hydra or the library, no chained exception
    frames = traceback.extract_tb(info.value.__traceback__)
    assert all(Path(f.filename).name in ("api.py", "test_api.py") for f in frames), frames
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_second_run_on_a_model_does_not_load_it(tmp_path):
    from stablefused import models

    sf.run(task="txt2img", model="tiny_random", seeds=[0], steps=1, logger="none", run_dir=tmp_path / "a")
    cached = dict(models._CACHE)
    sf.run(task="txt2img", model="tiny_random", seeds=[1], steps=1, logger="none", run_dir=tmp_path / "b")
    assert models._CACHE == cached  # same entries, same objects
    assert "Loaded model" not in (tmp_path / "b" / "app.log").read_text()
    (tiny,) = [c for c in cached.values() if c.source == "builtin:tiny_random"]
    assert sf.load_model("tiny_random").unet is tiny.unet  # the lower level shares the cache


def test_lower_level_gives_the_run_s_pixels(tmp_path):
    """load_model + sampler + a rule object, by hand, give the pixels sf.run writes for the same settings."""
    prompt = "a small blue triangle on a white background"
    model = sf.load_model("shapes")
    sampler = sf.sampler(model, "ddim")
    guidance = sf.Guidance("constant", sf.plugins.guidance_rule.apg(eta=0.5))
    gen = sampler.txt2img([prompt, prompt], [3, 4], [7.5, 2.0], steps=5, guidance=guidance, progress=False)
    res = sf.run(task="txt2img", prompts=[prompt], seeds=[3, 4], guidance_scales=[7.5, 2.0], steps=5,
                 scheduler="ddim", logger="none", progress=False, run_dir=tmp_path,
                 **{"guidance.rule": "apg", "+guidance.rule_params.eta": 0.5})
    by_hand = sf.to_pil(gen)
    ran = res.images.where(seed=3, guidance_scale=7.5) + res.images.where(seed=4, guidance_scale=2.0)
    assert [np.asarray(a).tolist() for a in by_hand] == [np.asarray(b).tolist() for b in ran]
    assert gen.latents.shape == (2, 4, 8, 8)


def test_plugins_namespace_checks_parameters():
    assert "apg" in dir(sf.plugins.guidance_rule)
    with pytest.raises(PluginError, match="Did you mean 'momentum'"):
        sf.plugins.guidance_rule.apg(momentun=1)
    with pytest.raises(PluginError, match="momentum=2"):
        sf.plugins.guidance_rule.apg(momentum=2)
    with pytest.raises(PluginError, match="Did you mean 'apg'"):
        sf.plugins.guidance_rule.apgg


def test_python_values_reach_the_config_unchanged():
    """Keyword values go through Hydra's override grammar: quotes, backslashes, ${...}, words that are
    literals (null, true, 1.5), commas and brackets all come out as the same Python value."""
    prompts = ["it's a \"red\" circle", "back\\slash", "ends with\\", "\\'", "a, b", "null", "true", "1.5",
               "${oops}", "x \\${y}", "[x]", "  spaced ", "ünï", "a=b", ""]
    cfg = sf.compose(None, prompts=prompts, guidance_scales=[-7.5, 1e-3, 2, 1e20], seeds=[0, 2**63],
                     model={"height": 48}, task="img2img", init_image=Path("/tmp/a b.png"))
    assert list(cfg.prompts) == prompts
    assert list(cfg.guidance_scales) == [-7.5, 1e-3, 2, 1e20] and list(cfg.seeds) == [0, 2**63]
    assert cfg.model.height == 48 and cfg.init_image == "/tmp/a b.png"


def test_import_is_cheap():
    code = "import sys, stablefused as sf; sf.plugins; assert not {'torch', 'hydra', 'diffusers'} & set(sys.modules)"
    res = subprocess.run([sys.executable, "-c", "import stablefused; " + code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_readme_from_python_uses_the_api_that_exists():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for code in blocks:
        compile(code, "README", "exec")
        used = set(re.findall(r"\bsf\.(\w+)", code))
        assert used <= set(sf.__all__), used - set(sf.__all__)
    for link in re.findall(r"\]\((examples/[^)]+\.ipynb)\)", section):
        assert (Path(__file__).resolve().parents[1] / link).is_file(), link
    assert len(re.findall(r"examples/\w+\.ipynb", section)) == 6


def test_interrupt_keeps_the_images_and_the_same_call_continues(tmp_path, monkeypatch):
    """An interrupt (the kernel's SIGINT) ends sf.run with KeyboardInterrupt naming the run dir; status.json says
    failed, the images made so far stay, and the same call with that run_dir makes only the rest."""
    import signal

    from stablefused import app, signals

    kw = dict(task="txt2img", model="tiny_random", seeds=[0, 1, 2], steps=2, batch_size=1, logger="none",
              progress=False, run_dir=tmp_path)
    real = app.Run.add_images

    def add_images(self, images, records):  # the signal arrives after the first image is written
        real(self, images, records)
        raise signals.Interrupted(signal.SIGINT)

    monkeypatch.setattr(app.Run, "add_images", add_images)
    with pytest.raises(KeyboardInterrupt, match=f"SIGINT: the images made so far are in {tmp_path}"):
        sf.run(**kw)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
    monkeypatch.setattr(app.Run, "add_images", real)
    res = sf.run(**kw)
    assert len(res.images) == 2 * 3 and res.stats["kept"] == 1  # 2 example prompts x 3 seeds and res.status["status"] == "ok"


def test_wandb_when_asked(tmp_path):
    """logger=wandb from Python: the run's offline W&B run, in its run dir, with the images and the grid."""
    from tests.test_app import read_wandb

    res = sf.run(task="txt2img", model="tiny_random", seeds=[0], steps=1, guidance_scales=[0, 5], logger="wandb",
                 progress=False, run_dir=tmp_path)
    (records,) = read_wandb(res.dir)
    run_rec = next(r for r in records if r["type"] == "run")["run"]
    assert '"guidance_scales"' in json.dumps(run_rec["config"])
    files = [f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]]
    assert sum("media/images/images_" in f for f in files) == len(res.images) == 4
    assert any("media/images/grid" in f for f in files)
