"""The data benchmark on a tiny plan, and the image trees it writes (PNG keeps every pixel)."""

import json

import numpy as np
import pytest
from PIL import Image

from bench.__main__ import SUITES, main
from bench.imagetree import folder_names, rendered, write_image_tree
from bench.suites import data

TINY = {
    "images": 240,
    "batch_size": 32,
    "workers": [1, 2],
    "rounds": 1,
    "stream_images": 96,
    "min_pass_s": 0.05,
    "epoch_workers": [1],
    "epoch_images": 64,
    "epoch_rounds": 2,
    "model": "vgg11",
    "width": 0.125,
}


def _read_tree(root, classes):
    """Every image of a tree as (index, label, pixels [C, H, W])."""
    found = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            with Image.open(path) as image:
                pixels = np.asarray(image)
            found.append((int(path.stem), label, pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)))
    return sorted(found, key=lambda item: item[0])


@pytest.mark.parametrize(("pad_to", "colour"), [(None, False), ((30, 41), True)])
def test_an_image_tree_round_trips_its_pixels_exactly(tmp_path, pad_to, colour):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 3, 12)
    classes = folder_names(["T-shirt/top", "Trouser", "Bag"])
    root = write_image_tree(images, labels, classes, tmp_path / "tree", pad_to=pad_to, colour=colour)
    assert sorted(p.name for p in root.iterdir()) == list(classes)
    expected = rendered(images, pad_to, colour)
    assert expected.shape[1:] == ((3, 30, 41) if colour else (1, 28, 28))
    back = _read_tree(root, classes)
    assert [index for index, _, _ in back] == list(range(12))
    assert [label for _, label, _ in back] == labels.tolist()
    assert np.array_equal(np.stack([pixels for _, _, pixels in back]), expected)
    if colour:  # tinted, not replicated: the channels differ
        assert not np.array_equal(expected[:, 0], expected[:, 2])
    with pytest.raises(FileExistsError):
        write_image_tree(images, labels, classes, root)


def test_bad_trees_are_refused(tmp_path):
    images = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="folder name"):
        write_image_tree(images, [0, 1], ["a", "b/c"], tmp_path / "t")
    with pytest.raises(ValueError, match="labels"):
        write_image_tree(images, [0, 2], ["a", "b"], tmp_path / "t")
    with pytest.raises(ValueError, match="smaller"):
        write_image_tree(images, [0, 1], ["a", "b"], tmp_path / "t", pad_to=(3, 8))
    assert not (tmp_path / "t").exists()


def test_a_tiny_data_benchmark_measures_both_paths_and_reuses_its_tree(tmp_path, monkeypatch, fashion_mnist):
    assert SUITES["data"] == data.__name__
    monkeypatch.setattr(data, "QUICK", TINY)
    out = tmp_path / "data.json"
    assert main(["data", "--json", str(out), "--quick", "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    tree = result["tree"]
    assert result["plan"] == TINY and tree["images"] == 240 and tree["png_bytes"] > 0 and not tree["reused"]
    assert result["pipelines"]["folder"]["train_images"] == result["pipelines"]["in_memory"]["train_images"]
    throughput, epochs = result["throughput"], result["epochs"]
    assert throughput["in_memory"]["images_per_s"] > 0
    for key in ("workers_1", "workers_2"):
        assert throughput[key]["images_per_s"] > 0 and throughput[key]["vs_in_memory"] > 0
    assert epochs["in_memory"]["seconds"] > 0 and epochs["in_memory"]["images"] == 64
    assert len(epochs["in_memory"]["rounds"]) == len(epochs["workers_1"]["rounds"]) == 2
    assert epochs["workers_1"]["images"] == 64 and epochs["workers_1"]["vs_in_memory"] > 0
    assert epochs["workers_1"]["best_seconds"] == min(epochs["workers_1"]["rounds"])
    assert throughput["workers_2"]["best_images_per_s"] == max(throughput["workers_2"]["rounds"])
    assert result["gpu"]["available"] == result["machine"]["cuda"] == result["summary"]["gpu_available"]
    assert result["machine"]["cores"] >= 1 and result["meta"]["machine"]["cpu_model"]
    summary = result["summary"]
    assert summary["folder_w2_vs_in_memory"] == throughput["workers_2"]["vs_in_memory"]
    assert summary["epoch_folder_w1_seconds"] == epochs["workers_1"]["seconds"]
    assert summary["epoch_folder_w1_best_vs_in_memory"] == epochs["workers_1"]["best_vs_in_memory"]
    assert main(["data", "--json", str(out), "--quick", "--threads", "1"]) == 0
    assert json.loads(out.read_text())["tree"]["reused"]


def test_with_a_gpu_both_epochs_run_again_there_against_their_cpu_times(monkeypatch, fashion_mnist):
    monkeypatch.setattr(data.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(data.torch.cuda, "get_device_name", lambda index: "a GPU")
    devices = []

    def epoch(plan, dataset, split, device="cpu"):
        devices.append((dataset.info.name, getattr(split, "workers", None), device))
        return {"seconds": 2.0, "images": len(split), "images_per_s": len(split) / 2.0, "device": device}

    monkeypatch.setattr(data, "_epoch", epoch)
    folder = data.datasets.Dataset(
        fashion_mnist.info, data.datasets.StreamSplit(fashion_mnist.train, data.torch.arange(8)), None, None
    )
    cpu = {"in_memory": {"seconds": 10.0}, "workers_4": {"seconds": 12.0}}
    result = data.gpu({**TINY, "epoch_workers": [1, 4]}, folder, fashion_mnist, cpu)
    assert result["available"] and result["name"] == "a GPU"
    assert result["in_memory"]["speedup"] == 5.0 and result["workers_4"]["speedup"] == 6.0
    assert devices == [("fashion-mnist", None, "cuda"), ("fashion-mnist", 4, "cuda")]
