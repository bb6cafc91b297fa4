// The resize and normalisation steps of dtop_export/preprocess.py, reproduced bit for bit.
//
// resize() computes what Pillow's Image.resize does for an 8-bit RGB image: a separable convolution in two
// passes whose order Pillow (>= 12.2, libImaging/Resample.c) picks by shape: the vertical pass first when the
// height shrinks and by more than twice as many pixels as the width does, else the horizontal one first; the
// 8-bit intermediate rounds differently, so the order shows in the result. The filter's support is widened
// by the downscale factor (so it antialiases), per-output-pixel coefficients normalised to sum 1 in double precision, then converted to
// 22-bit fixed point and accumulated in int32 with rounding. The arithmetic below is a from-scratch
// implementation of that definition; tests/test_cpp.py compares its output with Pillow's, pixel by pixel.
// This file is compiled with -ffp-contract=off so that no fused multiply-add changes a rounding.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "dtop/image.hpp"

namespace dtop {
namespace {

constexpr int kCoeffBits = 22;  // 32 bits - 8 bits of pixel - 2 bits of headroom

struct Kernel {
  double (*weight)(double);
  double support;
};

double box_weight(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

double triangle_weight(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

double hamming_weight(double x) {
  x = std::fabs(x);
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x *= M_PI;
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));
}

double cubic_weight(double x) {  // Keys' cubic convolution with a = -0.5
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= M_PI;
  return std::sin(x) / x;
}

double lanczos3_weight(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

Kernel kernel_for(const std::string& name) {
  if (name == "bilinear") return {triangle_weight, 1.0};
  if (name == "bicubic") return {cubic_weight, 2.0};
  if (name == "lanczos") return {lanczos3_weight, 3.0};
  if (name == "box") return {box_weight, 0.5};
  if (name == "hamming") return {hamming_weight, 1.0};
  throw Error("interpolation '" + name + "' is not supported by the C++ client: use bilinear, bicubic, lanczos, box or hamming");
}

// For every output position along one axis: the first input index, the tap count and the fixed-point taps.
struct Taps {
  int width = 0;                 // taps per output position (the buffer stride)
  std::vector<int> first;        // first input index
  std::vector<int> count;        // taps used
  std::vector<std::int32_t> k;   // out_size * width fixed-point coefficients
};

Taps make_taps(int in_size, int out_size, const Kernel& kernel) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filter_scale = std::max(scale, 1.0);
  const double support = kernel.support * filter_scale;
  Taps t;
  t.width = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.k.assign(static_cast<std::size_t>(out_size) * t.width, 0);
  const double inv_scale = 1.0 / filter_scale;
  std::vector<double> w(t.width);
  for (int o = 0; o < out_size; ++o) {
    const double center = (o + 0.5) * scale;
    const int lo = std::max(0, static_cast<int>(center - support + 0.5));
    const int hi = std::min(in_size, static_cast<int>(center + support + 0.5));
    const int n = hi - lo;
    double sum = 0.0;
    for (int i = 0; i < n; ++i) {
      w[i] = kernel.weight((i + lo - center + 0.5) * inv_scale);
      sum += w[i];
    }
    for (int i = 0; i < n; ++i) {
      const double v = sum != 0.0 ? w[i] / sum : w[i];
      const double f = v * (1 << kCoeffBits);
      t.k[static_cast<std::size_t>(o) * t.width + i] = static_cast<std::int32_t>(v < 0 ? f - 0.5 : f + 0.5);
    }
    t.first[o] = lo;
    t.count[o] = n;
  }
  return t;
}

inline std::uint8_t to_u8(std::int32_t acc) {
  const std::int32_t v = acc >> kCoeffBits;  // arithmetic shift: floor division
  return static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Resample along x (every row) to `out_w`.
Image resample_x(const Image& in, int out_w, const Kernel& kernel) {
  const Taps t = make_taps(in.width, out_w, kernel);
  Image out{out_w, in.height, std::vector<std::uint8_t>(static_cast<std::size_t>(out_w) * in.height * 3)};
  for (int y = 0; y < in.height; ++y) {
    const std::uint8_t* row = &in.rgb[static_cast<std::size_t>(y) * in.width * 3];
    std::uint8_t* dst = &out.rgb[static_cast<std::size_t>(y) * out_w * 3];
    for (int x = 0; x < out_w; ++x) {
      const std::int32_t* k = &t.k[static_cast<std::size_t>(x) * t.width];
      std::int32_t acc[3] = {1 << (kCoeffBits - 1), 1 << (kCoeffBits - 1), 1 << (kCoeffBits - 1)};
      const std::uint8_t* src = row + static_cast<std::size_t>(t.first[x]) * 3;
      for (int i = 0; i < t.count[x]; ++i) {
        for (int c = 0; c < 3; ++c) acc[c] += src[i * 3 + c] * k[i];
      }
      for (int c = 0; c < 3; ++c) dst[x * 3 + c] = to_u8(acc[c]);
    }
  }
  return out;
}

// Resample along y (every column) to `out_h`.
Image resample_y(const Image& in, int out_h, const Kernel& kernel) {
  const Taps t = make_taps(in.height, out_h, kernel);
  const std::size_t row_bytes = static_cast<std::size_t>(in.width) * 3;
  Image out{in.width, out_h, std::vector<std::uint8_t>(row_bytes * out_h)};
  std::vector<std::int32_t> acc(row_bytes);
  for (int y = 0; y < out_h; ++y) {
    const std::int32_t* k = &t.k[static_cast<std::size_t>(y) * t.width];
    std::fill(acc.begin(), acc.end(), 1 << (kCoeffBits - 1));
    for (int i = 0; i < t.count[y]; ++i) {
      const std::uint8_t* src = &in.rgb[static_cast<std::size_t>(t.first[y] + i) * row_bytes];
      const std::int32_t ki = k[i];
      for (std::size_t j = 0; j < row_bytes; ++j) acc[j] += src[j] * ki;
    }
    std::uint8_t* dst = &out.rgb[static_cast<std::size_t>(y) * row_bytes];
    for (std::size_t j = 0; j < row_bytes; ++j) dst[j] = to_u8(acc[j]);
  }
  return out;
}

// An Image a caller filled in (its own decoder, a camera frame) must hold width x height x 3 bytes: the loops below
// trust that and would read past the buffer otherwise.
void check_image(const Image& img) {
  if (img.width <= 0 || img.height <= 0 ||
      img.rgb.size() != static_cast<std::size_t>(img.width) * static_cast<std::size_t>(img.height) * 3) {
    throw Error("not an RGB image: " + std::to_string(img.width) + "x" + std::to_string(img.height) +
                " needs width * height * 3 bytes of rgb, it has " + std::to_string(img.rgb.size()));
  }
}

}  // namespace

bool vertical_first(int in_width, int in_height, int out_width, int out_height) {
  return out_height < in_height &&
         static_cast<std::int64_t>(in_height) - out_height > 2 * (static_cast<std::int64_t>(in_width) - out_width);
}

std::array<int, 2> model_size(int width, int height, const PreprocessConfig& cfg, int size, double scale) {
  if (cfg.resize != "longest_side" && cfg.resize != "square") {
    throw Error("resize policy '" + cfg.resize + "' is not supported: only 'longest_side' and 'square'");
  }
  const double target = static_cast<double>(size > 0 ? size : cfg.size) * scale;
  if (!(target > 0) || width <= 0 || height <= 0) {
    throw Error("cannot resize a " + std::to_string(width) + "x" + std::to_string(height) +
                " image to a longer side of " + std::to_string(target));
  }
  // the sides are ints: a size x scale beyond any model input's is refused rather than overflowing them
  constexpr double kMaxSide = 1 << 20;
  if (!(target <= kMaxSide)) {
    char text[64];
    std::snprintf(text, sizeof text, "%g", target);
    throw Error("a longer side of " + std::string(text) + " (image size x scale) is over the " +
                std::to_string(static_cast<int>(kMaxSide)) + " the client resizes to: use a smaller size or scale");
  }
  if (cfg.stride <= 0) throw Error("the stride must be positive, got " + std::to_string(cfg.stride));
  const int stride = cfg.stride;
  if (cfg.resize == "square") {  // a program for one size (ExecuTorch .pte): the whole image to side x side
    const int side = std::max(stride, static_cast<int>(std::floor(target / stride + 0.5)) * stride);
    return {side, side};
  }
  const double f = target / std::max(width, height);
  auto snap = [&](int v) {
    const int m = static_cast<int>(std::floor(static_cast<double>(v) * f / stride + 0.5)) * stride;
    return std::max(stride, m);
  };
  return {snap(width), snap(height)};
}

Image resize(const Image& img, int width, int height, const std::string& interpolation) {
  const Kernel kernel = kernel_for(interpolation);
  check_image(img);
  if (width <= 0 || height <= 0) throw Error("cannot resize to " + std::to_string(width) + "x" + std::to_string(height));
  if (width == img.width && height == img.height) return img;
  if (width == img.width) return resample_y(img, height, kernel);
  if (height == img.height) return resample_x(img, width, kernel);
  if (vertical_first(img.width, img.height, width, height)) {
    return resample_x(resample_y(img, height, kernel), width, kernel);
  }
  return resample_y(resample_x(img, width, kernel), height, kernel);
}

Tensor normalize(const Image& img, const PreprocessConfig& cfg) {
  check_image(img);
  Tensor t;
  t.height = img.height;
  t.width = img.width;
  const std::size_t plane = static_cast<std::size_t>(img.width) * img.height;
  t.data.resize(plane * 3);
  for (int c = 0; c < 3; ++c) {
    const float mean = cfg.mean[c], std = cfg.std[c];
    float* dst = &t.data[plane * c];
    for (std::size_t i = 0; i < plane; ++i) {
      const float x = static_cast<float>(img.rgb[i * 3 + c]) / 255.0f;
      dst[i] = (x - mean) / std;
    }
  }
  return t;
}

Tensor prepare(const Image& img, const PreprocessConfig& cfg, int size, double scale) {
  if (cfg.color_order != "RGB") throw Error("colour order '" + cfg.color_order + "' is not supported: only RGB");
  const auto wh = model_size(img.width, img.height, cfg, size, scale);
  return normalize(resize(img, wh[0], wh[1], cfg.interpolation), cfg);
}

}  // namespace dtop
