"""The real user's path, end to end through the CLI: a SAM 3 folder in the hub's exact layout
(``sam3_video`` config, full widths, 1008 px, prefixed safetensors; fewer layers and random
weights so that it runs on two CPU cores), given as a relative ``--model`` path, with the
shipped spaces unchanged but for ``--set``: one stage-1 trial, one stage-2 trial, ``best``,
``predict`` on one lesion, and the same adapters after the model folder has moved.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest
from hub_layout import build_hub_layout, build_nested_layout

from angiotune.cli import main
from angiotune.data.ingest import IndexSettings, build_index
from angiotune.data.phantoms import PhantomSettings, generate_phantoms
from angiotune.model.heads import has_heads
from angiotune.model.sam3 import ModelError, load_base_model

# One trial of one epoch: what this test checks is that every step runs on the real layout.
ONE_TRIAL = ["--set", "samples=1", "--set", "epochs=1", "--set", "asha=off",
             "--keep-below-zero-shot"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: ``models/sam3`` as downloaded, and a small export indexed, cut to two
    training lesions and one validation lesion of one vessel (a 1008 px step takes seconds on
    two cores)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("user")
    build_hub_layout(root / "models" / "sam3")
    generate_phantoms(root / "export", PhantomSettings(lesions=8, size=256, frames=2, seed=1,
                                                       messy=False))
    report = build_index(root / "export" / "manifest.csv", root / "full.parquet",
                         IndexSettings(salt="real-layout"))
    lad = report.index[report.index["vessel"] == "LAD"]
    keep = [*lad[lad["split"] == "train"]["sample_id"][:2],
            *lad[lad["split"] == "val"]["sample_id"][:1]]
    table = pq.read_table(root / "full.parquet")
    pq.write_table(table.filter(pc.is_in(table["sample_id"], pa.array(keep))),
                   root / "index.parquet")  # the index's metadata goes with its schema
    return root


@pytest.mark.slow
def test_a_checkpoint_that_leaves_the_decoder_unfilled_is_refused(tmp_path, capsys):
    nested = build_nested_layout(tmp_path / "saved")
    with pytest.raises(ModelError, match=r"missing from the checkpoint.*mask_decoder"
                                         r".*transformers 5\."):
        load_base_model(nested)
    code = main(["search", "--space", "lora_rank.yaml", "--model", str(nested),
                 "--results", str(tmp_path / "results"), *ONE_TRIAL])
    err = capsys.readouterr().err
    assert code == 2 and "was not filled from this checkpoint" in err
    assert "Traceback" not in err
    assert not (tmp_path / "results" / "searches").exists()  # refused before any search


@pytest.mark.slow  # the user's folder: phantoms and a full-width 1008 px model, loaded twice
def test_the_hub_folder_fills_the_tracker_and_the_concept_model(workspace):
    from angiotune.model.sam3 import image_size_of, load_prompt_tokenizer, model_config
    from angiotune.search.api import check_weights

    folder = workspace / "models" / "sam3"
    for mode in ("box", "text_box"):  # every weight of each from the checkpoint, or refused
        check_weights(folder, mode)
        assert image_size_of(model_config(folder, mode)) == 1008
    assert load_prompt_tokenizer(folder)("mid LAD stenosis")["input_ids"]


@pytest.mark.slow
@pytest.mark.ray
def test_hub_layout_through_the_cli_with_a_relative_model_path(workspace, ray_cluster,
                                                               monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    started = time.perf_counter()
    common = ["--model", "models/sam3", "--data", "index.parquet", "--results", "results",
              *ONE_TRIAL]
    assert main(["search", "--space", "lora_rank.yaml", *common]) == 0
    stage1 = capsys.readouterr().out
    assert "1008 px, batch 1, CPU only" in stage1
    assert main(["search", "--space", "stage2_multitask.yaml", *common]) == 0
    capsys.readouterr()
    entries = {p.parent.name: json.loads(p.read_text())
               for p in Path("results/best").glob("versions/*/manifest.json")}
    assert entries, "no adapter kept"
    for entry in entries.values():
        assert entry["base_model"].startswith("sam3@")
        assert Path(entry["base_model_path"]).is_absolute()
    stage2 = json.loads(Path("results/searches/stage2_multitask/summary.json").read_text())
    assert stage2["trials"] == 1 and stage2["errors"] == 0 and not stage2["failed"]
    assert has_heads(Path(stage2["best"]["LAD"]["adapter"]))
    vessel = "LAD"
    assert main(["best", "--vessel", vessel]) == 0
    assert vessel in capsys.readouterr().out

    cine = next(Path("export").rglob("*.dcm"))
    args = ["predict", str(cine), "--vessel", vessel, "--box", "90,90,170,170", "--frame", "0",
            "--out", "predictions"]
    assert main(args) == 0
    [lesion] = Path("predictions").glob("*_lesion*.json")  # beside predictions.json
    report = json.loads(lesion.read_text())
    assert report["adapter"]["vessel"] == vessel and report["segmentation"]["area_px"] >= 0

    # Moved, the folder is the same checkpoint: the kept adapters still load.
    shutil.move("models", "moved")
    assert main([*args[:-1], "predictions-moved", "--model", "moved/sam3"]) == 0
    assert list(Path("predictions-moved").glob("*_lesion*.json"))
    print(f"real-layout CLI path: {time.perf_counter() - started:.0f} s")
