"""The protocols end to end on tiny data in the real layouts, against values computed by hand from the
same features; the CLI; model sources; two processes give the one-process numbers."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F


from support.evaldata import imagenet_tree, tiny_vit, voc_tree  # noqa: E402

from ssl_modules.evaluation import EvalDataError, ModelSourceError, evaluate, load_backbone  # noqa: E402
from ssl_modules.cli.evaluate import main  # noqa: E402
from ssl_modules.evaluation.datasets import imagenet_split, voc_split  # noqa: E402
from ssl_modules.evaluation.transforms import normalise, resize_centre_crop, squash  # noqa: E402


def evaluate_tiny(*args, **kwargs):
    """``evaluate`` on the 4-class VOC tree of ``voc_tree``."""
    return evaluate(*args, voc_classes=4, **kwargs)

TINY = {"knn": {"image_size": 32},
        "linear": {"epochs": 2, "batch_size": 6, "image_size": 32},
        "hummingbird": {"input_size": 32, "memory_size": 96},
        "voc-linear": {"iterations": 3, "batch_size": 4, "crop_size": 32, "stride": 24}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("evaluation_data")
    return {"imagenet": str(imagenet_tree(root / "imagenet")), "voc": str(voc_tree(root / "voc"))}


def _features(backbone, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    rows, labels = [], []
    with torch.no_grad():
        for index in range(len(dataset)):
            image, label = dataset[index]
            rows.append(backbone(image[None]).global_[0])
            labels.append(label)
    return torch.stack(rows), torch.tensor(labels)


def test_knn_equals_dino_vote_on_the_same_features(data):
    backbone = tiny_vit()
    report = evaluate_tiny(backbone, ["knn"], imagenet=data["imagenet"], overrides={"knn": {"image_size": 32}},
                      batch_size=4, show_progress=False)
    transform = lambda image, index: normalise(resize_centre_crop(image, 32))  # noqa: E731
    bank, bank_labels = _features(backbone, imagenet_split(data["imagenet"], "train", transform))
    queries, labels = _features(backbone, imagenet_split(data["imagenet"], "val", transform))
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    metrics = report.results[0].metrics
    for k in (10, 20, 100, 200):
        correct = 0
        for query, label in zip(queries, labels):
            similarity = bank @ query
            top = similarity.argsort(descending=True)[:k]
            votes = torch.zeros(3)
            for neighbour in top:
                votes[bank_labels[neighbour]] += torch.exp(similarity[neighbour] / 0.07)
            correct += int(votes.argmax() == label)
        assert metrics[f"top1@k{k}"] == pytest.approx(correct / len(labels))
    assert report.results[0].floors["chance_top1"] == pytest.approx(1 / 3)


def test_hummingbird_floors_are_those_of_the_squashed_validation_masks(data):
    report = evaluate_tiny(tiny_vit(), ["hummingbird"], voc=data["voc"], overrides={"hummingbird": TINY["hummingbird"]},
                      batch_size=4, show_progress=False)
    result = report.results[0]
    val = voc_split(data["voc"], "val", lambda image, mask, index: squash(image, mask, 32), num_classes=4)
    masks = torch.stack([val[i][1] for i in range(len(val))])
    labelled = masks[masks != 255]
    assert result.floors["all_background_miou"] == pytest.approx(float((labelled == 0).float().mean()) / 4)
    # 96 patches over 6 images x 2 augmentation passes: 8 per image, as open-HB's memory_size // (N * epochs).
    assert result.metrics["memory_entries"] == 96
    assert result.metrics["miou_identity"] <= result.metrics["miou"] <= 1.0


def test_hummingbird_ignore_handling_is_an_option(data):
    common = dict(voc=data["voc"], batch_size=4, show_progress=False)
    mapped = evaluate_tiny(tiny_vit(), ["hummingbird"],
                           overrides={"hummingbird": {**TINY["hummingbird"], "memory_size": None}}, **common)
    left_out = evaluate_tiny(tiny_vit(), ["hummingbird"],
                        overrides={"hummingbird": {**TINY["hummingbird"], "memory_size": None,
                                                   "background_for_ignore": False}}, **common)
    assert mapped.results[0].settings["background_for_ignore"] is True
    assert left_out.results[0].metrics["memory_entries"] <= mapped.results[0].metrics["memory_entries"]


def test_knn_and_linear_share_one_extraction_of_the_validation_set(data, monkeypatch):
    from ssl_modules.evaluation import features

    calls = []
    original = features.Extractor._extract
    monkeypatch.setattr(features.Extractor, "_extract",
                        lambda self, dataset, select, desc: calls.append(desc) or original(self, dataset, select, desc))
    evaluate_tiny(tiny_vit(), ["knn", "knn"], imagenet=data["imagenet"], overrides={"knn": TINY["knn"]},
             batch_size=4, show_progress=False)
    assert calls == ["knn: train features", "knn: val features"]


def test_linear_and_voc_linear_report_their_metrics_and_floors(data, tmp_path):
    report = evaluate_tiny(tiny_vit(), ["linear", "voc-linear"], imagenet=data["imagenet"], voc=data["voc"],
                      presets={"linear": "bam", "voc-linear": "vicregl"},
                      overrides={"linear": TINY["linear"], "voc-linear": TINY["voc-linear"]},
                      batch_size=4, show_progress=False, output=tmp_path)
    linear, segmentation = report.results
    assert linear.preset == "bam" and linear.settings["features"] == "cls_mean" and linear.settings["batchnorm"]
    assert linear.metrics["top5"] == 1.0  # 3 classes: the true one is always among the top 5
    assert segmentation.settings["recipe"]["optimizer"] == "adamw"
    assert set(segmentation.floors) >= {"all_background_miou", "all_background_miou_present"}
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert [r["protocol"] for r in written["results"]] == ["linear", "voc-linear"]
    assert "floors" in (tmp_path / "evaluation.txt").read_text()


def test_missing_data_fails_before_any_extraction(tmp_path):
    with pytest.raises(EvalDataError, match="train"):
        evaluate_tiny(tiny_vit(), ["knn"], imagenet=str(tmp_path / "nowhere"), show_progress=False)
    with pytest.raises(ValueError, match="--voc"):
        evaluate_tiny(tiny_vit(), ["hummingbird"], show_progress=False)


def test_an_unreadable_image_fails_evaluate_naming_it(tmp_path):
    """The evaluation rule for unreadable files (the probes' data follows it too): an error naming the file,
    never another image in its place."""
    from datamodules.datasets import UnreadableImageError

    root = imagenet_tree(tmp_path / "imagenet")
    bad = sorted((root / "val").rglob("*.JPEG"))[4]  # not the first: the check before extraction passes
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(UnreadableImageError, match=bad.name):
        evaluate_tiny(tiny_vit(), ["knn"], imagenet=str(root), overrides={"knn": TINY["knn"]}, batch_size=4,
                      show_progress=False)
    voc = voc_tree(tmp_path / "voc")
    bad_mask = sorted((voc / "VOCdevkit/VOC2012/SegmentationClass").glob("val_*.png"))[2]
    bad_mask.write_bytes(b"not a png")
    with pytest.raises(EvalDataError, match=bad_mask.name):  # the check of every mask's header finds it first
        evaluate_tiny(tiny_vit(), ["hummingbird"], voc=str(voc), overrides={"hummingbird": TINY["hummingbird"]},
                      batch_size=4, show_progress=False)


def test_exported_backbone_and_timm_name_load(tmp_path):
    backbone = tiny_vit()
    torch.save(backbone.timm_state_dict(), tmp_path / "backbone.pt")
    meta = {"name": backbone.name, "model_kwargs": {**backbone.model_kwargs, "num_classes": 0}}
    (tmp_path / "backbone.json").write_text(json.dumps(meta))
    loaded = load_backbone(tmp_path / "backbone.pt")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images).global_, backbone.eval()(images).global_)
    (tmp_path / "backbone.json").unlink()
    with pytest.raises(ModelSourceError, match="json"):
        load_backbone(tmp_path / "backbone.pt")
    with pytest.raises(ModelSourceError, match="timm"):
        load_backbone("vit_smal_patch16_224")


def test_cli_help_lists_protocols_and_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("knn", "linear", "voc-linear", "hummingbird", "open-hb", "cribo", "vicregl", "bam", "dino"):
        assert word in text


def test_cli_evaluates_a_timm_model_and_writes_json(data, tmp_path, capsys):
    code = main(["vit_tiny_patch16_224", "--protocols", "knn", "--imagenet", data["imagenet"],
                 "--knn.image_size", "32", "--timm_kwargs", "{img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, "
                 "num_heads: 2}", "--num_workers", "0", "--show_progress", "false", "--output", str(tmp_path)])
    assert code == 0
    assert "top1@k20" in capsys.readouterr().out
    assert json.loads((tmp_path / "evaluation.json").read_text())["results"][0]["protocol"] == "knn"


def test_cli_bad_data_exits_1_with_the_reason(tmp_path, capsys):
    """A failure while running (here: the data layout) exits 1 as in every command; 2 is a bad command line."""
    code = main(["vit_tiny_patch16_224", "--protocols", "hummingbird", "--voc", str(tmp_path),
                 "--show_progress", "false", "--output", str(tmp_path / "out")])
    assert code == 1
    assert "JPEGImages" in capsys.readouterr().err


def _evaluate_in_process(rank: int, world: int, data: dict[str, str]) -> list[dict]:
    report = evaluate_tiny(tiny_vit(), ["knn", "hummingbird", "linear", "voc-linear"], imagenet=data["imagenet"],
                      voc=data["voc"], presets={"linear": "dino", "voc-linear": "cribo"}, overrides=TINY,
                      batch_size=2, show_progress=False)
    return [r.metrics for r in report.results]


@pytest.mark.slow
def test_two_processes_give_the_one_process_numbers(data):
    from support.distributed_utils import run_distributed

    single = _evaluate_in_process(0, 1, data)
    for metrics in run_distributed(_evaluate_in_process, 2, (data,)):
        for one, two in zip(single, metrics):
            assert one.keys() == two.keys()
            for key in one:
                assert two[key] == pytest.approx(one[key], abs=1e-6), key


def test_a_checkpoint_is_evaluated_through_its_teacher_unless_the_student_is_asked_for(tmp_path):
    import lightning.pytorch as pl
    from support.common import TINY_VIT

    from ssl_modules.methods.cribo import CrIBo

    module = CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), out_dim=32, object_out_dim=32,
                   head_hidden_dim=32, head_bottleneck_dim=16, queue_size=8)
    with torch.no_grad():
        for parameter in module.teacher["backbone"].parameters():
            parameter.add_(1.0)  # teacher != student
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "cribo.ckpt")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        teacher = load_backbone(tmp_path / "cribo.ckpt")(images).global_
        student = load_backbone(tmp_path / "cribo.ckpt", teacher=False)(images).global_
        assert torch.allclose(teacher, module.teacher["backbone"].eval()(images).global_)
        assert torch.allclose(student, module.backbone.eval()(images).global_)
    assert not torch.allclose(teacher, student)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelSourceError, match="broken.ckpt"):
        load_backbone(tmp_path / "broken.ckpt")
