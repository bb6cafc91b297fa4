// Contract::from_metadata: the `dtop.*` keys of dtop_export/contract.py (onnx_metadata), read back.
#include <cmath>
#include <stdexcept>

#include "dtop/runtime.hpp"
#include "json.hpp"

namespace dtop {
namespace {

const std::string* find(const Metadata& meta, const std::string& key) {
  auto it = meta.find(key);
  return it == meta.end() ? nullptr : &it->second;
}

// The command that writes the model again: `dtop-export executorch` for a program (its contract's format, or a .pte
// without one), `dtop-export onnx` for an .onnx and the IRs converted from one.
std::string exporter(const Metadata& meta, const std::string& source) {
  const std::string* format = find(meta, "dtop.format");
  const bool pte = format != nullptr ? *format == "dtop-export/executorch"
                                     : source.size() >= 4 && source.compare(source.size() - 4, 4, ".pte") == 0;
  return pte ? "dtop-export executorch" : "dtop-export onnx";
}

json::Value parse_value(const Metadata& meta, const std::string& key, const std::string& source) {
  try {
    return json::parse(meta.at(key));
  } catch (const std::exception& e) {
    throw Error(source + ": metadata " + key + " is unreadable (" + e.what() + "): re-export it with " +
                exporter(meta, source));
  }
}

std::array<float, 3> triple(const json::Value& v, const std::string& key, const std::string& source,
                            const std::string& fix) {
  if (v.kind != json::Value::Kind::Array || v.items.size() != 3) {
    throw Error(source + ": metadata " + key + " should be a list of 3 numbers: re-export it with " + fix);
  }
  std::array<float, 3> out{};
  for (int i = 0; i < 3; ++i) out[i] = static_cast<float>(v.items[i].number);  // float64 -> float32, as NumPy
  return out;
}

int to_int(const std::string& text, const std::string& key, const std::string& source, const std::string& fix) {
  try {
    std::size_t used = 0;
    const int v = std::stoi(text, &used);
    if (used != text.size()) throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    throw Error(source + ": metadata " + key + " = '" + text + "' is not an integer: re-export it with " + fix);
  }
}

// A whole number in [1, 2^20] (a side, a batch, a dimension): a value outside it is no dtop-export model's, and
// would hang the batching loop (0), size buffers from a negative count or overflow int arithmetic downstream.
constexpr double kMaxCount = 1 << 20;

int positive_int(const json::Value& v, const std::string& key, const std::string& source, const std::string& fix) {
  if (v.kind != json::Value::Kind::Number || !(v.number >= 1 && v.number <= kMaxCount) ||
      v.number != std::floor(v.number)) {
    throw Error(source + ": metadata " + key + " should be a whole number from 1 to " +
                std::to_string(static_cast<int>(kMaxCount)) + ": re-export it with " + fix);
  }
  return static_cast<int>(v.number);
}

int positive_int(const std::string& text, const std::string& key, const std::string& source, const std::string& fix) {
  json::Value v;
  v.kind = json::Value::Kind::Number;
  v.number = to_int(text, key, source, fix);
  return positive_int(v, key, source, fix);
}

}  // namespace

Contract Contract::from_metadata(const Metadata& meta, const std::string& source) {
  const std::string fix = exporter(meta, source);
  const std::string* format = find(meta, "dtop.format");
  if (format == nullptr) {
    throw Error(source + " has no dtop-export metadata (dtop.format): export the model with `" + fix + " CKPT.pt`");
  }
  for (const char* key : {"dtop.input_name", "dtop.output_name", "dtop.stride", "dtop.mean", "dtop.std",
                          "dtop.resize_policy", "dtop.descriptor_dim"}) {
    if (find(meta, key) == nullptr) {
      throw Error(source + " lacks metadata " + key + ": re-export it with this version of " + fix);
    }
  }
  Contract c;
  c.format = *format;
  c.input_name = meta.at("dtop.input_name");
  c.output_name = meta.at("dtop.output_name");
  if (const auto* v = find(meta, "dtop.input_layout")) c.layout = *v;
  if (c.layout != "NCHW") throw Error(source + ": input layout " + c.layout + " is not supported (NCHW only)");
  if (const auto* v = find(meta, "dtop.precision")) c.precision = *v;
  if (const auto* v = find(meta, "dtop.checkpoint_sha256")) c.checkpoint_sha256 = *v;
  if (const auto* v = find(meta, "dtop.l2_normalized")) c.l2_normalized = *v == "true";
  c.descriptor_dim = positive_int(meta.at("dtop.descriptor_dim"), "dtop.descriptor_dim", source, fix);
  PreprocessConfig& p = c.preprocess;
  p.stride = positive_int(meta.at("dtop.stride"), "dtop.stride", source, fix);
  p.mean = triple(parse_value(meta, "dtop.mean", source), "dtop.mean", source, fix);
  p.std = triple(parse_value(meta, "dtop.std", source), "dtop.std", source, fix);
  if (const auto* v = find(meta, "dtop.color_order")) p.color_order = *v;
  const json::Value resize = parse_value(meta, "dtop.resize_policy", source);
  if (!resize["policy"].is_null()) p.resize = resize["policy"].text;
  if (!resize["size"].is_null()) p.size = positive_int(resize["size"], "dtop.resize_policy size", source, fix);
  if (!resize["interpolation"].is_null()) p.interpolation = resize["interpolation"].text;
  if (find(meta, "dtop.static_hw") != nullptr) {
    const json::Value hw = parse_value(meta, "dtop.static_hw", source);
    if (hw.kind == json::Value::Kind::Array && hw.items.size() == 2) {
      c.static_hw = std::array<int, 2>{positive_int(hw.items[0], "dtop.static_hw", source, fix),
                                       positive_int(hw.items[1], "dtop.static_hw", source, fix)};
    }
  }
  if (find(meta, "dtop.fixed_batch") != nullptr) {
    const json::Value b = parse_value(meta, "dtop.fixed_batch", source);
    if (!b.is_null()) c.fixed_batch = positive_int(b, "dtop.fixed_batch", source, fix);
  }
  return c;
}

}  // namespace dtop
