"""Feeding the engine (issue 31): uint8 pixels normalised by the engine, the decode worker pool, shape-grouped
batches, the overlap of decoding with inference (counted, not timed), the bf16/fp16 deployment path's FP32 islands,
the device JPEG decoder's parity contract (run on the CPU), and the GPU options refusing without CUDA."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import cli
from PIL import Image

from dtop_export.contract import Engine
from dtop_export.corpus.feed import Failure, Feeder, embed_batches
from dtop_export.corpus.runtime import ActorStats
from dtop_export.corpus.schedule import Batcher, ordered, plan, shards_per_window
from dtop_export.corpus.source import CorpusItem, list_source
from dtop_export.errors import DToPError
from dtop_export.preprocess import PreprocessConfig, load_image, prepare_pixels, resize_for_model, to_rgb

CFG = PreprocessConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), size=96)
SCALES = (1.0, 0.75)


def reference_input(img: Image.Image, cfg: PreprocessConfig, size: int, scale: float) -> np.ndarray:
    """The model input as `preprocess.prepare` computed it before issue 31 (e02e813), written out here so that
    a change to the shared arithmetic shows: resize, then float32 /255, -mean, /std, HWC -> CHW."""
    a = np.asarray(resize_for_model(to_rgb(img), cfg, size, scale), dtype=np.float32) / 255.0
    a = (a - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos and generated files of every mode the decoder meets, an EXIF-rotated JPEG, two unreadable files."""
    from dtop_export.retrieval.sample_data import skimage_data_dir

    root = tmp_path_factory.mktemp("feed-images")
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "motorcycle_left.png"):
        img = Image.open(skimage_data_dir() / name).convert("RGB")
        img.thumbnail((200, 200))
        img.save(root / f"{Path(name).stem}.jpg", quality=90)
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), np.uint8)).save(root / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(rng.integers(0, 256, (70, 50, 4), np.uint8), "RGBA").save(root / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (40, 130), np.uint8), "L").save(root / "grey.jpg")
    Image.fromarray(rng.integers(0, 65535, (33, 47), np.uint16)).save(root / "deep.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).convert("CMYK").save(root / "cmyk.jpg")
    (root / "text.jpg").write_text("not an image")
    (root / "truncated.jpg").write_bytes((root / "coffee.jpg").read_bytes()[:300])
    return root


def _run_feeder(items: list[CorpusItem], **kw: Any) -> list[Any]:
    feeder = Feeder(items, CFG, 96, SCALES, batch_size=3, shard_size=5, **kw)
    return list(feeder)


class RecordingEngine(Engine):
    """Keeps every float32 batch it is given; descriptors: the per-image mean."""

    descriptor_dim, stride, preprocess = 1, 16, CFG

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def embed(self, images: np.ndarray) -> np.ndarray:
        self.inputs.append(np.array(images))
        return images.mean(axis=(1, 2, 3))[:, None].astype(np.float32)


# bit-identical model inputs -----------------------------------------------------------------------------------


def test_pixels_normalised_by_the_engine_are_the_preprocessing_bit_for_bit(images: Path) -> None:
    """uint8 pixels -> the engine's normalisation (numpy on the CPU; the torch arithmetic the CUDA path runs,
    here on CPU tensors) give exactly the float32 input the preprocessing gave before (array_equal, not allclose)."""
    import torch

    from dtop_export.engines.pytorch import pixel_normalizer

    engine = RecordingEngine()
    norm = pixel_normalizer(CFG.mean, CFG.std, "cpu")
    for path in sorted(images.iterdir()):
        try:
            img = load_image(path)
        except DToPError:
            continue
        for s in SCALES:
            ref = reference_input(img, CFG, 96, s)
            pixels = prepare_pixels(img, CFG, 96, s)
            assert pixels.dtype == np.uint8 and pixels.shape == (*ref.shape[1:], 3)
            engine.embed_pixels(np.stack([pixels, pixels]))
            assert np.array_equal(engine.inputs[-1], np.stack([ref, ref])), (path.name, s)
            on_device = norm(torch.from_numpy(pixels[None].copy())).contiguous().numpy()
            assert np.array_equal(on_device[0], ref), (path.name, s)
    with pytest.raises(DToPError, match="uint8"):
        engine.embed_pixels(np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_worker_pool_gives_the_same_inputs_every_image_once(images: Path, pool: str) -> None:
    """Decoded by 2 workers (threads, or processes that pickle the pixels back), every readable image's rows (one
    per scale) come back bit-identical to the preprocessing, each in exactly one batch of one shape; unreadable
    files are failures, once; the batch sequence does not depend on the pool or its size."""
    items = list_source(images)
    out = _run_feeder(items, workers=2, pool=pool)
    rows: Counter[tuple[int, int]] = Counter()
    failed = [x.key for x in out if isinstance(x, Failure)]
    for batch in [x for x in out if not isinstance(x, Failure)]:
        assert batch.pixels.dtype == np.uint8 and len(batch.rows) <= 3
        for (key, scale), pixels in zip(batch.rows, batch.pixels):
            rows[(key, scale)] += 1
            ref = reference_input(load_image(items[key].path), CFG, 96, SCALES[scale])
            assert np.array_equal(np.moveaxis(pixels.astype(np.float32) / 255.0, -1, 0),
                                  np.moveaxis(pixels, -1, 0).astype(np.float32) / 255.0)  # fmt: skip
            from dtop_export.preprocess import normalize_pixels

            assert np.array_equal(normalize_pixels(pixels, CFG.mean, CFG.std), ref)
    names = {items[k].path.rsplit("/", 1)[-1] for k in failed}
    assert names == {"text.jpg", "truncated.jpg"} and len(failed) == 2
    assert set(rows.values()) == {1}
    assert {k for k, _ in rows} | set(failed) == set(range(len(items)))
    assert all(rows[(k, s)] for k, _ in rows for s in range(len(SCALES)))
    sequence = [(b.rows, b.pixels.shape) if not isinstance(b, Failure) else b.key for b in out]
    again = _run_feeder(items, workers=1, pool="thread")
    assert sequence == [(b.rows, b.pixels.shape) if not isinstance(b, Failure) else b.key for b in again]


# shape-aware scheduling -------------------------------------------------------------------------------------


def test_plan_keeps_every_image_once_in_shard_windows_grouped_by_shape() -> None:
    rng = np.random.default_rng(1)
    items = [CorpusItem(k, f"id{k}", f"/x/{k}.jpg") for k in range(237)]
    kinds = [((96, 64),), ((64, 96),), ((80, 80),), None]
    shapes = [kinds[i] for i in rng.integers(0, 4, len(items))]
    per_window = shards_per_window(20, batch_size=8)
    assert per_window == 7  # whole shards holding >= 16 batches (128 images)
    work = ordered(items, shapes, 20, per_window)
    assert sorted(it.key for it, _ in work) == list(range(237))
    assert work == ordered(items, shapes, 20, per_window)  # deterministic
    windows = [[it for it, _ in work[i : i + 140]] for i in range(0, 237, 140)]
    for w, members in enumerate(windows):  # window w holds exactly the keys of its shards, shard order kept
        assert {it.key for it in members} == set(range(w * 140, min((w + 1) * 140, 237)))
    first = work[:140]  # within a window: by predicted shape (unknown last), then key
    assert first == plan([it for it, _ in first], [sh for _, sh in first])
    assert [sh for _, sh in first] == sorted((sh for _, sh in first), key=lambda s: (s is None, s or ()))
    # the batcher: rows whose real shape differs from the prediction still land in exactly one batch of one shape
    batcher, batches = Batcher(8), []
    left = Counter(sh for _, sh in first if sh)
    for it, sh in first:
        real = (64, 96) if it.key % 11 == 0 else (sh or ((72, 72),))[0]
        batches += batcher.add(it.key, 0, np.zeros((*real, 3), np.uint8))
        if sh:
            left[sh] -= 1
            if not left[sh]:
                batches += batcher.close_shapes([(*sh[0], 3)])
    batches += batcher.flush()
    assert sorted(k for b in batches for k, _ in b.rows) == sorted(it.key for it, _ in first)
    assert all(len(b.rows) <= 8 and b.pixels.shape[0] == len(b.rows) for b in batches)
    assert sum(len(b.rows) < 8 for b in batches) <= 5  # a fragment per shape, not one per interleaving


# overlap: counted, not timed --------------------------------------------------------------------------------


def test_decoding_runs_while_the_engine_holds_a_batch(tmp_path: Path) -> None:
    """12 images of one shape, batches of 2, 3 decode threads. The images of batch b >= 2 decode only once the
    engine has started batch b - 2, and the engine holds each batch until a decode has finished meanwhile (bounded
    waits): a pipeline that decodes between forward passes instead of during them counts no overlap. A compiled
    engine is warmed up first, at the planned shape."""
    for i in range(12):
        Image.new("RGB", (64, 48), (i, 0, 0)).save(tmp_path / f"{i:02d}.png")
    items = list_source(tmp_path)
    started = [threading.Event() for _ in range(6)]
    feeder = Feeder(items, CFG, 64, (1.0,), batch_size=2, shard_size=100, workers=3,
                    load=lambda p: (_gate(p, started), Image.open(p).convert("RGB"))[1])  # fmt: skip
    calls: list[int] = []

    class HoldingEngine(Engine):
        descriptor_dim, stride, preprocess, device = 1, 16, CFG, "cpu"

        def describe(self) -> dict[str, Any]:
            return {**super().describe(), "compile": "default"}

        def embed(self, x: np.ndarray) -> np.ndarray:
            calls.append(len(x))
            if len(calls) > 1:  # not the warm-up
                batch = len(calls) - 2
                started[batch].set()
                before = feeder.stats.overlapped
                deadline = time.monotonic() + 5
                while batch < 4 and feeder.stats.overlapped == before and time.monotonic() < deadline:
                    time.sleep(0.005)
            return np.ones((len(x), 1), np.float32)

    sink = Sink()
    done: list[int] = []
    embed_batches(HoldingEngine(), feeder, sink, done.append, ActorStats("t"), 2)  # type: ignore[arg-type]
    assert sorted(sink.keys) == list(range(12)) and sum(done) == 12  # progress counts embedded images
    assert feeder.stats.warmup_shapes == [[48, 64]] and calls[0] == 2  # warm-up at the planned shape, one batch
    assert feeder.stats.overlapped >= 4, feeder.stats  # decodes finished while the engine held batches 0..3
    assert feeder.stats.max_decoding >= 2  # the two images of a batch decoded at once
    assert feeder.stats.batches == 6 and feeder.stats.rows == 12


def _gate(path: str, started: list[threading.Event]) -> None:
    b = int(Path(path).stem) // 2
    if b >= 2:
        started[b - 2].wait(timeout=5)


class Sink:
    """What embed_batches needs of a ShardAssembler."""

    def __init__(self) -> None:
        self.keys: list[int] = []

    def add(self, key: int, scale: int, descriptor: np.ndarray) -> int:
        self.keys.append(key)
        return 1

    def fail(self, key: int, error: str) -> int:
        return 1


# the bf16/fp16 deployment path on the CPU -------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_path_keeps_fp32_islands_and_its_contract(small_model: Any, precision: str) -> None:
    """Under the deployment path (autocast) the norms take float32 with autocast off, the matmuls/convolutions the
    low precision but for the first convolution and the projections to descriptor space (float32), the L2 norm
    float32, on the CPU as on CUDA (explicit islands); a GroupNorm's ReLU runs on its rounded result (the same
    values as a float32 ReLU); descriptors within the parity contract."""
    import copy

    import torch
    from torch.overrides import TorchFunctionMode

    from dtop_export.engines.pytorch import TorchEngine
    from dtop_export.engines.torch_deploy import Fp32GroupNorm
    from dtop_export.parity import contract_for
    from dtop_export.preprocess import default_preprocess

    pp = default_preprocess(small_model.cfg.backbone, small_model.stride)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    engine = TorchEngine(copy.deepcopy(small_model), pp, precision=precision, cast="autocast")
    seen: dict[str, set[Any]] = {}
    F = torch.nn.functional  # noqa: N806

    class Record(TorchFunctionMode):  # what each op computes in: its input under autocast's state, or its result
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            name = {F.layer_norm: "norm", F.group_norm: "norm", F.linear: "matmul", F.conv2d: "matmul",
                    F.normalize: "l2", F.relu: "relu"}.get(func)  # fmt: skip
            out = func(*args, **(kwargs or {}))
            if name == "matmul":  # which layer (named by its weight) computed in which dtype
                w = args[1] if len(args) > 1 else kwargs["weight"]
                seen.setdefault(str(out.dtype), set()).add(layer_of.get(id(w), "?"))
            elif name == "relu":
                seen.setdefault(name, set()).add(out.dtype)
            elif name:
                seen.setdefault(name, set()).add((args[0].dtype, torch.is_autocast_enabled("cpu")))
            return out

    net = engine.model.net
    layer_of = {
        id(m.weight): name for name, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    with Record():
        out = engine.embed(x)
    edges = {"encoder.patch_embed.backbone.stem.conv", "global_branch.fc", "local_branch.fc", "head.fc"}
    assert seen["torch.float32"] == edges, seen  # the first conv (on the pixels), the projections to descriptors
    assert len(seen[str(low)]) > 10 and "?" not in seen[str(low)], seen  # every other layer in low precision
    assert seen["relu"] == {low}, seen
    assert seen["norm"] == seen["l2"] == {(torch.float32, False)}, seen  # float32 in, autocast off
    gn = next(m for m in engine.model.modules() if isinstance(m, Fp32GroupNorm) and hasattr(m, "act"))
    a = torch.randn(2, gn.num_channels, 8, 12).mul(5).add(40).to(low)  # a large group mean: low-precision stats fail
    with torch.no_grad():
        ref = F.relu(F.group_norm(a.float(), gn.num_groups, gn.weight, gn.bias, gn.eps)).to(low)
        assert torch.equal(gn(a), ref)  # float32 statistics and affine, ReLU after the one rounding: same values
    ref = TorchEngine(copy.deepcopy(small_model), pp).embed(x)
    assert np.all(np.sum(out * ref, axis=1) >= contract_for(precision).cosine_min)
    assert engine.describe()["cast"] == "autocast" and sorted(engine.describe()["fp32_layers"]) == sorted(edges)


# the device JPEG decoder, run on the CPU --------------------------------------------------------------------


def test_device_jpeg_decoder_meets_its_parity_contract_on_the_cpu(images: Path, small_onnx: Path) -> None:
    """The --gpu-decode code path with device="cpu" (libjpeg, the same torch resize and orientation): descriptors
    within the other-decoder contract (cos >= 0.9999) of the CPU path; PNG, CMYK and unreadable files go to the CPU
    path; the EXIF orientations turn pixels as Pillow does."""
    import torch

    from dtop_export.corpus.gpu_decode import DECODER_COSINE, DeviceJpegDecoder, decoder_parity, orient
    from dtop_export.engines import load_engine
    from dtop_export.preprocess import EXIF_TRANSPOSE

    engine = load_engine(small_onnx, threads=1)
    jpegs = [str(p) for p in sorted(images.glob("*.jpg")) if p.name not in ("text.jpg", "truncated.jpg")]
    report = decoder_parity(engine, [*jpegs, str(images / "alpha.png")], 96, device="cpu")
    assert report["passed"] and report["cosine_min"] >= DECODER_COSINE, report
    assert {Path(p).name for p in report["decoded_on_cpu"]} == {"cmyk.jpg", "alpha.png"}
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    for o in range(1, 9):
        m = EXIF_TRANSPOSE.get(o)
        pil = np.asarray(Image.fromarray(arr).transpose(Image.Transpose(m))) if m is not None else arr
        assert np.array_equal(orient(torch.from_numpy(arr).permute(2, 0, 1), o).permute(1, 2, 0).numpy(), pil), o
    items = list_source(images)
    gpu = DeviceJpegDecoder(CFG, 96, SCALES, "cpu")
    out = _run_feeder(items, workers=2, gpu=gpu)
    rows = [(k, s) for b in out if not isinstance(b, Failure) for k, s in b.rows]
    assert sorted(rows) == sorted((k, s) for k in range(len(items)) for s in range(2)
                                  if items[k].path.rsplit("/", 1)[-1] not in ("text.jpg", "truncated.jpg"))  # fmt: skip


# GPU options without a GPU ----------------------------------------------------------------------------------


def test_gpu_options_refuse_in_one_line_without_cuda(
    small_ckpt: Path, small_onnx: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "o"
    for argv, needle in [
        ([f"{small_ckpt}:device=cuda", str(images), "-o", str(out), "--gpu-decode"], "PyTorch sees no CUDA GPU"),
        ([str(small_onnx), str(images), "-o", str(out), "--gpu-decode"], "give a checkpoint on one"),
        ([f"{small_ckpt}:device=cuda", str(images), "-o", str(out), "--gpu-decode", "--ray"], "in-process only"),
        ([str(small_ckpt), str(images), "-o", str(tmp_path / "x.npy"), "--gpu-decode"], "is for folder output"),
        ([str(small_onnx), str(images), "-o", str(out), "--decode-pool", "fork"], "thread or process"),
    ]:
        assert cli("embed", *argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.count("error:") == 1 and "Traceback" not in err, err
        assert not out.exists()
    assert cli("bench", f"{small_ckpt}:bf16,compile=reduce-overhead", "--sizes", "64", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "needs device=cuda" in err and len(err.strip().splitlines()) == 1, err
    from dtop_export.corpus.gpu_decode import DeviceJpegDecoder

    with pytest.raises(DToPError, match="no CUDA GPU"):
        DeviceJpegDecoder(CFG, 96, (1.0,), "cuda")


def test_a_batch_on_the_engines_cuda_device_is_used_where_it_is(small_model: Any, monkeypatch: Any) -> None:
    """An engine on ``cuda`` (no index) takes a uint8 batch on ``cuda:0`` (GPU-decoded, or uploaded by a benchmark)
    as it is: ``torch.device("cuda") != torch.device("cuda:0")``, and the batch went to the host and back. A CPU
    stand-in for a CUDA tensor, whose ``cpu()`` fails the test."""
    import copy

    import torch

    from dtop_export.engines.pytorch import TorchEngine, same_device
    from dtop_export.preprocess import default_preprocess

    streams: list[Any] = []

    class CudaStandIn(torch.Tensor):
        @property
        def device(self) -> Any:  # noqa: ANN401 - torch.device
            return torch.device("cuda", 0)

        def record_stream(self, stream: Any) -> None:  # noqa: ANN401
            streams.append(stream)

        def cpu(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            raise AssertionError("a batch on the engine's device was copied through the host")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    engine = TorchEngine(copy.deepcopy(small_model), default_preprocess(small_model.cfg.backbone, small_model.stride))
    pixels = torch.zeros(2, 32, 48, 3, dtype=torch.uint8).as_subclass(CudaStandIn)
    assert engine._upload(pixels, torch.device("cuda"), None, "compute") is pixels and streams == ["compute"]
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda:0"), torch.device("cuda:1")
    assert same_device(cuda0, cuda) and same_device(cuda, cuda0) and same_device(cuda1, cuda1)
    assert not same_device(cuda1, cuda) and not same_device(torch.device("cpu"), cuda)


def test_device_decoded_pixels_are_recorded_on_the_callers_stream(images: Path, monkeypatch: Any) -> None:
    """The decoder's tensors are allocated on its own stream and stacked into a batch on the caller's, where that
    read queues behind the model: each is recorded on the caller's stream, so that the next decode cannot reuse its
    memory before the read has run (else a batch may hold the next images' pixels). CUDA's streams stood in for."""
    import contextlib

    import torch

    from dtop_export.corpus.gpu_decode import DeviceJpegDecoder, inspect_jpeg

    class Stream:
        def synchronize(self) -> None:
            pass

    recorded: list[tuple[int, Any]] = []
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "caller")
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: recorded.append((t.data_ptr(), s)), raising=False)
    decoder = DeviceJpegDecoder(CFG, 96, SCALES, "cpu")
    decoder.stream = Stream()
    out = decoder.decode([inspect_jpeg(str(images / n)) for n in ("coffee.jpg", "rotated.jpg")])
    assert sorted(recorded) == sorted((t.data_ptr(), "caller") for rows in out for t in rows), recorded


def test_ray_read_tasks_ship_uint8_pixels(images: Path) -> None:
    """A Ray read task's rows are the pixels of the one preprocessing path, uint8 (a quarter of float32's bytes)."""
    from dtop_export.corpus.ray_pipeline import preprocess_rows

    paths = [str(p) for p in sorted(images.glob("*.jpg"))]
    rows = preprocess_rows({"key": np.arange(len(paths)), "path": np.asarray(paths)}, CFG.to_dict(), 96, list(SCALES))
    good = rows["scale"] >= 0
    assert sum(~good) == 2 and sum(good) == 2 * (len(paths) - 2)
    for key, scale, pixels in zip(rows["key"][good], rows["scale"][good], rows["tensor"][good]):
        assert pixels.dtype == np.uint8
        assert np.array_equal(pixels, prepare_pixels(load_image(paths[key]), CFG, 96, SCALES[scale]))
    shutil.rmtree(images / "__pycache__", ignore_errors=True)


def test_an_overlapped_onnx_runtime_session_lets_its_idle_threads_sleep(small_onnx: Path) -> None:
    """Decoding shares the engine's cores in a corpus job: ONNX Runtime's intra-op threads are told not to spin
    (on 2 cores a spinning session left 0.79 of a perfect overlap, a sleeping one 1.00), unless MODEL says."""
    from dtop_export.corpus.runtime import engine_options, open_model

    assert engine_options(str(small_onnx), 2, None, shared_cores=True)[1] == {"threads": 2, "spin": False}
    assert engine_options(str(small_onnx), 2)[1] == {"threads": 2}  # alone: ONNX Runtime's default
    assert engine_options(f"{small_onnx}:spin=true", None, None, shared_cores=True)[1] == {"spin": True}
    assert "spin" not in engine_options(f"{small_onnx}:openvino", None, None, shared_cores=True)[1]
    with open_model(str(small_onnx), 1, shared_cores=True) as engine:
        config = engine.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert config == "0"


# batch sizes on a GPU: padded to a multiple of a quarter batch ----------------------------------------------------


def test_pad_batch_repeats_the_last_image_up_to_a_quarter_batch_multiple_never_over_the_batch() -> None:
    import torch

    from dtop_export.corpus.schedule import pad_batch, padded_size

    assert [padded_size(n, 64) for n in (1, 16, 17, 33, 63, 64)] == [16, 16, 32, 48, 64, 64]
    assert [padded_size(n, 10) for n in (1, 4, 7, 9, 10)] == [3, 6, 9, 9, 10]  # step 3, never over 10
    assert {padded_size(n, 64) for n in range(1, 65)} == {16, 32, 48, 64}  # four sizes per image shape
    assert [padded_size(n, 3) for n in (1, 2, 3)] == [1, 2, 3]
    x = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    padded = pad_batch(x, 16)
    assert padded.shape == (8, 2, 2, 3) and np.array_equal(padded[:5], x)
    assert all(np.array_equal(padded[i], x[-1]) for i in range(5, 8))
    assert pad_batch(x, 20) is x and pad_batch(x, 4) is x
    t = pad_batch(torch.from_numpy(x), 12)
    assert tuple(t.shape) == (6, 2, 2, 3) and torch.equal(t[5], t[4]) and torch.equal(t[:5], torch.from_numpy(x))


class ShapeRecordingEngine(Engine):
    """Records the batch sizes it is given; descriptor: the image's mean input (so a mix-up would show)."""

    descriptor_dim, stride, preprocess = 1, 16, CFG

    def __init__(self, device: str) -> None:
        self.device = device
        self.sizes: list[int] = []

    def embed(self, images: np.ndarray) -> np.ndarray:
        self.sizes.append(len(images))
        return images.mean(axis=(1, 2, 3))[:, None].astype(np.float32)


def test_a_cuda_engine_gets_batches_padded_and_each_image_once(tmp_path: Path) -> None:
    """On a GPU every batch size is a multiple of a quarter batch (cuDNN autotunes each new shape: partial batches
    of any size each paid it), the padding's results are dropped, and every image gets its own descriptor; a CPU
    engine gets the batches as they are."""
    for i in range(13):
        Image.new("RGB", (64, 48) if i % 3 else (48, 64), (9 * i, 3 * i, i)).save(tmp_path / f"{i:02d}.png")
    items = list_source(tmp_path)
    results = {}
    for device in ("cuda", "cpu"):
        engine = ShapeRecordingEngine(device)
        feeder = Feeder(items, CFG, 64, (1.0,), batch_size=8, shard_size=100, workers=2)
        sink = DescriptorSink()
        embed_batches(engine, feeder, sink, lambda n: None, ActorStats("t"), 8)  # type: ignore[arg-type]
        assert sorted(sink.rows) == list(range(13)), device
        results[device] = (engine.sizes, sink.rows)
    cuda_sizes, cpu_sizes = results["cuda"][0][2:], results["cpu"][0]
    assert results["cuda"][0][:2] == [8, 8]  # a GPU engine's warm-up: one full batch per planned shape
    assert sorted(cpu_sizes) == [5, 8], cpu_sizes  # 8 landscape, 5 portrait
    assert sorted(cuda_sizes) == [6, 8], cuda_sizes  # the same batches, each padded to a multiple of 2
    assert results["cuda"][1] == results["cpu"][1]  # the same descriptor per image
    assert len(set(results["cpu"][1].values())) == 13  # a mix-up of images would show


class DescriptorSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, float] = {}

    def add(self, key: int, scale: int, descriptor: np.ndarray) -> int:
        assert key not in self.rows
        self.rows[key] = float(descriptor[0])
        return 1


def test_a_ray_actor_pads_its_chunks_on_a_gpu_and_drops_the_padding() -> None:
    """A Ray actor's call cuts shape groups anywhere: on a GPU its chunks are padded like the in-process batches."""
    from dtop_export.corpus.ray_pipeline import EmbedActor

    rng = np.random.default_rng(0)
    shapes = [(32, 48)] * 7 + [(48, 32)] * 3
    tensors = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in shapes]
    batch = {"key": np.arange(10), "scale": np.zeros(10, np.int32), "error": np.array([""] * 10, dtype=object),
             "tensor": np.array(tensors + [None], dtype=object)[:10]}  # fmt: skip
    out = {}
    for device in ("cuda", "cpu"):
        actor = EmbedActor.__new__(EmbedActor)
        actor.engine, actor.batch_size, actor.name, actor.reported = ShapeRecordingEngine(device), 4, "a", True
        out[device] = (actor(batch)["descriptor"][:, 0], actor.engine.sizes)
    expected = np.concatenate([ShapeRecordingEngine("cpu").embed_pixels(t[None])[:, 0] for t in tensors])
    assert len(set(expected.tolist())) == 10  # a mix-up of images would show
    assert np.array_equal(out["cpu"][0], expected) and np.array_equal(out["cuda"][0], expected)
    assert sorted(out["cpu"][1]) == [3, 3, 4] and sorted(out["cuda"][1]) == [3, 3, 4]  # step 1 at batch 4
    actor = EmbedActor.__new__(EmbedActor)
    actor.engine, actor.batch_size, actor.name, actor.reported = ShapeRecordingEngine("cuda"), 8, "a", True
    assert np.array_equal(actor(batch)["descriptor"][:, 0], expected)
    assert sorted(actor.engine.sizes) == [4, 8]  # 7 -> 8 and 3 -> 4 at step 2


def test_the_decode_pool_is_processes_for_a_cuda_engine_by_default() -> None:
    from dtop_export.corpus.embed import CorpusJob
    from dtop_export.corpus.feed import resolve_pool

    cuda, cpu = ShapeRecordingEngine("cuda"), ShapeRecordingEngine("cpu")
    assert CorpusJob(source="x", output=Path("y"), model="m").decode_pool == "auto"
    assert resolve_pool("auto", cuda) == "process" and resolve_pool("auto", cpu) == "thread"
    assert resolve_pool("auto", cuda, gpu_decode=True) == "thread"  # the CPU only reads JPEG headers then
    assert resolve_pool("thread", cuda) == "thread" and resolve_pool("process", cpu) == "process"


def test_the_header_scan_leaves_a_fifo_to_the_decoder(tmp_path: Path) -> None:
    """Reading a FIFO's header would block the window's scan (and eat the bytes its decode needs): the scan gives
    it no predicted shape; a regular file's header still gives one."""
    import os

    from dtop_export.corpus.schedule import predicted_shapes

    fifo = tmp_path / "stuck.jpg"
    os.mkfifo(fifo)
    Image.new("RGB", (200, 100)).save(tmp_path / "wide.jpg")
    got: list[Any] = []
    scan = threading.Thread(target=lambda: got.append(predicted_shapes(str(fifo), CFG, 96, (1.0,))), daemon=True)
    scan.start()
    scan.join(timeout=10)
    if scan.is_alive():  # the old code blocks in open(): a writer releases it
        with open(fifo, "wb"):
            pass
    assert got == [None]
    assert predicted_shapes(str(tmp_path / "wide.jpg"), CFG, 96, (1.0,)) == ((48, 96),)


STUCK_FEED = """
import os, signal, sys, threading, time
from dtop_export.corpus.feed import Feeder, embed_batches
from dtop_export.corpus.source import CorpusItem
from dtop_export.preprocess import PreprocessConfig

ok, fifo, pool, where = sys.argv[1:5]
cfg = PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), size=64)
items = [CorpusItem(0, "ok", ok), CorpusItem(1, "stuck", fifo)]  # ok's header: a shape to warm up at
feeder = Feeder(items, cfg, 64, (1.0,), batch_size=1, shard_size=2, workers=1, pool=pool)

def decoding():  # the FIFO's decode has started (it blocks in open(): the FIFO has no writer)
    while feeder.stats.max_decoding < 1:
        time.sleep(0.01)
    time.sleep(1.5)

class WarmingEngine:  # a GPU engine's warm-up, which Ctrl-C interrupts
    device = "cuda"
    def embed_pixels(self, pixels):
        decoding()
        raise KeyboardInterrupt

try:
    if where == "warm-up":
        embed_batches(WarmingEngine(), feeder, None, None, None, 1)
    else:  # Ctrl-C while the engine's thread waits for the FIFO's batch
        threading.Thread(target=lambda: (decoding(), os.kill(os.getpid(), signal.SIGINT)), daemon=True).start()
        list(feeder)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.parametrize("where", ["waiting for a batch", "warm-up"])
@pytest.mark.parametrize("pool", ["thread", "process"])
def test_an_interrupted_job_exits_while_a_decode_never_returns(tmp_path: Path, pool: str, where: str) -> None:
    """Ctrl-C while a decode is blocked for good (a FIFO without a writer; a hung network mount), the engine's thread
    waiting for that batch or warming the engine up: the feed leaves its pool without waiting and the process exits
    (ThreadPoolExecutor's workers are joined at exit, a process pool waits for its workers: both hung)."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    fifo, ok = tmp_path / "stuck.jpg", tmp_path / "ok.jpg"
    os.mkfifo(fifo)
    Image.new("RGB", (80, 60)).save(ok)
    proc = subprocess.Popen([sys.executable, "-c", STUCK_FEED, str(ok), str(fifo), pool, where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):  # a writer releases a stuck open() (ENXIO: nobody has it open)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        os.killpg(proc.pid, signal.SIGKILL)  # its pool's processes too: they hold its output pipes
        proc.communicate()
        pytest.fail(f"the {pool} pool kept the process interrupted in '{where}' alive")
    assert proc.returncode == 0 and out.strip() == "interrupted", err[-2000:]
    assert "Traceback" not in err, err[-2000:]  # e.g. a done-callback on a cancelled future


def test_an_interrupted_header_scan_does_not_wait_for_a_read_that_never_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C while the header scan's threads are stuck in reads (a hung network mount) interrupts the scan at once:
    its daemon threads are left behind, not joined (a ThreadPoolExecutor waited for them)."""
    import signal

    from dtop_export.corpus import schedule

    release = threading.Event()
    monkeypatch.setattr(schedule, "predicted_shapes", lambda path, **kw: release.wait(20))
    items = [CorpusItem(i, f"img{i}", f"/nowhere/img{i}.jpg") for i in range(8)]
    main = threading.get_ident()
    timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))  # a real Ctrl-C, to the main thread
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            timer.start()
            schedule.scan(items, PreprocessConfig(), 256, [1.0], workers=4)
        elapsed = time.perf_counter() - t0
    finally:
        timer.cancel()
        release.set()
    assert elapsed < 5, f"the scan waited {elapsed:.1f} s for its stuck reads"


def test_gpu_feed_leaves_later_phases_their_time_and_runs_the_eager_sweep_last(monkeypatch: Any) -> None:
    """benchmarks/gpu_feed.py: ``compiled`` kept 200 s for the phases after it even where none was asked for or the
    whole budget was 200 s (gpu_feed.sh's own example, ``--phases corpus,compiled --budget-s 200``: every compiled
    cell "deadline"), and the eager model sweep, which runs until ``--reserve-s`` is left, came before ``decode``."""
    import importlib.util
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ first
    spec = importlib.util.spec_from_file_location("gpu_feed", Path(__file__).parents[1] / "benchmarks" / "gpu_feed.py")
    assert spec is not None and spec.loader is not None
    gpu_feed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_feed)
    assert gpu_feed.PHASES[-1] == "model"
    assert gpu_feed.default_later_s(list(gpu_feed.PHASES), 470.0, dry=False) == 200.0
    assert gpu_feed.default_later_s(["corpus", "compiled"], 200.0, dry=False) == 100.0
    assert gpu_feed.default_later_s(["compiled"], 470.0, dry=False) == 0.0
    assert gpu_feed.default_later_s(list(gpu_feed.PHASES), 470.0, dry=True) == 0.0
