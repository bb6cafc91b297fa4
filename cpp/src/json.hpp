// A small JSON reader (the metadata values are JSON) and writer helpers for the .json sidecar. Internal.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace dtop::json {

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  std::string text;
  std::vector<Value> items;
  std::map<std::string, Value> fields;

  bool is_null() const { return kind == Kind::Null; }
  /// The field `key` of an object, or a null value.
  const Value& operator[](const std::string& key) const;
};

/// Parse one JSON document; throws std::invalid_argument with the position on malformed input.
Value parse(const std::string& text);

/// `text` as a JSON string literal (quoted, escaped): UTF-8 kept as it is, a byte that is not part of well-formed
/// UTF-8 written as \udcXX, the lone surrogate Python's os.fsdecode makes of it (json.dumps writes the same).
std::string quote(const std::string& text);

/// A double as JSON (shortest round-trip form, like Python's repr).
std::string number(double v);

}  // namespace dtop::json
