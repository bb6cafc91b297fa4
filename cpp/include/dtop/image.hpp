// Images and the deployment preprocessing, reproducing dtop_export/preprocess.py pixel for pixel.
//
// load_image: JPEG (libjpeg-turbo) or PNG (libpng) -> 8-bit RGB, EXIF orientation applied, converted the way
//   preprocess.to_rgb does (alpha composited on white, 16-bit grey scaled by 1/257, CMYK with Adobe polarity).
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

/// Decode a JPEG or PNG file to RGB with its EXIF orientation applied. Throws ImageError naming the file.
Image load_image(const std::string& path);

/// Decode an in-memory JPEG or PNG (`what` names it in errors).
Image decode_image(const std::vector<std::uint8_t>& bytes, const std::string& what = "image");

/// (width, height) the model sees: longer side `size * scale` keeping the aspect ratio, each side rounded to
/// the nearest multiple of the stride (at least one stride); under the `square` policy (a program compiled for one
/// size, e.g. an ExecuTorch .pte) both sides are `size * scale` rounded to the stride. size <= 0 means cfg.size.
std::array<int, 2> model_size(int width, int height, const PreprocessConfig& cfg, int size = 0, double scale = 1.0);

/// Pillow-exact resample of `img` to width x height with `interpolation`
/// (nearest is not supported: bilinear, bicubic, lanczos, box, hamming).
Image resize(const Image& img, int width, int height, const std::string& interpolation = "bilinear");

/// 8-bit RGB -> float32 [3, H, W]: (x / 255 - mean) / std, in float32 like NumPy.
Tensor normalize(const Image& img, const PreprocessConfig& cfg);

/// resize to model_size, then normalize: the model input of one image at one scale.
Tensor prepare(const Image& img, const PreprocessConfig& cfg, int size = 0, double scale = 1.0);

}  // namespace dtop
