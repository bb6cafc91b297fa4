// Images and the deployment preprocessing, reproducing dtop_export/preprocess.py pixel for pixel.
//
// load_image: JPEG (libjpeg-turbo) or PNG (Pillow's reader on zlib) -> 8-bit RGB, EXIF orientation applied,
//   converted the way preprocess.to_rgb does (alpha composited on white, 16-bit grey scaled by 1/257, CMYK with
//   Adobe polarity); the files Pillow refuses are refused, and so is a file over the decode budget (DecodeLimits).
// resize: Pillow's separable convolution resample (the filter support grows with the downscale factor, 8-bit
//   fixed-point coefficients): what PIL's Image.resize computes, so the model input is bit-identical.
// model_size / prepare: the longest-side policy with sides rounded to the stride, then (x / 255 - mean) / std.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace dtop {

/// Every error of the library: one line that says what is wrong and what to do.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An image file that cannot be decoded (missing, truncated, not an image, unsupported format).
class ImageError : public Error {
 public:
  using Error::Error;
};

/// 8-bit RGB pixels, row-major, interleaved (width * height * 3 bytes).
struct Image {
  int width = 0;
  int height = 0;
  std::vector<std::uint8_t> rgb;
};

/// What a deployer must do to an image before the model sees it (the model's `dtop.*` metadata).
struct PreprocessConfig {
  std::array<float, 3> mean{0.5f, 0.5f, 0.5f};
  std::array<float, 3> std{0.5f, 0.5f, 0.5f};
  std::string color_order = "RGB";
  std::string resize = "longest_side";
  int size = 1024;
  int stride = 16;
  std::string interpolation = "bilinear";
};

/// The model input of one image: float32 [3, height, width] (NCHW without the batch axis).
struct Tensor {
  int height = 0;
  int width = 0;
  std::vector<float> data;
};

/// What decoding one image may cost (dtop_export.preprocess.DecodeBudget: same defaults, same arithmetic). An image
/// over it is refused from its header, before any pixel buffer is allocated.
struct DecodeLimits {
  /// width x height; the default is Pillow's DecompressionBombError threshold (dtop-embed --max-pixels).
  std::uint64_t max_pixels = 178956970;
  /// MiB of every buffer that coexists while decoding: the file, the RGB image and its rotated copy (6 bytes a
  /// pixel), a progressive (or multi-scan) JPEG's coefficients (128 bytes a block), libjpeg's row buffers (128
  /// bytes per component and column), an interlaced PNG's raw image, 32 bytes per PNG column (--max-decode-mb).
  std::uint64_t max_decode_mb = 1024;
  /// Start-of-scan markers of a JPEG: every scan of a progressive JPEG revisits every block (--max-scans).
  std::uint64_t max_scans = 100;
};

/// Decode a JPEG or PNG file to RGB with its EXIF orientation applied. Throws ImageError naming the file.
Image load_image(const std::string& path, const DecodeLimits& limits = {});

/// Decode an in-memory JPEG or PNG (`what` names it in errors; the bytes count in the budget).
Image decode_image(const std::vector<std::uint8_t>& bytes, const std::string& what = "image",
                   const DecodeLimits& limits = {});

/// (width, height) the model sees: longer side `size * scale` keeping the aspect ratio, each side rounded to
/// the nearest multiple of the stride (at least one stride); under the `square` policy (a program compiled for one
/// size, e.g. an ExecuTorch .pte) both sides are `size * scale` rounded to the stride. size <= 0 means cfg.size.
std::array<int, 2> model_size(int width, int height, const PreprocessConfig& cfg, int size = 0, double scale = 1.0);

/// The pass order of Pillow's two-pass resample: true when the vertical pass runs first (the height shrinks, by
/// more than twice the pixels the width loses), as Pillow >= 12.2 decides it.
bool vertical_first(int in_width, int in_height, int out_width, int out_height);

/// Pillow-exact resample of `img` to width x height with `interpolation`
/// (nearest is not supported: bilinear, bicubic, lanczos, box, hamming).
Image resize(const Image& img, int width, int height, const std::string& interpolation = "bilinear");

/// 8-bit RGB -> float32 [3, H, W]: (x / 255 - mean) / std, in float32 like NumPy.
Tensor normalize(const Image& img, const PreprocessConfig& cfg);

/// resize to model_size, then normalize: the model input of one image at one scale.
Tensor prepare(const Image& img, const PreprocessConfig& cfg, int size = 0, double scale = 1.0);

}  // namespace dtop
