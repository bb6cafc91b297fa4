// dtop::Embedder: image files -> L2-normalised DToP descriptors, the way `dtop-export embed` computes them.
//
//   dtop::Embedder embedder("model.onnx");
//   std::vector<float> d = embedder.embed(dtop::load_image("photo.jpg"));   // N floats, unit norm
//
// Same-size inputs are batched; multi-scale sums the scales' unit descriptors and normalises again
// (cirtorch's `ms`: 1, 1/sqrt(2), sqrt(2)), exactly as dtop_export/retrieval/extract.py.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dtop/image.hpp"
#include "dtop/runtime.hpp"

namespace dtop {

/// cirtorch's multi-scale set (`--scales ms`).
std::vector<double> multi_scales();

/// "1", "1,0.707,1.414" or "ms" -> scales; throws Error on anything else.
std::vector<double> parse_scales(const std::string& text);

struct EmbedOptions {
  int image_size = 0;                 // longer side before scaling; 0 = the model's (dtop.resize_policy size)
  std::vector<double> scales{1.0};    // multi-scale: several
  int batch_size = 1;                 // same-shape inputs per forward pass
  DecodeLimits decode;                // what decoding one file may cost (pixels, MiB, JPEG scans)
};

/// Descriptors of a list of files: rows in input order for the readable ones, the others skipped with why.
struct EmbedResult {
  int dim = 0;
  std::vector<float> descriptors;          // rows.size() x dim, row-major
  std::vector<std::size_t> rows;           // input index of every row
  struct Skipped {
    std::size_t index;
    std::string reason;
  };
  std::vector<Skipped> skipped;
};

/// Called after every input file: (done, total).
using Progress = std::function<void(std::size_t, std::size_t)>;

/// A model and its contract: images in, descriptors out.
///
/// Errors: every failure is a dtop::Error (dtop::ImageError for a file that cannot be decoded), one line that says
/// what to do; std::bad_alloc when memory runs out.
/// Threads: one Embedder may be shared by any number of threads (run, embed, embed_files, preprocess). On OpenVINO
/// the forward passes run in parallel on the one compiled model, each on an infer request of its own (the runtime
/// keeps as many as threads have run at once); open it with RuntimeOptions::performance "throughput" for OpenVINO to
/// give them streams of their own, under "latency" it runs them in turn on its one stream. On a runtime that is not
/// Runtime::concurrent() (ExecuTorch) the forward passes take turns. An Embedder per thread does not make ExecuTorch's
/// parallel either: every program of a process runs on its one XNNPACK thread pool, whose parallel sections take turns
/// (open them with the same threads, or 0; see open_executorch); for parallel passes use OpenVINO or processes.
/// Ownership: results are returned by value; nothing refers to the caller's images or tensors after a call returns.
/// Movable, not copyable; a moved-from Embedder may only be destroyed or assigned to.
class Embedder {
 public:
  /// Open `model_path` (.onnx or OpenVINO .xml) with OpenVINO and read its contract. Throws Error when the file is
  /// missing, not a model, or not exported by dtop-export (no or unreadable `dtop.*` metadata).
  explicit Embedder(const std::string& model_path, const RuntimeOptions& options = {});
  /// Use any runtime (another backend, a test double); `source` names it in errors. Throws as above.
  Embedder(std::unique_ptr<Runtime> runtime, const std::string& source);

  const Contract& contract() const { return contract_; }
  const std::string& source() const { return source_; }
  std::string describe() const { return runtime_->describe(); }
  /// See Runtime::fp32_islands.
  int fp32_islands() const { return runtime_->fp32_islands(); }
  /// See Runtime::inference_precision.
  std::string inference_precision() const { return runtime_->inference_precision(); }

  /// The model input of one image at one scale (resize + normalise). Throws Error on an Image whose rgb does not
  /// hold width * height * 3 bytes.
  Tensor preprocess(const Image& img, int image_size = 0, double scale = 1.0) const;
  /// Descriptors [count, N] of same-shape tensors in one forward pass (unit norm), row-major.
  std::vector<float> run(const std::vector<const Tensor*>& batch);
  /// The descriptor of one image (multi-scale when several scales are given).
  std::vector<float> embed(const Image& img, const EmbedOptions& options = {});
  /// Descriptors of image files; unreadable files are skipped, never fatal.
  EmbedResult embed_files(const std::vector<std::string>& paths, const EmbedOptions& options = {},
                          const Progress& progress = nullptr);

 private:
  std::unique_ptr<Runtime> runtime_;
  std::string source_;
  Contract contract_;
  bool concurrent_ = false;  // runtime_->concurrent(): run() takes no lock
  std::unique_ptr<std::mutex> run_mutex_ = std::make_unique<std::mutex>();  // held by run() otherwise; movable
};

/// Write a float32 matrix as a NumPy .npy file (atomically: temp file + rename). Throws Error.
void write_npy(const std::string& path, const std::vector<float>& data, std::size_t rows, std::size_t cols);
/// Write a float32 array of any shape as .npy (atomically).
void write_npy(const std::string& path, const std::vector<float>& data, const std::vector<std::size_t>& shape);
/// Write text to a file atomically (temp file in the same folder + rename). Throws Error.
void write_text_atomic(const std::string& path, const std::string& text);

}  // namespace dtop
