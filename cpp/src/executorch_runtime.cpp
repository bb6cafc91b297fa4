// The ExecuTorch implementation of dtop::Runtime: Module API (mmap-loaded program, XNNPACK delegate), the contract
// from the program's `dtop_metadata` constant method, ExecuTorch's log lines kept for error messages instead of
// printed (its runtime logs at Info level, e.g. the CPU probe, to stderr).
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>

#ifdef __linux__
#include <sched.h>
#endif

#include <cstdint>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "dtop/executorch.hpp"
#include "json.hpp"

// The thread pool of the executorch wheel (libexecutorch_threadpool.so); its header is not in the wheel. These are
// the declarations of extension/threadpool/threadpool.h that this file uses.
namespace executorch::extension::threadpool {
class ThreadPool final {
 public:
  std::size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(std::uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace dtop {
namespace {

using executorch::extension::module::Module;
using executorch::runtime::Error;

constexpr const char* kMetadataMethod = "dtop_metadata";

// ExecuTorch's log: errors are kept (the last few) for our messages, everything else is dropped.
std::mutex log_mutex;
std::vector<std::string> log_errors;

void keep_errors(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*, std::size_t line,
                 const char* message, std::size_t length) {
  if (level != kError && level != kFatal) return;
  std::string text(message, length);
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  std::lock_guard<std::mutex> lock(log_mutex);
  log_errors.push_back(std::filesystem::path(filename ? filename : "").filename().string() + ":" +
                       std::to_string(line) + ": " + text);
  if (log_errors.size() > 8) log_errors.erase(log_errors.begin());
}

void quiet_log() {
  static std::once_flag once;
  std::call_once(once, [] {
    executorch::runtime::register_pal(executorch::runtime::PalImpl::create(keep_errors, __FILE__));
  });
}

// CPUs this process may run on (its affinity: taskset, a cgroup cpuset), which ExecuTorch's default pool, a thread
// per core of the machine, does not look at; 0 where the OS does not say.
std::size_t usable_cpus() {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<std::size_t>(CPU_COUNT(&set));
#endif
  return 0;
}

// ExecuTorch's thread pool is the process's, and XNNPACK takes its pthreadpool when a program's forward method loads
// and keeps it: resizing the pool destroys that pthreadpool, so a resize while any program is open left it running on
// freed memory (ThreadPool::_unsafe_reset_threadpool says as much). The pool is sized only while no program of this
// process is open: sizing it and loading the forward method (XNNPACK's hold on the pool) happen under this mutex,
// counted in open_programs; Module::load and the metadata method run before it (neither touches the pool).
std::mutex pool_mutex;
std::size_t open_programs = 0;
std::size_t pool_default = 0;  // the pool's own size, read before this file first resized it (0: not read yet)

// "(code: the runtime's last error line)" for an error message.
std::string reason(Error error) {
  std::string text = executorch::runtime::to_string(error);
  std::lock_guard<std::mutex> lock(log_mutex);
  if (!log_errors.empty()) text += ": " + log_errors.back();
  log_errors.clear();
  return text;
}

class ExecuTorchRuntime final : public Runtime {
 public:
  ExecuTorchRuntime(const std::string& path, const RuntimeOptions& options) : path_(path), options_(options) {
    if (!std::filesystem::is_regular_file(path)) throw dtop::Error("model " + path + " not found");
    if (options.threads < 0) throw dtop::Error("threads must be >= 0 (0: ExecuTorch's default)");
    if (!options.precision.empty() && options.precision != "f32" && options.precision != "fp32") {
      throw dtop::Error(path + " is an ExecuTorch program: it runs at the precision it was compiled with (" +
                        std::string("drop --precision ") + options.precision + ")");
    }
    if (options.device != "CPU" && options.device != "cpu") {
      throw dtop::Error("an ExecuTorch program runs on the CPU (XNNPACK), not " + options.device);
    }
    quiet_log();
    module_ = std::make_unique<Module>(path, Module::LoadMode::Mmap);
    if (const Error e = module_->load(); e != Error::Ok) {
      throw dtop::Error(path + " is not a readable ExecuTorch program (" + reason(e) +
                        "): export it again with `dtop-export executorch`");
    }
    read_metadata();
    std::lock_guard<std::mutex> lock(pool_mutex);
    // The pool is the process's: threads sizes it; 0 is ExecuTorch's own size (as it was before the first resize, not
    // what an earlier program left), capped at the usable CPUs (two threads on one CPU under taskset made every
    // forward pass wait). Only while no other program is open.
    if (auto* pool = executorch::extension::threadpool::get_threadpool(); pool != nullptr) {
      const std::size_t have = pool->get_thread_count();
      if (pool_default == 0) pool_default = have;
      std::size_t wanted = options.threads > 0 ? static_cast<std::size_t>(options.threads) : pool_default;
      if (const std::size_t cpus = usable_cpus(); options.threads == 0 && cpus > 0 && wanted > cpus) wanted = cpus;
      if (wanted != have && open_programs > 0) {
        if (options.threads > 0) {
          throw dtop::Error(path + ": ExecuTorch's thread pool is the process's, and the " +
                            std::to_string(open_programs) + " ExecuTorch program(s) open in it run on " +
                            std::to_string(have) + " threads: open this one with threads " + std::to_string(have) +
                            " (or 0), or close them first");
        }
        wanted = have;  // the default: the pool as the open programs have it
      }
      if (wanted != have) pool->_unsafe_reset_threadpool(static_cast<std::uint32_t>(wanted));
      threads_ = pool->get_thread_count();
    }
    if (const Error e = module_->load_forward(); e != Error::Ok) {
      throw dtop::Error("ExecuTorch cannot load " + path + "'s forward method (" + reason(e) + ")");
    }
    ++open_programs;
    counted_ = true;
  }

  ~ExecuTorchRuntime() override {
    module_.reset();  // its XNNPACK runtime (and its hold on the pool) goes first
    if (counted_) {
      std::lock_guard<std::mutex> lock(pool_mutex);
      --open_programs;
    }
  }

  ExecuTorchRuntime(const ExecuTorchRuntime&) = delete;
  ExecuTorchRuntime& operator=(const ExecuTorchRuntime&) = delete;

  const Metadata& metadata() const override { return metadata_; }

  std::vector<float> run(const float* images, int batch, int height, int width, int* dim) override {
    auto input = executorch::extension::from_blob(const_cast<float*>(images), {batch, 3, height, width},
                                                  executorch::aten::ScalarType::Float);
    auto result = module_->forward(input);
    if (!result.ok()) {
      throw dtop::Error("ExecuTorch inference failed on a " + std::to_string(batch) + "x3x" + std::to_string(height) +
                        "x" + std::to_string(width) + " batch (" + reason(result.error()) + ")");
    }
    if (result->empty() || !(*result)[0].isTensor()) throw dtop::Error(path_ + " returned no tensor");
    const auto& out = (*result)[0].toTensor();
    if (out.dim() != 2 || out.size(0) != batch) {
      throw dtop::Error(path_ + " returned a tensor of rank " + std::to_string(out.dim()) + " for a batch of " +
                        std::to_string(batch) + ": expected [batch, N]");
    }
    if (out.scalar_type() != executorch::aten::ScalarType::Float) {
      throw dtop::Error(path_ + " returned a tensor of another type than float32: export it again with "
                        "dtop-export executorch");
    }
    *dim = static_cast<int>(out.size(1));
    const float* p = out.const_data_ptr<float>();
    return std::vector<float>(p, p + out.numel());
  }

  // concurrent() stays false: a Module is not thread-safe (dtop::Embedder runs one forward pass at a time on it).

  std::string describe() const override {
    const auto version = metadata_.find("dtop.executorch_version");
    return "executorch " + (version == metadata_.end() ? std::string("?") : version->second) + " XNNPACK " +
           (threads_ > 0 ? std::to_string(threads_) + " threads" : std::string("default threads"));
  }

 private:
  void read_metadata() {
    const auto names = module_->method_names();
    if (!names.ok() || names->count(kMetadataMethod) == 0) {
      throw dtop::Error(path_ + " carries no dtop-export contract (no " + kMetadataMethod +
                        " method): export it with `dtop-export executorch CKPT.pt`");
    }
    auto out = module_->execute(kMetadataMethod);
    if (!out.ok() || out->empty() || !(*out)[0].isString()) {
      throw dtop::Error(path_ + ": its " + kMetadataMethod + " method returns no string: export it again");
    }
    const std::string text((*out)[0].toString());
    json::Value meta;
    try {
      meta = json::parse(text);
    } catch (const std::exception& e) {
      throw dtop::Error(path_ + ": its " + kMetadataMethod + " is not JSON (" + e.what() + "): export it again");
    }
    if (meta.kind != json::Value::Kind::Object) {
      throw dtop::Error(path_ + ": its " + kMetadataMethod + " is not a JSON object: export it again");
    }
    for (const auto& [key, value] : meta.fields) {
      if (value.kind == json::Value::Kind::String) metadata_[key] = value.text;
    }
  }

  std::string path_;
  RuntimeOptions options_;
  std::size_t threads_ = 0;  // the pool's size when this program was opened
  bool counted_ = false;     // in open_programs
  std::unique_ptr<Module> module_;
  Metadata metadata_;
};

}  // namespace

std::unique_ptr<Runtime> open_executorch(const std::string& model_path, const RuntimeOptions& options) {
  return std::make_unique<ExecuTorchRuntime>(model_path, options);
}

}  // namespace dtop
