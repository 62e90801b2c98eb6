"""The agreement check of the block and model benchmarks: one call's tensors, judged by the
rule of ``cvt_kernels.agreement`` (ours vs eager, each against a higher-precision truth)."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from cvt_kernels import agreement


class Results(NamedTuple):
    """One call's tensors: outputs (the output, and dx in a block's training call),
    parameter gradients and floating-point buffers (running statistics), by name."""
    tensors: List[torch.Tensor]
    grads: Dict[str, Optional[torch.Tensor]]
    buffers: Dict[str, torch.Tensor]


def grads_and_buffers(module: torch.nn.Module):
    """Copies of ``module``'s parameter gradients and floating-point buffers, by name."""
    grads = {n: (q.grad.detach().clone() if q.grad is not None else None)
             for n, q in module.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()}
    return grads, buffers


def verdicts(ours: Results, eager: Results, truth: Results, dtype: torch.dtype,
             names: Sequence[str]) -> List[agreement.Verdict]:
    """``ours`` vs ``eager``, each against ``truth``: the outputs (``names``), then in
    training every parameter gradient and the running statistics (each the worst tensor)."""
    out = [agreement.judge(name, o, e, t, dtype)
           for name, o, e, t in zip(names, ours.tensors, eager.tensors, truth.tensors)]
    if truth.grads:
        keys = [n for n, g in truth.grads.items() if g is not None]
        out.append(agreement.judge_all("param grads", [ours.grads.get(n) for n in keys],
                                       [eager.grads.get(n) for n in keys],
                                       [truth.grads[n] for n in keys], dtype, 1e-3))
        keys = list(truth.buffers)
        out.append(agreement.judge_all("running stats", [ours.buffers.get(n) for n in keys],
                                       [eager.buffers.get(n) for n in keys],
                                       [truth.buffers[n] for n in keys], dtype))
    return out


def fields(checks: List[agreement.Verdict], baseline: bool = False) -> dict:
    """A row's agreement columns: the first output's error vs the truth (``rel_err``;
    eager's own with ``baseline``), eager's (``eager_err``), and in training the tensor
    nearest its bar (``grad_err``: its name and error)."""
    pick = (lambda v: v.baseline) if baseline else (lambda v: v.ours)
    row = {"rel_err": f"{pick(checks[0]):.1e}", "eager_err": f"{checks[0].baseline:.1e}"}
    if len(checks) > 1:
        worst = max(checks[1:], key=lambda v: v.ours / v.bar if v.bar else v.ours)
        row["grad_err"] = f"{worst.name} {pick(worst):.1e}"
    return row


def wrong_status(checks: List[agreement.Verdict]) -> Optional[str]:
    """None when every check passes, else the row's status naming what failed."""
    if agreement.all_ok(checks):
        return None
    return "wrong: " + agreement.describe(v for v in checks if not v.ok)


__all__ = ["Results", "fields", "grads_and_buffers", "verdicts", "wrong_status"]
