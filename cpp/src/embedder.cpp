// dtop::Embedder: preprocessing + runtime + batching + multi-scale, as dtop_export/retrieval/extract.py.
#include "dtop/embedder.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <utility>

namespace dtop {

std::vector<double> multi_scales() { return {1.0, 1.0 / std::sqrt(2.0), std::sqrt(2.0)}; }

std::vector<double> parse_scales(const std::string& text) {
  if (text == "ms" || text == "multi" || text == "multiscale") return multi_scales();
  std::vector<double> out;
  std::stringstream in(text);
  std::string item;
  const auto bad = [&]() {
    return Error("cannot read scales '" + text + "': write positive numbers separated by commas, e.g. 1,0.707,1.414");
  };
  while (std::getline(in, item, ',')) {
    if (item.find_first_not_of(" \t") == std::string::npos) continue;
    std::size_t used = 0;
    double v = 0;
    try {
      v = std::stod(item, &used);
    } catch (const std::exception&) {
      throw bad();
    }
    if (item.find_first_not_of(" \t", used) != std::string::npos || !(v > 0) || !std::isfinite(v)) throw bad();
    out.push_back(v);
  }
  if (out.empty()) throw bad();
  return out;
}

Embedder::Embedder(const std::string& model_path, const RuntimeOptions& options)
    : Embedder(open_openvino(model_path, options), model_path) {}

Embedder::Embedder(std::unique_ptr<Runtime> runtime, const std::string& source)
    : runtime_(std::move(runtime)),
      source_(source),
      contract_(Contract::from_metadata(runtime_->metadata(), source)),
      concurrent_(runtime_->concurrent()) {}

Tensor Embedder::preprocess(const Image& img, int image_size, double scale) const {
  return prepare(img, contract_.preprocess, image_size > 0 ? image_size : contract_.preprocess.size, scale);
}

std::vector<float> Embedder::run(const std::vector<const Tensor*>& batch) {
  if (batch.empty()) return {};
  for (const Tensor* t : batch) {
    if (t == nullptr) throw Error("Embedder::run: a null tensor in the batch");
    if (t->height <= 0 || t->width <= 0 ||
        t->data.size() != static_cast<std::size_t>(3) * static_cast<std::size_t>(t->height) *
                              static_cast<std::size_t>(t->width)) {
      throw Error("Embedder::run: a tensor of " + std::to_string(t->height) + "x" + std::to_string(t->width) +
                  " needs 3 * height * width floats, it has " + std::to_string(t->data.size()));
    }
  }
  const int h = batch[0]->height, w = batch[0]->width;
  if (contract_.static_hw && ((*contract_.static_hw)[0] != h || (*contract_.static_hw)[1] != w)) {
    // An ExecuTorch program has no --static to drop: its size is `executorch --size`'s (as the Python engine says).
    const std::string fix = contract_.format == "dtop-export/executorch"
                                ? "resize, or compile a program of that size (dtop-export executorch CKPT.pt --size " +
                                      std::to_string(h) + ")"
                                : "re-export without --static";
    throw Error(source_ + " was exported for " + std::to_string((*contract_.static_hw)[0]) + "x" +
                std::to_string((*contract_.static_hw)[1]) + " inputs only, got " + std::to_string(h) + "x" +
                std::to_string(w) + ": " + fix);
  }
  const std::size_t plane = static_cast<std::size_t>(3) * h * w;
  const int n = static_cast<int>(batch.size());
  // A fixed-batch export runs in chunks of its batch, the last one padded by repeating its final image.
  const int chunk = contract_.fixed_batch.value_or(n);
  // A runtime that is not concurrent (ExecuTorch: one Module) runs one forward pass at a time: two threads
  // interleaving their inputs and outputs on it got each other's descriptors. OpenVINO's passes run in parallel.
  std::unique_lock<std::mutex> lock(*run_mutex_, std::defer_lock);
  if (!concurrent_) lock.lock();
  std::vector<float> out;
  std::vector<float> input;
  int dim = 0;
  for (int start = 0; start < n; start += chunk) {
    const int count = std::min(chunk, n - start);
    input.resize(plane * chunk);
    for (int i = 0; i < chunk; ++i) {
      const Tensor* t = batch[start + std::min(i, count - 1)];
      if (t->height != h || t->width != w) throw Error("Embedder::run needs tensors of one shape");
      std::memcpy(&input[plane * i], t->data.data(), plane * sizeof(float));
    }
    std::vector<float> d = runtime_->run(input.data(), chunk, h, w, &dim);
    if (contract_.descriptor_dim && dim != contract_.descriptor_dim) {
      throw Error(source_ + " returned descriptors of " + std::to_string(dim) + " values; its metadata says " +
                  std::to_string(contract_.descriptor_dim));
    }
    // A custom Runtime is not trusted to keep its contract: the copy below reads count x dim values
    if (d.size() != static_cast<std::size_t>(chunk) * static_cast<std::size_t>(dim)) {
      throw Error(source_ + ": the runtime returned " + std::to_string(d.size()) + " values for a batch of " +
                  std::to_string(chunk) + " descriptors of " + std::to_string(dim) +
                  " values; Runtime::run must return batch x dim floats");
    }
    out.insert(out.end(), d.begin(), d.begin() + static_cast<std::ptrdiff_t>(count) * dim);
  }
  if (!contract_.l2_normalized) {
    for (int i = 0; i < n; ++i) {
      double s = 0;
      for (int j = 0; j < dim; ++j) s += static_cast<double>(out[i * dim + j]) * out[i * dim + j];
      const double norm = std::max(std::sqrt(s), 1e-12);
      for (int j = 0; j < dim; ++j) out[i * dim + j] = static_cast<float>(out[i * dim + j] / norm);
    }
  }
  return out;
}

namespace {

// Sum of per-scale unit descriptors, normalised again (extract.py accumulates in float64).
void finish_multiscale(std::vector<double>& acc, std::size_t rows, int dim, std::size_t scales, std::vector<float>& out) {
  out.resize(rows * dim);
  for (std::size_t r = 0; r < rows; ++r) {
    double* a = &acc[r * dim];
    double norm = 1.0;
    if (scales > 1) {
      double s = 0;
      for (int j = 0; j < dim; ++j) s += a[j] * a[j];
      norm = std::max(std::sqrt(s), 1e-12);
    }
    for (int j = 0; j < dim; ++j) out[r * dim + j] = static_cast<float>(a[j] / norm);
  }
}

}  // namespace

std::vector<float> Embedder::embed(const Image& img, const EmbedOptions& options) {
  if (options.scales.empty()) throw Error("no scales given");
  std::vector<double> acc;
  int dim = 0;
  for (const double s : options.scales) {
    const Tensor t = preprocess(img, options.image_size, s);
    const std::vector<float> d = run({&t});
    dim = static_cast<int>(d.size());
    acc.resize(d.size(), 0.0);
    for (std::size_t j = 0; j < d.size(); ++j) acc[j] += d[j];
  }
  std::vector<float> out;
  finish_multiscale(acc, 1, dim, options.scales.size(), out);
  return out;
}

EmbedResult Embedder::embed_files(const std::vector<std::string>& paths, const EmbedOptions& options,
                                  const Progress& progress) {
  if (options.scales.empty()) throw Error("no scales given");
  for (const double s : options.scales) {
    if (!(s > 0)) throw Error("scales must be positive numbers");
  }
  if (options.batch_size < 1) throw Error("batch size must be >= 1, got " + std::to_string(options.batch_size));
  const std::size_t n = paths.size();
  const int dim = contract_.descriptor_dim;
  std::vector<double> acc(n * static_cast<std::size_t>(dim), 0.0);
  std::vector<bool> ok(n, true);
  EmbedResult result;
  result.dim = dim;
  // Inputs of one shape wait in a bucket until batch_size of them are there (extract.py's buckets).
  std::map<std::pair<int, int>, std::vector<std::pair<std::size_t, Tensor>>> buckets;
  auto flush = [&](const std::pair<int, int>& key) {
    auto& items = buckets[key];
    if (items.empty()) return;
    std::vector<const Tensor*> batch;
    for (const auto& it : items) batch.push_back(&it.second);
    const std::vector<float> d = run(batch);
    for (std::size_t i = 0; i < items.size(); ++i) {
      double* a = &acc[items[i].first * dim];
      for (int j = 0; j < dim; ++j) a[j] += d[i * dim + j];
    }
    items.clear();
  };
  for (std::size_t i = 0; i < n; ++i) {
    std::vector<Tensor> tensors;
    try {
      const Image img = load_image(paths[i], options.decode);
      for (const double s : options.scales) tensors.push_back(preprocess(img, options.image_size, s));
    } catch (const ImageError& e) {
      result.skipped.push_back({i, e.what()});
      ok[i] = false;
    }
    for (auto& t : tensors) {
      const std::pair<int, int> key{t.height, t.width};
      buckets[key].emplace_back(i, std::move(t));
      if (static_cast<int>(buckets[key].size()) >= options.batch_size) flush(key);
    }
    if (progress) progress(i + 1, n);
  }
  for (auto& [key, items] : buckets) flush(key);
  std::vector<double> kept;
  for (std::size_t i = 0; i < n; ++i) {
    if (!ok[i]) continue;
    result.rows.push_back(i);
    kept.insert(kept.end(), acc.begin() + static_cast<std::ptrdiff_t>(i * dim),
                acc.begin() + static_cast<std::ptrdiff_t>((i + 1) * dim));
  }
  finish_multiscale(kept, result.rows.size(), dim, options.scales.size(), result.descriptors);
  return result;
}

// ---- files ------------------------------------------------------------------------------------------------

void write_text_atomic(const std::string& path, const std::string& text) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code dir_error;  // (the throwing overload's std::filesystem_error, e.g. a name too long, is no dtop::Error)
  if (!fs::is_directory(dir, dir_error)) {
    const bool missing = !dir_error || dir_error == std::errc::no_such_file_or_directory ||
                         dir_error == std::errc::not_a_directory;
    throw Error("cannot write " + path + ": " +
                (missing ? "folder " + dir.string() + " does not exist" : dir_error.message()));
  }
  const fs::path tmp = dir / ("." + target.filename().string() + ".tmp" + std::to_string(::getpid()));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot write " + path + ": " + std::strerror(errno));
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    out.flush();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw Error("cannot write " + path + ": " + std::strerror(errno));
    }
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw Error("cannot write " + path + ": " + ec.message());
  }
}

void write_npy(const std::string& path, const std::vector<float>& data, const std::vector<std::size_t>& shape) {
  std::string dims;
  std::size_t count = 1;
  for (const std::size_t d : shape) {
    dims += std::to_string(d) + ", ";
    count *= d;
  }
  if (shape.size() > 1) dims.erase(dims.size() - 2);  // (n, N) ; a 1-d shape keeps its trailing comma: (n,)
  else if (!shape.empty()) dims.erase(dims.size() - 1);
  if (count != data.size()) throw Error("write_npy: shape does not match the data");
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  // magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of 64, ending in \n
  const std::size_t total = ((10 + header.size() + 1 + 63) / 64) * 64;
  header.append(total - 10 - header.size() - 1, ' ');
  header += '\n';
  std::string blob("\x93NUMPY\x01\x00", 8);
  blob += static_cast<char>(header.size() & 0xFF);
  blob += static_cast<char>(header.size() >> 8);
  blob += header;
  blob.append(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float));  // little-endian host
  write_text_atomic(path, blob);
}

void write_npy(const std::string& path, const std::vector<float>& data, std::size_t rows, std::size_t cols) {
  write_npy(path, data, std::vector<std::size_t>{rows, cols});
}

}  // namespace dtop
