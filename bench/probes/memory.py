"""`python -m bench.probes.memory`: resident memory of an edge runtime in a fresh process (a bench helper).

    python -m bench.probes.memory --files A B ... [--budget-bytes N --switches K] [--as-loaded]

Loads every variant file into an `edge.runtime.Runtime` the way an agent does (`cache_loader`:
optimized, or as loaded with `--as-loaded`, as `--no-optimize-models` makes an agent do) and
prints one JSON object: the process RSS before and after, and the parameter and buffer bytes held.
With a budget, it then switches round-robin among the variants (each switch loading on demand what
the budget evicted) and reports, per switch, the peak RSS during the switch (the kernel's high-water
mark, reset before each switch) above the RSS just before it and above the peak of serving one
request, next to the bytes of the two variants involved.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from pathlib import Path

import numpy as np
import psutil
import torch

from common.files import sha256_file, short_id
from edge.loading import cache_loader
from edge.runtime import Runtime, RuntimeConfig, libc_trim
from edge.variants import VariantInfo

HWM = re.compile(r"VmHWM:\s+(\d+) kB")


def _settled_rss(trim) -> int:
    gc.collect()
    trim()
    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    return int(HWM.search(Path("/proc/self/status").read_text()).group(1)) * 1024


def _switch_peaks(runtime: Runtime, ids: list[str], switches: int, trim) -> list[dict]:
    """Per switch: the peak above the settled RSS (`extra_bytes`), and above the peak of serving one
    request on the active variant (`extra_over_serving_bytes`: a serving agent's steady state holds a
    forward pass's activations, which an idle process has returned to the system)."""
    peaks, pixels = [], np.zeros((1, *runtime.active.spec.input_shape), np.uint8)
    for i in range(switches):
        target = ids[(i + 1) % len(ids)]
        source = runtime.active.variant_id
        source_bytes = runtime.resident()[source].memory_bytes
        steady = _settled_rss(trim)
        if not _reset_peak():
            return []
        runtime.predict(pixels)
        serving = _peak()
        _settled_rss(trim)
        _reset_peak()
        record = runtime.switch(target, "probe")
        peak = _peak()
        peaks.append(
            {
                "from": short_id(source),
                "to": short_id(target),
                "loaded": record.load_s > 0,
                "extra_bytes": peak - steady,
                "extra_over_serving_bytes": peak - serving,
                "two_variants_bytes": source_bytes + runtime.resident()[target].memory_bytes,
            }
        )
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probes.memory")
    parser.add_argument("--files", type=Path, nargs="+", required=True)
    parser.add_argument("--budget-bytes", type=int, default=0)
    parser.add_argument("--switches", type=int, default=0)
    parser.add_argument("--as-loaded", action="store_true", help="serve the variants as loaded, not optimized")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    trim = libc_trim()
    infos = [VariantInfo(sha256_file(path), path.stem, 0.0, path.stat().st_size, 0) for path in args.files]
    loaders = [cache_loader(info, path, optimize=not args.as_loaded) for info, path in zip(infos, args.files)]
    runtime = Runtime(RuntimeConfig(memory_budget_bytes=args.budget_bytes))
    warm = loaders[0]()  # the first forward pass initializes torch's kernels; not the portfolio's cost
    del warm
    before = _settled_rss(trim)
    for i, (info, loader) in enumerate(zip(infos, loaders)):
        runtime.add(loader(), loader)
        if i == 0:
            runtime.switch(info.variant_id, "probe")
    after = _settled_rss(trim)
    result = {
        "rss_before": before,
        "rss_after": after,
        "growth_bytes": after - before,
        "param_bytes": runtime.resident_bytes(),
        "resident": len(runtime.resident()),
    }
    if args.switches:
        result["switches"] = _switch_peaks(runtime, [i.variant_id for i in infos], args.switches, trim)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
