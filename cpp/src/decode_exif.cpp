// Pillow's Image.getexif() (Pillow >= 13), reduced to what ImageOps.exif_transpose needs: the orientation.
//
// The sources, in Pillow's order: info["exif"] (JPEG: the first APP1 "Exif" segment with the later ones appended;
// PNG: the last eXIf chunk, or a tEXt chunk keyed "exif"), else the hex of a "Raw profile type exif" text chunk;
// the block loses one or two leading "Exif\0\0", is parsed as a TIFF header and IFD0 (Exif.load,
// TiffImagePlugin.ImageFileDirectory_v2), and tag 0x0112 is read as Pillow decodes its type. Without that tag,
// XMP's `tiff:Orientation="N"` or `<tiff:Orientation>N` counts. exif_transpose turns the image for 2..8 only: a
// value of another type that equals such an integer (6.0, the rational 12/2) turns it, bytes or text do not.
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "decode_internal.hpp"

namespace dtop::decode {
namespace {

bool starts_with(std::string_view s, std::string_view p) { return s.size() >= p.size() && s.substr(0, p.size()) == p; }

// The orientation tag of IFD0: present or not (the XMP fallback needs that), and the transpose it asks for
// (2..8, or 0 when its value is none of those).
struct OrientationTag {
  bool present = false;
  int value = 0;
};

// Byte size of one value of a TIFF type Pillow loads; 0 for the types it skips.
unsigned unit_size(unsigned type) {
  switch (type) {
    case 1: case 2: case 6: case 7: return 1;   // BYTE, ASCII, SBYTE, UNDEFINED
    case 3: case 8: return 2;                   // SHORT, SSHORT
    case 4: case 9: case 11: case 13: return 4; // LONG, SLONG, FLOAT, IFD
    case 5: case 10: case 12: case 16: return 8;  // RATIONAL, SRATIONAL, DOUBLE, LONG8
    default: return 0;
  }
}

int transpose_code(long double v) {  // the dict lookup of exif_transpose: equal to an int key 2..8
  if (!(v >= 2 && v <= 8) || v != std::floor(v)) return 0;
  return static_cast<int>(v);
}

// The first value of tag data `d` of `type` (Pillow keeps the first of several), as exif_transpose sees it.
int tag_value(unsigned type, std::string_view d, bool little) {
  auto byte = [&](std::size_t i) { return static_cast<std::uint64_t>(static_cast<std::uint8_t>(d[i])); };
  auto uint = [&](std::size_t o, int n) {
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= byte(o + (little ? i : n - 1 - i)) << (8 * i);
    return v;
  };
  auto sint = [&](std::size_t o, int n) {
    const std::uint64_t v = uint(o, n);
    const std::uint64_t sign = 1ull << (8 * n - 1);
    return static_cast<long long>(v ^ sign) - static_cast<long long>(sign);
  };
  switch (type) {
    case 3: return transpose_code(static_cast<long double>(uint(0, 2)));
    case 4: case 13: return transpose_code(static_cast<long double>(uint(0, 4)));
    case 16: return transpose_code(static_cast<long double>(uint(0, 8)));
    case 6: return transpose_code(static_cast<long double>(sint(0, 1)));
    case 8: return transpose_code(static_cast<long double>(sint(0, 2)));
    case 9: return transpose_code(static_cast<long double>(sint(0, 4)));
    case 5: case 10: {  // IFDRational(num, den): nan for den 0, else the exact fraction
      const long long num = type == 5 ? static_cast<long long>(uint(0, 4)) : sint(0, 4);
      const long long den = type == 5 ? static_cast<long long>(uint(4, 4)) : sint(4, 4);
      if (den == 0 || num % den != 0) return 0;
      return transpose_code(static_cast<long double>(num / den));
    }
    case 11: {
      const auto bits = static_cast<std::uint32_t>(uint(0, 4));
      float f = 0;
      std::memcpy(&f, &bits, 4);
      return std::isnan(f) ? 0 : transpose_code(f);
    }
    case 12: {
      const std::uint64_t bits = uint(0, 8);
      double f = 0;
      std::memcpy(&f, &bits, 8);
      return std::isnan(f) ? 0 : transpose_code(f);
    }
    default: return 0;  // BYTE / UNDEFINED (bytes), ASCII (str): never a transpose
  }
}

// Exif.load(raw) and IFD0's tag 0x0112; throws Refused where Pillow raises (the header), and stops where
// ImageFileDirectory_v2.load stops reading (a truncated entry or tag data beyond the block) keeping what it read.
OrientationTag exif_tag(std::string_view raw) {
  static const std::string_view kExif("Exif\0\0", 6);
  for (int k = 0; k < 2 && starts_with(raw, kExif); ++k) raw.remove_prefix(6);
  if (raw.empty()) return {};
  const std::string_view head = raw.substr(0, 8);
  static const std::string_view kPrefixes[] = {{"MM\0\x2a", 4}, {"II\x2a\0", 4}, {"MM\x2a\0", 4},
                                              {"II\0\x2a", 4}, {"MM\0\x2b", 4}, {"II\x2b\0", 4}};
  bool known = false;
  for (const auto& p : kPrefixes) known = known || starts_with(head, p);
  if (!known) throw Refused("not a TIFF file (EXIF header not valid)");
  const bool little = head[0] == 'I';
  if (static_cast<std::uint8_t>(head[2]) == 0x2b) throw Refused("unpack requires a buffer of 8 bytes (BigTIFF EXIF)");
  if (head.size() < 8) throw Refused("unpack requires a buffer of 4 bytes (EXIF header)");
  const std::size_t n = raw.size();
  auto u = [&](std::size_t o, int len) {
    std::uint64_t v = 0;
    for (int i = 0; i < len; ++i) {
      v |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(raw[o + (little ? i : len - 1 - i)])) << (8 * i);
    }
    return v;
  };
  const std::uint64_t ifd = u(4, 4);
  if (ifd > n || n - ifd < 2) return {};
  const std::uint64_t count = u(static_cast<std::size_t>(ifd), 2);
  std::size_t pos = static_cast<std::size_t>(ifd) + 2;
  std::uint64_t total = 0;
  std::vector<bool> stored(65536, false);
  for (std::uint64_t i = 0; i < count; ++i) {
    if (n - pos < 12) return {};
    const auto tag = static_cast<unsigned>(u(pos, 2));
    const auto type = static_cast<unsigned>(u(pos + 2, 2));
    const std::uint64_t values = u(pos + 4, 4);
    const std::size_t entry = pos;
    pos += 12;
    if (stored[tag]) continue;
    const unsigned unit = unit_size(type);
    if (unit == 0) continue;
    const std::uint64_t size = values * unit;
    std::string_view data;
    if (size > 4) {
      const std::uint64_t offset = u(entry + 8, 4);
      total += size;
      if (total > n) continue;  // "Tag data larger than file": skipped
      if (offset > n || n - offset < size) return {};  // a short read ends the directory
      data = raw.substr(static_cast<std::size_t>(offset), static_cast<std::size_t>(size));
    } else {
      data = raw.substr(entry + 8, static_cast<std::size_t>(size));
    }
    if (size == 0) continue;
    stored[tag] = true;
    if (tag == 0x0112) return {true, tag_value(type, data, little)};
  }
  return {};
}

// bytes.fromhex("".join(text.split("\n")[3:])): the EXIF block of ImageMagick's "Raw profile type exif".
std::string raw_profile_exif(const std::string& text) {
  std::size_t start = 0;
  for (int k = 0; k < 3; ++k) {
    const std::size_t nl = text.find('\n', start);
    if (nl == std::string::npos) return {};
    start = nl + 1;
  }
  std::string hex;
  for (std::size_t i = start; i < text.size(); ++i) {
    if (text[i] != '\n') hex += text[i];
  }
  for (const char c : hex) {
    if (static_cast<unsigned char>(c) >= 0x80) throw Refused("non-hexadecimal number found in fromhex() arg");
  }
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  std::size_t i = 0;
  while (i < hex.size()) {
    if (space(hex[i])) {
      while (i < hex.size() && space(hex[i])) ++i;
      if (i >= hex.size()) break;
    }
    const int top = digit(hex[i]);
    const int bot = i + 1 < hex.size() ? digit(hex[i + 1]) : -1;
    if (top < 0 || bot < 0) throw Refused("non-hexadecimal number found in fromhex() arg");
    out += static_cast<char>(top * 16 + bot);
    i += 2;
  }
  return out;
}

// re.search(r'tiff:Orientation(="|>)([0-9])', xmp): the digit, or nothing.
std::optional<int> xmp_orientation(const std::string& xmp) {
  static const std::string kKey = "tiff:Orientation";
  for (std::size_t at = xmp.find(kKey); at != std::string::npos; at = xmp.find(kKey, at + 1)) {
    std::size_t p = at + kKey.size();
    if (p < xmp.size() && xmp[p] == '>') {
      ++p;
    } else if (p + 1 < xmp.size() && xmp[p] == '=' && xmp[p + 1] == '"') {
      p += 2;
    } else {
      continue;
    }
    if (p < xmp.size() && xmp[p] >= '0' && xmp[p] <= '9') return xmp[p] - '0';
  }
  return std::nullopt;
}

}  // namespace

int orientation(const Info& info, bool swallow_exif_errors) {
  OrientationTag tag;
  try {
    const auto exif = info.find("exif");
    if (exif != info.end()) {
      if (exif->second.kind != InfoValue::kBytes) throw Refused("cannot use a bytes pattern on a string-like object");
      tag = exif_tag(exif->second.data);
    } else {
      const auto profile = info.find("Raw profile type exif");
      if (profile != info.end()) tag = exif_tag(raw_profile_exif(profile->second.data));
    }
  } catch (const Refused&) {
    if (swallow_exif_errors) return 1;  // JPEG: getexif() failed while opening, its empty result was kept
    throw;
  }
  int value = tag.value;
  if (!tag.present) {
    const auto xml = info.find("XML:com.adobe.xmp");
    const auto xmp = info.find("xmp");
    const InfoValue* source = nullptr;
    bool bytes_pattern = false;
    if (xml != info.end() && xml->second.truthy()) {
      source = &xml->second;
    } else if (xmp != info.end() && xmp->second.truthy()) {
      source = &xmp->second;
      bytes_pattern = true;
    }
    if (source != nullptr) {
      if (bytes_pattern != (source->kind == InfoValue::kBytes)) {
        throw Refused(bytes_pattern ? "cannot use a bytes pattern on a string-like object"
                                    : "cannot use a string pattern on a bytes-like object");
      }
      value = xmp_orientation(source->data).value_or(0);
    }
  }
  return value >= 2 && value <= 8 ? value : 1;
}

}  // namespace dtop::decode
