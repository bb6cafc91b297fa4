// The ExecuTorch backend of dtop::Runtime: a `.pte` from `dtop-export executorch` (XNNPACK, fp32 or INT8), run with
// ExecuTorch's C++ Module API from the `executorch` wheel. Built when the wheel is installed (`dtop-export cpp
// build`; CMake: -DDTOP_WITH_EXECUTORCH=ON, target dtop::executorch).
//
//   dtop::Embedder embedder(dtop::open_executorch("model.384.pte"), "model.384.pte");
//   std::vector<float> d = embedder.embed(dtop::load_image("photo.jpg"));   // same preprocessing as the .onnx
//
// The contract is the program's `dtop_metadata` method (the `dtop.*` strings an ONNX file keeps in metadata_props):
// a fixed [1, 3, S, S] input and the `square` resize policy (the whole image resized to S x S).
#pragma once

#include <algorithm>
#include <cctype>
#include <memory>
#include <string>

#include "dtop/runtime.hpp"

namespace dtop {

/// Open a dtop-export `.pte`. options.threads sizes ExecuTorch's thread pool (one per process, shared by every program:
/// XNNPACK keeps the pool it loaded with; 0 = its default, one thread per core, capped at the CPUs the process may run
/// on, whatever size an earlier, closed program left). The pool is sized only while no other program is open: with
/// programs open, 0 takes the pool as it is and another count than theirs is refused (an Error). The Python engine
/// differs there: it refuses a default that is not the open programs' size instead of adopting it. options.precision
/// must be "f32" (a program runs at the precision it was compiled with: an INT8 program's quantised layers compute in
/// int8 whatever the hint). Throws Error when the file is missing, truncated, not a .pte, or carries no dtop-export
/// contract.
std::unique_ptr<Runtime> open_executorch(const std::string& model_path, const RuntimeOptions& options = {});

/// True for a path ending in .pte (case-insensitive): what open_executorch takes.
inline bool is_executorch_program(const std::string& model_path) {
  if (model_path.size() < 4) return false;
  std::string ext = model_path.substr(model_path.size() - 4);
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".pte";
}

}  // namespace dtop
