"""The presets follow a small model's input size (or ``image_size``), exact at the papers' size; every result
carries its protocol card; ``seeds`` gives mean ± std with the per-seed values."""
from __future__ import annotations

import json
import statistics
from importlib import metadata
from types import SimpleNamespace

import pytest

from support.evaldata import imagenet_tree, tiny_vit, voc_tree

from ssl_modules.evaluation import evaluate
from ssl_modules.evaluation.api import resolve_settings
from ssl_modules.evaluation.sizes import scaled_settings, size_rule

FAST = {"linear": {"epochs": 1, "batch_size": 6}, "hummingbird": {"memory_size": 96},
        "voc-linear": {"iterations": 2, "batch_size": 4}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("size_data")
    return {"imagenet": str(imagenet_tree(root / "imagenet")), "voc": str(voc_tree(root / "voc"))}


def _model(size: int, stride: int) -> SimpleNamespace:
    """What the size rule reads of a backbone: its stride and its ViT's img_size."""
    return SimpleNamespace(stride=stride, model=SimpleNamespace(patch_embed=SimpleNamespace(img_size=(size, size))))


def _sizes(rule) -> dict[str, tuple[int, ...]]:
    knn = scaled_settings("knn", resolve_settings("knn", None, None), rule)
    linear = scaled_settings("linear", resolve_settings("linear", None, None), rule)
    segmentation = scaled_settings("voc-linear", resolve_settings("voc-linear", None, None), rule)
    hummingbird = scaled_settings("hummingbird", resolve_settings("hummingbird", None, None), rule)
    return {"knn": (knn.image_size,), "linear": (linear.image_size,), "hummingbird": (hummingbird.input_size,),
            "voc-linear": (segmentation.crop_size, segmentation.stride)}


def test_a_model_of_the_papers_size_keeps_the_presets_exactly():
    for size in (224, 518):  # DINOv2's ViTs are built for 518 px: still the papers' protocol
        rule = size_rule(_model(size, 14))
        assert _sizes(rule) == {"knn": (224,), "linear": (224,), "hummingbird": (512,), "voc-linear": (512, 480)}
        assert scaled_settings("hummingbird", resolve_settings("hummingbird", None, None), rule).memory_size == \
            10_240_000


def test_a_small_model_is_evaluated_at_its_own_size_every_size_scaled_alike():
    rule = size_rule(_model(32, 8))  # the quickstart's micro ViT
    assert rule.image_size == 32 and "32 px" in rule.reason
    # 512 x 32/224 = 73.1 and 480 x 32/224 = 68.6, rounded to whole patches of 8
    assert _sizes(rule) == {"knn": (32,), "linear": (32,), "hummingbird": (72,), "voc-linear": (72, 72)}
    # the memory (patches) scales with the area: 10,240,000 x (32/224)^2
    memory = scaled_settings("hummingbird", resolve_settings("hummingbird", None, None), rule).memory_size
    assert memory == round(10_240_000 / 49)


def test_image_size_chooses_the_size_whatever_the_model():
    assert _sizes(size_rule(_model(32, 8), image_size=48)) == {"knn": (48,), "linear": (48,),
                                                               "hummingbird": (112,), "voc-linear": (112, 104)}
    assert _sizes(size_rule(_model(32, 8), image_size=224))["hummingbird"] == (512,)
    with pytest.raises(ValueError, match="--image_size"):
        size_rule(_model(32, 8), image_size=4)


def test_evaluate_scales_to_the_model_and_keeps_a_size_the_user_gave(data):
    report = evaluate(tiny_vit(), ["knn", "hummingbird"], imagenet=data["imagenet"], voc=data["voc"],
                      voc_classes=4, overrides={"hummingbird": {"input_size": 40, **FAST["hummingbird"]}},
                      batch_size=4, show_progress=False)
    knn, hummingbird = report.results
    assert knn.settings["image_size"] == 32 and hummingbird.settings["input_size"] == 40
    assert knn.card["resolution"].startswith("32 px") and "model's input size 32 px" in knn.card["size_rule"]


def test_every_result_carries_its_protocol_card_in_the_json_and_the_table(data, tmp_path):
    evaluate(tiny_vit(), ["knn", "hummingbird"], imagenet=data["imagenet"], voc=data["voc"],
             voc_classes=4, overrides={"hummingbird": FAST["hummingbird"]}, batch_size=4,
             show_progress=False, output=tmp_path)
    written = json.loads((tmp_path / "evaluation.json").read_text())
    knn, hummingbird = (result["card"] for result in written["results"])
    version = metadata.version("ssl-modules")
    assert knn["preset"] == "dino" and knn["k"] == [10, 20, 100, 200] and knn["temperature"] == 0.07
    assert knn["data"].endswith(data["imagenet"]) and "val" in knn["split"] and knn["version"] == version
    assert hummingbird["memory_size"] == 96 and hummingbird["k"] == 30 and hummingbird["temperature"] == 0.02
    assert hummingbird["matching"].startswith("Hungarian") and hummingbird["seeds"] == [0]
    assert hummingbird["resolution"] == "72 x 72 px (squashed)"
    table = (tmp_path / "evaluation.txt").read_text()
    assert table.count("card: protocol") == 2 and f"version {version}" in table


def test_seeds_report_mean_and_std_with_the_values_of_each_seed(data, tmp_path):
    report = evaluate(tiny_vit(), ["knn", "linear"], imagenet=data["imagenet"], seeds=3,
                      overrides={"linear": FAST["linear"]}, batch_size=4, show_progress=False, output=tmp_path)
    knn, linear = report.results
    assert knn.per_seed == [] and knn.std == {} and knn.card["seeds"].startswith("deterministic")
    assert linear.card["seeds"] == [0, 1, 2] and len(linear.per_seed) == 3
    values = [run["top1"] for run in linear.per_seed]
    assert linear.metrics["top1"] == pytest.approx(statistics.mean(values))
    assert linear.std["top1"] == pytest.approx(statistics.stdev(values))
    single = evaluate(tiny_vit(), ["linear"], imagenet=data["imagenet"], overrides={"linear": {**FAST["linear"],
                      "seed": 2}}, batch_size=4, show_progress=False)
    assert single.results[0].metrics["top1"] == values[2]  # the third run is seed 2
    assert "±" in (tmp_path / "evaluation.txt").read_text()
    assert len(json.loads((tmp_path / "evaluation.json").read_text())["results"][1]["per_seed"]) == 3


def test_seeds_below_one_are_refused():
    with pytest.raises(ValueError, match="seeds=0"):
        evaluate(tiny_vit(), ["knn"], imagenet="/nowhere", seeds=0)


def test_linear_without_augmentation_trains_on_features_extracted_once(data, monkeypatch):
    from ssl_modules.evaluation import linear

    calls = []
    original = linear._train_transform
    monkeypatch.setattr(linear, "_train_transform", lambda *args: calls.append(args) or original(*args))
    report = evaluate(tiny_vit(), ["linear"], imagenet=data["imagenet"],
                      overrides={"linear": {**FAST["linear"], "epochs": 3, "augment": False}}, batch_size=4,
                      show_progress=False)
    result = report.results[0]
    assert calls == [(32, 0, 0)]  # only the probe of the feature width; no augmented epoch
    assert 0.0 <= result.metrics["top1"] <= 1.0 and result.card["augmentation"].startswith("none")
