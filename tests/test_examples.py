"""The runnable examples in python/, each in a small smoke mode (CI runs them here)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from cvt_kernels import models

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--batch", "2", "--img-size", "32", "--num-classes", "4", "--device", "cpu"]


def test_train_synthetic_resumes_exactly(tmp_path, capsys):
    train = load_script("train_synthetic")
    straight, half, resumed = (str(tmp_path / n) for n in ("a.pt", "b.pt", "c.pt"))
    assert train.main(SMALL + ["--steps", "3", "--save", straight]) == 0
    assert train.main(SMALL + ["--steps", "1", "--save", half]) == 0
    assert train.main(SMALL + ["--steps", "3", "--resume", half, "--save", resumed]) == 0
    # weights_only: the checkpoint is plain data (tests/test_checkpoint_security.py).
    a, c = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert a["step"] == c["step"] == 3
    for key, value in a["model"].items():  # bitwise: same data, same RNG, same order of ops
        assert torch.equal(value, c["model"][key]), key
    out = capsys.readouterr().out
    assert "resumed from" in out and "13 attention modules accelerated" in out
    # The accelerated model's checkpoint is an ordinary CvT checkpoint: eager resumes it.
    assert train.main(SMALL + ["--steps", "4", "--resume", resumed, "--no-accelerate"]) == 0


def test_train_synthetic_cpu_bfloat16_autocast(capsys):
    train = load_script("train_synthetic")
    assert train.main(SMALL + ["--steps", "1", "--amp", "bfloat16"]) == 0
    assert "amp bfloat16" in capsys.readouterr().out


def test_train_synthetic_rejects_float16_on_cpu():
    with pytest.raises(SystemExit):
        load_script("train_synthetic").main(["--amp", "float16", "--device", "cpu"])


INFER = ["--img-size", "32", "--repeats", "1", "--device", "cpu", "--dtype", "float32"]


def test_infer_package_checkpoint_and_image_files(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "cvt13.pth"
    torch.save(models.cvt_13(num_classes=7, img_size=32).state_dict(), ckpt)
    images = tmp_path / "img.pt"
    torch.save(torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8), images)
    assert load_script("infer").main(INFER + ["--checkpoint", str(ckpt),
                                              "--images", str(images)]) == 0
    out = capsys.readouterr().out
    assert "package names" in out and "image 1:" in out and "same top-1: True" in out


def test_infer_rejects_a_bad_image_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save(torch.rand(4, 32, 32), bad)
    assert load_script("infer").main(INFER + ["--images", str(bad)]) == 2  # usage error
    assert f"--images {bad}: expected a (3, H, W)" in capsys.readouterr().err


def test_infer_reads_a_training_checkpoint(tmp_path):
    """A checkpoint with the model beside the optimizer (train_synthetic.py's, timm's) loads,
    and the description says which entry was taken."""
    ckpt = tmp_path / "train.pt"
    state = models.cvt_13(num_classes=4).state_dict()
    torch.save({"model": state, "optimizer": {"state": {}}, "step": 1}, ckpt)
    infer = load_script("infer")
    model, _, what = infer.load_model(infer.parse_args(INFER + ["--checkpoint", str(ckpt)]))
    assert "took the 'model' entry of a training checkpoint (left out: optimizer, step)" in what
    assert torch.equal(model.head.weight, state["head.weight"])


def test_infer_hugging_face_model_and_checkpoint(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.CvtConfig(num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"},
                                    label2id={"cat": 0, "dog": 1, "owl": 2})
    torch.manual_seed(0)
    hf = transformers.CvtForImageClassification(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    infer = load_script("infer")
    assert infer.main(INFER + ["--hf", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "same top-1: True" in out and "cat" in out
    # The same weights as a state_dict under HF names: converted onto our CvT-13.
    torch.save(hf.state_dict(), tmp_path / "hf.pth")
    assert infer.main(INFER + ["--checkpoint", str(tmp_path / "hf.pth")]) == 0
    assert "Hugging Face names, converted" in capsys.readouterr().out
