"""The benchmark harness (``dtop-export bench``): ``spec`` (what to run: ``PATH[:options]``), ``harness``
(load pass with memory sampling, interleaved timed pass, FLOPs, machine facts) and ``report`` (the results as
Markdown tables, JSON and a PNG). Takes engines through :func:`dtop_export.engines.load_engine` (its only
import of a runtime, inside the run); building the artefacts it compares (``--derive``) is
:mod:`dtop_export.pipeline`'s job."""
