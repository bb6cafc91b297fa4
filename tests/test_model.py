"""The DToP model against the paper's spec (§3.3): shapes, DPE, ELM, branches, head, ablations."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtop_export.errors import DToPError, ShapeError
from dtop_export.model import DToP, DynamicPosEmbed, WaveBlock, build_model, get_preset, parameter_counts
from dtop_export.model.backbone import StdConv2dStaticSame, create_vit, make_same_padding_static


@pytest.mark.parametrize(("h", "w"), [(256, 256), (192, 320), (320, 192), (64, 128), (16, 16)])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_shapes(small_model: DToP, h: int, w: int, batch: int) -> None:
    x = torch.randn(batch, 3, h, w)
    with torch.no_grad():
        u = small_model(x)
        d = small_model.descriptors(x)
    assert u.shape == (batch, 256)
    assert d.shape == (batch, 256)
    assert torch.allclose(d.norm(dim=-1), torch.ones(batch), atol=1e-5)
    assert torch.isfinite(u).all()


@pytest.mark.parametrize("shape", [(1, 3, 250, 256), (1, 3, 256, 100), (1, 1, 256, 256), (3, 256, 256)])
def test_bad_shapes_raise_clear_error(small_model: DToP, shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError) as e:
        small_model(torch.randn(*shape))
    assert "\n" not in str(e.value)


def test_non_multiple_size_suggests_fix(small_model: DToP) -> None:
    with pytest.raises(ShapeError, match=r"multiple of the model stride 16: resize to 256x256"):
        small_model(torch.randn(1, 3, 250, 260))


def _cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (t in [0, 1))."""

    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return np.array([k(t + 1), k(t), k(1 - t), k(2 - t)])


def _reference_resize(grid: np.ndarray, out_h: int, out_w: int, mode: str) -> np.ndarray:
    """Separable resize of [C, h, w] with half-pixel centres and edge clamping, written from the formula."""

    def matrix(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = (i + 0.5) * n_in / n_out - 0.5
            if mode == "bilinear":
                src = max(src, 0.0)
                i0 = int(np.floor(src))
                t = src - i0
                for off, wt in ((0, 1 - t), (1, t)):
                    m[i, min(max(i0 + off, 0), n_in - 1)] += wt
            else:
                i0 = int(np.floor(src))
                t = src - i0
                for off, wt in zip((-1, 0, 1, 2), _cubic_weights(t)):
                    m[i, min(max(i0 + off, 0), n_in - 1)] += wt
        return m

    mh, mw = matrix(grid.shape[1], out_h), matrix(grid.shape[2], out_w)
    return np.einsum("oh,chw,pw->cop", mh, grid, mw)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_dpe_identity_at_native_grid(mode: str) -> None:
    torch.manual_seed(1)
    dpe = DynamicPosEmbed((6, 8), 5, mode=mode)
    with torch.no_grad():
        out = dpe(6, 8)
    assert out.shape == (1, 1 + 48, 5)
    torch.testing.assert_close(out, dpe.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize(("h", "w"), [(9, 12), (3, 5), (6, 20), (14, 4)])
def test_dpe_matches_reference_interpolation(mode: str, h: int, w: int) -> None:
    torch.manual_seed(2)
    dpe = DynamicPosEmbed((6, 8), 5, mode=mode)
    with torch.no_grad():
        out = dpe(h, w)[0].numpy()
    weight = dpe.weight.detach()[0].numpy()
    np.testing.assert_array_equal(out[0], weight[0])  # [CLS] row untouched
    grid = weight[1:].reshape(6, 8, 5).transpose(2, 0, 1)
    ref = _reference_resize(grid, h, w, mode).transpose(1, 2, 0).reshape(h * w, 5)
    np.testing.assert_allclose(out[1:], ref, atol=1e-5)


def test_dpe_initialised_from_backbone_pos_embed() -> None:
    torch.manual_seed(3)
    vit = create_vit("dtop_tiny_r_s16", img_size=256)
    pos = vit.pos_embed.detach().clone()
    model = DToP(get_preset("small"), vit)
    torch.testing.assert_close(model.encoder.pos_embed.weight.detach(), pos)
    assert model.encoder.pos_embed.grid_size == (16, 16)


def test_static_same_padding_equals_timm_dynamic_padding() -> None:
    """The static-pad stem is exactly timm's dynamic TF-'same' stem at sizes that are multiples of 16."""
    torch.manual_seed(4)
    vit = create_vit("dtop_tiny_r_s16", img_size=256)
    stem = vit.patch_embed.backbone.eval()
    static = copy.deepcopy(stem)
    assert make_same_padding_static(static) > 0
    for h, w in [(64, 64), (96, 160), (256, 192)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(static(x), stem(x), rtol=1e-5, atol=1e-5)


def test_weight_standardisation_cached_once_per_state_of_the_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With caching on (and no gradient recorded) the stem's standardised weights are computed once per state of
    the weights and reused, the same bits as computing them in every pass; an optimiser step, loaded weights, a
    dtype round trip or inference-mode weights are never served a stale copy; off (the default), every pass
    computes them, and the eager fp32 engine turns it on."""
    from dtop_export.checkpoint import new_provenance, save_checkpoint
    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.model.backbone import cache_weight_standardization, weight_standardization_cached
    from dtop_export.preprocess import default_preprocess

    torch.manual_seed(0)
    model = build_model(get_preset("small")).eval()
    convs = [m for m in model.modules() if isinstance(m, StdConv2dStaticSame)]
    calls: list[StdConv2dStaticSame] = []
    standardize = StdConv2dStaticSame.standardized_weight

    def counted(self: StdConv2dStaticSame) -> torch.Tensor:
        calls.append(self)
        return standardize(self)

    monkeypatch.setattr(StdConv2dStaticSame, "standardized_weight", counted)
    x = torch.randn(2, 3, 64, 96)

    def every_pass() -> torch.Tensor:  # the forward as it was: standardised in the pass
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(StdConv2dStaticSame, "inference_weight", counted)
            return model(x)

    with torch.no_grad():
        model(x), model(x)
    assert len(calls) == 2 * len(convs) > 0  # off by default
    calls.clear()
    with weight_standardization_cached(model):
        with torch.no_grad():
            first, again = model(x), model(x)
        with torch.inference_mode():
            third = model(x)
        assert len(calls) == len(convs)  # once each, for three passes
        assert torch.equal(first, every_pass()) and torch.equal(again, first) and torch.equal(third, first)

        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model(x).square().sum().backward()  # records a gradient: computed in the pass
        with torch.no_grad():
            model(x)  # cached at the weights before the step
        optimizer.step()  # updates the weights in place
        with torch.no_grad():
            stepped = model(x)
        assert torch.equal(stepped, every_pass()) and not torch.equal(stepped, first)

        torch.manual_seed(1)
        model.load_state_dict(build_model(get_preset("small")).state_dict())
        with torch.no_grad():
            loaded = model(x)
        assert torch.equal(loaded, every_pass()) and not torch.equal(loaded, stepped)
        model.half().float()  # new storage each way, the weights rounded to fp16
        with torch.no_grad():
            rounded = model(x)
        assert torch.equal(rounded, every_pass()) and not torch.equal(rounded, loaded)
        # the key's address is pinned by an alias of the weight's own storage (it cannot come back as another's)
        assert all(c.__dict__["_standardized"][0].data_ptr() == c.weight.data_ptr() for c in convs)
        adam = torch.optim.Adam(model.parameters(), lr=0.5, foreach=True)  # foreach kernels bump versions too
        model(x).square().sum().backward()
        adam.step()
        with torch.no_grad():
            adamed = model(x)
        assert torch.equal(adamed, every_pass()) and not torch.equal(adamed, rounded)
        # a pickled or deep-copied module keeps caching on but carries no copy of the stem's weights
        saved = io.BytesIO()
        torch.save(model, saved)
        saved.seek(0)
        for twin in (torch.load(saved, weights_only=False), copy.deepcopy(model)):
            twins = [m for m in twin.modules() if isinstance(m, StdConv2dStaticSame)]
            assert all(m.__dict__["_standardized"] == [] for m in twins)
            calls.clear()
            with torch.no_grad():
                assert torch.equal(twin(x), adamed) and torch.equal(twin(x), adamed)
            assert calls == twins  # its own copy, computed once
        assert all(c.__dict__["_standardized"] for c in convs)  # the original's copies kept
    assert not any("_standardized" in c.__dict__ for c in convs)  # off again, the copies dropped

    with torch.inference_mode():  # inference-mode weights have no version counter: never cached
        frozen = build_model(get_preset("small")).eval()
    cache_weight_standardization(frozen)
    with torch.inference_mode():
        frozen(x)

    TorchEngine(model, default_preprocess("dtop_tiny_r_s16", model.stride))  # the caller's model: left as it is
    assert not any("_standardized" in c.__dict__ for c in convs)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, default_preprocess("dtop_tiny_r_s16", model.stride), provenance=new_provenance("t"))
    engine = TorchEngine.from_checkpoint(ckpt)  # a model of its own: cached
    calls.clear()
    engine.embed(x.numpy()), engine.embed(x.numpy())
    assert len(calls) == len(convs)


def test_only_strided_same_layers_pad_and_only_their_asymmetric_part(small_model: DToP) -> None:
    """A separate zero pad copies its input: the stride-1 convs (timm pads them symmetrically itself) and the
    symmetric part of a stride-2 "same" pad go to the conv's own padding, so only the one extra row/column of a
    strided conv or pool is an F.pad -- in the model and in the folded deployment network alike."""
    from torch.overrides import TorchFunctionMode

    from dtop_export.fold import fold_for_deployment

    class CountPads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.pads: list[tuple[int, ...]] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is torch.nn.functional.pad:
                self.pads.append(tuple(args[1]))
            return func(*args, **(kwargs or {}))

    def strided(m: torch.nn.Module) -> bool:  # a strided conv/pool wider than 1: TF's "same" pads it unevenly
        return m.stride not in (1, (1, 1)) and m.kernel_size not in (1, (1, 1))

    padded = [m for m in small_model.modules() if hasattr(m, "static_pad") and any(m.static_pad)]
    assert padded and padded == [m for m in small_model.modules() if hasattr(m, "static_pad") and strided(m)]
    deploy, _ = fold_for_deployment(copy.deepcopy(small_model), None)
    x = torch.randn(1, 3, 64, 96)
    for net in (small_model, deploy):
        counter = CountPads()
        with torch.no_grad(), counter:
            net(x)
        assert len(counter.pads) == len(padded), counter.pads
        assert all(min(p[0], p[1]) == 0 and min(p[2], p[3]) == 0 for p in counter.pads), counter.pads


def test_eval_is_deterministic_and_train_is_augmented(small_model: DToP) -> None:
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a, b = small_model(x), small_model(x)
    assert torch.equal(a, b)
    train_model = copy.deepcopy(small_model).train()
    with torch.no_grad():
        torch.manual_seed(0)
        t1 = train_model(x)
        torch.manual_seed(1)
        t2 = train_model(x)
    assert not torch.allclose(t1, t2)  # WaveBlock + dropout differ between calls in training


def test_waveblock_keeps_one_band_and_scales_the_rest() -> None:
    wb = WaveBlock(ratio=0.25, rate=1.5).train()
    x = torch.ones(4, 2, 8, 3)
    y = wb(x)
    for b in range(4):
        rows = y[b, 0, :, 0]
        kept = (rows == 1.0).nonzero().flatten()
        assert len(kept) == 2 and kept[1] - kept[0] == 1  # one contiguous band of 0.25*8 rows
        assert torch.all((rows == 1.0) | (rows == 1.5))
        assert torch.equal(y[b, 1], y[b, 0])  # same band for all channels of a sample
    assert torch.equal(wb.eval()(x), x)


def test_head_bn_removed_at_inference_by_default(small_model: DToP) -> None:
    head = copy.deepcopy(small_model.head)
    with torch.no_grad():
        head.bn.running_mean.fill_(3.0)
        head.bn.running_var.fill_(4.0)
    z = torch.randn(5, head.fc.in_features)
    with torch.no_grad():
        torch.testing.assert_close(head(z), head.fc(z))
        head.bn_at_inference = True
        torch.testing.assert_close(head(z), head.bn(head.fc(z)))


def test_branch_dimensions_follow_the_paper(small_model: DToP) -> None:
    d, k, n = 192, 4, 256
    assert small_model.global_branch.fc.in_features == k * d
    assert small_model.local_branch.reduce.in_channels == k * d
    assert small_model.local_branch.reduce.out_channels == d
    irb = small_model.local_branch.elm.irb
    convs = [m for m in irb.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    assert convs[0].out_channels == 2 * d and convs[1].groups == 2 * d and convs[2].out_channels == d
    aspp = small_model.local_branch.elm.aspp
    assert [b[0].dilation for b in aspp.branches] == [(6, 6), (12, 12), (18, 18)]
    assert aspp.project[0].in_channels == 3 * d and aspp.project[0].out_channels == d
    assert small_model.head.fc.in_features == 2 * n and small_model.head.fc.out_features == n


ABLATIONS = {
    "baseline (plain CLS)": dict(global_branch=False, local_branch=False),
    "global only": dict(local_branch=False),
    "local only": dict(global_branch=False),
    "local no ELM": dict(global_branch=False, elm=False),
    "full no ELM": dict(elm=False),
    "fuse concat": dict(fuse="concat"),
    "fuse max": dict(fuse="max"),
    "separable ASPP": dict(aspp_separable=True),
    "no WaveBlock": dict(waveblock=False),
    "k=1": dict(num_layers=1),
    "k=L": dict(num_layers=6),
    "head BN kept": dict(head_bn_at_inference=True),
    "no head BN": dict(head_bn=False),
    "bilinear DPE": dict(pos_embed_mode="bilinear"),
    "N=128, rates 2,4": dict(descriptor_dim=128, aspp_rates=(2, 4)),
    "no feature norm": dict(norm_features=False),
}


@pytest.mark.parametrize("changes", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_every_ablation_builds_and_runs(changes: dict) -> None:
    cfg = get_preset("small").replace(**changes)
    model = build_model(cfg).eval()
    with torch.no_grad():
        d = model.descriptors(torch.randn(2, 3, 96, 128))
    assert d.shape == (2, cfg.descriptor_dim)
    assert torch.isfinite(d).all()
    model.train()(torch.randn(2, 3, 64, 64)).sum().backward()  # trainable in every configuration


def test_ablation_parts() -> None:
    cfg = get_preset("small")
    assert cfg.replace(global_branch=False, local_branch=False).branches == ("cls",)
    assert cfg.replace(global_branch=False).branches == ("local",)
    assert cfg.branches == ("cls", "local")
    baseline = build_model(cfg.replace(global_branch=False, local_branch=False))
    assert baseline.global_branch.fc.in_features == 192  # last-layer [CLS] only
    assert baseline.local_branch is None and baseline.head.fc.in_features == 256


@pytest.mark.parametrize(
    "changes",
    [dict(num_layers=0), dict(num_layers=7), dict(fuse="mean"), dict(irb_expansion=1.0), dict(backbone="nope")],
)
def test_invalid_configs_are_user_errors(changes: dict) -> None:
    with pytest.raises(DToPError):
        build_model(get_preset("small").replace(**changes))


def test_config_roundtrip() -> None:
    cfg = get_preset("small").replace(aspp_rates=(3, 5), fuse="concat")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DToPError, match="unknown DToP config field"):
        type(cfg).from_dict({**cfg.to_dict(), "shiny_new_field": 1})


def test_full_preset_parameter_counts() -> None:
    """R50+ViT-B/16 has 98M parameters (paper §4.1); the DToP head adds the branches on top."""
    counts = parameter_counts(build_model(get_preset("r50-vitb16")))
    backbone = counts["stem"] + counts["transformer"] + counts["pos_embed"]
    assert 97e6 < backbone < 99.5e6
    assert counts["global_branch"] == 6 * 768 * 1536 + 1536
    assert counts["total"] == backbone + counts["global_branch"] + counts["local_branch"] + counts["head"]


def test_small_preset_uses_descriptor_normalisation(small_model: DToP) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small_model.descriptors(x), F.normalize(small_model(x), dim=-1))


def test_in_training_validation_standardises_the_stem_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Validation during training embeds every image of its set with fixed weights: the stem's standardised weights
    are computed once for the whole pass (not in every image's pass), and the model is left uncached after."""
    import dtop_export.retrieval.evaluate as evaluate_module
    from dtop_export.preprocess import default_preprocess
    from dtop_export.training.config import ValSection
    from dtop_export.training.validate import validate

    torch.manual_seed(0)
    model = build_model(get_preset("small")).train()
    convs = [m for m in model.modules() if isinstance(m, StdConv2dStaticSame)]
    calls: list[StdConv2dStaticSame] = []
    standardize = StdConv2dStaticSame.standardized_weight
    monkeypatch.setattr(StdConv2dStaticSame, "standardized_weight", lambda m: calls.append(m) or standardize(m))
    images = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)

    def evaluate(engine, root, name, **kwargs):  # noqa: ANN001, ANN003, ANN202 - three images' passes
        for _ in range(3):
            engine.embed(images)
        return type("Result", (), {"map": {"easy": 1.0, "medium": 2.0, "hard": 3.0}})()

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    got = validate(model, default_preprocess("dtop_tiny_r_s16", model.stride), ValSection(root=str(tmp_path)))
    assert got == {"easy": 1.0, "medium": 2.0, "hard": 3.0}
    assert calls == convs  # once each, for three passes
    assert model.training and not any("_standardized" in c.__dict__ for c in convs)
