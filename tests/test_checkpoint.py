"""Checkpoint format: round trip, atomic writes and one-line errors for every bad file."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from dtop_export.checkpoint import FORMAT_VERSION, Whitening, load_checkpoint, load_model, save_checkpoint
from dtop_export.errors import CheckpointError, DToPError
from dtop_export.model import DToP, build_model, get_preset
from dtop_export.preprocess import default_preprocess


def test_roundtrip_is_bit_exact(tmp_path: Path, small_model: DToP) -> None:
    wh = Whitening(mean=torch.randn(256), proj=torch.randn(128, 256), kind="lw", info={"pairs": 10})
    path = save_checkpoint(tmp_path / "a.pt", small_model, default_preprocess("x", 16), whitening=wh)
    model, ckpt = load_model(path)
    for k, v in small_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert ckpt.config == small_model.cfg
    assert torch.equal(ckpt.whitening.proj, wh.proj) and ckpt.whitening.info == {"pairs": 10}
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert torch.equal(model(x), small_model(x))
    assert len(ckpt.sha256) == 64


def test_whitening_semantics() -> None:
    """cirtorch: normalize(P (x - m)) on L2-normalised descriptors."""
    x = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    wh = Whitening(mean=torch.randn(6), proj=torch.randn(3, 6))
    ref = (wh.proj @ (x - wh.mean).T).T
    torch.testing.assert_close(wh.apply(x), ref / ref.norm(dim=1, keepdim=True))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    p.write_text("hello")
    with pytest.raises(CheckpointError, match="not a dtop-export checkpoint"):
        load_checkpoint(p)
    torch.save({"state_dict": {"a": torch.zeros(1)}}, p)  # a torch file, but not ours
    with pytest.raises(CheckpointError, match="not a dtop-export checkpoint"):
        load_checkpoint(p)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_truncated_file(tmp_path: Path, small_ckpt: Path, keep: float) -> None:
    data = small_ckpt.read_bytes()
    p = tmp_path / "t.pt"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(p)


def _rewrite(src: Path, dst: Path, **changes: object) -> None:
    payload = torch.load(src, weights_only=True)
    payload.update(changes)
    torch.save(payload, dst)


def test_newer_format_version(tmp_path: Path, small_ckpt: Path) -> None:
    p = tmp_path / "new.pt"
    _rewrite(small_ckpt, p, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match=rf"format version {FORMAT_VERSION + 1}.*upgrade"):
        load_checkpoint(p)


def _edited(small_ckpt: Path, section: str, **changes: object) -> dict:
    payload = torch.load(small_ckpt, weights_only=True)
    if section == "whitening" and "value" in changes:
        payload["whitening"] = changes["value"]
    else:
        payload[section] = {**(payload[section] or {}), **changes}
    return payload


WHITENING_OK = {"mean": torch.zeros(256), "proj": torch.eye(128, 256), "kind": "lw", "info": {}}


@pytest.mark.parametrize(
    ("section", "changes", "said"),
    [
        ("whitening", {"value": {"proj": torch.eye(256)}}, "no floating-point tensor 'mean'"),
        ("whitening", {"value": [torch.zeros(256)]}, "whitening is a list, not a mapping"),
        ("whitening", {"value": {**WHITENING_OK, "proj": torch.eye(128, 200)}}, r"want mean \(256,\) and proj"),
        ("whitening", {"value": {**WHITENING_OK, "proj": torch.eye(300, 256)}}, r"with d <= 256"),
        ("config", {"num_layers": "four"}, "field num_layers is 'four': not a valid int"),
        ("config", {"fuse": "avg"}, "field fuse is 'avg': not a valid one of 'sum', 'concat', 'max'"),
        ("config", {"num_layers": 0}, "num_layers .k. must be >= 1"),
        ("preprocess", {"stride": 0}, "stride and size must be >= 1"),
        ("preprocess", {"mean": [0.5]}, r"field mean is \[0.5\]: not a valid tuple"),
        ("preprocess", {"std": [0.5, 0.0, 0.5]}, "std > 0"),
        ("preprocess", {"interpolation": "magic"}, "unknown interpolation 'magic'"),
        ("preprocess", {"size": True}, "field size is True: not a valid int"),
    ],
)
def test_a_malformed_section_is_one_line_naming_it(
    tmp_path: Path, small_ckpt: Path, section: str, changes: dict, said: str
) -> None:
    """A checkpoint whose whitening, config or preprocessing a hand or another tool edited failed far from the file:
    KeyError 'mean', a TypeError in the model's constructor, a ZeroDivisionError in a resize, a whitening of the
    wrong size deep inside torch.export after 20 s of tracing, a 1-value mean written into the ONNX metadata (a
    review). Each is now a CheckpointError on load, naming the file and the field."""
    p = tmp_path / "edited.pt"
    torch.save(_edited(small_ckpt, section, **changes), p)
    with pytest.raises(CheckpointError, match=said) as e:
        load_checkpoint(p)
    assert str(e.value).startswith(f"{p}: its {section}") and "\n" not in str(e.value)


def test_a_malformed_checkpoint_is_one_line_in_the_cli(
    tmp_path: Path, small_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_helpers import cli

    p = tmp_path / "edited.pt"
    torch.save(_edited(small_ckpt, "config", num_layers="four"), p)
    assert cli("onnx", str(p), "-o", str(tmp_path / "m.onnx")) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "num_layers is 'four'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.onnx").exists()
    torch.save(_edited(small_ckpt, "whitening", value=WHITENING_OK), p)  # a well-formed whitening loads
    assert load_checkpoint(p).whitening.out_dim == 128


def test_config_weights_mismatch_names_keys(tmp_path: Path, small_ckpt: Path) -> None:
    p = tmp_path / "mm.pt"
    cfg = get_preset("small").replace(descriptor_dim=128).to_dict()
    _rewrite(small_ckpt, p, config=cfg)
    with pytest.raises(CheckpointError, match=r"shape mismatch .* global_branch\.fc\.weight"):
        load_model(p)
    payload = torch.load(small_ckpt, weights_only=True)
    del payload["state_dict"]["head.fc.bias"]
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, p)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\) e\.g\. head\.fc\.bias.*unexpected.*extra\.weight"):
        load_model(p)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"format": "dtop-export/checkpoint", "format_version": 1, "x": _Evil(str(marker))}, p)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(p)
    assert not marker.exists()
    # and a raw pickle (not even a zip) is refused before unpickling
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_save_is_atomic(tmp_path: Path, small_model: DToP, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "c.pt"
    dest.write_bytes(b"previous")

    def failing_save(obj: object, f: object) -> None:
        Path(f).write_bytes(b"PK\x03\x04half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(dest, small_model, default_preprocess("x", 16))
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_saved_file_is_a_plain_zip_of_tensors(small_ckpt: Path) -> None:
    names = zipfile.ZipFile(io.BytesIO(small_ckpt.read_bytes())).namelist()
    assert any(n.endswith("data.pkl") for n in names)
    # weights_only loading works with no dtop-export code involved
    payload = torch.load(small_ckpt, weights_only=True)
    assert payload["format"] == "dtop-export/checkpoint" and payload["config"]["backbone"] == "dtop_tiny_r_s16"


def test_provenance_and_preprocess_survive(small_ckpt: Path) -> None:
    ckpt = load_checkpoint(small_ckpt)
    assert ckpt.provenance["source"] == "test" and ckpt.provenance["code_version"]
    assert ckpt.preprocess.mean == (0.5, 0.5, 0.5) and ckpt.preprocess.stride == 16


def test_checkpoint_builds_same_architecture(small_ckpt: Path) -> None:
    model = load_checkpoint(small_ckpt).build_model()
    assert isinstance(model, DToP) and not model.training
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in build_model(get_preset("small")).parameters()
    )


def test_build_model_owns_its_weights(small_ckpt: Path) -> None:
    """Built on the meta device, the model gets real copies: nothing left on meta, the sha256 is the file's,
    and changing the model's weights (as folding does) leaves the checkpoint's tensors alone."""
    import hashlib

    ckpt = load_checkpoint(small_ckpt)
    model = ckpt.build_model()
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and not any(t.is_meta for t in tensors)
    assert all(p.requires_grad for p in model.parameters())
    assert ckpt.sha256 == hashlib.sha256(small_ckpt.read_bytes()).hexdigest()
    name, before = next((k, v.clone()) for k, v in ckpt.state_dict.items() if v.is_floating_point())
    with torch.no_grad():
        dict(model.named_parameters(), **dict(model.named_buffers()))[name].add_(1.0)
    assert torch.equal(ckpt.state_dict[name], before)
    assert torch.equal(ckpt.build_model().state_dict()[name], before)


def test_init_from_local_backbone_weights(tmp_path: Path) -> None:
    """`--backbone-weights FILE` (offline machines): the backbone gets exactly those weights."""
    from safetensors.torch import save_file

    from dtop_export.model.backbone import create_vit

    torch.manual_seed(123)
    donor = create_vit("dtop_tiny_r_s16", img_size=256)
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(weights))
    torch.manual_seed(0)
    model = build_model(get_preset("small"), backbone_weights=weights)
    torch.testing.assert_close(model.encoder.blocks[0].attn.qkv.weight, donor.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.encoder.pos_embed.weight, donor.pos_embed)
    torch.testing.assert_close(
        model.encoder.patch_embed.backbone.stem.conv.weight, donor.patch_embed.backbone.stem.conv.weight
    )
    bad = tmp_path / "bad.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(DToPError, match="does not fit backbone"):
        build_model(get_preset("small"), backbone_weights=bad)
    with pytest.raises(DToPError, match="not found"):
        build_model(get_preset("small"), backbone_weights=tmp_path / "missing.safetensors")


def test_file_digest_is_remembered_per_file_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sha256 as hashlib computes it; one read per unchanged file, a prefetch in the background waited for
    and not repeated, a new read once the file changes; several files hash in order."""
    import hashlib
    import os

    from dtop_export import digest

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(5 << 20))  # more than one 4 MiB chunk
    b.write_bytes(b"second")
    reads: list[str] = []
    real_open = open

    def counting_open(path: object, *args: object, **kwargs: object) -> object:
        reads.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", counting_open)
    digest.prefetch_sha256(a)
    assert digest.file_sha256(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert digest.file_sha256(str(a)) == digest.file_sha256(a)
    assert reads == [str(a)]
    assert digest.file_sha256(a, b) == hashlib.sha256(a.read_bytes() + b"second").hexdigest()
    b.write_bytes(b"changed, longer")
    assert digest.file_sha256(b) == hashlib.sha256(b"changed, longer").hexdigest()
    digest.prefetch_sha256(tmp_path / "missing.bin")  # nothing to hash: the caller reports it
    with pytest.raises(FileNotFoundError):
        digest.file_sha256(tmp_path / "missing.bin")
