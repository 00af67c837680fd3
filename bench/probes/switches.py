"""`python -m bench.probes.switches`: resident memory of an edge runtime over many switches (a bench helper).

    python -m bench.probes.switches --portfolio STORE --files A B ... --switches N [--every K] [--budget-bytes B]
        [--data-dir DIR]

In a fresh process, loads every variant file into an `edge.runtime.Runtime` the way an agent does
(`cache_loader`), then switches round-robin among them N times, answering one of the portfolio's own
inputs (`cloud.localfleet.inputs`: a test image of the data it was built on) on the new variant after
each switch (an agent serves between switches). The process's resident
set size is read from /proc/self/status (VmRSS, what the kernel charges; no collection or trim
forced) every K switches. With a budget, every switch loads its variant on demand and evicts another.
Prints one JSON object: the RSS curve `[[switches, rss_bytes], ...]`, the warm-up (the first tenth of
the switches, at least one round), the growth after it, and the switch times.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cloud.localfleet.inputs import portfolio_inputs
from common.files import sha256_file
from edge.loading import cache_loader
from edge.runtime import Runtime, RuntimeConfig
from edge.variants import VariantInfo

VMRSS = re.compile(r"VmRSS:\s+(\d+) kB")


def rss_bytes() -> int:
    return int(VMRSS.search(Path("/proc/self/status").read_text()).group(1)) * 1024


def probe(files: list[Path], switches: int, every: int, budget_bytes: int, images: np.ndarray) -> dict:
    infos = [VariantInfo(sha256_file(path), path.stem, 0.0, path.stat().st_size, 0) for path in files]
    runtime = Runtime(RuntimeConfig(memory_budget_bytes=budget_bytes))
    for info, path in zip(infos, files):
        loader = cache_loader(info, path)
        runtime.add(loader(), loader)
    ids = [info.variant_id for info in infos]
    runtime.switch(ids[0], "probe")
    warmup = max(len(ids), switches // 10)
    # the probe's own records are allocated up front, so what grows is the runtime's
    switch_us = np.zeros(switches)
    curve, loads = [[0, 0]] * (switches // every + 2), 0
    curve[0], samples = [0, rss_bytes()], 1
    for i in range(1, switches + 1):
        record = runtime.switch(ids[i % len(ids)], "probe")
        switch_us[i - 1] = record.switch_us
        loads += record.load_s > 0
        runtime.predict(images[i % len(images)][None])
        if i % every == 0 or i == switches:
            curve[samples], samples = [i, rss_bytes()], samples + 1
    curve = curve[:samples]
    at_warmup = min((point for point in curve if point[0] >= warmup), key=lambda p: p[0])
    return {
        "switches": switches,
        "variants": len(ids),
        "budget_bytes": budget_bytes,
        "on_demand_loads": loads,
        "warmup_switches": at_warmup[0],
        "rss_start_bytes": curve[0][1],
        "rss_at_warmup_bytes": at_warmup[1],
        "rss_end_bytes": curve[-1][1],
        "rss_max_after_warmup_bytes": max(r for s, r in curve if s >= warmup),
        "growth_after_warmup_bytes": curve[-1][1] - at_warmup[1],
        "switch_us_p50": float(np.percentile(switch_us, 50)),
        "switch_us_p99": float(np.percentile(switch_us, 99)),
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probes.switches")
    parser.add_argument("--portfolio", type=Path, required=True, help="the store the files belong to")
    parser.add_argument("--files", type=Path, nargs="+", required=True)
    parser.add_argument("--switches", type=int, required=True)
    parser.add_argument("--every", type=int, default=100, help="switches between RSS samples")
    parser.add_argument("--budget-bytes", type=int, default=0, help="runtime memory budget (0: all resident)")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.switches < 1 or args.every < 1:
        parser.error("--switches and --every must be >= 1")
    torch.set_num_threads(1)
    images = portfolio_inputs(args.portfolio, 256, data_dir=args.data_dir)
    started = time.perf_counter()
    result = probe(args.files, args.switches, args.every, args.budget_bytes, images)
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
