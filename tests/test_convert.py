"""State dicts between our (microsoft/CvT) names and Hugging Face's: round trips, outputs of a
converted model, strict errors, the command line, the builders' act/LayerNorm options."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cvt_kernels
from cvt_kernels import convert, models

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(DIM_EMBED=[16, 32, 48], NUM_HEADS=[1, 2, 3], DEPTH=[1, 2, 3])


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed "
                                                      "(pip install -e '.[hf]')")


def hf_model(transformers, cls_name="CvtForImageClassification"):
    config = transformers.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3],
                                    depth=[1, 2, 3], num_labels=5)
    model = getattr(transformers, cls_name)(config).to(torch.float64).eval()
    with torch.no_grad():  # non-trivial BatchNorm state
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_hf_package_hf_round_trip_is_bitwise(transformers):
    hf = hf_model(transformers)
    sd = hf.state_dict()
    ours = convert.hf_to_package(sd)
    assert all(k.startswith(("stage", "norm.", "head.")) for k in ours)
    back = convert.package_to_hf(ours, target=hf)
    assert_same(back, sd)
    hf.load_state_dict(back, strict=True)
    # CvtModel naming (hf.cvt is one): no "cvt." prefix, and no final norm or head.
    base = convert.package_to_hf(ours, hf_prefix="")
    base = {k: v for k, v in base.items() if k.startswith("encoder.")}
    assert_same(base, hf.cvt.state_dict())


def test_package_hf_package_round_trip_is_bitwise():
    ours = models.cvt_13(num_classes=5, spec_overrides=SMALL)
    sd = ours.state_dict()
    assert_same(convert.hf_to_package(convert.package_to_hf(sd), target=ours), sd)


@pytest.mark.parametrize("accelerated", [False, True])
def test_converted_model_reproduces_hf_outputs(transformers, accelerated):
    hf = hf_model(transformers)
    ours = convert.model_from_hf_config(hf.config).to(torch.float64).eval()
    ours.load_state_dict(convert.hf_to_package(hf.state_dict(), target=ours), strict=True)
    # The same model through the builder's options.
    built = models.cvt_13(num_classes=5, spec_overrides=SMALL, act="gelu",
                          layer_norm="plain").to(torch.float64).eval()
    built.load_state_dict(convert.hf_to_package(hf.state_dict(), target=built), strict=True)
    if accelerated:
        assert cvt_kernels.accelerate(ours)[1] == cvt_kernels.accelerate(built)[1] == 6
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(ours(x), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(built(x), ref, rtol=1e-12, atol=1e-12)


def test_reference_options_differ_from_hf(transformers):
    """QuickGELU (the default) is not HF's exact GELU: the options matter."""
    hf = hf_model(transformers)
    ours = models.cvt_13(num_classes=5, spec_overrides=SMALL).to(torch.float64).eval()
    ours.load_state_dict(convert.hf_to_package(hf.state_dict(), target=ours), strict=True)
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(ours(x), hf(x).logits, rtol=1e-6, atol=1e-6)


def test_builder_defaults_unchanged_and_options_checked():
    model = models.cvt_13(num_classes=5, spec_overrides=SMALL)
    block = model.stage0.blocks[0]
    assert type(block.mlp.act) is models.QuickGELU
    assert type(block.norm1) is models.LayerNorm and block.norm1.eps == 1e-5
    hf_like = models.cvt_21(num_classes=5, spec_overrides=SMALL, act="gelu", layer_norm="plain",
                            layer_norm_eps=1e-6)
    block = hf_like.stage0.blocks[0]
    assert type(block.mlp.act) is torch.nn.GELU and block.mlp.act.approximate == "none"
    assert type(block.norm1) is torch.nn.LayerNorm and block.norm1.eps == 1e-6
    assert type(hf_like.norm) is torch.nn.LayerNorm
    with pytest.raises(ValueError, match="act: expected one of"):
        models.cvt_13(act="relu")
    with pytest.raises(ValueError, match="layer_norm: expected one of"):
        models.cvt_w24(layer_norm="rms")


def test_unmatched_missing_and_misshaped_keys_are_named():
    sd = dict(models.cvt_13(num_classes=5, spec_overrides=SMALL).state_dict())
    with pytest.raises(ValueError, match=r"not package .*\['stage0.foo.weight', 'bar'\]"):
        convert.package_to_hf({**sd, "stage0.foo.weight": torch.zeros(1), "bar": torch.zeros(1)})
    hf_sd = convert.package_to_hf(sd)
    with pytest.raises(ValueError, match=r"not Hugging Face .*\['stage0.blocks.0.norm1.weight'\]"):
        convert.hf_to_package({**hf_sd, "stage0.blocks.0.norm1.weight": torch.zeros(1)})

    bad = dict(hf_sd)
    key = "cvt.encoder.stages.1.layers.1.attention.attention.projection_key.weight"
    bad[key] = torch.zeros(32, 31)
    del bad["classifier.bias"]
    target = models.cvt_13(num_classes=5, spec_overrides=SMALL)
    with pytest.raises(ValueError) as info:
        convert.hf_to_package(bad, target=target)
    message = str(info.value)
    assert "missing: ['head.bias']" in message
    assert "stage1.blocks.1.attn.proj_k.weight: (32, 31) (expected (32, 32))" in message
    with pytest.raises(ValueError, match=r"unexpected: \['head.weight', 'head.bias'\]"):
        convert.hf_to_package(hf_sd, target=models.cvt_13(num_classes=0, spec_overrides=SMALL))
    # Without a target: the architecture the state_dict implies must hold it consistently.
    with pytest.raises(ValueError, match=r"stage1.blocks.1.attn.proj_k.weight: \(32, 31\)"):
        convert.package_to_hf({**sd, "stage1.blocks.1.attn.proj_k.weight": torch.zeros(32, 31)})
    with pytest.raises(TypeError, match="target: expected"):
        convert.hf_to_package(hf_sd, target=3)


def test_hf_base_model_needs_a_final_norm(transformers):
    with pytest.raises(ValueError, match=r"missing: \['norm.weight', 'norm.bias'\]"):
        convert.hf_to_package(hf_model(transformers, "CvtModel").state_dict())


def test_cli_in_process(tmp_path, capsys):
    sd = models.cvt_13(num_classes=5, spec_overrides=SMALL).state_dict()
    src, hf_file, back = tmp_path / "ours.pth", tmp_path / "hf.pth", tmp_path / "back.pth"
    torch.save(sd, src)
    assert convert.main([str(src), str(hf_file), "--to", "hf"]) == 0
    assert "tensors, hf naming" in capsys.readouterr().out
    assert convert.main([str(hf_file), str(back), "--to", "package"]) == 0
    assert_same(torch.load(back, weights_only=True), sd)
    # The wrong direction: a usage error that says the file needs no conversion.
    assert convert.main([str(src), str(back), "--to", "package"]) == 2
    assert "already uses package (microsoft/CvT) names: nothing to convert (--to hf" in \
        capsys.readouterr().err


def test_cli_safetensors(tmp_path, transformers):
    hf = hf_model(transformers)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    from safetensors.torch import load_file, save_file
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "ours.pth"),
                         "--to", "package"]) == 0
    assert convert.main([str(tmp_path / "ours.pth"), str(tmp_path / "back.safetensors"),
                         "--to", "hf"]) == 0
    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_cli_scripts_run(tmp_path):
    sd = models.cvt_13(num_classes=5, spec_overrides=SMALL).state_dict()
    torch.save(sd, tmp_path / "ours.pth")
    subprocess.run([sys.executable, "-m", "cvt_kernels.convert", str(tmp_path / "ours.pth"),
                    str(tmp_path / "hf.pth"), "--to", "hf"], check=True, cwd=ROOT)
    subprocess.run([sys.executable, str(ROOT / "python" / "convert_checkpoint.py"),
                    str(tmp_path / "hf.pth"), str(tmp_path / "back.pth"), "--to", "package"],
                   check=True, cwd=tmp_path)
    assert_same(torch.load(tmp_path / "back.pth", weights_only=True), sd)


def _convert_cli(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "cvt_kernels.convert", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def _one_line_error(proc, code, *words):
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


def test_cli_file_already_in_the_target_naming_says_so(tmp_path):
    """Not a list of every key "not Hugging Face names": the file needs no conversion."""
    torch.save(models.cvt_13(num_classes=5, spec_overrides=SMALL).state_dict(),
               tmp_path / "ours.pth")
    _one_line_error(_convert_cli(tmp_path / "ours.pth", tmp_path / "out.pth", "--to",
                                 "package"), 2, "already uses package (microsoft/CvT) names",
                    "--to hf")
    assert not (tmp_path / "out.pth").exists()


def test_cli_missing_source_and_destination_directory(tmp_path):
    _one_line_error(_convert_cli(tmp_path / "none.pth", tmp_path / "out.pth", "--to", "hf"), 2,
                    "SRC", "no such file")
    script = subprocess.run([sys.executable, str(ROOT / "python" / "convert_checkpoint.py"),
                             str(tmp_path / "none.pth"), "out.pth", "--to", "hf"],
                            capture_output=True, text=True, cwd=tmp_path)
    _one_line_error(script, 2, "convert_checkpoint.py: error: SRC", "no such file")
    torch.save({}, tmp_path / "empty.pth")
    _one_line_error(_convert_cli(tmp_path / "empty.pth", tmp_path / "no" / "out.pth", "--to",
                                 "hf"), 2, "DST", "does not exist")


@pytest.mark.parametrize("wrap, note", [
    (lambda sd: {"model": sd, "optimizer": {"state": {}}, "epoch": 3},
     "took the 'model' entry of a training checkpoint (left out: optimizer, epoch)"),
    (lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3,
                 "args": argparse.Namespace(model="cvt13")},
     "removed the 'module.' prefix (DistributedDataParallel/DataParallel)"),
], ids=["model-entry", "timm-ddp"])
def test_cli_unwraps_training_checkpoints_and_says_so(tmp_path, wrap, note):
    """microsoft/CvT and timm save {'state_dict': ...} (timm with its argparse options), DDP
    adds 'module.': the model's tensors are converted, and the output says what was done."""
    sd = models.cvt_13(num_classes=5, spec_overrides=SMALL).state_dict()
    torch.save(wrap(sd), tmp_path / "ckpt.pth")
    proc = _convert_cli(tmp_path / "ckpt.pth", tmp_path / "hf.pth", "--to", "hf")
    assert proc.returncode == 0 and note in proc.stdout, proc.stdout + proc.stderr
    assert_same(torch.load(tmp_path / "hf.pth", weights_only=True), convert.package_to_hf(sd))


def test_cli_not_a_state_dict_is_a_usage_error(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    _one_line_error(_convert_cli(tmp_path / "meta.pth", tmp_path / "out.pth", "--to", "hf"), 2,
                    "expected a state_dict or a training checkpoint", "'epoch'")


def test_messages_list_a_few_keys_not_all():
    sd = models.cvt_13(num_classes=5, spec_overrides=SMALL).state_dict()
    bad = {f"x{i}.weight": torch.zeros(1) for i in range(50)}
    with pytest.raises(ValueError, match=r"50 of 50 key\(s\) .*\.\.\. and 47 more\]$"):
        convert.hf_to_package(bad)
    with pytest.raises(ValueError, match="already uses package"):
        convert.hf_to_package(sd)


def test_cli_non_string_keys_are_a_usage_error(tmp_path):
    """A mapping keyed by numbers is not a state_dict: one line naming the file, not an
    AttributeError from deep inside the renaming."""
    torch.save({1: torch.zeros(1), 2: torch.zeros(1)}, tmp_path / "ints.pth")
    _one_line_error(_convert_cli(tmp_path / "ints.pth", tmp_path / "out.pth", "--to", "hf"), 2,
                    f"SRC {tmp_path / 'ints.pth'}", "2 key(s) of type int: [1, 2]")
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("content, words", [
    ({"model": {(0, 1): torch.zeros(1)}, "step": 1}, ["1 key(s) of type tuple"]),
    ({"a.weight": torch.zeros(1), 3: torch.zeros(1)}, ["1 key(s) of type int: [3]"]),
    (torch.zeros(3), ["expected a state_dict", "got Tensor"]),
    ([torch.zeros(3)], ["expected a state_dict", "got list"]),
], ids=["nested-tuple-keys", "mixed-keys", "tensor", "list"])
def test_cli_files_that_hold_no_state_dict_name_the_file(tmp_path, capsys, content, words):
    """The same command in-process (the subprocess test above shows there is no traceback)."""
    src = tmp_path / "bad.pth"
    torch.save(content, src)
    assert convert.main([str(src), str(tmp_path / "out.pth"), "--to", "package"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        f"python -m cvt_kernels.convert: error: SRC {src}: "), err
    assert all(word in err for word in words), err


def test_renaming_refuses_non_string_keys():
    with pytest.raises(ValueError, match=r"state_dict: expected .* string names .* type int"):
        convert.hf_to_package({0: torch.zeros(1)})
