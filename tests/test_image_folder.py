"""dataset=image_folder: a user's own PNGs (written here) in the ImageFolder and CSV layouts, and through the
pipeline."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_config, run_cli
from influencelab.compose import build
from influencelab.data.image_folder import ImageFolder, count_classes
from influencelab.data.images import IMAGENET_MEAN, IMAGENET_STD
from influencelab.errors import ConfigError, DataNotFoundError

CLASSES = ("cat", "dog", "owl")
N_TRAIN, N_TEST, SIDE = 12, 4, 16


def write_folder(root: Path, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/NN.png``: 16x16 RGB, dark noise with a bright horizontal band whose
    position is the class (rows 0-5, 5-10, 10-15), so a small CNN can learn it."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (SIDE, SIDE, 3))
                a[c * 5:c * 5 + 6] += 180
                Image.fromarray(a.astype(np.uint8)).save(root / split / name / f"{i:02d}.png")
    return root


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def folder_rows(root: Path, split: str, absolute: bool = False,
                int_labels: bool = False) -> list[tuple[str, str]]:
    return [(str(p if absolute else p.relative_to(root)), str(c) if int_labels else name)
            for c, name in enumerate(CLASSES) for p in sorted((root / split / name).glob("*.png"))]


def spec(root: Path, **kw) -> ImageFolder:
    return ImageFolder(root=str(root), **{"image_size": SIDE, **kw})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "images")


def test_folder_layout_classes_labels_lengths_and_pixels(folder):
    s = spec(folder)
    assert s.classes == list(CLASSES) and s.num_classes == 3 == count_classes(str(folder))
    train, test = s.load()
    assert not train.in_memory and len(train) == 3 * N_TRAIN and len(test) == 3 * N_TEST
    assert train.targets.tolist() == [c for c in range(3) for _ in range(N_TRAIN)]
    assert test.targets.tolist() == [c for c in range(3) for _ in range(N_TEST)]
    assert train.classes == list(CLASSES) and train.num_classes == 3
    x = train.images([0, N_TRAIN + 1])
    assert x.shape == (2, 3, SIDE, SIDE) and x.dtype == torch.float32
    raw = np.asarray(Image.open(folder / "train" / "dog" / "01.png"), dtype=np.float32) / 255
    want = (torch.from_numpy(raw).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[1], want)
    xb, yb, pos = next(train.batches(5))
    assert xb.shape == (5, 3, SIDE, SIDE) and yb.tolist() == [0] * 5 and pos.tolist() == [0, 1, 2, 3, 4]


def test_grayscale_and_resize(folder):
    train, _ = spec(folder, channels=1, mean=[0.5], std=[0.5]).load()
    x = train.images([2 * N_TRAIN])[0]
    gray = np.asarray(Image.open(folder / "train" / "owl" / "00.png").convert("L"), dtype=np.float32) / 255
    assert x.shape == (1, SIDE, SIDE)
    torch.testing.assert_close(x[0], (torch.from_numpy(gray) - 0.5) / 0.5)
    big, _ = ImageFolder(root=str(folder), image_size=24).load()
    assert big.images([0]).shape == (1, 3, 24, 24)


def test_label_noise_flips_exactly_round_fraction(folder):
    n = 3 * N_TRAIN
    train, test = spec(folder, label_noise=0.25, seed=3).load()
    flipped = train.flipped
    assert int(flipped.sum()) == round(0.25 * n) == 9
    assert (train.targets[flipped] != train.clean_targets[flipped]).all()
    assert train.clean_targets.tolist() == [c for c in range(3) for _ in range(N_TRAIN)]
    assert not test.flipped.any()
    again, _ = spec(folder, label_noise=0.25, seed=3).load()
    assert torch.equal(again.targets, train.targets)
    sub, _ = spec(folder, subset=10, label_noise=0.5).load()
    assert len(sub) == 10 and int(sub.flipped.sum()) == 5


def test_csv_layout_gives_the_same_data(folder, tmp_path):
    ref_train, ref_test = spec(folder).load()
    # (1) explicit keys, paths relative to root, class names: same root, same files -> same cache key too
    write_csv(folder / "lists" / "train.csv", folder_rows(folder, "train"))
    write_csv(folder / "lists" / "test.csv", folder_rows(folder, "test"))
    s1 = spec(folder, train_csv="lists/train.csv", test_csv="lists/test.csv")
    # (2) auto-detected train.csv/test.csv in another root, absolute paths, integer labels
    other = tmp_path / "csv_root"
    write_csv(other / "train.csv", folder_rows(folder, "train", absolute=True, int_labels=True))
    write_csv(other / "test.csv", folder_rows(folder, "test", absolute=True, int_labels=True))
    s2 = spec(other)
    assert s1.classes == list(CLASSES) and s2.classes == ["0", "1", "2"] and s2.num_classes == 3
    assert count_classes(str(other)) == 3
    assert s1.cache_key() == spec(folder).cache_key()
    for s in (s1, s2):
        train, test = s.load()
        assert torch.equal(train.targets, ref_train.targets) and torch.equal(test.targets, ref_test.targets)
        idx = list(range(0, len(train), 5))
        assert torch.equal(train.images(idx), ref_train.images(idx))
        assert torch.equal(test.images(range(len(test))), ref_test.images(range(len(test))))


def test_csv_integer_labels_sort_numerically_and_row_order_is_sample_order(folder, tmp_path):
    labels = ["10", "2", "9", "2", "10", "9", "02", "10", "9", "2", "10"]
    paths = [p for p, _ in folder_rows(folder, "train", absolute=True)[:11]]
    rows = list(zip(paths, labels, strict=True))
    write_csv(tmp_path / "c" / "train.csv", rows)
    write_csv(tmp_path / "c" / "test.csv", rows[:3])
    s = spec(tmp_path / "c")
    assert s.classes == ["2", "9", "10"]
    train, test = s.load()
    assert train.targets.tolist() == [2, 0, 1, 0, 2, 1, 0, 2, 1, 0, 2] and test.targets.tolist() == [2, 0, 1]


def test_cache_key_tracks_the_files(folder, tmp_path):
    key = spec(folder).cache_key()
    assert spec(folder).cache_key() == key and spec(folder, check_images=False).cache_key() == key
    assert spec(folder, image_size=24).cache_key() != key
    shutil.copy(folder / "train" / "cat" / "00.png", folder / "train" / "cat" / "99.png")  # one more image
    added = spec(folder).cache_key()
    assert added != key
    (folder / "train" / "cat" / "99.png").rename(folder / "train" / "dog" / "99.png")  # relabelled
    assert spec(folder).cache_key() not in (key, added)
    (folder / "train" / "dog" / "99.png").unlink()
    assert spec(folder).cache_key() == key
    # a copy elsewhere: a new key by size (the root is part of it), the same by content (exact, location-free)
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert spec(copy).cache_key() != key
    assert spec(copy, fingerprint="content").cache_key() == spec(folder, fingerprint="content").cache_key()
    a = np.asarray(Image.open(copy / "test" / "owl" / "03.png")).copy()
    a[0, 0] ^= 1  # one pixel: the file may keep its size, the content fingerprint sees it
    Image.fromarray(a).save(copy / "test" / "owl" / "03.png")
    assert spec(copy, fingerprint="content").cache_key() != spec(folder, fingerprint="content").cache_key()


def one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_bad_layouts_one_line_errors(folder, tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        spec(tmp_path / "nothing")
    one_line(e, str(tmp_path / "nothing"), "dataset.root", "train.csv")
    with pytest.raises(ConfigError) as e:
        ImageFolder()
    one_line(e, "dataset.root=None", "train/<class>")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError) as e:
        spec(tmp_path / "empty")
    one_line(e, "train/", "train.csv", str(tmp_path / "empty"))
    write_csv(folder / "train.csv", folder_rows(folder, "train"))
    with pytest.raises(ConfigError) as e:
        spec(folder)
    one_line(e, "both layouts", str(folder / "train.csv"), str(folder / "train"))
    (folder / "train.csv").unlink()
    shutil.rmtree(folder / "test")
    with pytest.raises(DataNotFoundError) as e:
        spec(folder)
    one_line(e, str(folder / "test"))


def test_bad_folders_one_line_errors(folder):
    (folder / "test" / "yak").mkdir()
    Image.new("RGB", (SIDE, SIDE)).save(folder / "test" / "yak" / "0.png")
    with pytest.raises(ConfigError) as e:
        spec(folder)
    one_line(e, "'yak'", "cat, dog, owl")
    shutil.rmtree(folder / "test" / "yak")
    (folder / "train" / "emu").mkdir()
    with pytest.raises(DataNotFoundError) as e:
        spec(folder)
    one_line(e, "emu", str(folder / "train"))
    (folder / "train" / "emu").rmdir()
    (folder / "test" / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataNotFoundError) as e:
        spec(folder)
    one_line(e, str(folder / "test" / "dog" / "broken.png"), "check_images")
    _, test = spec(folder, check_images=False).load()  # unchecked: the decode error is one line too
    with pytest.raises(DataNotFoundError) as e:
        test.images([2 * N_TEST])  # cat 00-03, dog 00-03, dog/broken.png
    one_line(e, "broken.png", "remove or replace")
    (folder / "test" / "dog" / "broken.png").write_bytes(b"")
    with pytest.raises(DataNotFoundError) as e:
        spec(folder, check_images=False)
    one_line(e, "broken.png", "empty")


def test_bad_csv_one_line_errors(folder, tmp_path):
    root = tmp_path / "c"
    rows = folder_rows(folder, "train", absolute=True)
    write_csv(root / "train.csv", rows)
    write_csv(root / "test.csv", [(str(tmp_path / "gone.png"), "cat")])
    with pytest.raises(DataNotFoundError) as e:
        spec(root)
    one_line(e, str(tmp_path / "gone.png"), "remove the row")
    write_csv(root / "test.csv", [(rows[0][0], "yak")])
    with pytest.raises(ConfigError) as e:
        spec(root)
    one_line(e, "'yak'", "not a train label")
    (root / "test.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(ConfigError) as e:
        spec(root)
    one_line(e, str(root / "test.csv"), "path,label", "file,class")
    (root / "test.csv").unlink()
    with pytest.raises(DataNotFoundError) as e:
        spec(root)
    one_line(e, str(root / "test.csv"))
    write_csv(root / "test.csv", [])
    with pytest.raises(DataNotFoundError) as e:
        spec(root)
    one_line(e, "lists no images")
    write_csv(root / "test.csv", [(rows[0][0], "cat")])
    write_csv(root / "train.csv", [(rows[0][0], "cat")])
    with pytest.raises(ConfigError) as e:
        spec(root)
    one_line(e, "at least 2 classes")


def test_config_checks(folder):
    with pytest.raises(ConfigError) as e:
        spec(folder, num_classes=5)
    one_line(e, "dataset.num_classes=5", "set dataset.num_classes=3")
    with pytest.raises(ConfigError) as e:
        spec(folder, num_classes=None)
    one_line(e, "set dataset.num_classes=3 (your folder has 3 classes)")
    assert spec(folder, num_classes=3).num_classes == 3
    with pytest.raises(ConfigError) as e:
        spec(folder, channels=1)
    one_line(e, "dataset.mean/std")
    with pytest.raises(ConfigError) as e:
        spec(folder, channels=4)
    one_line(e, "dataset.channels=4")
    with pytest.raises(ConfigError) as e:
        spec(folder, subset=37)
    one_line(e, "dataset.subset=37", "36 training images")


def test_hydra_composition_gives_the_model_the_class_count(folder):
    """The YAML's num_classes node counts the class folders when the model is built (before data are read)."""
    base = ["dataset=image_folder", f"dataset.root={folder}", f"dataset.image_size={SIDE}"]
    for model in ("cnn", "mlp", "linear"):
        cfg = make_config([*base, f"model={model}"])
        assert build(cfg.dataset).num_classes == 3
        assert build(cfg.model)(torch.zeros(2, 3, SIDE, SIDE)).shape == (2, 3)
    model = build(make_config([*base, "dataset.num_classes=3"]).model)
    assert model(torch.zeros(1, 3, SIDE, SIDE)).shape == (1, 3)
    with pytest.raises(ConfigError) as e:
        build(make_config([*base, "dataset.num_classes=4"]).dataset)
    one_line(e, "dataset.num_classes=4", "set dataset.num_classes=3")
    with pytest.raises(ConfigError) as e:
        build(make_config([*base, "dataset.num_classes=null"]).dataset)
    one_line(e, "set dataset.num_classes=3")


def test_end_to_end_train_fit_self(folder, run_pipeline):
    """Train a CNN on the folder (with 25% flipped labels), fit EK-FAC, score every training image."""
    run_dir, metrics = run_pipeline([
        "dataset=image_folder", f"dataset.root={folder}", f"dataset.image_size={SIDE}",
        "dataset.num_workers=0", "dataset.label_noise=0.25", "model=cnn", "trainer.epochs=2",
        "trainer.batch_size=4", "trainer.lr=3e-3",
        "trainer.device=cpu", "solver=ekfac", "stages=[train,fit,self]"])
    assert metrics["train/test_accuracy"] >= 0.75, metrics  # clean test labels; chance is 1/3
    assert metrics["train/train_accuracy"] >= 0.6, metrics  # against the noisy labels: 0.75 = the clean classes
    scores = load_file(str(run_dir / "scores" / "self.safetensors"))
    assert scores["scores"].shape == (3 * N_TRAIN,) and torch.isfinite(scores["scores"]).all()
    assert scores["train_indices"].tolist() == list(range(3 * N_TRAIN))
    assert (run_dir / "model.safetensors").exists()


@pytest.mark.parametrize("root", ["missing", None])
def test_cli_bad_root_one_line_exit_2(tmp_path, root):
    args = ["dataset=image_folder", "trainer.epochs=1"]
    if root is not None:
        args.append(f"dataset.root={tmp_path / root}")
    r = run_cli(args, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "dataset.root" in lines[0], r.stderr
    assert root is None or str(tmp_path / root) in lines[0]
    assert not (tmp_path / "cache").exists()
