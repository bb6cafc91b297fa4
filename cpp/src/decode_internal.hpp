// Internal to the decoder (decode*.cpp). The client reads a file the way dtop_export.preprocess.load_image
// does through Pillow, which is the contract: the same files refused, the same pixels for the others.
//
//   decode.cpp        entry points, the decode budget, EXIF orientation applied, Pillow's pixel arithmetic
//   decode_exif.cpp   Pillow's Image.getexif() reduced to what exif_transpose needs: the orientation
//   decode_jpeg.cpp   Pillow's JPEG header walk (JpegImagePlugin), then libjpeg-turbo for the pixels
//   decode_png.cpp    Pillow's PNG reader (PngImagePlugin's chunk rules, ZipDecode.c's rows) on zlib
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>

#include "dtop/image.hpp"

namespace dtop::decode {

/// Why a file is refused (Pillow's reason where Pillow refuses it), without the file's name.
class Refused : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A value of Pillow's `image.info` that decoding depends on: Python bytes, str, int or tuple. A str keeps the
/// bytes the file stored (latin-1 or UTF-8): the searches made on it find the same ASCII text either way.
struct InfoValue {
  enum Kind { kBytes, kStr, kInt, kTuple } kind = kBytes;
  std::string data;
  long long number = 0;

  bool truthy() const { return kind == kInt ? number != 0 : kind == kTuple ? true : !data.empty(); }
};
using Info = std::map<std::string, InfoValue>;

/// The orientation ImageOps.exif_transpose applies (2..8; 1 for none), from what Pillow's getexif() reads:
/// info["exif"], else info["Raw profile type exif"], then XMP's tiff:Orientation when EXIF has none. Throws
/// Refused where getexif() raises. `swallow_exif_errors`: the JPEG case where Pillow already called getexif()
/// while opening and caught its errors (an unreadable EXIF block then counts as no orientation at all).
int orientation(const Info& info, bool swallow_exif_errors);

/// Saturating arithmetic for the budget (a header can claim 2^32 x 2^32 pixels).
std::uint64_t add_sat(std::uint64_t a, std::uint64_t b);
std::uint64_t mul_sat(std::uint64_t a, std::uint64_t b);

/// Bytes of every buffer that coexists while an image decodes: the file, the RGB image and its rotated copy
/// (6 bytes a pixel) and the decoder's own `work` (dtop_export.preprocess.decode_bytes).
std::uint64_t decode_bytes(std::uint64_t file_size, std::uint64_t width, std::uint64_t height, std::uint64_t work);

/// Refuse, naming the limit and the option that raises it, when the image is over `limits`.
void check_pixels(std::uint64_t width, std::uint64_t height, const DecodeLimits& limits);
void check_bytes(std::uint64_t need, const DecodeLimits& limits);
void check_scans(std::uint64_t scans, const DecodeLimits& limits);
std::uint64_t budget_bytes(const DecodeLimits& limits);

/// (a * b) / 255 rounded, the way Pillow's MULDIV255 computes it.
inline int mul_div_255(int a, int b) {
  const int t = a * b + 128;
  return ((t >> 8) + t) >> 8;
}

/// One straight-alpha pixel over opaque white (Pillow's alpha_composite, 7 extra bits), as to_rgb does.
inline void over_white(std::uint8_t r, std::uint8_t g, std::uint8_t b, std::uint8_t alpha, std::uint8_t* rgb) {
  const std::uint32_t a = alpha;
  if (a == 0) {
    rgb[0] = rgb[1] = rgb[2] = 255;
    return;
  }
  constexpr std::uint32_t kBits = 7;
  const std::uint32_t blend = 255u * (255u - a);
  const std::uint32_t out_a255 = a * 255u + blend;
  const std::uint32_t coef1 = a * 255u * 255u * (1u << kBits) / out_a255;
  const std::uint32_t coef2 = 255u * (1u << kBits) - coef1;
  const std::uint8_t in[3] = {r, g, b};
  for (int c = 0; c < 3; ++c) {
    const std::uint32_t t = in[c] * coef1 + 255u * coef2 + (0x80u << kBits);
    rgb[c] = static_cast<std::uint8_t>((((t >> 8) + t) >> 8) >> kBits);
  }
}

/// Turn `img` by an EXIF orientation (2..8) as ImageOps.exif_transpose does; 1 leaves it. Mirrors and the
/// half turn run in place; the transposing ones need a second image (counted in the budget).
void apply_orientation(Image& img, int orientation);

/// Decode a JPEG / PNG held in `data` (routed by decode_image on the signature).
Image decode_jpeg(const std::uint8_t* data, std::size_t size, const DecodeLimits& limits);
Image decode_png(const std::uint8_t* data, std::size_t size, const DecodeLimits& limits);

/// Start-of-scan markers of a JPEG before its end of image, and the components of the first scan, walking the
/// segments as libjpeg's marker reader does (dtop_export.decode_budget.jpeg_scans is the same walk).
struct JpegScans {
  std::uint64_t scans = 0;
  int first_components = 0;
};
JpegScans jpeg_scans(const std::uint8_t* data, std::size_t size);

}  // namespace dtop::decode
