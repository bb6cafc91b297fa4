// JPEG: Pillow's header walk (JpegImagePlugin.JpegImageFile._open), which decides what Pillow refuses before
// decoding and what it keeps (EXIF, XMP, the JFIF density that changes how a broken EXIF block counts), then
// libjpeg-turbo for the pixels, with the same IDCT (ISLOW) and upsampling (fancy) Pillow's libjpeg-turbo uses,
// converted the way preprocess.to_rgb does: grey replicated, CMYK / YCCK with Adobe polarity through cmyk2rgb.
//
// A file is refused when Pillow would refuse it, when it is over the decode budget (pixels, bytes, scans: checked
// from the header, before libjpeg allocates anything), and where libjpeg's own checks fail. Truncation: running
// out of data before the last row counts (Pillow: "image file is truncated"); a missing end of image after it
// does not, and libjpeg's warnings (corrupt data, premature end of a segment) are silent as in Pillow.
#include <setjmp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

// jpeglib.h needs FILE and size_t declared before it.
#include <jerror.h>
#include <jpeglib.h>

#include "decode_internal.hpp"

namespace dtop::decode {
namespace {

// What Pillow's JPEG _open leaves: the frame (the last SOF's), every SOF component's sampling factors, and the
// info entries the orientation depends on.
struct JpegHeader {
  std::uint64_t width = 0, height = 0;
  int layers = 0;
  bool progressive = false;
  std::vector<std::pair<int, int>> sampling;  // (h, v) of every component of every SOF, as Pillow's `layer`
  bool dpi = false;                           // info["dpi"] set by a JFIF APP0 (unit 1 or 2)
  Info info;                                  // "exif" (segments appended), "xmp" (the last)
};

bool starts_with(std::string_view s, std::string_view p) { return s.size() >= p.size() && s.substr(0, p.size()) == p; }

class PillowJpegOpen {
 public:
  PillowJpegOpen(const std::uint8_t* d, std::size_t n) : d_(d), n_(n) {}

  JpegHeader run() {
    // s = b"\xff" after the SOI and the first 0xFF; then byte by byte, as _open does.
    pos_ = 3;
    std::optional<int> s = 0xFF;
    bool sos = false;
    while (s) {
      int i = *s;
      if (i != 0xFF) {
        s = next_byte();
        continue;
      }
      if (pos_ >= n_) break;
      i = 0xFF00 | d_[pos_++];
      if (i >= 0xFFC0 && i <= 0xFFFE) {
        marker(i);
        if (i == 0xFFDA) {
          sos = true;
          break;
        }
        s = next_byte();
      } else if (i == 0xFFFF) {
        s = 0xFF;
      } else if (i == 0xFF00) {
        s = next_byte();
      } else {
        throw Refused("cannot identify image file (no marker found)");
      }
    }
    if (h_.layers == 0 || h_.width == 0 || h_.height == 0) throw Refused("cannot identify image file");
    if (!sos) throw Refused("cannot load this image (no start of scan)");
    return std::move(h_);
  }

 private:
  std::optional<int> next_byte() {
    if (pos_ >= n_) return std::nullopt;
    return d_[pos_++];
  }

  // i16(fp.read(2)) - 2 then ImageFile._safe_read: the segment's payload.
  std::string_view segment() {
    if (n_ - pos_ < 2) throw Refused("cannot identify image file (truncated marker length)");
    const long length = ((d_[pos_] << 8) | d_[pos_ + 1]) - 2;
    pos_ += 2;
    if (length <= 0) return {};
    if (n_ - pos_ < static_cast<std::size_t>(length)) throw Refused("Truncated File Read");
    const std::string_view s(reinterpret_cast<const char*>(d_ + pos_), static_cast<std::size_t>(length));
    pos_ += static_cast<std::size_t>(length);
    return s;
  }

  static int u8(std::string_view s, std::size_t i) { return static_cast<std::uint8_t>(s[i]); }
  static int i16(std::string_view s, std::size_t o) {  // Pillow's i16be: struct.error when short
    if (s.size() < o + 2) throw Refused("cannot identify image file (truncated segment)");
    return (u8(s, o) << 8) | u8(s, o + 1);
  }

  void marker(int i) {
    if (i == 0xFFC8 || (i >= 0xFFD0 && i <= 0xFFD9) || (i >= 0xFFF0 && i <= 0xFFFD)) return;  // no handler
    if (i >= 0xFFE0 && i <= 0xFFEF) return app(i, segment());
    if (i == 0xFFDB) return dqt(segment());
    if (i == 0xFFC4 || i == 0xFFCC || i == 0xFFDA || i == 0xFFDC || i == 0xFFDD || i == 0xFFDF || i == 0xFFFE) {
      segment();  // Skip, COM
      return;
    }
    sof(i, segment());  // C0-C3, C5-C7, C9-CB, CD-CF, DE
  }

  void app(int marker, std::string_view s) {
    if (marker == 0xFFE0 && starts_with(s, "JFIF")) {
      i16(s, 5);  // the version: struct.error on a short segment refuses the file
      if (s.size() >= 12 && (u8(s, 7) == 1 || u8(s, 7) == 2)) h_.dpi = true;
    } else if (marker == 0xFFE1 && starts_with(s, std::string_view("Exif\0\0", 6))) {
      auto [it, fresh] = h_.info.try_emplace("exif");
      it->second.data.append(fresh ? s : s.substr(6));
    } else if (marker == 0xFFE1 && starts_with(s, std::string_view("http://ns.adobe.com/xap/1.0/\0", 29))) {
      h_.info["xmp"] = InfoValue{InfoValue::kBytes, std::string(s.substr(29)), 0};
    } else if (marker == 0xFFE2 && starts_with(s, std::string_view("FPXR\0", 5))) {
      // FlashPix: kept by Pillow, nothing to check
    } else if (marker == 0xFFE2 && starts_with(s, std::string_view("ICC_PROFILE\0", 12))) {
      icc_.emplace_back(s);
    } else if (marker == 0xFFED && starts_with(s, std::string_view("Photoshop 3.0\0", 14))) {
      photoshop(s);
    } else if (marker == 0xFFEE && starts_with(s, "Adobe")) {
      i16(s, 5);
    }
  }

  // The 8BIM resource walk: Pillow stops at a short read (struct.error) but an exhausted name length is an
  // IndexError, which refuses the file.
  static void photoshop(std::string_view s) {
    std::size_t offset = 14;
    auto i32 = [&](std::size_t o) -> std::optional<std::uint64_t> {
      if (s.size() < o + 4) return std::nullopt;
      return (static_cast<std::uint64_t>(u8(s, o)) << 24) | (u8(s, o + 1) << 16) | (u8(s, o + 2) << 8) | u8(s, o + 3);
    };
    while (offset < s.size() && s.substr(offset, 4) == "8BIM") {
      offset += 4;
      if (s.size() < offset + 2) return;
      const int code = (u8(s, offset) << 8) | u8(s, offset + 1);
      offset += 2;
      if (offset >= s.size()) throw Refused("index out of range (Photoshop resource)");
      offset += 1 + static_cast<std::size_t>(u8(s, offset));
      offset += offset & 1;
      const auto size = i32(offset);
      if (!size) return;
      offset += 4;
      if (code == 0x03ED) {
        const std::size_t len = offset < s.size() ? static_cast<std::size_t>(std::min<std::uint64_t>(*size, s.size() - offset)) : 0;
        if (len < 14) return;  // struct.error on the ResolutionInfo fields
      }
      if (*size > s.size()) return;
      offset += static_cast<std::size_t>(*size);
      offset += offset & 1;
    }
  }

  void dqt(std::string_view s) {
    while (!s.empty()) {
      const std::size_t length = 1 + (u8(s, 0) / 16 == 0 ? 1 : 2) * 64;
      if (s.size() < length) throw Refused("bad quantization table marker");
      s.remove_prefix(length);
    }
  }

  void sof(int marker, std::string_view s) {
    const int width = i16(s, 3), height = i16(s, 1);
    h_.width = static_cast<std::uint64_t>(width);
    h_.height = static_cast<std::uint64_t>(height);
    if (u8(s, 0) != 8) throw Refused("cannot handle " + std::to_string(u8(s, 0)) + "-bit layers");
    if (s.size() < 6) throw Refused("index out of range (frame header)");
    const int layers = u8(s, 5);
    if (layers != 1 && layers != 3 && layers != 4) throw Refused("cannot handle " + std::to_string(layers) + "-layer images");
    h_.layers = layers;
    if (marker == 0xFFC2 || marker == 0xFFC6 || marker == 0xFFCA || marker == 0xFFCE) h_.progressive = true;
    if (!icc_.empty()) {  // the ICC fragments, sorted: the first's byte 13 is read
      std::sort(icc_.begin(), icc_.end());
      if (icc_[0].size() < 14) throw Refused("index out of range (ICC profile fragment)");
      icc_.clear();
    }
    for (std::size_t i = 6; i < s.size(); i += 3) {
      if (s.size() - i < 3) throw Refused("index out of range (frame component)");
      h_.sampling.emplace_back(u8(s, i + 1) / 16, u8(s, i + 1) & 15);
    }
  }

  const std::uint8_t* d_;
  std::size_t n_;
  std::size_t pos_ = 0;
  JpegHeader h_;
  std::vector<std::string> icc_;
};

// libjpeg's buffers while decoding (dtop_export.preprocess._decoder_work): the whole-image coefficient arrays
// of a progressive or multi-scan JPEG (a 64-coefficient block is 128 bytes) and 128 bytes per component and
// column for its row buffers.
std::uint64_t jpeg_work(const JpegHeader& h, const JpegScans& scans) {
  std::uint64_t work = mul_sat(128 * h.sampling.size(), h.width + 64);
  if (h.sampling.empty() || !(h.progressive || scans.first_components < h.layers)) return work;
  int hmax = 1, vmax = 1;
  for (const auto& [hs, vs] : h.sampling) {
    hmax = std::max(hmax, std::max(1, hs));
    vmax = std::max(vmax, std::max(1, vs));
  }
  for (const auto& [h0, v0] : h.sampling) {
    const std::uint64_t hs = std::max(1, h0), vs = std::max(1, v0);
    const std::uint64_t bw = (h.width * hs + 8 * hmax - 1) / (8 * hmax), bh = (h.height * vs + 8 * vmax - 1) / (8 * vmax);
    const std::uint64_t blocks = mul_sat((bw + hs - 1) / hs * hs, (bh + vs - 1) / vs * vs);
    work = add_sat(work, mul_sat(blocks, 128));
  }
  return work;
}

struct JpegErrors {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  bool truncated;
  std::uint64_t max_scans;
  char message[JMSG_LENGTH_MAX + 64];
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

// The scan limit, again, as libjpeg counts scans (the walk of jpeg_scans decided first; this only guards it).
extern "C" void jpeg_progress(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrors*>(cinfo->err);
  const auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (static_cast<std::uint64_t>(d->input_scan_number) > err->max_scans) {
    std::snprintf(err->message, sizeof(err->message),
                  "more than %llu JPEG scans (raise the limit with --max-scans or DecodeLimits::max_scans)",
                  static_cast<unsigned long long>(err->max_scans));
    longjmp(err->jump, 1);
  }
}

// libjpeg over the whole file into `img` (allocated to the frame, rows converted as they come).
void run_libjpeg(const std::uint8_t* data, std::size_t size, const JpegHeader& h, std::uint64_t memory,
                 const DecodeLimits& limits, Image& img) {
  jpeg_decompress_struct cinfo;
  JpegErrors err;
  std::memset(&err, 0, sizeof(err));
  err.max_scans = limits.max_scans;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  err.mgr.emit_message = jpeg_note;
  jpeg_progress_mgr progress;
  std::memset(&progress, 0, sizeof(progress));
  progress.progress_monitor = jpeg_progress;
  // Lives across setjmp: allocated before it, only read after a longjmp.
  std::vector<std::uint8_t> row;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw Refused(err.message);
  }
  jpeg_create_decompress(&cinfo);
  cinfo.progress = &progress;
  cinfo.mem->max_memory_to_use = static_cast<long>(std::clamp<std::uint64_t>(memory, 1, 0x7fffffffffffffffull));  // 0: no limit
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.image_width != h.width || cinfo.image_height != h.height || cinfo.num_components != h.layers) {
    std::snprintf(err.message, sizeof(err.message), "the frame header libjpeg reads (%u x %u, %d components) is not "
                  "the one Pillow reads", cinfo.image_width, cinfo.image_height, cinfo.num_components);
    longjmp(err.jump, 1);
  }
  const int comps = cinfo.num_components;
  cinfo.out_color_space = comps == 1 ? JCS_GRAYSCALE : comps == 3 ? JCS_RGB : JCS_CMYK;
  jpeg_start_decompress(&cinfo);
  const std::size_t width = cinfo.output_width;
  row.resize(width * static_cast<std::size_t>(cinfo.output_components));
  img.width = static_cast<int>(cinfo.output_width);
  img.height = static_cast<int>(cinfo.output_height);
  img.rgb.resize(width * cinfo.output_height * 3);
  while (cinfo.output_scanline < cinfo.output_height) {
    std::uint8_t* o = &img.rgb[static_cast<std::size_t>(cinfo.output_scanline) * width * 3];
    JSAMPROW r = row.data();
    if (jpeg_read_scanlines(&cinfo, &r, 1) != 1) break;
    for (std::size_t x = 0; x < width; ++x, o += 3) {
      if (comps == 1) {
        o[0] = o[1] = o[2] = row[x];
      } else if (comps == 3) {
        std::memcpy(o, &row[x * 3], 3);
      } else {  // CMYK with Adobe polarity: Pillow reads it inverted ("CMYK;I"), then cmyk2rgb
        const std::uint8_t* c = &row[x * 4];
        const int nk = 255 - (255 - c[3]);
        for (int j = 0; j < 3; ++j) {
          const int v = nk - mul_div_255(255 - c[j], nk);
          o[j] = static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
        }
      }
    }
  }
  if (err.truncated) {
    std::snprintf(err.message, sizeof(err.message), "image file is truncated");
    longjmp(err.jump, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
}

}  // namespace

Image decode_jpeg(const std::uint8_t* data, std::size_t size, const DecodeLimits& limits) {
  const JpegHeader h = PillowJpegOpen(data, size).run();
  check_pixels(h.width, h.height, limits);
  const JpegScans scans = jpeg_scans(data, size);
  check_scans(scans.scans, limits);
  const std::uint64_t need = decode_bytes(size, h.width, h.height, jpeg_work(h, scans));
  check_bytes(need, limits);
  // Pillow opens with getexif() when the EXIF block is there and JFIF gave no density (_read_dpi_from_exif),
  // and keeps its (possibly empty) result: an unreadable block is then no orientation rather than an error.
  const int turn = orientation(h.info, h.info.count("exif") != 0 && !h.dpi);
  // libjpeg may use what the budget leaves once the file and the RGB image are counted.
  const std::uint64_t rgb = mul_sat(3, mul_sat(h.width, h.height));
  const std::uint64_t left = budget_bytes(limits) - std::min(budget_bytes(limits), add_sat(size, rgb));
  Image img;
  run_libjpeg(data, size, h, left, limits, img);
  apply_orientation(img, turn);
  return img;
}

}  // namespace dtop::decode
