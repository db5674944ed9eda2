"""Speed switches: compile resolution and the opt-in FP8 path (torchao, emulated on CPU)."""

from __future__ import annotations

import sys

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS, error_line

import maelab
from maelab.config import PretrainConfig, build_config
from maelab.engine.accel import compile_module, convert_to_fp8, is_fp8_candidate, resolve_compile
from maelab.engine.optim import build_adamw
from maelab.errors import ConfigError
from maelab.methods import pretrain_step

CPU = torch.device("cpu")
# dims that are multiples of 16, as float8 matmuls need
FP8_ARGS = dict(TINY_MODEL_ARGS, embed_dim=64, decoder_embed_dim=32)


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cpu", False),
        ("auto", "cuda", True),
        ("on", "cpu", True),
        ("off", "cuda", False),
        (True, "cpu", True),
        (False, "cuda", False),
    ],
)
def test_resolve_compile(setting, device, expected):
    assert resolve_compile(setting, torch.device(device)) is expected


def test_resolve_compile_and_mode_reject_bad_values():
    with pytest.raises(ConfigError, match="compile='sometimes'"):
        resolve_compile("sometimes", CPU)
    with pytest.raises(ConfigError, match="compile_mode='turbo'.*reduce-overhead"):
        compile_module(torch.nn.Linear(2, 2), "turbo")


def test_config_compile_defaults_to_auto_and_reads_yaml_booleans():
    assert PretrainConfig().compile == "auto"
    assert build_config(PretrainConfig, None, {"compile": True}).compile == "on"
    assert build_config(PretrainConfig, None, {"compile": False}).compile == "off"
    with pytest.raises(ConfigError, match="compile_mode"):
        build_config(PretrainConfig, None, {"compile_mode": "fast"})
    assert build_config(PretrainConfig, None, {"fp8": False}).fp8 == "off"  # fp8=off on the command line
    with pytest.raises(ConfigError, match="fp8=True.*tensorwise"):
        build_config(PretrainConfig, None, {"fp8": True})
    with pytest.raises(ConfigError, match="fp8='e4m3'.*tensorwise"):
        build_config(PretrainConfig, None, {"fp8": "e4m3"})
    with pytest.raises(ConfigError, match="compile_mode='reduce-overhead'.*accum_steps > 1"):
        build_config(PretrainConfig, None, {"compile_mode": "reduce-overhead", "accum_steps": 2})
    assert build_config(PretrainConfig, None, {"compile_mode": "default", "accum_steps": 2}).accum_steps == 2
    with pytest.raises(ConfigError, match="fp8.*fp16"):
        build_config(PretrainConfig, None, {"fp8": "tensorwise", "precision": "fp16"})


def _model(**kw):
    torch.manual_seed(0)
    return maelab.create_model("mae_vit_pico_patch4_32", **{**FP8_ARGS, **kw})


def test_fp8_converts_only_block_linears_and_keeps_state_dict_keys():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    model = _model()
    keys = list(model.state_dict())
    blocks = FP8_ARGS["depth"] + FP8_ARGS["decoder_depth"]
    assert convert_to_fp8(model, "tensorwise", CPU) == 4 * blocks  # qkv, proj, fc1, fc2 per block
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert len(converted) == 4 * blocks
    assert all(n.startswith(("encoder.blocks.", "decoder_blocks.")) for n in converted)
    assert not isinstance(model.decoder_pred, Float8Linear) and not isinstance(model.decoder_embed, Float8Linear)
    assert list(model.state_dict()) == keys
    plain = maelab.create_model("mae_vit_pico_patch4_32", **FP8_ARGS)
    plain.load_state_dict(model.state_dict(), strict=True)  # a fp8 run's checkpoint loads into a plain model


def test_fp8_candidates_need_dims_divisible_by_16():
    assert is_fp8_candidate(torch.nn.Linear(64, 128), "encoder.blocks.0.mlp.fc1")
    assert not is_fp8_candidate(torch.nn.Linear(64, 120), "encoder.blocks.0.mlp.fc1")
    assert not is_fp8_candidate(torch.nn.Linear(64, 128), "decoder_pred")
    model = _model(embed_dim=24, num_heads=2, decoder_embed_dim=24)
    pytest.importorskip("torchao")
    with pytest.raises(ConfigError, match="divisible by 16"):
        convert_to_fp8(model, "tensorwise", CPU)


def test_fp8_without_torchao_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'maelab\[fp8\]'"):
        convert_to_fp8(_model(), "tensorwise", CPU)


def test_fp8_off_is_a_no_op():
    model = _model()
    before = {n: type(m) for n, m in model.named_modules()}
    assert convert_to_fp8(model, "off", CPU) == 0
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_loss_and_gradients_follow_the_exact_path(recipe):
    """Same weights and noise: the fp8 loss is within float8 rounding of the fp32 loss and the
    gradients point the same way (emulated float8 on CPU: the same casts and scales as on GPU)."""
    pytest.importorskip("torchao")
    exact, fp8 = _model(), _model()
    convert_to_fp8(fp8, recipe, CPU)
    imgs, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 64)
    grads = {}
    losses = {}
    for name, model in (("exact", exact), ("fp8", fp8)):
        out = model(imgs, noise=noise)
        out.loss.backward()
        losses[name] = out.loss.item()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert losses["fp8"] == pytest.approx(losses["exact"], rel=0.03)
    cos = torch.nn.functional.cosine_similarity(grads["fp8"], grads["exact"], dim=0).item()
    assert cos > 0.97, cos


def test_fp8_pads_the_token_dim_of_the_weight_gradient_for_cuda_scaled_mm(monkeypatch):
    """A batch whose batch x tokens is not a multiple of 16 (3 x 65 decoder tokens) trains: every float8
    matmul gets inner dims divisible by 16, which torch._scaled_mm requires on CUDA (checked here on CPU)."""
    pytest.importorskip("torchao")
    real = torch._scaled_mm
    inner: list[int] = []

    def cuda_like_scaled_mm(a, b, *args, **kwargs):
        assert a.shape[1] == b.shape[0]
        inner.append(a.shape[1])
        if a.shape[1] % 16:
            raise RuntimeError(f"inner dim {a.shape[1]} of torch._scaled_mm must be divisible by 16")
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", cuda_like_scaled_mm)
    model = _model()
    layers = convert_to_fp8(model, "tensorwise", CPU)
    model(torch.randn(3, 3, 32, 32), noise=torch.rand(3, 64)).loss.backward()
    assert len(inner) == 3 * layers  # output, grad input and grad weight of each float8 Linear


@pytest.mark.slow  # ~45 s: torchao's emulated float8 steps are slow on CPU
def test_fp8_training_lowers_the_loss_like_the_exact_path():
    pytest.importorskip("torchao")
    imgs = torch.randn(16, 3, 32, 32)
    curves = {}
    for name in ("exact", "fp8"):
        model = _model()
        if name == "fp8":
            convert_to_fp8(model, "tensorwise", CPU)
        opt = build_adamw(model, lr=2e-3)
        step = pretrain_step(model, opt, CPU, torch.float32, generator=torch.Generator().manual_seed(1))
        curves[name] = [step([imgs], 2e-3).item() for _ in range(8)]
    assert curves["fp8"][-1] < 0.8 * curves["fp8"][0]
    assert curves["fp8"][-1] == pytest.approx(curves["exact"][-1], rel=0.1)


def test_pretrain_with_fp8_runs_and_reports_it(tmp_path, caplog):
    pytest.importorskip("torchao")
    from maelab.engine.pretrain import pretraining_loop

    overrides = {
        "output": str(tmp_path / "run"),
        "device": "cpu",
        "epochs": 1,
        "batch_size": 8,
        "warmup_epochs": 0,
        "data.num_samples": 16,
        "data.num_workers": 0,
        "model": "mae_vit_pico_patch4_32",
        "fp8": "tensorwise",
        "vis_every": 1,
        **{f"model_args.{k}": v for k, v in FP8_ARGS.items()},
    }
    with caplog.at_level("INFO"):
        loop = pretraining_loop(build_config(PretrainConfig, None, overrides), progress=False)
        loop.run()
    assert loop.p.fp8_layers == 4 * (FP8_ARGS["depth"] + FP8_ARGS["decoder_depth"])
    assert "fp8 tensorwise in 12 Linear layers" in caplog.text and ", eager" in caplog.text
    plain = maelab.create_model("mae_vit_pico_patch4_32", **FP8_ARGS)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    plain.load_state_dict(state["model"], strict=True)


def test_compile_failure_becomes_one_actionable_line():
    from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException

    from maelab.engine.accel import explain_compile_failure

    with pytest.raises(ConfigError, match=r"torch.compile failed.*boom.*compile=off \(--no-compile\)"):
        with explain_compile_failure(True):
            raise TorchDynamoException("boom\nlong trace")
    assert issubclass(BackendCompilerFailed, TorchDynamoException)
    with pytest.raises(ValueError):  # model errors are not blamed on the compiler
        with explain_compile_failure(True):
            raise ValueError("bad input")
    with pytest.raises(TorchDynamoException):  # eager runs: nothing to explain
        with explain_compile_failure(False):
            raise TorchDynamoException("boom")


# ---------------------------------------------------------------------------------- compile=auto falls back
COMPILE_ERROR = "inductor: no working C++ compiler"
FALLBACK_WARNING = (
    f"torch.compile failed on this machine (TorchDynamoException: {COMPILE_ERROR}); compile=auto: "
    "running eagerly instead (compile=on makes this an error, compile=off skips compiling)"
)


class FailsOnFirstCall:
    """Stands in for a torch.compile'd module whose compilation fails inside the first call, after the step drew
    that call's masking noise and after work that must not count: gradients accumulated, the global RNG drawn."""

    def __init__(self, module):
        self.module = module
        self.calls = 0

    def __call__(self, imgs, noise=None):
        self.calls += 1
        self.module(imgs, noise=noise).loss.backward()
        torch.rand(3)
        from torch._dynamo.exc import TorchDynamoException

        raise TorchDynamoException(f"{COMPILE_ERROR}\nfull trace")


def _force_compile(monkeypatch, compiled=None, build_error=None):
    """compile=auto/on resolve to on (on CPU auto is off); torch.compile returns ``compiled`` or raises."""
    import maelab.engine.accel as accel

    monkeypatch.setattr(accel, "resolve_compile", lambda setting, device: accel.on_off(setting) != "off")

    def fake_compile(module, mode="default"):
        if build_error is not None:
            raise build_error
        compiled.append(FailsOnFirstCall(module))
        return compiled[-1]

    monkeypatch.setattr(accel, "compile_module", fake_compile)


def _pretrain_overrides(tmp_path, name, compile):
    return {
        "output": str(tmp_path / name),
        "device": "cpu",
        "epochs": 1,
        "batch_size": 8,
        "warmup_epochs": 0,
        "lr": 1e-2,
        "data.num_samples": 24,
        "data.num_workers": 0,
        "model": "mae_vit_pico_patch4_32",
        "compile": compile,
        **{f"model_args.{k}": v for k, v in TINY_MODEL_ARGS.items()},
    }


def _train(tmp_path, name, compile):
    from maelab.engine.pretrain import pretraining_loop

    loop = pretraining_loop(
        build_config(PretrainConfig, None, _pretrain_overrides(tmp_path, name, compile)), progress=False
    )
    loop.run(max_steps=2)  # stops (with a checkpoint) before the end-of-epoch figures
    return loop, torch.get_rng_state()


def test_compile_auto_failing_in_the_first_step_reruns_it_eagerly_from_the_same_state(tmp_path, monkeypatch, caplog):
    """The failed try's gradients, masking noise and RNG draws are undone: the weights after the run, the masking
    generator and the global RNG are exactly those of an eager run; one warning names the error."""
    eager, eager_rng = _train(tmp_path, "eager", "off")
    compiled: list[FailsOnFirstCall] = []
    _force_compile(monkeypatch, compiled)
    with caplog.at_level("WARNING"):
        auto, auto_rng = _train(tmp_path, "auto", "auto")
    assert len(compiled) == 1 and compiled[0].calls == 1  # one failed call, then eager steps
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [FALLBACK_WARNING]
    assert auto.step == eager.step == 2 and not auto.p.compiled
    for key, value in eager.p.model.state_dict().items():
        assert torch.equal(auto.p.model.state_dict()[key], value), key
    assert torch.equal(auto.p.mask_gen.get_state(), eager.p.mask_gen.get_state())
    assert torch.equal(auto_rng, eager_rng)


def test_compile_auto_failing_at_build_trains_eagerly_and_on_keeps_one_line_errors(
    tmp_path, monkeypatch, caplog, capsys
):
    _force_compile(monkeypatch, build_error=RuntimeError("Dynamo is not supported on this Python"))
    with caplog.at_level("INFO"):
        loop, _ = _train(tmp_path, "auto", "auto")
    assert loop.step == 2 and ", eager" in loop.p.summary()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "torch.compile failed on this machine (RuntimeError: Dynamo is not supported on this Python); compile=auto: "
        "running eagerly instead (compile=on makes this an error, compile=off skips compiling)"
    ]

    argv = [
        "pretrain",
        "--model",
        "mae_vit_pico_patch4_32",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--no-progress",
        "--compile",
        "data.num_samples=16",
        *[f"model_args.{k}={v}" for k, v in TINY_MODEL_ARGS.items()],
    ]
    err = error_line(capsys, [*argv, "--output", str(tmp_path / "on-build")])
    assert err.startswith(
        "maelab: error: torch.compile failed on this machine (RuntimeError: Dynamo is not supported on this Python)"
        "; rerun with compile=off"
    ), err
    _force_compile(monkeypatch, [])  # compiles, then fails in the first step
    err = error_line(capsys, [*argv, "--output", str(tmp_path / "on-step")])
    assert f"(TorchDynamoException: {COMPILE_ERROR}); rerun with compile=off" in err, err


def test_bench_step_falls_back_like_training(monkeypatch, caplog):
    """maelab bench's default variant (compile=auto) measures the eager step when compiling fails."""
    from maelab.bench.run import Variant, _ours
    from maelab.models.registry import get_config

    compiled: list[FailsOnFirstCall] = []
    _force_compile(monkeypatch, compiled)
    step = _ours(get_config("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS), 4, CPU, torch.float32, Variant())
    with caplog.at_level("WARNING"):
        step()
        step()
    assert compiled[0].calls == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [FALLBACK_WARNING]
