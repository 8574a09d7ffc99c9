"""The model card evaluate writes (issue 31 item 5): the run's own records, the metrics with their intervals, and the
author's sections under the reporting checklists' headings."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from csi_dist.evaluation.model_card import TO_FILL, write_model_card

AUTHOR_SECTIONS = ("Intended use", "Data", "Limitations", "Ethical considerations")


def sections(card: str) -> dict[str, str]:
    """{heading without its number: text under it}."""
    parts = re.split(r"^## \d+\. (.+)$", card, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_evaluate_writes_a_model_card_from_the_runs_records(trained_run: Path):
    evaluation = trained_run / "evaluation"  # the fixture evaluated the test split
    card = (evaluation / "model_card.md").read_text()
    origin = json.loads((trained_run / "provenance.json").read_text())["origin"]
    metrics = json.loads((evaluation / "test_metrics.json").read_text())
    found = sections(card)
    assert list(found) == ["Model details", "Intended use", "Data", "Performance", "Calibration", "Subgroups",
                           "Limitations", "Ethical considerations"]
    assert all(TO_FILL in found[name] for name in AUTHOR_SECTIONS)
    assert origin["code"]["commit"] in found["Model details"] and "Tiny_CNN" in found["Model details"]
    assert origin["data"]["manifest_sha256"] in found["Data"]
    low, high = metrics["intervals"]["f1_weighted"]
    assert f"| f1_weighted | {metrics['f1_weighted']:.3f} ({low:.3f}-{high:.3f}) |" in found["Performance"]
    assert f"test ({metrics['n_images']} images)" in found["Performance"]
    # the phantom's train split from the manifest, graded zones counted over all six zones
    manifest = json.loads((Path(origin["data"]["shard_dir"]) / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    normal = sum(train["label_histogram"][zone][0] for zone in train["label_histogram"])
    assert re.search(rf"^\| train \| {train['count']} \| \d+ \| {normal} \|", found["Data"], flags=re.MULTILINE)
    assert f"split test has {metrics['n_images']} images: its intervals are wide" in found["Limitations"]


def test_the_card_says_what_the_records_show_a_reader_should_weigh(trained_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    provenance["origin"]["code"]["dirty"] = True
    provenance["segments"][-1]["outcome"] = "completed WITHOUT VALIDATION (the val split is empty)"
    (run_dir / "provenance.json").write_text(json.dumps(provenance))
    evaluation = run_dir / "evaluation"
    evaluated = json.loads((evaluation / "provenance.json").read_text())
    evaluated["evaluated"]["manifest_sha256"] = "0" * 64  # another dataset's shards: an external validation
    evaluated["evaluated"]["shard_dir"] = "/data/other_site"
    (evaluation / "provenance.json").write_text(json.dumps(evaluated))
    metrics = json.loads((evaluation / "test_metrics.json").read_text())
    metrics["decode_failures"] = 2
    (evaluation / "test_metrics.json").write_text(json.dumps(metrics))

    (evaluation / "test_subgroups.csv").write_text(  # as evaluate --by site writes it: B flagged, C too small
        "column;value;n_images;n_patients;status;metric;estimate;ci_low;ci_high;overall;flag\n"
        "site;A;40;20;estimated;f1_weighted;0.8;0.7;0.9;0.75;0\n"
        "site;B;40;20;estimated;f1_weighted;0.5;0.4;0.6;0.75;1\n"
        "site;C;6;3;too small to estimate;;;;;;\n")

    found = sections(write_model_card(evaluation, run_dir).read_text())
    assert "**flagged** (interval wholly worse than the whole split's estimate): site = B on f1_weighted" in \
        found["Subgroups"] and "too small to estimate: site = C (6 images)" in found["Subgroups"]
    limitations = found["Limitations"]
    assert "uncommitted changes" in limitations and "without a validation split" in limitations
    assert "split test: 2 image(s) could not be decoded" in limitations
    assert "Performance on the external data" in found
    assert "**Evaluated on other data**: `/data/other_site`" in found["Data"]
