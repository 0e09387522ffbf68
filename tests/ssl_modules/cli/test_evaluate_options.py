"""``evaluate``'s options of the size rule, the segmentation data sets and the seeds: shown in ``--help``,
parsed into ``evaluate``'s arguments, a bad value refused before the model is loaded."""
from __future__ import annotations

import pytest

from ssl_modules.cli.evaluate import check_command_line, main, parse
from ssl_modules.cli._errors import CommandLineError


def test_help_shows_the_size_option_the_data_sets_and_the_seeds(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--image_size", "--seeds", "--seg_dataset", "--seg_root", "--linear.augment"):
        assert option in text
    for dataset in ("ade20k", "cityscapes", "coco-stuff"):
        assert dataset in text


def test_the_options_reach_evaluate():
    kwargs = parse(["model.ckpt", "--protocols", "hummingbird", "--seg_dataset", "cityscapes", "--seg_root", "/data/cs",
                    "--image_size", "48", "--seeds", "3"])
    assert (kwargs["seg_dataset"], kwargs["seg_root"], kwargs["image_size"], kwargs["seeds"]) == \
        ("cityscapes", "/data/cs", 48, 3)
    check_command_line(kwargs)


def test_a_segmentation_protocol_without_its_root_names_the_option():
    kwargs = parse(["model.ckpt", "--protocols", "voc-linear", "--seg_dataset", "ade20k"])
    with pytest.raises(CommandLineError, match="--seg_root"):
        check_command_line(kwargs)


def test_an_unknown_segmentation_data_set_is_a_bad_command_line(capsys):
    assert main(["model.ckpt", "--protocols", "hummingbird", "--seg_dataset", "kitti", "--seg_root", "/x"]) == 2
    assert "kitti" in capsys.readouterr().err
