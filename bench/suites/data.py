"""`data`: the image-folder pipeline against the in-memory Fashion-MNIST path.

Fashion-MNIST's training images are written once as a class-per-folder tree of PNG files
(`bench.imagetree`, kept in the work directory for a rerun of the same plan) and loaded as the
`imagefolder` dataset (`cloud.build.data`), whose training split is then streamed: decoded by
DataLoader workers. The in-memory path is Fashion-MNIST from its IDX files, cut to the same number of
training images. Two measurements, each against the in-memory path in the same run, in rounds that
alternate the paths:

- images per second out of `batches` (the training batches a build reads, normalized), at each
  worker count of the plan; a pass starts its workers, as an epoch does, and passes repeat until
  `min_pass_s` has gone by;
- one training epoch (`cloud.build.train.train`, the same model from the same initialization, the
  same recipe, as many images) from each path, the image folder at each of the plan's epoch worker
  counts.

Each figure is the median over its rounds, with the best round beside it (on a machine busy with
other work the best is the least disturbed); ratios divide by the in-memory path's figure. Where
CUDA is available, the in-memory epoch and the folder epoch at the most workers run again on the GPU,
each against its CPU time; otherwise the result says the GPU was not available.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from bench import workdir
from bench.imagetree import folder_names, write_image_tree
from cloud.build import data as build_data
from cloud.build.train import TrainConfig, train
from common import datasets, models
from common.profiling import cpu_model

log = logging.getLogger(__name__)

FULL = {
    "images": 60_000,  # Fashion-MNIST training images written as PNG (all of them)
    "batch_size": 128,
    "workers": [1, 2, 4],
    "rounds": 5,  # alternating throughput rounds per path
    "stream_images": 10_000,  # images per throughput pass
    "min_pass_s": 2.0,  # passes repeat until this long: the in-memory path takes a fraction of a second
    "epoch_workers": [1, 2, 4],
    "epoch_images": 6_000,  # images of the training epoch, on both paths
    "epoch_rounds": 3,  # alternating epochs per path
    "model": "vgg11",
    "width": 0.25,
}
QUICK = {**FULL, "images": 3_000, "rounds": 3, "stream_images": 2_000, "min_pass_s": 1.0}
QUICK.update({"epoch_workers": [2], "epoch_images": 1_000, "epoch_rounds": 1})
TREE = "fashion-mnist-png"
MANY_WORKERS = "This DataLoader will create"  # torch's warning at more workers than cores: a measured point here


def _tree(plan: dict, work: Path, data_dir: Path | None) -> dict:
    """The PNG tree of the plan's first Fashion-MNIST training images: written once, reused after."""
    root, seconds = work / TREE, None
    reused = root.exists()
    if not reused:
        source = datasets.load("fashion-mnist", data_dir, val_fraction=0.0)
        images, labels = source.train.images[: plan["images"]].numpy(), source.train.labels[: plan["images"]].numpy()
        started = time.perf_counter()
        write_image_tree(images, labels, folder_names(source.info.classes), root)
        seconds = time.perf_counter() - started
        log.info("wrote %d PNG images in %.1f s", len(images), seconds)
    sizes = [path.stat().st_size for path in root.rglob("*.png")]
    return {"root": str(root), "images": len(sizes), "png_bytes": sum(sizes), "reused": reused, "write_s": seconds}


def _paths(plan: dict, root: Path, data_dir: Path | None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The image folder and the in-memory Fashion-MNIST, both cut to the same training images."""
    folder = build_data.load("imagefolder", root)
    memory = datasets.load("fashion-mnist", data_dir)
    size = min(len(folder.train), len(memory.train))
    folder = replace(folder, train=folder.train.subset(size, 0))
    memory = replace(memory, train=memory.train.subset(size, 0))
    return folder, memory


def _pass(dataset: datasets.Dataset, split, batch_size: int, workers: int | None, min_s: float) -> float:
    """Images per second of whole passes of training batches over `split`, workers started included
    in each, repeated until `min_s` has passed (the in-memory path takes a fraction of it per pass)."""
    started, count = time.perf_counter(), 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MANY_WORKERS)
        while not count or time.perf_counter() - started < min_s:
            batches = datasets.batches(split, dataset.info, batch_size, shuffle_seed=0, train=True, workers=workers)
            count += sum(len(inputs) for inputs, _ in batches)
    return count / (time.perf_counter() - started)


def _compared(rounds: dict[str, list[float]], unit: str, best) -> dict:
    """Each path's rounds, their median (`unit`) and `best` (`best_<unit>`), and both divided by the
    in-memory path's (`vs_in_memory`, `best_vs_in_memory`). The median is the figure; the best, the
    round least disturbed by other work on the machine, is there for a busy one."""
    base, base_best = statistics.median(rounds["in_memory"]), best(rounds["in_memory"])
    return {
        key: {
            unit: statistics.median(values),
            f"best_{unit}": best(values),
            "rounds": values,
            "vs_in_memory": statistics.median(values) / base,
            "best_vs_in_memory": best(values) / base_best,
        }
        for key, values in rounds.items()
    }


def throughput(plan: dict, folder: datasets.Dataset, memory: datasets.Dataset) -> dict:
    """Images per second of the in-memory path and of the image folder at each worker count, in
    alternating rounds, compared as `_compared` does (`vs_in_memory` below 1: the folder is slower)."""
    folder_split = folder.train.subset(plan["stream_images"], 1)
    memory_split = memory.train.subset(plan["stream_images"], 1)
    rounds: dict[str, list[float]] = {"in_memory": [], **{f"workers_{w}": [] for w in plan["workers"]}}
    for _ in range(plan["rounds"]):
        rounds["in_memory"].append(_pass(memory, memory_split, plan["batch_size"], None, plan["min_pass_s"]))
        for w in plan["workers"]:
            rounds[f"workers_{w}"].append(_pass(folder, folder_split, plan["batch_size"], w, plan["min_pass_s"]))
    return {"images": len(memory_split), **_compared(rounds, "images_per_s", max)}


def _epoch(plan: dict, dataset: datasets.Dataset, split, device: str = "cpu") -> dict:
    """One training epoch of the plan's model, initialized from seed 0, on `device`."""
    torch.manual_seed(0)
    info = dataset.info
    model = models.build(plan["model"], models.zoo_kwargs(info.input_shape, info.num_classes, plan["width"]))
    recipe = TrainConfig(epochs=1, batch_size=plan["batch_size"], progress=False)
    if device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MANY_WORKERS)
        train(model, info, split, recipe, device=torch.device(device))
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images": len(split), "images_per_s": len(split) / seconds, "device": device}


def epochs(plan: dict, folder: datasets.Dataset, memory: datasets.Dataset) -> dict:
    """One epoch from the in-memory path and from the image folder at each epoch worker count, on
    as many images, in alternating rounds, compared as `_compared` does (`vs_in_memory` above 1: the
    folder's epoch takes longer)."""
    memory_split = memory.train.subset(plan["epoch_images"], 2)
    folder_split = folder.train.subset(plan["epoch_images"], 2)
    paths = {"in_memory": (memory, memory_split)}
    paths.update({f"workers_{w}": (folder, replace(folder_split, workers=w)) for w in plan["epoch_workers"]})
    rounds: dict[str, list[float]] = {key: [] for key in paths}
    for _ in range(plan["epoch_rounds"]):
        for key, (dataset, split) in paths.items():
            rounds[key].append(_epoch(plan, dataset, split)["seconds"])
    result = _compared(rounds, "seconds", min)
    for point in result.values():
        point.update(images=plan["epoch_images"], images_per_s=plan["epoch_images"] / point["seconds"])
    return result


def gpu(plan: dict, folder: datasets.Dataset, memory: datasets.Dataset, cpu_epochs: dict) -> dict:
    """Where CUDA is available, the in-memory epoch and the folder epoch at the most workers again on
    the GPU, each with its CPU time divided by its GPU time (`speedup`)."""
    if not torch.cuda.is_available():
        return {"available": False}
    w = max(plan["epoch_workers"])
    splits = {
        "in_memory": (memory, memory.train.subset(plan["epoch_images"], 2)),
        f"workers_{w}": (folder, replace(folder.train.subset(plan["epoch_images"], 2), workers=w)),
    }
    result = {"available": True, "name": torch.cuda.get_device_name(0)}
    for key, (dataset, split) in splits.items():
        point = _epoch(plan, dataset, split, device="cuda")
        result[key] = {
            **point,
            "cpu_seconds": cpu_epochs[key]["seconds"],
            "speedup": cpu_epochs[key]["seconds"] / point["seconds"],
        }
    return result


def machine() -> dict:
    """The CPU, its cores, and whether CUDA is there (the run's metadata says more)."""
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "cuda": torch.cuda.is_available()}


def summary(result: dict, plan: dict) -> dict:
    out = {}
    for part, unit, prefix, counts in (
        ("throughput", "images_per_s", "folder", plan["workers"]),
        ("epochs", "seconds", "epoch_folder", plan["epoch_workers"]),
    ):
        out[f"{part}_in_memory_{unit}"] = result[part]["in_memory"][unit]
        for w in counts:
            point = result[part][f"workers_{w}"]
            out[f"{prefix}_w{w}_{unit}"] = point[unit]
            out[f"{prefix}_w{w}_vs_in_memory"] = point["vs_in_memory"]
            out[f"{prefix}_w{w}_best_vs_in_memory"] = point["best_vs_in_memory"]
    out["gpu_available"] = result["gpu"]["available"]
    out["gpu_epoch_speedup"] = result["gpu"]["in_memory"]["speedup"] if out["gpu_available"] else None
    return out


def run(quick: bool, data_dir: Path | None = None, work: Path | None = None, plan: dict | None = None) -> dict:
    plan = dict(plan or (QUICK if quick else FULL))
    work = Path(work or "runs/bench-data.work")
    workdir.fresh_if_changed(work, plan)
    tree = _tree(plan, work, data_dir)
    folder, memory = _paths(plan, Path(tree["root"]), data_dir)
    result = {"plan": plan, "machine": machine(), "tree": tree}
    result["pipelines"] = {
        name: {"dataset": d.info.name, "train_images": len(d.train), "augment": d.info.augment}
        for name, d in (("in_memory", memory), ("folder", folder))
    }
    result["throughput"] = throughput(plan, folder, memory)
    result["epochs"] = epochs(plan, folder, memory)
    result["gpu"] = gpu(plan, folder, memory, result["epochs"])
    result["summary"] = summary(result, plan)
    return result
