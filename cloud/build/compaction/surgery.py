"""Surgery: physically remove every provably dead channel of a sparse model, and prove nothing changed.

`cloud.build.compaction.channels` decides which channels are dead and which constants their readers must absorb; this
module folds those constants, removes the channels with torch-pruning, repeats until nothing more is
dead (a removed reader can leave its own inputs unread), then checks the compact model against the
sparse one on real and random inputs. Any difference past the tolerance is a `SurgeryError` naming the
groups that cause it; the argument model is never touched, so nothing half-pruned escapes.
In approximate mode, constants that meet a padded conv are folded as if it had no padding (exact
away from the border) and the report gives the resulting error instead of refusing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from cloud.build.compaction import channels
from cloud.build.compaction.channels import SurgeryError
from common.models import count_params

CHECK_BATCH = 256
__all__ = ["SurgeryError", "SurgeryReport", "compact", "find_dead_channels"]


@dataclass(frozen=True)
class SurgeryReport:
    params_before: int
    params_after: int
    channels_before: int  # all channels of all groups (each root's out-channels)
    channels_removed: int
    removed_by_group: dict[str, int]  # group root module name -> channels removed
    max_abs_diff: float  # over real and random check inputs
    argmax_agreement: float  # share of check inputs with the same argmax (1.0 = all)
    seconds: float  # surgery and check
    check_seconds: float = 0.0  # the equivalence check alone (both models' forward passes)
    max_abs_diff_float64: float | None = None  # both models in float64; set only when float32 missed atol
    folded: int = 0  # constant channels absorbed into their readers' biases
    inexact_folds: int = 0  # of those, folded into padded convs (approximate mode only)
    skipped_groups: dict[str, str] = field(default_factory=dict)  # group root -> why it was left alone

    @property
    def exact(self) -> bool:
        return self.inexact_folds == 0


def find_dead_channels(
    model: nn.Module, example_input: torch.Tensor, classifier: nn.Module | None = None
) -> dict[str, list[int]]:
    """Root module name -> dead channel indices (one pass), for groups that have any. Leaves the model
    as it was (tracing switches it to eval mode; the modes are restored)."""
    modes = {m: m.training for m in model.modules()}
    try:
        analysis = channels.analyse(channels.trace(model, example_input, classifier))
    finally:
        for module, mode in modes.items():
            module.training = mode
    return {p.name: list(p.dead) for p in analysis.plans if p.dead}


def _prune(analysis: channels.Analysis, only: str | None = None) -> tuple[dict[str, int], list[channels.Fold]]:
    """Fold, then remove, the dead channels of the analysed groups. Every fold comes first: its columns
    index its reader as analysed, and a reader of a concat loses columns to each group removed."""
    chosen = [plan for plan in analysis.plans if plan.dead and only in (None, plan.name)]
    removed, folds = {}, [fold for plan in chosen for fold in plan.folds]
    try:
        for fold in folds:
            channels.apply_fold(fold)
    except Exception as err:  # the caller discards the copy
        raise SurgeryError(f"folding constant channels into {fold.reader!r} failed: {err}") from err
    for plan in chosen:
        try:
            analysis.trace.graph.get_pruning_group(plan.root, plan.handler, list(plan.dead)).prune()
        except Exception as err:  # torch-pruning failed mid-way; the caller discards the copy
            raise SurgeryError(f"pruning group {plan.name!r} failed: {err}") from err
        removed[plan.name] = len(plan.dead)
    return removed, folds


def _check_batches(example_input: torch.Tensor, check_inputs: torch.Tensor | None, random_checks: int) -> list:
    """Random inputs shaped like the (checked) example, fixed seed, then the caller's real inputs, in
    batches of at most CHECK_BATCH."""
    shape = tuple(example_input.shape[1:])
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(random_checks, *shape, generator=generator, dtype=example_input.dtype)]
    if check_inputs is not None and len(check_inputs):
        if tuple(check_inputs.shape[1:]) != shape:
            raise SurgeryError(
                f"check inputs have samples of shape {tuple(check_inputs.shape[1:])}, the example input {shape}"
            )
        inputs.append(check_inputs.to(example_input.dtype))
    return list(torch.cat(inputs).split(CHECK_BATCH))


@torch.no_grad()
def _outputs(model: nn.Module, batches: list, what: str) -> list[torch.Tensor]:
    try:
        outputs = [model(x) for x in batches]
    except Exception as err:  # whatever breaks the forward pass, name it
        raise SurgeryError(f"{what} does not run on the check inputs: {err}") from err
    if not all(isinstance(out, torch.Tensor) and out.dim() >= 2 for out in outputs):
        raise SurgeryError(f"{what} must return one (batch, classes) tensor of logits to be checked")
    return outputs


def _sparse_outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    """The argument model's outputs in eval mode; its own modes are restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        return _outputs(model.eval(), batches, type(model).__name__)
    finally:
        for module, mode in modes.items():
            module.training = mode


def _compare(model: nn.Module, batches: list, expected: list, what: str) -> tuple[float, float]:
    """Max abs difference and share of equal argmax against the sparse outputs (inf, 0 if shapes differ)."""
    got = _outputs(model, batches, what)
    if not all(e.shape == g.shape for e, g in zip(expected, got)):
        return float("inf"), 0.0
    diff = max(float((e - g).abs().max()) for e, g in zip(expected, got))
    same = sum(int((e.flatten(1).argmax(1) == g.flatten(1).argmax(1)).sum()) for e, g in zip(expected, got))
    return diff, same / sum(len(e) for e in expected)


def _verify(
    sparse: nn.Module, pruned: nn.Module, batches: list, expected: list, atol: float, what: str
) -> tuple[float, float, float | None]:
    """Max abs difference and share of equal argmax against the sparse outputs, and, only when float32
    misses `atol`, the difference with both models in float64: layers such as a BatchNorm over a nearly
    constant channel (running variance ~0) amplify float32 rounding until the sparse model disagrees
    with itself between batch sizes; in float64 that rounding is about 1e9 times smaller, while a wrong
    removal still shows in full. Raises when neither comparison holds."""
    diff, agreement = _compare(pruned, batches, expected, what)
    if diff <= atol and agreement == 1.0:  # written so that NaN fails
        return diff, agreement, None
    wide = [b.double() for b in batches]
    diff64, agreement64 = _compare(
        copy.deepcopy(pruned).double(), wide, _sparse_outputs(copy.deepcopy(sparse).double(), wide), what
    )
    if diff64 <= atol and agreement64 == 1.0:
        return diff, agreement, diff64
    raise SurgeryError(
        f"{what} differs from the sparse model (max abs diff {diff:.3g}, in float64 {diff64:.3g}, "
        f"atol {atol:g}; argmax agreement {agreement:.4f})"
    )


def _counterpart(model: nn.Module, clone: nn.Module, module: nn.Module | None) -> nn.Module | None:
    """The module of `clone` at the place `module` has in `model`."""
    if module is None:
        return None
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        raise SurgeryError(f"classifier {type(module).__name__} is not a module of {type(model).__name__}")
    return dict(clone.named_modules())[name]


def _blame(model, example_input, classifier, batches, expected, atol, removed: dict[str, int]) -> list[str]:
    """The groups whose first-pass removal alone breaks equivalence (each tried on a fresh copy)."""
    culprits = []
    for name in removed:
        trial = copy.deepcopy(model).eval()
        try:
            trace = channels.trace(trial, batches[0][:1], _counterpart(model, trial, classifier))
            _prune(channels.analyse(trace), only=name)
            _verify(model, trial, batches, expected, atol, f"group {name}")
        except SurgeryError:
            culprits.append(name)
    return culprits


def _remove_dead(
    trace: channels.Trace, approximate: bool
) -> tuple[channels.Analysis, dict[str, int], list[channels.Fold]]:
    """Remove dead channels from the traced model in place until none is left: the first analysis,
    the channels removed per group and the folds applied."""
    first = analysis = channels.analyse(trace, approximate)
    removed: dict[str, int] = {}
    folds: list[channels.Fold] = []
    while (step := _prune(analysis))[0]:  # repeat: a removed reader can leave its own inputs unread
        removed = {name: removed.get(name, 0) + step[0].get(name, 0) for name in {**removed, **step[0]}}
        folds += step[1]
        if sum(removed.values()) >= first.channels:  # cannot happen unless pruning silently did nothing
            raise SurgeryError(f"removing dead channels does not converge: {removed}")
        analysis = channels.analyse(trace, approximate)
    return first, removed, folds


def _check(
    model: nn.Module,
    pruned: nn.Module,
    example_input: torch.Tensor,
    classifier: nn.Module | None,
    batches: list,
    removed: dict[str, int],
    atol: float,
    approximate: bool,
) -> tuple[float, float, float | None]:
    """How far the compact copy is from the sparse model (see `_verify`); unless approximate, a copy
    that differs is refused, naming the groups whose removal alone breaks it."""
    if not removed:  # nothing changed: the copy computes exactly what the sparse model computes
        return 0.0, 1.0, None
    what = f"the model after pruning groups {removed}"
    expected = _sparse_outputs(model, batches)  # the untouched sparse model
    if approximate:
        return (*_compare(pruned, batches, expected, what), None)
    try:
        return _verify(model, pruned, batches, expected, atol, what)
    except SurgeryError as err:
        culprits = _blame(model, example_input, classifier, batches, expected, atol, removed)
        raise SurgeryError(f"{err}; groups that break it alone: {culprits or 'none'}") from err


def compact(
    model: nn.Module,
    example_input: torch.Tensor,
    check_inputs: torch.Tensor | None = None,
    atol: float = 1e-4,
    classifier: nn.Module | None = None,
    random_checks: int = 16,
    approximate: bool = False,
) -> tuple[nn.Module, SurgeryReport]:
    """A compact copy of `model` without its dead channels, checked equal to `model` (max abs diff at
    most `atol`, same argmax) on `check_inputs` and `random_checks` random inputs. In approximate mode,
    constants meeting padded convs are folded too, and the difference is reported, not refused.
    `model` itself is never touched, not even its train/eval mode."""
    start = time.perf_counter()
    if not atol >= 0 or random_checks < 1:
        raise ValueError(f"need atol >= 0 and random_checks >= 1, got {atol} and {random_checks}")
    pruned = copy.deepcopy(model).eval()
    trace = channels.trace(pruned, example_input, _counterpart(model, pruned, classifier))
    batches = _check_batches(example_input, check_inputs, random_checks)
    first, removed, folds = _remove_dead(trace, approximate)
    checking = time.perf_counter()
    diff, agreement, diff64 = _check(model, pruned, example_input, classifier, batches, removed, atol, approximate)
    check_s = time.perf_counter() - checking
    return pruned, SurgeryReport(
        params_before=count_params(model),
        params_after=count_params(pruned),
        channels_before=first.channels,
        channels_removed=sum(removed.values()),
        removed_by_group=removed,
        max_abs_diff=diff,
        argmax_agreement=agreement,
        max_abs_diff_float64=diff64,
        seconds=time.perf_counter() - start,
        check_seconds=check_s,
        folded=len(folds),
        inexact_folds=sum(not f.exact for f in folds),
        skipped_groups=first.skipped,
    )
