"""Minimal reproduction, for a PyTorch issue: on CPU, ``F.batch_norm``'s backward returns
wrong input and weight gradients at batch size 1 when the incoming gradient is strided the
way a vision transformer produces it (tokens ``(1, 1 + h*w, C)`` -> drop the class token
-> ``(1, C, h, w)``: strides ``(., 1, w*C, C)``). A contiguous copy of the same gradient
gives the right answer, and so does a hand-written batch norm.

    python tests/repro_torch_bn_batch1.py

Prints the versions and the errors; exit code 1 when the bug is present, 0 when not.
Needs only torch. Seen with torch 2.13.0 (CPU), float32 and float64.
"""

import sys

import torch
import torch.nn.functional as F


def grads(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, norm) -> tuple:
    return torch.autograd.grad(norm(x, weight), (x, weight), grad_out)


def by_hand(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight[None, :, None, None]


def main() -> int:
    torch.manual_seed(0)
    c, h, w = 4, 3, 5
    x = torch.randn(1, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(1, 1 + h * w, c, dtype=torch.float64)
    grad_out = tokens[:, 1:].transpose(1, 2).unflatten(2, (h, w))  # a view, not a copy

    def aten(x, weight):
        return F.batch_norm(x, None, None, weight, None, training=True)

    expected = grads(x, weight, grad_out, by_hand)
    strided = grads(x, weight, grad_out, aten)
    contiguous = grads(x, weight, grad_out.contiguous(), aten)
    print(f"torch {torch.__version__}; grad_out {tuple(grad_out.shape)} strides "
          f"{grad_out.stride()}")
    bug = False
    for name, want, got, ok in zip(("grad_input", "grad_weight"), expected, strided,
                                   contiguous):
        err, err_ok = ((g - want).abs().max().item() for g in (got, ok))
        print(f"{name}: max error {err:.2e} with the strided grad_out, {err_ok:.2e} with "
              f"grad_out.contiguous()")
        bug |= not torch.allclose(got, want)
    print("BUG: batch_norm backward is wrong for this grad_out layout" if bug else
          "OK: this PyTorch computes it right")
    return 1 if bug else 0


if __name__ == "__main__":
    sys.exit(main())
