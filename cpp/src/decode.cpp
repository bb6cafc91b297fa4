// Decoding entry points: the file read within the budget, routing by signature, the budget's arithmetic and
// messages, and the EXIF orientation applied (ImageOps.exif_transpose's transposes).
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "decode_internal.hpp"

namespace dtop {
namespace decode {

std::uint64_t add_sat(std::uint64_t a, std::uint64_t b) {
  return a > std::numeric_limits<std::uint64_t>::max() - b ? std::numeric_limits<std::uint64_t>::max() : a + b;
}

std::uint64_t mul_sat(std::uint64_t a, std::uint64_t b) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::numeric_limits<std::uint64_t>::max();
  return a * b;
}

std::uint64_t decode_bytes(std::uint64_t file_size, std::uint64_t width, std::uint64_t height, std::uint64_t work) {
  return add_sat(add_sat(file_size, mul_sat(6, mul_sat(width, height))), work);
}

std::uint64_t budget_bytes(const DecodeLimits& limits) { return mul_sat(limits.max_decode_mb, 1ull << 20); }

void check_pixels(std::uint64_t width, std::uint64_t height, const DecodeLimits& limits) {
  const std::uint64_t pixels = mul_sat(width, height);
  if (pixels > limits.max_pixels) {
    throw Refused(std::to_string(width) + " x " + std::to_string(height) + " = " + std::to_string(pixels) +
                  " pixels, over the limit of " + std::to_string(limits.max_pixels) +
                  " (raise it with --max-pixels or DecodeLimits::max_pixels)");
  }
}

void check_bytes(std::uint64_t need, const DecodeLimits& limits) {
  if (need > budget_bytes(limits)) {
    const std::uint64_t mb = need / (1ull << 20) + (need % (1ull << 20) != 0);
    throw Refused("decoding needs " + std::to_string(mb) + " MB, over the budget of " +
                  std::to_string(limits.max_decode_mb) +
                  " MB (raise it with --max-decode-mb or DecodeLimits::max_decode_mb)");
  }
}

void check_scans(std::uint64_t scans, const DecodeLimits& limits) {
  if (scans > limits.max_scans) {
    throw Refused(std::to_string(scans) + " JPEG scans, over the limit of " + std::to_string(limits.max_scans) +
                  " (raise it with --max-scans or DecodeLimits::max_scans)");
  }
}

void apply_orientation(Image& img, int orientation) {
  if (orientation < 2 || orientation > 8) return;
  const int w = img.width, h = img.height;
  auto px = [](std::vector<std::uint8_t>& v, std::size_t i) { return &v[i * 3]; };
  auto swap_px = [](std::uint8_t* a, std::uint8_t* b) {
    for (int c = 0; c < 3; ++c) std::swap(a[c], b[c]);
  };
  const auto at = [w](int x, int y) { return static_cast<std::size_t>(y) * w + x; };
  if (orientation == 2 || orientation == 3) {  // mirror each row (and for 3, the rows too: a half turn)
    for (int y = 0; y < h; ++y) {
      for (int x = 0; x < w / 2; ++x) swap_px(px(img.rgb, at(x, y)), px(img.rgb, at(w - 1 - x, y)));
    }
  }
  if (orientation == 3 || orientation == 4) {  // flip: swap whole rows
    const std::size_t row = static_cast<std::size_t>(w) * 3;
    for (int y = 0; y < h / 2; ++y) {
      std::swap_ranges(img.rgb.begin() + static_cast<std::ptrdiff_t>(y * row),
                       img.rgb.begin() + static_cast<std::ptrdiff_t>((y + 1) * row),
                       img.rgb.begin() + static_cast<std::ptrdiff_t>((h - 1 - y) * row));
    }
  }
  if (orientation <= 4) return;
  // 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise: width and height swap.
  Image out;
  out.width = h;
  out.height = w;
  out.rgb.resize(img.rgb.size());
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx = 0, sy = 0;
      switch (orientation) {
        case 5: sx = y; sy = x; break;
        case 6: sx = y; sy = h - 1 - x; break;
        case 7: sx = w - 1 - y; sy = h - 1 - x; break;
        default: sx = w - 1 - y; sy = x; break;  // 8
      }
      std::memcpy(&out.rgb[(static_cast<std::size_t>(y) * out.width + x) * 3], &img.rgb[at(sx, sy) * 3], 3);
    }
  }
  img = std::move(out);
}

JpegScans jpeg_scans(const std::uint8_t* d, std::size_t n) {
  JpegScans out;
  std::size_t pos = 2;
  while (true) {
    // The next marker: a run of 0xFF and a byte that is not a stuffed zero, TEM, RSTn, SOI or another 0xFF.
    std::size_t j = pos;
    std::uint8_t m = 0;
    bool found = false;
    while (j < n) {
      const void* ff = std::memchr(d + j, 0xFF, n - j);
      if (ff == nullptr) break;
      j = static_cast<std::size_t>(static_cast<const std::uint8_t*>(ff) - d) + 1;
      while (j < n && d[j] == 0xFF) ++j;
      if (j >= n) break;
      m = d[j++];
      if (m != 0x00 && m != 0x01 && !(m >= 0xD0 && m <= 0xD8)) {
        found = true;
        break;
      }
    }
    if (!found) break;
    pos = j;
    if (m == 0xD9 || pos + 2 > n) break;
    const std::size_t length = (static_cast<std::size_t>(d[pos]) << 8) | d[pos + 1];
    if (m == 0xDA) {
      ++out.scans;
      if (out.scans == 1 && pos + 2 < n) out.first_components = d[pos + 2];
    }
    if (length < 2) break;
    pos += length;
  }
  return out;
}

}  // namespace decode

Image decode_image(const std::vector<std::uint8_t>& bytes, const std::string& what, const DecodeLimits& limits) {
  static const std::uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  try {
    decode::check_bytes(bytes.size(), limits);
    if (bytes.size() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) {
      return decode::decode_jpeg(bytes.data(), bytes.size(), limits);
    }
    if (bytes.size() >= 8 && std::memcmp(bytes.data(), kPng, 8) == 0) {
      return decode::decode_png(bytes.data(), bytes.size(), limits);
    }
  } catch (const decode::Refused& e) {
    throw ImageError("cannot read image " + what + ": " + e.what());
  } catch (const std::bad_alloc&) {
    throw ImageError("cannot read image " + what + ": out of memory");
  }
  if (bytes.empty()) throw ImageError("cannot read image " + what + ": the file is empty");
  throw ImageError("cannot read image " + what + ": not a JPEG or PNG file (the C++ client decodes those two)");
}

Image load_image(const std::string& path, const DecodeLimits& limits) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) throw ImageError("image " + path + " not found");
    throw ImageError("cannot read image " + path + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) throw ImageError("cannot read image " + path + ": not a file");
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size > decode::budget_bytes(limits)) {  // before reading it: the file itself is in the budget
    throw ImageError("cannot read image " + path + ": the file has " + std::to_string((size + (1u << 20) - 1) >> 20) +
                     " MB, over the decode budget of " + std::to_string(limits.max_decode_mb) +
                     " MB (raise it with --max-decode-mb or DecodeLimits::max_decode_mb)");
  }
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) throw ImageError("cannot read image " + path + ": " + std::strerror(errno));
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
  const std::size_t got = bytes.empty() ? 0 : std::fread(bytes.data(), 1, bytes.size(), file.get());
  if (got != bytes.size() || std::ferror(file.get())) throw ImageError("cannot read image " + path + ": read error");
  return decode_image(bytes, path, limits);
}

}  // namespace dtop
