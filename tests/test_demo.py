"""`vas demo`'s pipeline at a seconds-long size on the tiny model: stages written, reused on a rerun."""

import json
import shutil

import datasets
import pytest

from vas.demo import DemoSize, run_demo
from vas.pipeline import Recipe

TINY = DemoSize(train_prompts=6, eval_prompts=3, recipe=Recipe(samples_per_prompt=2, max_new_tokens=4, epochs=1.0, batch_size=4),
                betas=(2.0,), best_of=(1, 2))


def test_demo_stages_and_rerun(tiny_model_dir, tmp_path):
    logs = []
    report = run_demo(tmp_path / "d", base_model=tiny_model_dir, size=TINY, progress=False, log=logs.append)
    assert json.loads((tmp_path / "d" / "eval" / "report.json").read_text()) == json.loads(json.dumps(report))
    assert [v["beta"] for v in report["vas"]] == [2.0]
    assert report["best_of_n"][0]["reward"] == pytest.approx(report["plain"]["reward"], abs=1e-6)  # best of 1 = plain
    assert len(datasets.load_from_disk(str(tmp_path / "d" / "samples"))) == TINY.train_prompts * TINY.recipe.samples_per_prompt
    # a quarter of the tiny π0's 2 layers, rounded, at least 1
    assert json.loads((tmp_path / "d" / "value" / "vas_value_config.json").read_text())["num_layers"] == 1

    logs.clear()
    shutil.rmtree(tmp_path / "d" / "eval")
    run_demo(tmp_path / "d", base_model=tiny_model_dir, size=TINY, progress=False, log=logs.append)
    assert any(line.startswith("samples: reusing") for line in logs)
    assert any(line.startswith("value model: reusing") for line in logs)


def test_demo_refuses_a_folder_made_otherwise(tiny_model_dir, tmp_path):
    """A rerun with other demo settings, or into stages that predate recorded settings, is refused in one line,
    before anything is loaded or written."""
    from dataclasses import replace

    from vas.errors import VasError

    run_demo(tmp_path / "d", base_model=tiny_model_dir, size=TINY, progress=False, log=lambda _: None)
    settings = (tmp_path / "d" / "settings.json").read_text()
    assert json.loads(settings)["size"]["train_prompts"] == TINY.train_prompts
    with pytest.raises(VasError, match="holds results made with other settings"):
        run_demo(tmp_path / "d", base_model=tiny_model_dir, size=replace(TINY, best_of=(1, 2, 4)), progress=False,
                 log=lambda _: None)
    assert (tmp_path / "d" / "settings.json").read_text() == settings
    (tmp_path / "d" / "settings.json").unlink()  # a folder from before settings were recorded
    with pytest.raises(VasError, match="holds stages made before their settings were recorded"):
        run_demo(tmp_path / "d", base_model=tiny_model_dir, size=TINY, progress=False, log=lambda _: None)
