// JPEG (libjpeg-turbo) and PNG (libpng) decoding to 8-bit RGB with the EXIF orientation applied, converting
// every mode the way dtop_export/preprocess.py (to_rgb, load_image) does through Pillow:
//   grey -> replicated; 1/2/4-bit grey -> scaled to 0..255; 16-bit grey -> round(v / 257);
//   16-bit RGB(A) and grey+alpha -> the high byte (Pillow's RGB;16B / RGBA;16B / LA;16B unpackers);
//   alpha (RGBA, grey+alpha, palette with tRNS) -> composited on white with Pillow's integer alpha_composite;
//   CMYK / YCCK JPEG -> Adobe polarity (inverted), then Pillow's cmyk2rgb; tRNS of grey/RGB is ignored.
#include <png.h>
#include <setjmp.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>

// jpeglib.h needs FILE and size_t declared before it.
#include <jerror.h>
#include <jpeglib.h>

#include "dtop/image.hpp"

namespace dtop {
namespace {

// ---- pixel conversions (Pillow's integer arithmetic) ------------------------------------------------------

// (a * b) / 255 rounded, the way Pillow's MULDIV255 computes it.
inline int mul_div_255(int a, int b) {
  const int t = a * b + 128;
  return ((t >> 8) + t) >> 8;
}

// Composite one straight-alpha pixel over opaque white (Pillow's alpha_composite, 7 extra bits).
inline void over_white(const std::uint8_t* rgba, std::uint8_t* rgb) {
  const std::uint32_t a = rgba[3];
  if (a == 0) {
    rgb[0] = rgb[1] = rgb[2] = 255;
    return;
  }
  constexpr std::uint32_t kBits = 7;
  const std::uint32_t blend = 255u * (255u - a);
  const std::uint32_t out_a255 = a * 255u + blend;
  const std::uint32_t coef1 = a * 255u * 255u * (1u << kBits) / out_a255;
  const std::uint32_t coef2 = 255u * (1u << kBits) - coef1;
  for (int c = 0; c < 3; ++c) {
    const std::uint32_t t = rgba[c] * coef1 + 255u * coef2 + (0x80u << kBits);
    rgb[c] = static_cast<std::uint8_t>((((t >> 8) + t) >> 8) >> kBits);
  }
}

// Pillow refuses images over 2 * MAX_IMAGE_PIXELS (DecompressionBombError); so does the client.
constexpr std::uint64_t kMaxPixels = 2ull * (1024ull * 1024ull * 1024ull / 4 / 3);

bool too_large(std::uint64_t width, std::uint64_t height) { return width * height > kMaxPixels; }

// ---- EXIF orientation ------------------------------------------------------------------------------------

// Orientation (tag 0x0112 of IFD0) of a TIFF-structured EXIF block; 1 when absent or unreadable.
int exif_orientation(const std::uint8_t* p, std::size_t n) {
  if (n < 8) return 1;
  const bool little = p[0] == 'I' && p[1] == 'I';
  if (!little && !(p[0] == 'M' && p[1] == 'M')) return 1;
  auto u16 = [&](std::size_t o) -> std::uint32_t {
    return little ? (p[o] | (p[o + 1] << 8)) : ((p[o] << 8) | p[o + 1]);
  };
  auto u32 = [&](std::size_t o) -> std::uint32_t {
    return little ? (u16(o) | (u16(o + 2) << 16)) : ((u16(o) << 16) | u16(o + 2));
  };
  if (u16(2) != 42) return 1;
  const std::size_t ifd = u32(4);
  if (ifd + 2 > n) return 1;
  const std::uint32_t count = u16(ifd);
  for (std::uint32_t i = 0; i < count; ++i) {
    const std::size_t e = ifd + 2 + 12 * static_cast<std::size_t>(i);
    if (e + 12 > n) break;
    if (u16(e) != 0x0112) continue;
    const std::uint32_t type = u16(e + 2);
    if (type == 3) return static_cast<int>(u16(e + 8));   // SHORT
    if (type == 4) return static_cast<int>(u32(e + 8));   // LONG
    return 1;
  }
  return 1;
}

// Pillow's ImageOps.exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
// 7 transverse, 8 rotate 90 counter-clockwise.
Image apply_orientation(Image img, int orientation) {
  if (orientation < 2 || orientation > 8) return img;
  const int w = img.width, h = img.height;
  const bool swap = orientation >= 5;
  Image out;
  out.width = swap ? h : w;
  out.height = swap ? w : h;
  out.rgb.resize(img.rgb.size());
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;
      switch (orientation) {
        case 2: sx = w - 1 - x; break;
        case 3: sx = w - 1 - x; sy = h - 1 - y; break;
        case 4: sy = h - 1 - y; break;
        case 5: sx = y; sy = x; break;
        case 6: sx = y; sy = h - 1 - x; break;
        case 7: sx = w - 1 - y; sy = h - 1 - x; break;
        case 8: sx = w - 1 - y; sy = x; break;
        default: break;
      }
      std::memcpy(&out.rgb[(static_cast<std::size_t>(y) * out.width + x) * 3],
                  &img.rgb[(static_cast<std::size_t>(sy) * w + sx) * 3], 3);
    }
  }
  return out;
}

// ---- JPEG ------------------------------------------------------------------------------------------------

struct JpegErrors {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  bool truncated;
  char message[JMSG_LENGTH_MAX];
};

extern "C" void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrors*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

// Warnings are silent (as in Pillow), but running out of data is a truncated file.
extern "C" void jpeg_note(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) reinterpret_cast<JpegErrors*>(cinfo->err)->truncated = true;
}

Image decode_jpeg(const std::vector<std::uint8_t>& bytes, const std::string& what) {
  jpeg_decompress_struct cinfo;
  JpegErrors err;
  std::memset(&err, 0, sizeof(err));
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  err.mgr.emit_message = jpeg_note;
  // Everything that lives across setjmp is allocated before it and only read after a longjmp.
  std::vector<std::uint8_t> raw;
  std::vector<std::uint8_t> exif;
  int width = 0, height = 0, comps = 0;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw ImageError("cannot read image " + what + ": " + err.message);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, bytes.data(), static_cast<unsigned long>(bytes.size()));
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);
  if (too_large(cinfo.image_width, cinfo.image_height)) {
    std::snprintf(err.message, sizeof(err.message), "image size (%u x %u) exceeds the limit of %llu pixels",
                  cinfo.image_width, cinfo.image_height, static_cast<unsigned long long>(kMaxPixels));
    longjmp(err.jump, 1);
  }
  if (cinfo.num_components == 1) {
    cinfo.out_color_space = JCS_GRAYSCALE;
  } else if (cinfo.num_components == 3) {
    cinfo.out_color_space = JCS_RGB;
  } else if (cinfo.num_components == 4) {
    cinfo.out_color_space = JCS_CMYK;
  } else {
    std::snprintf(err.message, sizeof(err.message), "cannot handle %d-layer images", cinfo.num_components);
    longjmp(err.jump, 1);
  }
  for (jpeg_saved_marker_ptr m = cinfo.marker_list; m != nullptr; m = m->next) {
    if (m->marker == JPEG_APP0 + 1 && m->data_length > 6 && std::memcmp(m->data, "Exif\0\0", 6) == 0) {
      exif.assign(m->data + 6, m->data + m->data_length);
      break;  // Pillow keeps the first Exif block
    }
  }
  jpeg_start_decompress(&cinfo);
  width = static_cast<int>(cinfo.output_width);
  height = static_cast<int>(cinfo.output_height);
  comps = cinfo.output_components;
  raw.resize(static_cast<std::size_t>(width) * height * comps);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = raw.data() + static_cast<std::size_t>(cinfo.output_scanline) * width * comps;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  if (err.truncated) {
    std::snprintf(err.message, sizeof(err.message), "image file is truncated");
    longjmp(err.jump, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);

  Image img;
  img.width = width;
  img.height = height;
  const std::size_t n = static_cast<std::size_t>(width) * height;
  img.rgb.resize(n * 3);
  for (std::size_t i = 0; i < n; ++i) {
    std::uint8_t* o = &img.rgb[i * 3];
    if (comps == 1) {
      o[0] = o[1] = o[2] = raw[i];
    } else if (comps == 3) {
      std::memcpy(o, &raw[i * 3], 3);
    } else {  // CMYK with Adobe polarity: Pillow reads it inverted ("CMYK;I"), then cmyk2rgb
      const std::uint8_t* c = &raw[i * 4];
      const int nk = 255 - (255 - c[3]);
      for (int j = 0; j < 3; ++j) {
        const int v = nk - mul_div_255(255 - c[j], nk);
        o[j] = static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
      }
    }
  }
  return apply_orientation(std::move(img), exif.empty() ? 1 : exif_orientation(exif.data(), exif.size()));
}

// ---- PNG -------------------------------------------------------------------------------------------------

struct PngReader {
  const std::vector<std::uint8_t>* bytes;
  std::size_t pos;
};

extern "C" void png_read_bytes(png_structp png, png_bytep out, png_size_t n) {
  auto* r = static_cast<PngReader*>(png_get_io_ptr(png));
  if (r->pos + n > r->bytes->size()) png_error(png, "image file is truncated");
  std::memcpy(out, r->bytes->data() + r->pos, n);
  r->pos += n;
}

extern "C" void png_fail(png_structp png, png_const_charp message) {
  auto* text = static_cast<char*>(png_get_error_ptr(png));
  std::snprintf(text, 200, "%s", message);
  png_longjmp(png, 1);
}

extern "C" void png_warn(png_structp, png_const_charp) {}

// What a PNG read leaves behind. Everything the setjmp/longjmp path touches lives here, behind a pointer that
// libpng also holds (io ptr), so nothing is cached in a register across the jump.
struct PngState {
  PngReader reader;
  char message[200] = "broken PNG file";
  std::vector<std::uint8_t> raw;
  std::vector<png_bytep> rows;
  png_uint_32 width = 0, height = 0;
  int depth = 0, channels = 0;
  volatile int stage = 0;  // 2: all pixels read (an error in the trailing chunks is then ignored, as Pillow does)
};

// Decode into st; false (with st.message) on an error before all pixels were read.
bool read_png(png_structp png, png_infop info, PngState& st) {
  if (setjmp(png_jmpbuf(png))) return st.stage == 2;
  png_set_read_fn(png, &st.reader, png_read_bytes);
  png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
  png_read_info(png, info);
  int color = 0;
  png_get_IHDR(png, info, &st.width, &st.height, &st.depth, &color, nullptr, nullptr, nullptr);
  if (too_large(st.width, st.height)) png_error(png, "image size exceeds the limit of 178956970 pixels");
  if (color == PNG_COLOR_TYPE_PALETTE) {
    png_set_palette_to_rgb(png);
    if (png_get_valid(png, info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(png);  // only palettes honour tRNS
  } else if (color == PNG_COLOR_TYPE_GRAY && st.depth < 8) {
    png_set_expand_gray_1_2_4_to_8(png);
  }
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  st.channels = png_get_channels(png, info);
  st.depth = png_get_bit_depth(png, info);
  const std::size_t stride = png_get_rowbytes(png, info);
  st.raw.resize(stride * st.height);
  st.rows.resize(st.height);
  for (png_uint_32 y = 0; y < st.height; ++y) st.rows[y] = st.raw.data() + y * stride;
  png_read_image(png, st.rows.data());
  st.stage = 2;
  png_read_end(png, info);
  return true;
}

Image decode_png(const std::vector<std::uint8_t>& bytes, const std::string& what) {
  auto st = std::make_unique<PngState>();
  st->reader = PngReader{&bytes, 0};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, st->message, png_fail, png_warn);
  if (png == nullptr) throw ImageError("cannot read image " + what + ": out of memory");
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || !read_png(png, info, *st)) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw ImageError("cannot read image " + what + ": " + st->message);
  }
  std::vector<std::uint8_t> exif;
#ifdef PNG_eXIf_SUPPORTED
  png_uint_32 exif_len = 0;
  png_bytep exif_data = nullptr;
  if (png_get_eXIf_1(png, info, &exif_len, &exif_data) != 0 && exif_data != nullptr) {
    exif.assign(exif_data, exif_data + exif_len);
  }
#endif
  png_destroy_read_struct(&png, &info, nullptr);

  const png_uint_32 width = st->width, height = st->height;
  const int depth = st->depth, channels = st->channels;
  const std::vector<std::uint8_t>& raw = st->raw;
  Image img;
  img.width = static_cast<int>(width);
  img.height = static_cast<int>(height);
  const std::size_t n = static_cast<std::size_t>(width) * height;
  img.rgb.resize(n * 3);
  const int bpc = depth == 16 ? 2 : 1;  // bytes per channel; 16-bit samples are big-endian
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint8_t* s = &raw[i * channels * bpc];
    std::uint8_t* o = &img.rgb[i * 3];
    auto hi = [&](int c) { return s[c * bpc]; };  // the high byte of a 16-bit sample
    if (channels == 1) {
      if (bpc == 2) {
        const double v = (s[0] << 8) | s[1];
        o[0] = o[1] = o[2] = static_cast<std::uint8_t>(std::nearbyint(v / 257.0));
      } else {
        o[0] = o[1] = o[2] = s[0];
      }
    } else if (channels == 2) {
      const std::uint8_t rgba[4] = {hi(0), hi(0), hi(0), hi(1)};
      over_white(rgba, o);
    } else if (channels == 3) {
      o[0] = hi(0), o[1] = hi(1), o[2] = hi(2);
    } else {
      const std::uint8_t rgba[4] = {hi(0), hi(1), hi(2), hi(3)};
      over_white(rgba, o);
    }
  }
  return apply_orientation(std::move(img), exif.empty() ? 1 : exif_orientation(exif.data(), exif.size()));
}

}  // namespace

Image decode_image(const std::vector<std::uint8_t>& bytes, const std::string& what) {
  if (bytes.size() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) return decode_jpeg(bytes, what);
  static const std::uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (bytes.size() >= 8 && std::memcmp(bytes.data(), kPng, 8) == 0) return decode_png(bytes, what);
  if (bytes.empty()) throw ImageError("cannot read image " + what + ": the file is empty");
  throw ImageError("cannot read image " + what + ": not a JPEG or PNG file (the C++ client decodes those two)");
}

Image load_image(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw ImageError("image " + path + " not found");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ImageError("cannot read image " + path + ": permission denied or not a file");
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw ImageError("cannot read image " + path + ": read error");
  return decode_image(bytes, path);
}

}  // namespace dtop
