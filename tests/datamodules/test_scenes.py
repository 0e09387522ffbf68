import numpy as np
import pytest

from datamodules.synthetic import SceneConfig

from datamodules.synthetic import render_scene


def test_a_palette_restricts_every_colour_of_the_scene():
    palette = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    scene = render_scene(np.random.default_rng(0), 48, 6, dominant=2, palette=palette, noise=0.0,
                         object_textures={"solid": 1.0}, background_textures={"solid": 1.0})
    colours = {tuple(c) for c in scene.image.reshape(-1, 3).tolist()}
    assert colours <= {(255, 0, 0), (0, 0, 255)}


def test_upright_objects_do_not_rotate():
    def dominant_mask(max_rotation, seed):
        scene = render_scene(np.random.default_rng(seed), 64, 6, dominant=1, objects=(1, 1), noise=0.0,
                             max_rotation=max_rotation)
        return scene.instances == 0
    # a square (class 1) drawn upright fills its bounding box; rotated, it does not
    for seed in range(5):
        mask = dominant_mask(0.0, seed)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert box.mean() > 0.97
    rotated = [dominant_mask(180.0, seed) for seed in range(5)]
    fills = []
    for mask in rotated:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        fills.append(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].mean())
    assert min(fills) < 0.9


@pytest.mark.parametrize("kwargs, message", [(dict(style="busy"), "style"), (dict(palette_size=1), "palette_size"),
                                             (dict(max_rotation=200.0), "max_rotation"),
                                             (dict(dominant_area=(0.3, 0.2)), "dominant_area"),
                                             (dict(other_area=(0.0, 0.1)), "other_area")])
def test_impossible_scene_parameters_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SceneConfig(**kwargs)


def test_style_palette_and_rotation_are_part_of_the_cache_key():
    keys = {SceneConfig().key(), SceneConfig(style="flat").key(), SceneConfig(palette_size=4).key(),
            SceneConfig(max_rotation=0.0).key(), SceneConfig(dominant_area=(0.1, 0.2)).key()}
    assert len(keys) == 5


@pytest.mark.parametrize("palette_size", [None, 4])
def test_every_object_stands_out_from_the_background_around_it(palette_size):
    palette = SceneConfig(palette_size=palette_size).palette()
    for seed in range(40):
        scene = render_scene(np.random.default_rng(seed), 48, 6, dominant=seed % 6, objects=(1, 2), noise=0.0,
                             palette=palette, object_textures={"solid": 1.0}, background_textures={"solid": 1.0})
        pixels = scene.image.reshape(-1, 3).astype(np.float32) / 255
        background_colours = np.unique(pixels[scene.instances.ravel() == -1], axis=0)  # one or two (blobs)
        for obj in range(len(scene.classes)):
            inside = pixels[scene.instances.ravel() == obj]
            if len(inside) and len(background_colours):
                distances = np.linalg.norm(background_colours - inside.mean(0), axis=1)
                assert distances.min() >= 0.3, (seed, obj)


def test_palette_colours_are_far_apart():
    palette = SceneConfig(palette_size=6).palette()
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1)[np.triu_indices(6, 1)]
    assert distances.min() > 0.5


def test_generated_objects_cover_the_configured_share_of_the_image(tmp_path):
    from PIL import Image

    from datamodules.synthetic import generate_scenes
    config = SceneConfig(image_size=64, num_classes=4, num_train=8, num_val=1, objects=(1, 1),
                         dominant_area=(0.08, 0.12))
    generate_scenes(config, tmp_path)
    masks = sorted((tmp_path / "voc" / "VOC2012" / "SegmentationClass").glob("*.png"))
    assert len(masks) == 9
    for path in masks:
        assert 0.07 <= (np.array(Image.open(path)) > 0).mean() <= 0.13


def test_several_copies_of_the_labelled_class_each_get_their_own_place():
    for seed in range(10):
        scene = render_scene(np.random.default_rng(seed), 64, 6, dominant=3, objects=(2, 2), dominant_copies=(3, 3),
                             dominant_area=(0.04, 0.06), other_area=(0.01, 0.02), noise=0.0)
        assert scene.classes[:3] == [3, 3, 3] and scene.classes[3] != 3
        assert scene.label == 3
        centres = [np.argwhere(scene.instances == obj).mean(0) for obj in range(3) if (scene.instances == obj).any()]
        assert len(centres) >= 2
        assert min(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]) > 0


def test_the_label_is_the_class_with_the_largest_visible_area_over_its_copies():
    for seed in range(20):
        scene = render_scene(np.random.default_rng(seed), 48, 6, dominant=0, objects=(2, 3), dominant_copies=(1, 3),
                             noise=0.0)
        areas = np.bincount(scene.instances.ravel() + 1, minlength=len(scene.classes) + 1)[1:]
        per_class = np.bincount(scene.classes, weights=areas, minlength=6)
        assert scene.label == int(np.argmax(per_class))


def test_a_patterned_fill_always_shows_two_colours():
    palette = SceneConfig(palette_size=3).palette()
    for seed in range(20):
        scene = render_scene(np.random.default_rng(seed), 48, 6, dominant=0, objects=(1, 1), noise=0.0, palette=palette,
                             object_textures={"checker": 1.0}, background_textures={"solid": 1.0})
        inside = scene.image[scene.instances == 0]
        assert len(np.unique(inside, axis=0)) >= 2, seed


def test_dominant_copies_are_validated_and_part_of_the_cache_key():
    with pytest.raises(ValueError, match="dominant_copies"):
        SceneConfig(dominant_copies=(0, 2))
    assert SceneConfig(dominant_copies=(2, 3)).key() != SceneConfig().key()
