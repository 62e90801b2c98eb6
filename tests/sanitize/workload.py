"""One pass over every Triton kernel at odd sizes, for compute-sanitizer (see run.sh).

Forward and backward of FusedConvAttention on the triton backend, training and eval, with
and without class token, float32/float16/bfloat16, at sizes that are no multiple of any
block (every masked tail runs), plus the attention op at Nq != Nk. Small, because
memcheck and racecheck slow kernels down 10-100x. Exits non-zero if a result is wrong.
"""

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cvt_kernels  # noqa: E402
from cvt_kernels import FusedConvAttention  # noqa: E402
from cvt_kernels.models import Attention  # noqa: E402

# No autotuning: it would benchmark every candidate under the sanitizer. One config each.
os.environ.setdefault("CVT_KERNELS_AUTOTUNE", "0")


def main() -> int:
    # On CPU under TRITON_INTERPRET=1 it runs too (slowly): a check of this script itself.
    device = "cuda" if torch.cuda.is_available() else (
        "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
    if device is None:
        print("workload: no CUDA device (and TRITON_INTERPRET is not 1)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    failures = 0
    # bfloat16 only on a GPU: the interpreter's bf16 tl.dot is wrong (docs: performance.md).
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if device == "cuda" else ())
    for dtype in dtypes:
        for h, w, cls in ((3, 5, True), (7, 9, False), (1, 2, True)):
            for training in (True, False):
                ref = Attention(24, 48, 3, qkv_bias=True, stride_kv=2,
                                with_cls_token=cls).to(device).train(training)
                ours = FusedConvAttention.from_reference(copy.deepcopy(ref)).to(dtype)
                x = torch.randn(3, h * w + cls, 24, device=device, requires_grad=True)
                with cvt_kernels.use_backend("triton"):
                    out = ours(x.to(dtype), h, w)
                out.float().square().sum().backward()
                expected = ref(x.detach(), h, w)
                err = ((out.float() - expected).abs().max() / expected.abs().max()).item()
                ok = err < (1e-2 if dtype == torch.float32 else 6e-2)
                failures += not ok
                print(f"{dtype} {h}x{w} cls={cls} train={training}: rel err {err:.2e}"
                      f"{'' if ok else '  <-- WRONG'}")
    for nq, nk in ((17, 5), (1, 1), (65, 130)):
        q = torch.randn(2, nq, 2 * 64, device=device, dtype=torch.float16, requires_grad=True)
        k = torch.randn(2, nk, 2 * 64, device=device, dtype=torch.float16, requires_grad=True)
        with cvt_kernels.use_backend("triton"):
            out = cvt_kernels.ops.attention(q, k, k, 2, 128 ** -0.5)
        out.float().sum().backward()
        print(f"attention fp16 Nq={nq} Nk={nk}: finite {bool(torch.isfinite(out).all())}")
        failures += not bool(torch.isfinite(out).all())
    if device == "cuda":
        torch.cuda.synchronize()
    print("workload: done," if not failures else f"workload: {failures} WRONG results,",
          "no sanitizer report above means no error found")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
