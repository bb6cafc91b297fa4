"""Build a serialized engine (``.plan`` + JSON sidecar) from a dtop-export ONNX file (TensorRT 10.x and 11.x, and
TensorRT-RTX: :mod:`dtop_export.engines.tensorrt.install` holds what differs).

Polygraphy's ``EngineFromNetwork`` in small: ONNX parser, the parsed network's types checked against the FP32
islands (:mod:`~dtop_export.engines.tensorrt.network`), one optimization profile per ``--min/--opt/--max``
triple, workspace limit, timing cache (TensorRT), optional TF32 off, and with TensorRT-RTX one plan per named
compute capability (``--target``, no GPU needed: parsed once, built per target). Precision:

* **strongly typed** (default; the only mode on TensorRT 11): ``--fp16`` builds the FP16 ONNX of
  :mod:`dtop_export.fp16.convert` (FP16 with FP32 islands made by ``Cast`` nodes); without it the float32
  ONNX builds as FP32 (TF32 allowed unless turned off).
* **weakly typed** (TensorRT 10.0–10.11; deprecated from 10.12, removed in 11): the float32 ONNX with
  ``BuilderFlag.FP16`` and ``OBEY_PRECISION_CONSTRAINTS``, the islands' layers pinned to FP32.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtop_export.atomic import atomic_paths, atomic_write_bytes, output_folder
from dtop_export.contract import load_onnx, metadata_of
from dtop_export.digest import file_sha256
from dtop_export.engines.tensorrt.install import (
    Flavour,
    GpuInfo,
    create_builder,
    driver_cuda_version,
    process_logger,
    require_builder,
    require_tensorrt_and_gpu,
    resolve_flavour,
    tensorrt_cuda_major,
    use_device,
    version_tuple,
)
from dtop_export.engines.tensorrt.network import fp32_layers, network_precision, parser_error_lines, pin_layers_fp32
from dtop_export.engines.tensorrt.profiles import Profile, check_static_dims, make_profiles
from dtop_export.engines.tensorrt.sidecar import PlanInfo, onnx_record, sidecar_path, sidecar_text
from dtop_export.engines.tensorrt.targets import Target, parse_target
from dtop_export.engines.tensorrt.watch import BuildWatch, build_failure_hint
from dtop_export.errors import DToPError
from dtop_export.fp16.convert import fp16_onnx_model, refuse_fp16_over_source
from dtop_export.logs import quiet_logger
from dtop_export.onnx_graph import name_nodes

log = logging.getLogger("dtop_export.engines.tensorrt")

WEAK_TYPING_DEPRECATED = (10, 12)  # FP16 flag and layer precision deprecated from here, removed in 11


def load_timing_cache(config: Any, path: Path) -> Any:
    """The timing cache from ``path`` set on ``config``; a missing, corrupt or foreign file (other GPU or
    TensorRT) gives a fresh cache with a warning instead of failing the build."""
    blob = path.read_bytes() if path.is_file() else b""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                return cache
            why = "it was made on another GPU or TensorRT"
        except Exception as e:  # noqa: BLE001 - TensorRT raises various types on a corrupt blob
            why = f"it cannot be read ({e.__class__.__name__}: {' '.join(str(e).split())[:120]})"
        log.warning("timing cache %s ignored (%s): starting a new one, saved there after the build", path, why)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise DToPError("TensorRT could not create an empty timing cache: build without --timing-cache")
    return cache


def weak_typing_layer_names(
    onnx_path: str | Path, keep_fp32_nodes: Sequence[str] = (), device: int = 0
) -> tuple[list[str], list[str]]:
    """(TensorRT layer names a weakly typed ``--fp16`` build pins to FP32, FP32 nodes that match no layer):
    the network is parsed exactly as :func:`build_engine` parses it, nothing is built. Needs TensorRT 10."""
    from dtop_export.fp16.convert import plan_fp32_islands

    model, _, node_names, _ = _onnx_facts(Path(onnx_path))
    keep = sorted(plan_fp32_islands(model, keep_fp32_nodes=keep_fp32_nodes).islands)
    trt, gpu = require_tensorrt_and_gpu(device)
    if version_tuple(trt.__version__)[:1] != (10,):
        raise DToPError(f"weak typing exists on TensorRT 10 only (this is {trt.__version__})")
    use_device(gpu.index)
    logger = process_logger(trt)
    builder = create_builder(trt, logger)  # kept alive while the network and parser are used
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        raise DToPError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(parser_error_lines(parser))}")
    found, unmatched = fp32_layers(trt, network, keep, node_names)
    return [layer.name for layer, _ in found], unmatched


@dataclass
class BuildResult:
    """What :func:`build_engine` wrote."""

    plan: Path
    sidecar: Path
    info: PlanInfo
    seconds: float
    size_bytes: int
    built_onnx: Path


def _onnx_facts(onnx_path: Path) -> tuple[Any, dict[str, str], list[str], bool]:
    """(model with every node named, dtop metadata, node names, is FP16) of an ONNX file."""
    from dtop_export.fp16.convert import is_fp16_model, name_nodes

    model = load_onnx(onnx_path)
    name_nodes(model)
    return model, metadata_of(model), [n.name for n in model.graph.node], is_fp16_model(model)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    fp16: bool = False,
    profiles: Sequence[Profile] | None = None,
    workspace_gb: float = 4.0,
    timing_cache: str | Path | None = None,
    weak_typing: bool = False,
    tf32: bool = True,
    keep_fp32_nodes: Sequence[str] = (),
    fp16_onnx_path: str | Path | None = None,
    device: int = 0,
    verbose: bool = False,
    detailed_profile: bool = False,
    backend: str = "auto",
    target: Target | str | None = None,
) -> BuildResult:
    """Build ``plan_path`` (+ its sidecar) from the dtop-export ONNX ``onnx_path``: on this GPU, or with
    TensorRT-RTX for the named compute capability ``target`` (``"sm86"``; no GPU needed).

    ``fp16``: strongly typed FP16 ONNX with FP32 islands (written to ``fp16_onnx_path``, default
    ``<plan>.fp16.onnx``, with the first plan: a build that writes no plan leaves an old one as it was), or with
    ``weak_typing`` (TensorRT 10.0–10.11) the FP16 flag with the islands' layers pinned to FP32. ``profiles``
    default to :func:`make_profiles`'s. ``timing_cache`` (TensorRT) is loaded when it exists and saved after the
    build (a corrupt or foreign cache is replaced, with a warning). ``tf32=False`` for strict FP32 parity.
    ``detailed_profile`` keeps per-layer precision for the engine inspector (the self-test reads it). ``device``
    is made current before any TensorRT object exists. ``backend``: ``auto`` (the installed flavour; TensorRT when
    both are), ``tensorrt`` or ``rtx``.
    """
    targets = None if target is None else [parse_target(target) if isinstance(target, str) else target]
    return build_engines(
        onnx_path,
        [Path(plan_path)],
        targets=targets,
        fp16=fp16,
        profiles=profiles,
        workspace_gb=workspace_gb,
        timing_cache=timing_cache,
        weak_typing=weak_typing,
        tf32=tf32,
        keep_fp32_nodes=keep_fp32_nodes,
        fp16_onnx_path=fp16_onnx_path,
        device=device,
        verbose=verbose,
        detailed_profile=detailed_profile,
        backend=backend,
    )[0]


def build_engines(
    onnx_path: str | Path,
    plan_paths: Sequence[str | Path],
    *,
    targets: Sequence[Target] | None = None,
    fp16: bool = False,
    profiles: Sequence[Profile] | None = None,
    workspace_gb: float = 4.0,
    timing_cache: str | Path | None = None,
    weak_typing: bool = False,
    tf32: bool = True,
    keep_fp32_nodes: Sequence[str] = (),
    fp16_onnx_path: str | Path | None = None,
    device: int = 0,
    verbose: bool = False,
    detailed_profile: bool = False,
    backend: str = "auto",
    on_build: Callable[[str], None] | None = None,
) -> list[BuildResult]:
    """:func:`build_engine` for several named ``targets`` at once (TensorRT-RTX): the ONNX is converted, parsed
    and checked once, then built once per target into ``plan_paths[i]``. Without ``targets``: one plan (one
    path) for this machine's GPU. ``on_build(text)`` hears which plan is being built."""
    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    plans = [Path(p) for p in plan_paths]
    if not onnx_path.is_file():
        raise DToPError(f"ONNX file {onnx_path} not found")
    if len(plans) != (len(targets) if targets else 1):
        raise ValueError(f"{len(plans)} plan paths for {len(targets) if targets else 1} build(s)")
    if not 0 < workspace_gb < float("inf"):  # NaN included
        raise DToPError(f"--workspace must be a number of GiB > 0, got {workspace_gb:g}")
    if weak_typing and not fp16:
        raise DToPError("--weak-typing only applies to --fp16 builds")
    named_model, meta, node_names, onnx_is_fp16 = _onnx_facts(onnx_path)
    onnx_sha256 = file_sha256(onnx_path)  # the file read now (the sidecar's; one hash for every target)
    fp16_dst = Path(fp16_onnx_path or plans[0].with_suffix(".fp16.onnx"))
    if fp16 and not weak_typing and not onnx_is_fp16:
        refuse_fp16_over_source(onnx_path, fp16_dst)
    stride = int(meta.get("dtop.stride", 16))
    profiles = list(profiles) if profiles else make_profiles(stride=stride)
    flavour = resolve_flavour(backend, named_target=bool(targets))
    if weak_typing and not flavour.weak_typing:
        raise DToPError(
            f"{flavour.label} builds strongly typed only: drop --weak-typing (--fp16 then builds the FP16 ONNX with "
            "FP32 islands)"
        )
    if timing_cache is not None and not flavour.timing_cache:
        raise DToPError(
            f"{flavour.label} has no builder timing cache (it compiles kernels on the GPU at run time and keeps them "
            "in a runtime cache: the runner's runtime_cache= option): drop --timing-cache"
        )
    trt, gpu = require_builder(flavour, device, named_target=bool(targets))
    version = trt.__version__
    if weak_typing:
        vt = version_tuple(version)
        if vt[:1] != (10,):
            raise DToPError(
                f"--weak-typing needs TensorRT 10.x (this is {version}: 11 builds strongly typed only): drop "
                "--weak-typing, --fp16 then builds the FP16 ONNX with FP32 islands"
            )
        if onnx_is_fp16:
            raise DToPError(f"{onnx_path} is already FP16: --weak-typing builds from the float32 export")
        if vt[:2] >= WEAK_TYPING_DEPRECATED:
            log.warning("TensorRT %s deprecates weak typing (FP16 flag, layer precision); 11 removes it", version)

    # what the parser reads, and which nodes stay FP32
    keep_nodes: list[str] = []
    source, parsed_model, fp16_model = onnx_path, named_model, None
    if fp16 and not weak_typing:  # the FP16 ONNX goes to disk with the first plan: a build that writes no plan
        fp16_model, keep_nodes = fp16_onnx_model(onnx_path, keep_fp32_nodes)  # leaves none (an old one as it was)
        if fp16_model is not None:
            source = fp16_dst
            output_folder(source)  # a missing folder fails now, not after the build
            name_nodes(fp16_model)
            parsed_model = fp16_model
    elif fp16:
        from dtop_export.fp16.convert import plan_fp32_islands

        keep_nodes = sorted(plan_fp32_islands(named_model, keep_fp32_nodes=keep_fp32_nodes).islands)
    elif onnx_is_fp16:
        from dtop_export.fp16.convert import fp32_nodes_of

        fp16 = True  # the file's types decide: an FP16 ONNX builds FP16 even without the flag
        keep_nodes = fp32_nodes_of(named_model)
    built_meta = metadata_of(parsed_model)

    if gpu is not None and not targets:
        use_device(gpu.index)  # before the builder: TensorRT tunes on the current CUDA device
    logger = process_logger(trt, verbose)
    builder = create_builder(trt, logger, flavour)
    flags = 0
    strong = not weak_typing
    strong_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strong and strong_flag is not None:  # 10.x opts in; 11.x and TensorRT-RTX are always strongly typed
        flags |= 1 << int(strong_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # the copy whose nodes all have names: layer names and metadata are matched against them; the parser's
    # multi-line log is kept for --verbose (its last error is in the one-line message either way)
    with contextlib.nullcontext() if verbose else quiet_logger(log.name, logging.CRITICAL):
        parsed = parser.parse(parsed_model.SerializeToString(), str(source))
    if not parsed:
        lines = parser_error_lines(parser) or [logger.last_error or "unknown parser error"]
        more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
        checked = onnx_path if fp16_model is not None else source  # an FP16 ONNX is not written without a plan
        raise DToPError(
            f"{flavour.label}'s ONNX parser rejected {source.name}: {lines[0]}{more}; "
            f"`dtop-export check {checked} --target tensorrt` lists every problem"
        )
    if network.num_inputs != 1:
        raise DToPError(f"{source.name} has {network.num_inputs} inputs: a dtop-export model has one (images)")
    inp = network.get_input(0)
    input_name, net_shape = inp.name, tuple(inp.shape)
    check_static_dims(net_shape, profiles)
    output_name = network.get_output(0).name if network.num_outputs else "descriptors"
    precision_facts: dict[str, Any] = {}
    if strong:
        nodes = [(n.name, n.op_type) for n in parsed_model.graph.node]
        checked = network_precision(trt, network, keep_nodes, nodes, fp16)
        if not checked.ok:
            raise DToPError(
                f"the network {flavour.label} parsed from {source.name} does not compute in the precision the FP16 "
                f"contract needs: {len(checked.violations)} layer(s), e.g. {checked.violations[0]}"
            )
        precision_facts = checked.to_dict()

    pinned: list[str] = []
    if weak_typing:
        pinned, unmatched = pin_layers_fp32(trt, network, keep_nodes, node_names)
        keep_nodes = [n for n in keep_nodes if n not in set(unmatched)]  # the sidecar lists what is FP32
    parse_seconds = time.perf_counter() - t0

    results: list[BuildResult] = []
    watch = BuildWatch(plans)  # Ctrl-C stops the build at TensorRT's next step; each plan is written with its sidecar
    with watch.deferring_ctrl_c():
        for k, plan_path in enumerate(plans):
            target = targets[k] if targets else None
            t1 = time.perf_counter()
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
            if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
                config.clear_flag(trt.BuilderFlag.TF32)
            if detailed_profile:
                config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
            if weak_typing:
                config.set_flag(trt.BuilderFlag.FP16)
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            if flavour.named_targets:  # TensorRT-RTX: the named compute capability, or the current GPU's
                config.num_compute_capabilities = 1
                cc = target.enum(trt) if target is not None else trt.ComputeCapability.CURRENT
                if not config.set_compute_capability(cc, 0):
                    raise DToPError(f"{flavour.label} refused the build target {target.sm if target else 'current'}")
            for p in profiles:
                prof = builder.create_optimization_profile()
                prof.set_shape(input_name, p.min, p.opt, p.max)
                config.add_optimization_profile(prof)
            cache_path = Path(timing_cache) if timing_cache is not None else None
            if cache_path is not None:
                load_timing_cache(config, cache_path)

            what = f"{flavour.label} {'FP16' if fp16 else 'FP32'} plan for " + (
                f"{target.sm} (no GPU needed)" if target else (gpu.name if gpu else "this GPU")
            )
            head = f"building the {what} ({k + 1}/{len(plans)})"
            if on_build is not None:
                on_build(head)
                watch.report = lambda phase, head=head: on_build(f"{head}: {phase}")  # type: ignore[misc]
            logger.reset()
            monitor = watch.monitor(trt, logger)  # progress, and Ctrl-C's stop at the next step
            if monitor is not None:
                config.progress_monitor = monitor
            watch.stop_if_interrupted()  # Ctrl-C after the last plan was written: no next build
            with watch.building():  # a second Ctrl-C in here exits at once
                serialized = builder.build_serialized_network(network, config)
            watch.stop_if_interrupted()
            if serialized is None:
                hint = build_failure_hint(logger.last_error, workspace_gb)
                raise DToPError(f"{flavour.label} could not build the {what}: {hint}")
            seconds = time.perf_counter() - t1 + (parse_seconds if k == 0 else 0.0)
            info = plan_info(
                flavour,
                version,
                built_for(gpu, target),
                profiles,
                plan=plan_path,
                precision={
                    "mode": "fp16" if fp16 else "fp32",
                    "typing": "weak" if weak_typing else "strong",
                    "tf32": bool(tf32),
                    "fp32_nodes": keep_nodes,
                    "fp32_layers_pinned": len(pinned),
                    "network": precision_facts,
                },
                onnx_path=onnx_path,
                onnx_sha256=onnx_sha256,
                built_from=source,
                built_metadata=built_meta,
                build={
                    "seconds": round(seconds, 2),
                    "parse_seconds": round(parse_seconds, 2),
                    "workspace_gb": workspace_gb,
                    "timing_cache": str(timing_cache) if timing_cache else None,
                    "detailed_profile": detailed_profile,
                    "plan_bytes": len(memoryview(serialized)),  # read_sidecar: the plan beside it is this one
                },
                input_name=input_name,
                output_name=output_name,
            )
            side = sidecar_path(plan_path)
            together = [source, plan_path, side] if fp16_model is not None and k == 0 else [plan_path, side]
            with atomic_paths(together) as staged:  # the plan, its sidecar (and the FP16 ONNX with the first plan)
                staged[-2].write_bytes(memoryview(serialized))  # go into place together or not at all: a sidecar
                staged[-1].write_text(sidecar_text(info))  # never describes a plan not written for it
                if len(staged) == 3:
                    staged[0].write_bytes(fp16_model.SerializeToString())
            if cache_path is not None:
                atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

            results.append(BuildResult(plan_path, side, info, seconds, plan_path.stat().st_size, source))
            watch.kept.append(plan_path)
            watch.stop_if_interrupted()
    return results


def built_for(gpu: GpuInfo | None, target: Target | None) -> dict[str, Any]:
    """The sidecar's ``gpu``: the GPU the plan was built on, or the named target of a GPU-less build."""
    if target is not None:
        from dtop_export.engines.tensorrt.targets import GPUS

        return {
            "name": None,
            "compute_capability": target.compute_capability,
            "target": target.sm,
            "examples": GPUS.get(target.compute_capability, ""),
        }
    assert gpu is not None
    return {"name": gpu.name, "compute_capability": gpu.compute_capability, "index": gpu.index, "target": None}


def plan_info(
    flavour: Flavour,
    tensorrt_version: str,
    gpu: dict[str, Any],
    profiles: Sequence[Profile],
    *,
    plan: Path,
    precision: dict[str, Any],
    onnx_path: Path,
    onnx_sha256: str,
    built_from: Path,
    built_metadata: dict[str, str],
    build: dict[str, Any],
    input_name: str,
    output_name: str,
) -> PlanInfo:
    """The sidecar of ``plan``, a finished build (ONNX paths relative to its folder). ``metadata`` is that of the ONNX
    TensorRT parsed (``built_from``: the FP16 file for strongly typed FP16, with its ``dtop.precision`` and FP32
    islands); ``build.cuda`` is the CUDA that the flavour's wheels were built for and ``build.driver_cuda`` what the
    driver supports."""
    from dtop_export import __version__

    trt_cuda = tensorrt_cuda_major(flavour)
    return PlanInfo(
        tensorrt_version=tensorrt_version,
        backend=flavour.key,
        gpu=gpu,
        profiles=[p.to_dict() for p in profiles],
        precision=precision,
        onnx=onnx_record(plan, onnx_path, built_from, onnx_sha256),
        build={
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cuda": str(trt_cuda) if trt_cuda else None,
            "driver_cuda": driver_cuda_version(),
            **build,
        },
        input_name=input_name,
        output_name=output_name,
        metadata={k: v for k, v in built_metadata.items() if k.startswith("dtop.")},
        toolkit_version=__version__,
    )
