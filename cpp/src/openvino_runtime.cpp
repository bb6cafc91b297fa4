// The OpenVINO implementation of dtop::Runtime (CPU by default; the inference precision is pinned to f32 unless
// asked otherwise or the IR records a hint, dtop.inference_precision, because OpenVINO's CPU plugin would pick bf16 by
// itself on an AMX machine).
#include <openvino/frontend/manager.hpp>
#include <openssl/evp.h>
#include <openvino/openvino.hpp>

#include <algorithm>
#include <array>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <sstream>
#include <utility>
#include <vector>

#include "dtop/runtime.hpp"

namespace dtop {
namespace {

// OpenVINO's messages open with "Exception from src/...cpp:123:", "Check '...' failed at ...:" and headers such
// as "FrontEnd API failed with GeneralFailure:": keep the first line that says what happened.
std::string first_reason(const std::string& text) {
  std::istringstream lines(text);
  std::string line, last;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    last = line;
    if (line.rfind("Exception from", 0) == 0 || line.rfind("Check '", 0) == 0 || line.back() == ':') continue;
    return line;
  }
  return last.empty() ? "unknown error" : last;
}

ov::element::Type precision_type(const std::string& name) {
  if (name == "f32" || name == "fp32") return ov::element::f32;
  if (name == "bf16") return ov::element::bf16;
  if (name == "f16" || name == "fp16") return ov::element::f16;
  throw Error("unknown precision '" + name + "': choose f32, bf16 or f16");
}

// The engine's name of a precision hint: fp32, bf16, fp16 (what dtop-export writes in its reports).
std::string precision_name(const ov::element::Type& type) {
  return type == ov::element::bf16 ? "bf16" : (type == ov::element::f16 ? "fp16" : "fp32");
}

// The process's one ov::Core (thread-safe), never destroyed. Each Core loads a CPU plugin of its own, which gives the
// thread that loads it an alternate signal stack and unmaps it when the plugin goes: runtimes freed in another order
// than made, or on another thread, left that thread's signal stack pointing at unmapped memory, and the next signal
// handled on it (SA_ONSTACK: a crash reporter's, an embedding Python's) crashed the process or wrote its frame over
// whatever was mapped there since (found in the Python engines, which share one Core as well).
ov::Core& process_core() {
  static ov::Core* const core = new ov::Core();  // leaked on purpose: no destruction order to get wrong at exit
  return *core;
}

// sha256 of a file as 64 lowercase hex digits (Python's hashlib.sha256().hexdigest()), read in 4 MiB pieces: an IR's
// .bin is ~350 MB for the full model.
std::string file_sha256(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path.string());
  const std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL has no sha256");
  std::vector<char> buffer(std::size_t{4} << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const std::streamsize n = in.gcount();
    if (n > 0 && EVP_DigestUpdate(ctx.get(), buffer.data(), static_cast<std::size_t>(n)) != 1) {
      throw Error("sha256 of " + path.string() + " failed");
    }
  }
  if (in.bad()) throw Error("cannot read " + path.string());
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int size = 0;
  if (EVP_DigestFinal_ex(ctx.get(), digest.data(), &size) != 1) throw Error("sha256 of " + path.string() + " failed");
  static const char* const kHex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < size; ++i) {
    out += kHex[digest[i] >> 4];
    out += kHex[digest[i] & 15];
  }
  return out;
}

// The value of the entry `key` that `dtop-export openvino` writes into an IR's <rt_info> (`<KEY value="..." />`, or
// `<info name="KEY" value="..." />`), read from the .xml's text before OpenVINO reads the model (which needs the
// .bin); empty when the .xml has none.
std::string xml_entry(const std::string& xml, const std::string& key) {
  for (const std::string& opening : {"<" + key, "name=\"" + key + "\""}) {
    for (std::size_t at = xml.find(opening); at != std::string::npos; at = xml.find(opening, at + 1)) {
      const std::size_t after = at + opening.size();
      if (after >= xml.size() || !(std::isspace(static_cast<unsigned char>(xml[after])) || xml[after] == '/' ||
                                   xml[after] == '>')) {
        continue;  // a longer name that starts with key
      }
      const std::size_t open = xml.rfind('<', at), close = xml.find('>', at);
      if (open == std::string::npos || close == std::string::npos) continue;
      const std::size_t value = xml.find("value=\"", open);
      if (value == std::string::npos || value > close) continue;
      const std::size_t end = xml.find('"', value + 7);
      if (end == std::string::npos || end > close) continue;
      return xml.substr(value + 7, end - value - 7);
    }
  }
  return "";
}

// Refuse an IR whose .bin is not the one its .xml was written with (the sha256 `dtop-export openvino` records as
// dtop.weights_sha256): OpenVINO reads the weights by offset, so a .bin left from another export of the same
// architecture (a retrained checkpoint, only the new .xml copied) ran silently with the old weights under the new
// .xml's metadata. An IR without the entry (another tool, an older dtop-export) is not checked. The same check and
// messages as the Python readers (engines/openvino.py check_weights).
void check_weights(const std::filesystem::path& xml) {
  std::ifstream in(xml, std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string expected = xml_entry(text, "dtop.weights_sha256");
  if (expected.empty()) return;
  const std::filesystem::path weights = std::filesystem::path(xml).replace_extension(".bin");
  if (!std::filesystem::is_regular_file(weights)) {
    throw Error(xml.string() + "'s weights " + weights.filename().string() +
                " not found: copy the .xml and its .bin together");
  }
  if (file_sha256(weights) != expected) {
    throw Error(weights.string() + " is not the .bin " + xml.filename().string() +
                " was written with (sha256 differs: left from another export?): copy the .xml and its .bin "
                "together, or write both again with `dtop-export openvino`");
  }
}

// Read with the frontend the suffix names (ov::Core::read_model would offer the file to every frontend, and
// TensorFlow's logs its parse errors of a broken .onnx to stderr).
std::shared_ptr<ov::Model> read_model(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  const std::string framework = ext == ".onnx" ? "onnx" : (ext == ".xml" ? "ir" : "");
  if (ext == ".pte") throw Error(path + " is an ExecuTorch program: open it with dtop::open_executorch");
  if (framework.empty()) throw Error(path + " is not an .onnx file or an OpenVINO IR (.xml + .bin)");
  if (framework == "ir") check_weights(path);
  ov::frontend::FrontEndManager manager;
  const ov::frontend::FrontEnd::Ptr frontend = manager.load_by_framework(framework);
  const ov::frontend::InputModel::Ptr input = frontend->load(path);
  if (!input) throw Error("OpenVINO cannot read " + path);
  return frontend->convert(input);
}

class OpenVinoRuntime final : public Runtime {
 public:
  OpenVinoRuntime(const std::string& path, const RuntimeOptions& options) : options_(options) {
    if (!std::filesystem::is_regular_file(path)) throw Error("model " + path + " not found");
    if (options.threads < 0) throw Error("threads must be >= 0 (0: OpenVINO's choice)");
    if (!options.precision.empty()) precision_type(options.precision);  // an unknown one before the model is read
    ov::hint::PerformanceMode mode;
    if (options.performance == "latency") {
      mode = ov::hint::PerformanceMode::LATENCY;
    } else if (options.performance == "throughput") {
      mode = ov::hint::PerformanceMode::THROUGHPUT;
    } else {
      throw Error("unknown performance mode '" + options.performance + "': choose latency or throughput");
    }
    try {
      model_ = read_model(path);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error("OpenVINO cannot read " + path + ": " + first_reason(e.what()));
    }
    read_metadata();
    // no precision asked for: the hint the model records (`openvino MODEL.pt --precision auto`: what bench --recommend
    // measured within its contract), else f32; an INT8 model's float parts run f32
    const auto recorded = metadata_.find("dtop.inference_precision");
    const bool int8 = metadata_.count("dtop.precision") && metadata_.at("dtop.precision") == "int8";
    if (options_.precision.empty()) {
      options_.precision = recorded != metadata_.end() && !int8 ? recorded->second : "f32";
    }
    ov::element::Type precision;
    try {
      precision = precision_type(options_.precision);
    } catch (const Error&) {
      throw Error(path + " records dtop.inference_precision '" + options_.precision +
                  "', not one of f32, bf16, f16: pass --precision");
    }
    precision_ = precision_name(precision);
    int8_ = int8;
    // the key OpenVINO gives the IR attribute DisablePrecisionConversion (what dtop-export openvino writes on the
    // FP32 islands): those layers stay f32 under an f16 hint (the CPU plugin ignores the mark under bf16)
    for (const auto& op : model_->get_ops()) {
      fp32_islands_ += static_cast<int>(op->get_rt_info().count("DisablePrecisionConversion_0"));
    }
    ov::AnyMap config{ov::hint::inference_precision(precision), ov::hint::performance_mode(mode)};
    if (options.threads > 0) config.emplace(ov::inference_num_threads(options.threads));
    try {
      compiled_ = process_core().compile_model(model_, options.device, config);
      idle_.push_back(compiled_.create_infer_request());
    } catch (const std::exception& e) {
      throw Error("OpenVINO cannot compile " + path + " for " + options.device + ": " + first_reason(e.what()));
    }
    // what it runs at: the CPU plugin drops a hint the CPU lacks (bf16 without AVX512-BF16/AMX, f16 without
    // AVX512-FP16) and runs f32; a device that does not report it: the hint asked for
    ran_ = precision;
    try {
      ran_ = compiled_.get_property(ov::hint::inference_precision);
    } catch (const std::exception&) {
    }
    precision_ = precision_name(ran_);
    // the images would go to another input, or another output be read as the descriptor, silently
    input_index_ = port_index(compiled_.inputs(), "dtop.input_name", "inputs", path);
    output_index_ = port_index(compiled_.outputs(), "dtop.output_name", "outputs", path);
  }

  const Metadata& metadata() const override { return metadata_; }

  // Thread-safe: each call runs on an infer request of its own (one infer request shared by two threads failed with
  // 'Infer Request is busy' or returned the other thread's descriptor).
  std::vector<float> run(const float* images, int batch, int height, int width, int* dim) override {
    const ov::Shape shape{static_cast<std::size_t>(batch), 3, static_cast<std::size_t>(height),
                          static_cast<std::size_t>(width)};
    try {
      Lease lease(*this);
      ov::InferRequest& request = lease.request;
      ov::Tensor input(ov::element::f32, shape, const_cast<float*>(images));  // read-only use, no copy
      request.set_input_tensor(input_index_, input);
      request.infer();
      const ov::Tensor out = request.get_output_tensor(output_index_);
      const ov::Shape os = out.get_shape();
      if (os.size() != 2 || os[0] != static_cast<std::size_t>(batch)) {
        throw Error("the model returned a tensor of shape " + out.get_shape().to_string() + " for a batch of " +
                    std::to_string(batch) + ": expected [batch, N]");
      }
      *dim = static_cast<int>(os[1]);
      const float* p = out.data<const float>();
      return std::vector<float>(p, p + out.get_size());
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error("OpenVINO inference failed on a " + std::to_string(batch) + "x3x" + std::to_string(height) + "x" +
                  std::to_string(width) + " batch: " + first_reason(e.what()));
    }
  }

  std::string describe() const override {
    const ov::element::Type asked = precision_type(options_.precision);
    return "openvino " + std::string(ov::get_openvino_version().buildNumber) + " " + options_.device + " " +
           ran_.get_type_name() + (asked != ran_ ? " (" + asked.get_type_name() + " asked: this CPU lacks it)" : "") +
           (fp32_islands_ && ran_ == ov::element::f16 ? ", " + std::to_string(fp32_islands_) + " FP32 islands" : "");
  }

  int fp32_islands() const override { return fp32_islands_; }

  std::string inference_precision() const override { return int8_ ? "int8" : precision_; }

  bool concurrent() const override { return true; }

 private:
  // An infer request taken from the pool for one run(): an idle one, or a new one when every request is in use (the
  // pool grows to as many as threads have run at once). Given back when the output has been copied out.
  struct Lease {
    explicit Lease(OpenVinoRuntime& rt) : runtime(rt), request(rt.take()) {}
    ~Lease() {
      try {
        const std::lock_guard<std::mutex> lock(runtime.pool_mutex_);
        runtime.idle_.push_back(std::move(request));
      } catch (...) {  // no memory to keep it: the request is dropped, the next run creates another
      }
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    OpenVinoRuntime& runtime;
    ov::InferRequest request;
  };

  ov::InferRequest take() {
    {
      const std::lock_guard<std::mutex> lock(pool_mutex_);
      if (!idle_.empty()) {
        ov::InferRequest request = std::move(idle_.back());
        idle_.pop_back();
        return request;
      }
    }
    return compiled_.create_infer_request();  // CompiledModel is thread-safe
  }

  // The index of the port the metadata's `key` names (0 when it names none); an Error listing the ports' names
  // when no port has that name.
  std::size_t port_index(const std::vector<ov::Output<const ov::Node>>& ports, const std::string& key,
                         const std::string& what, const std::string& path) const {
    const auto wanted = metadata_.find(key);
    if (wanted == metadata_.end()) return 0;
    std::string names;
    for (std::size_t i = 0; i < ports.size(); ++i) {
      if (ports[i].get_names().count(wanted->second) != 0) return i;
      for (const auto& n : ports[i].get_names()) names += (names.empty() ? "" : ", ") + n;
    }
    throw Error(path + ": metadata " + key + " '" + wanted->second + "' names none of its " + what + " (" + names +
                "): export it again with dtop-export");
  }

  // ONNX metadata_props appear under rt_info["framework"]; an IR may also carry them at the top level.
  void read_metadata() {
    auto take = [&](const ov::AnyMap& map) {
      for (const auto& [key, value] : map) {
        if (key.rfind("dtop.", 0) == 0) metadata_[key] = value.as<std::string>();
      }
    };
    take(model_->get_rt_info());
    if (model_->has_rt_info("framework")) take(model_->get_rt_info<ov::AnyMap>("framework"));
  }

  RuntimeOptions options_;
  std::string precision_ = "fp32";  // the precision it runs at (ran_), by the engine's name
  ov::element::Type ran_ = ov::element::f32;  // the compiled model's inference precision: the hint, unless the CPU
                                              // lacks it (then f32)
  bool int8_ = false;               // an INT8 model (its float parts run at precision_)
  std::shared_ptr<ov::Model> model_;
  ov::CompiledModel compiled_;
  std::mutex pool_mutex_;
  std::vector<ov::InferRequest> idle_;  // infer requests no run() holds (guarded by pool_mutex_)
  Metadata metadata_;
  std::size_t input_index_ = 0;
  std::size_t output_index_ = 0;
  int fp32_islands_ = 0;
};

}  // namespace

std::unique_ptr<Runtime> open_openvino(const std::string& model_path, const RuntimeOptions& options) {
  return std::make_unique<OpenVinoRuntime>(model_path, options);
}

}  // namespace dtop
