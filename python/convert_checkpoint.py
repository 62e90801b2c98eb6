"""Convert a CvT checkpoint between this package's (microsoft/CvT) names and Hugging Face's.

    python python/convert_checkpoint.py cvt-13-hf.safetensors cvt_13.pth --to package
    python python/convert_checkpoint.py cvt_13.pth model.safetensors --to hf

Same as ``python -m cvt_kernels.convert``; every key and shape is checked (see
``cvt_kernels/convert.py``), and a training checkpoint (``{'model': ...}``,
``{'state_dict': ...}``, a ``module.`` prefix) is unwrapped. To load an HF checkpoint into
our model and get HF's outputs, build it with
``cvt_kernels.convert.model_from_hf_config(config)`` (exact GELU, plain LayerNorm) or
``cvt_13(..., act="gelu", layer_norm="plain")``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from cvt_kernels.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="convert_checkpoint.py"))
