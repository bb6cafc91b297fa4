// The deployment contract a dtop-export model carries, and the runtime interface that executes it.
//
// Contract: parsed from the model's `dtop.*` metadata (ONNX metadata_props; OpenVINO shows them in the
//   model's rt_info under "framework"), the same keys dtop_export/contract.py writes.
// Runtime: one model on one device, `run(images [B, 3, H, W]) -> [B, N]`. OpenVINO implements it here;
//   an ONNX Runtime or TensorRT backend implements the same three methods (and concurrent() when its run() is
//   thread-safe).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dtop/image.hpp"

namespace dtop {

using Metadata = std::map<std::string, std::string>;

/// The model's deployment contract (see dtop_export/contract.py: onnx_metadata).
struct Contract {
  std::string format;                     // dtop.format, "dtop-export/onnx"
  std::string input_name = "images";      // dtop.input_name
  std::string output_name = "descriptors";  // dtop.output_name
  std::string layout = "NCHW";            // dtop.input_layout
  std::string precision = "fp32";         // dtop.precision
  int descriptor_dim = 0;                 // dtop.descriptor_dim (N)
  bool l2_normalized = true;              // dtop.l2_normalized
  PreprocessConfig preprocess;            // mean, std, color order, resize policy, stride
  std::optional<std::array<int, 2>> static_hw;  // dtop.static_hw (H, W) when exported with --static
  std::optional<int> fixed_batch;         // dtop.fixed_batch
  std::string checkpoint_sha256;          // dtop.checkpoint_sha256: the checkpoint it was exported from ("" if none)

  /// Parse the `dtop.*` keys; throws Error naming `source` when the model was not exported by dtop-export
  /// or a value cannot be read.
  static Contract from_metadata(const Metadata& meta, const std::string& source);
};

/// Runtime settings. threads: CPU inference threads (0 = the runtime's choice). precision: the inference
/// precision hint, "f32" (exact parity), "bf16" or "f16"; "" (default): the hint the model records as
/// `dtop.inference_precision` (an IR from `dtop-export openvino MODEL.pt --precision auto`: what `bench --recommend`
/// measured within its contract on that CPU), else "f32". performance: "latency" (one OpenVINO stream: the
/// forward passes of several threads run in turn) or "throughput" (streams that run them in parallel).
struct RuntimeOptions {
  std::string device = "CPU";
  int threads = 0;
  std::string precision;
  std::string performance = "latency";
};

/// One loaded model. Implementations: OpenVINO (openvino_runtime.cpp), ExecuTorch (executorch_runtime.cpp).
/// Threads: const methods may be called from any thread. run() may be called by several threads at once only when
/// concurrent() says so (OpenVINO: each call takes an infer request of its own from a pool on the one compiled
/// model); otherwise one run() at a time (dtop::Embedder serialises the calls of such a runtime: ExecuTorch).
class Runtime {
 public:
  virtual ~Runtime() = default;
  /// The model's metadata as strings (empty when it has none).
  virtual const Metadata& metadata() const = 0;
  /// float32 images [batch, 3, height, width] (contiguous) -> float32 [batch, N]; N is written to *dim.
  virtual std::vector<float> run(const float* images, int batch, int height, int width, int* dim) = 0;
  /// True when run() may be called by several threads at once; false (the default): one call at a time. A runtime's
  /// answer never changes.
  virtual bool concurrent() const { return false; }
  /// e.g. "openvino 2026.4.1 CPU f32".
  virtual std::string describe() const = 0;
  /// Layers the model keeps FP32 under an f16 hint (the whitening, L2 norms, LayerNorm, Softmax of an IR from
  /// `dtop-export openvino`); 0 when it marks none.
  virtual int fp32_islands() const { return 0; }
  /// The precision it runs at: "fp32", "bf16" or "fp16" (OpenVINO: RuntimeOptions::precision or the model's own
  /// hint as the compiled model reports it: fp32 where the CPU lacks the hint's arithmetic); by default the model's
  /// dtop.precision (what an ExecuTorch program was compiled as).
  virtual std::string inference_precision() const {
    const auto it = metadata().find("dtop.precision");
    return it == metadata().end() ? "fp32" : it->second;
  }
};

/// Open an exported `.onnx` or an OpenVINO IR `.xml` with OpenVINO. Throws Error when the file is missing or
/// not a model OpenVINO can read, or when an IR's `.bin` is missing or not the one its `.xml` records
/// (dtop.weights_sha256, from `dtop-export openvino`).
std::unique_ptr<Runtime> open_openvino(const std::string& model_path, const RuntimeOptions& options = {});

}  // namespace dtop
