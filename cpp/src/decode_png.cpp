// PNG the way Pillow reads it (Pillow >= 13: PngImagePlugin.py for the chunks, ImageFile.load for the reads,
// ZipDecode.c for the rows, Unpack.c for the samples), on zlib. Pillow is the contract, and libpng's checks
// differ from Pillow's on dozens of broken files (bad CRCs after the image data, a duplicate IHDR, an unknown
// critical chunk, IHDR compression != 0, a zlib stream that ends early...), so the client follows Pillow's rules
// rather than libpng's:
//   - header chunks up to the first IDAT (or fdAT): CRC checked, lengths checked against the bytes present
//     before anything is read, Pillow's per-chunk checks (short gAMA/cHRM/sRGB/pHYs/tRNS/IHDR/acTL/fcTL refuse,
//     zTXt/iCCP compression must be 0, a text chunk inflates to at most 1 MiB, 64 MiB of text in all, APNG
//     sequence numbers and frame boxes), every text chunk lands in `info` (where its key can matter: "exif",
//     "xmp", "interlace", "transparency", "bbox");
//   - image data: the consecutive IDAT / DDAT / fdAT chunks, read in pieces of at most 64 KiB, inflated a row at
//     a time; the image is done when its last row is (or when zlib's stream ends on a row boundary: the rest
//     stays zero); running out of image-data chunks first is "image file is truncated";
//   - chunks after the image: no CRC, but their handlers' checks and lengths still count;
//   - the pixels: Pillow's modes (1, L, P, I;16, LA, RGB, RGBA) converted as preprocess.to_rgb does, the palette
//     with its tRNS alphas wherever the chunks are (before PLTE, longer than it, after IDAT), missing palette
//     entries black.
// Memory: the decoded RGB image, one raw image of the mode's samples only for interlaced (or palette) images,
// two rows; checked against the decode budget from IHDR before any of it is allocated.
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "decode_internal.hpp"

namespace dtop::decode {
namespace {

constexpr std::uint64_t kSafeBlock = 1 << 20;            // ImageFile.SAFEBLOCK = PngImagePlugin.MAX_TEXT_CHUNK
constexpr std::uint64_t kMaxTextMemory = 64 * kSafeBlock;  // PngImagePlugin.MAX_TEXT_MEMORY
constexpr std::uint64_t kMaxBlock = 65536;               // ImageFile.MAXBLOCK: the decoder's reads

// The raw modes of PngImagePlugin._MODES, and the Pillow mode each one decodes into.
enum class Raw { k1, kL2, kL4, kL, kI16B, kRGB, kRGB16B, kP1, kP2, kP4, kP, kLA, kLA16B, kRGBA, kRGBA16B };
enum class Mode { kNone, k1, kL, kI16, kRGB, kP, kLA, kRGBA };

struct ModeInfo {
  Mode mode;
  Raw raw;
  int bits;  // per pixel, in the file
};

std::optional<ModeInfo> png_mode(int depth, int color) {
  switch (color * 100 + depth) {
    case 1: return ModeInfo{Mode::k1, Raw::k1, 1};
    case 2: return ModeInfo{Mode::kL, Raw::kL2, 2};
    case 4: return ModeInfo{Mode::kL, Raw::kL4, 4};
    case 8: return ModeInfo{Mode::kL, Raw::kL, 8};
    case 16: return ModeInfo{Mode::kI16, Raw::kI16B, 16};
    case 208: return ModeInfo{Mode::kRGB, Raw::kRGB, 24};
    case 216: return ModeInfo{Mode::kRGB, Raw::kRGB16B, 48};
    case 301: return ModeInfo{Mode::kP, Raw::kP1, 1};
    case 302: return ModeInfo{Mode::kP, Raw::kP2, 2};
    case 304: return ModeInfo{Mode::kP, Raw::kP4, 4};
    case 308: return ModeInfo{Mode::kP, Raw::kP, 8};
    case 408: return ModeInfo{Mode::kLA, Raw::kLA, 16};
    case 416: return ModeInfo{Mode::kRGBA, Raw::kLA16B, 32};
    case 608: return ModeInfo{Mode::kRGBA, Raw::kRGBA, 32};
    case 616: return ModeInfo{Mode::kRGBA, Raw::kRGBA16B, 64};
    default: return std::nullopt;
  }
}

// Bytes a pixel of a mode takes in the raw image (dtop_export.preprocess._PNG_RAW_BYTES).
int mode_bytes(Mode m) {
  switch (m) {
    case Mode::kI16: case Mode::kLA: return 2;
    case Mode::kRGB: return 3;
    case Mode::kRGBA: return 4;
    default: return 1;
  }
}

std::uint32_t be32(const std::uint8_t* p) {
  return (static_cast<std::uint32_t>(p[0]) << 24) | (p[1] << 16) | (p[2] << 8) | p[3];
}
std::uint32_t be32(std::string_view s, std::size_t o) { return be32(reinterpret_cast<const std::uint8_t*>(s.data()) + o); }
int be16(std::string_view s, std::size_t o) {
  return (static_cast<std::uint8_t>(s[o]) << 8) | static_cast<std::uint8_t>(s[o + 1]);
}

// One value of a raw-mode pixel unpacked into its mode's samples (Unpack.c), at `bit` of a row.
void unpack(Raw raw, const std::uint8_t* row, std::size_t bit, std::uint8_t* out) {
  const std::uint8_t* p = row + bit / 8;
  switch (raw) {
    case Raw::k1: out[0] = ((*p >> (7 - bit % 8)) & 1) ? 255 : 0; break;
    case Raw::kL2: out[0] = static_cast<std::uint8_t>(((*p >> (6 - bit % 8)) & 3) * 0x55); break;
    case Raw::kL4: out[0] = static_cast<std::uint8_t>(((*p >> (4 - bit % 8)) & 15) * 0x11); break;
    case Raw::kP1: out[0] = (*p >> (7 - bit % 8)) & 1; break;
    case Raw::kP2: out[0] = (*p >> (6 - bit % 8)) & 3; break;
    case Raw::kP4: out[0] = (*p >> (4 - bit % 8)) & 15; break;
    case Raw::kL: case Raw::kP: out[0] = p[0]; break;
    case Raw::kI16B: out[0] = p[1], out[1] = p[0]; break;  // native little-endian uint16
    case Raw::kRGB: out[0] = p[0], out[1] = p[1], out[2] = p[2]; break;
    case Raw::kRGB16B: out[0] = p[0], out[1] = p[2], out[2] = p[4]; break;  // the high bytes
    case Raw::kLA: out[0] = p[0], out[1] = p[1]; break;
    case Raw::kLA16B: out[0] = out[1] = out[2] = p[0], out[3] = p[2]; break;
    case Raw::kRGBA: std::memcpy(out, p, 4); break;
    case Raw::kRGBA16B: out[0] = p[0], out[1] = p[2], out[2] = p[4], out[3] = p[6]; break;
  }
}

// Strict UTF-8 (Python's decoder): the number of code points, or nothing.
std::optional<std::uint64_t> utf8_length(std::string_view s) {
  std::uint64_t count = 0;
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<std::uint8_t>(s[i]);
    int more = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      cp = c;
    } else if (c >= 0xC2 && c <= 0xDF) {
      more = 1, cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      more = 2, cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      more = 3, cp = c & 0x07;
    } else {
      return std::nullopt;
    }
    if (s.size() - i <= static_cast<std::size_t>(more)) return std::nullopt;
    for (int k = 1; k <= more; ++k) {
      const auto b = static_cast<std::uint8_t>(s[i + k]);
      if ((b & 0xC0) != 0x80) return std::nullopt;
      cp = (cp << 6) | (b & 0x3F);
    }
    if ((more == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (more == 3 && (cp < 0x10000 || cp > 0x10FFFF))) {
      return std::nullopt;
    }
    i += 1 + more;
    ++count;
  }
  return count;
}

// PngImagePlugin._safe_zlib_decompress: zlib.decompressobj().decompress(s, MAX_TEXT_CHUNK), refused (ValueError)
// when input is left once 1 MiB came out.
enum class Inflated { kOk, kTooLarge, kError };
Inflated inflate_text(std::string_view in, std::string& out) {
  z_stream z{};
  if (inflateInit(&z) != Z_OK) return Inflated::kError;
  out.assign(kSafeBlock, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  z.avail_in = static_cast<uInt>(std::min<std::size_t>(in.size(), UINT_MAX));
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  Inflated result = Inflated::kOk;
  while (true) {
    const int err = inflate(&z, Z_SYNC_FLUSH);
    if (err == Z_STREAM_END) break;
    if (err != Z_OK && err != Z_BUF_ERROR) {
      result = Inflated::kError;
      break;
    }
    if (z.avail_out == 0) {
      if (z.avail_in > 0) result = Inflated::kTooLarge;
      break;
    }
    if (z.avail_in == 0 || err == Z_BUF_ERROR) break;
  }
  out.resize(out.size() - z.avail_out);
  inflateEnd(&z);
  return result;
}

// A chunk header: its type, where its data starts, the declared length.
struct Chunk {
  std::string cid;
  std::uint64_t pos = 0;
  std::uint64_t length = 0;
};

// ZipDecode.c: inflate a row at a time, undo the filters, hand each row (or interlaced pixel) to `sink`.
class ZipRows {
 public:
  // sink(y, pass, row): a complete, unfiltered row (without its filter byte) of row `y` of `pass` (-1: not
  // interlaced), row_len bytes.
  using Sink = void (*)(void* ctx, int y, int pass, const std::uint8_t* row, int row_len);

  ZipRows(int xsize, int ysize, int bits, bool interlaced, Sink sink, void* ctx)
      : xsize_(xsize), ysize_(ysize), bits_(bits), interlaced_(interlaced), sink_(sink), ctx_(ctx) {
    bytes_ = static_cast<int>((static_cast<std::int64_t>(bits) * xsize + 7) / 8);
  }
  ~ZipRows() {
    if (started_) inflateEnd(&z_);
  }
  ZipRows(const ZipRows&) = delete;
  ZipRows& operator=(const ZipRows&) = delete;

  // ImagingZipDecode on one read: false to ask for more, true when done; throws Refused on a broken stream.
  bool decode(const std::uint8_t* buf, std::size_t n) {
    if (!started_) {
      buffer_.assign(static_cast<std::size_t>(bytes_) + 1, 0);
      previous_.assign(static_cast<std::size_t>(bytes_) + 1, 0);
      if (inflateInit(&z_) != Z_OK) throw Refused("bad configuration (zlib)");
      started_ = true;
      if (interlaced_) pass_ = 0, y_ = 0;
    }
    int row_len = interlaced_ ? pass_row_len(pass_) : bytes_;
    z_.next_in = const_cast<Bytef*>(buf);
    z_.avail_in = static_cast<uInt>(n);
    while (z_.avail_in > 0) {
      z_.next_out = buffer_.data() + last_output_;
      z_.avail_out = static_cast<uInt>(row_len + 1 - last_output_);
      const int err = inflate(&z_, Z_NO_FLUSH);
      if (err < 0) {
        throw Refused(err == Z_DATA_ERROR ? "broken data stream when reading image file"
                      : err == Z_MEM_ERROR ? "out of memory error when reading image file"
                                           : "bad configuration when reading image file");
      }
      const int got = row_len + 1 - static_cast<int>(z_.avail_out);
      if (got < row_len + 1) {
        last_output_ = got;
        break;  // need more input data
      }
      unfilter(row_len);
      sink_(ctx_, y_, interlaced_ ? pass_ : -1, buffer_.data() + 1, row_len);
      if (interlaced_) {
        static const int kRowIncrement[] = {8, 8, 8, 4, 4, 2, 2};
        static const int kStartingRow[] = {0, 0, 4, 0, 2, 0, 1};
        y_ += kRowIncrement[pass_];
        while (y_ >= ysize_ || row_len <= 0) {
          if (++pass_ == 7) {
            y_ = ysize_;
            break;
          }
          y_ = kStartingRow[pass_];
          row_len = pass_row_len(pass_);
          std::fill(buffer_.begin(), buffer_.end(), 0);
        }
      } else {
        ++y_;
      }
      last_output_ = 0;
      if (y_ >= ysize_ || err == Z_STREAM_END) return true;  // done (the rest of the image stays zero)
      std::swap(buffer_, previous_);
    }
    return false;
  }

  static int pass_pixels(int xsize, int pass) {
    static const int kOffset[] = {7, 3, 3, 1, 1, 0, 0};
    static const int kColIncrement[] = {8, 8, 4, 4, 2, 2, 1};
    return (xsize + kOffset[pass]) / kColIncrement[pass];
  }

 private:
  int pass_row_len(int pass) const {
    return static_cast<int>((static_cast<std::int64_t>(pass_pixels(xsize_, pass)) * bits_ + 7) / 8);
  }

  void unfilter(int row_len) {
    std::uint8_t* b = buffer_.data();
    const std::uint8_t* prev = previous_.data();
    const int bpp = (bits_ + 7) / 8;
    switch (b[0]) {
      case 0: break;
      case 1:
        for (int i = bpp + 1; i <= row_len; ++i) b[i] = static_cast<std::uint8_t>(b[i] + b[i - bpp]);
        break;
      case 2:
        for (int i = 1; i <= row_len; ++i) b[i] = static_cast<std::uint8_t>(b[i] + prev[i]);
        break;
      case 3: {
        int i = 1;
        for (; i <= bpp && i <= row_len; ++i) b[i] = static_cast<std::uint8_t>(b[i] + prev[i] / 2);
        for (; i <= row_len; ++i) b[i] = static_cast<std::uint8_t>(b[i] + (b[i - bpp] + prev[i]) / 2);
        break;
      }
      case 4: {
        int i = 1;
        for (; i <= bpp && i <= row_len; ++i) b[i] = static_cast<std::uint8_t>(b[i] + prev[i]);
        for (; i <= row_len; ++i) {
          const int a = b[i - bpp], up = prev[i], c = prev[i - bpp];
          const int pa = std::abs(up - c), pb = std::abs(a - c), pc = std::abs(a + up - 2 * c);
          b[i] = static_cast<std::uint8_t>(b[i] + ((pa <= pb && pa <= pc) ? a : (pb <= pc) ? up : c));
        }
        break;
      }
      default: throw Refused("unrecognized data stream contents when reading image file");
    }
  }

  int xsize_, ysize_, bits_;
  bool interlaced_;
  Sink sink_;
  void* ctx_;
  int bytes_ = 0;
  bool started_ = false;
  z_stream z_{};
  std::vector<std::uint8_t> buffer_, previous_;
  int last_output_ = 0;
  int y_ = 0, pass_ = 0;
};

class PngFile {
 public:
  PngFile(const std::uint8_t* d, std::size_t n) : d_(d), n_(n) {}

  Image decode(const DecodeLimits& limits) {
    open();
    check_pixels(width_, height_, limits);
    const bool interlaced = info_truthy("interlace");
    const std::uint64_t raw = interlaced ? mul_sat(mul_sat(width_, height_), mode_bytes(mode_.mode)) : 0;
    check_bytes(decode_bytes(n_, width_, height_, add_sat(raw, mul_sat(32, width_))), limits);
    Image img = load(interlaced);
    apply_orientation(img, orientation(info_, false));
    return img;
  }

 private:
  // ---- the file as Python's file object -----------------------------------------------------------------
  std::string_view view(std::uint64_t at, std::uint64_t len) const {
    return {reinterpret_cast<const char*>(d_ + at), static_cast<std::size_t>(len)};
  }
  std::string_view read(std::uint64_t k) {  // fp.read(k)
    const std::uint64_t at = std::min<std::uint64_t>(fp_, n_);
    const std::uint64_t got = std::min<std::uint64_t>(k, n_ - at);
    fp_ = at + got;
    return view(at, got);
  }
  std::string_view safe_read(std::uint64_t k) {  // ImageFile._safe_read
    if (k == 0) return {};
    const std::string_view s = read(k);
    if (s.size() < k) throw Refused("Truncated File Read");
    return s;
  }

  // ChunkStream.read: struct.error (fewer than 4 bytes) or SyntaxError (not 4 word characters) both throw.
  struct BadChunk {};
  Chunk read_chunk() {
    const std::string_view s = read(8);
    if (s.size() < 4) throw BadChunk{};
    Chunk c;
    c.cid = std::string(s.substr(4));
    c.pos = fp_;
    c.length = be32(s, 0);
    if (c.cid.size() < 4) throw BadChunk{};
    for (const char ch : c.cid) {  // \w of a bytes pattern
      if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_')) throw BadChunk{};
    }
    return c;
  }

  // ---- PngStream's chunk handlers ----------------------------------------------------------------------
  enum class Call { kOk, kEof, kUnknown };

  Call call(const Chunk& c, std::string_view& s) {
    const std::string& t = c.cid;
    if (t == "IHDR") {
      s = safe_read(c.length);
      if (c.length < 13) throw Refused("Truncated IHDR chunk");
      width_ = be32(s, 0), height_ = be32(s, 4);
      if (const auto m = png_mode(static_cast<std::uint8_t>(s[8]), static_cast<std::uint8_t>(s[9]))) mode_ = *m;
      if (s[12]) info_["interlace"] = InfoValue{InfoValue::kInt, {}, 1};
      if (s[11]) throw Refused("unknown filter category");
      return Call::kOk;
    }
    if (t == "IDAT") return idat(c.pos, c.length);
    if (t == "IEND") return Call::kEof;
    if (t == "PLTE") {
      s = safe_read(c.length);
      if (mode_.mode == Mode::kP) palette_ = std::string(s);
      return Call::kOk;
    }
    if (t == "tRNS") {
      s = safe_read(c.length);
      trns(s);
      return Call::kOk;
    }
    if (t == "gAMA" || t == "cHRM" || t == "sRGB" || t == "pHYs") {
      s = safe_read(c.length);
      const std::uint64_t need = t == "gAMA" ? 4 : t == "cHRM" ? 32 : t == "sRGB" ? 1 : 9;
      if (c.length < need) throw Refused("Truncated " + t + " chunk");
      return Call::kOk;
    }
    if (t == "tEXt" || t == "zTXt" || t == "iTXt") {
      s = safe_read(c.length);
      text(t, s);
      return Call::kOk;
    }
    if (t == "iCCP") {
      s = safe_read(c.length);
      const std::size_t nul = s.find('\0');
      const std::size_t at = nul == std::string_view::npos ? 0 : nul + 1;  // s[i + 1] with i = -1 when absent
      if (at >= s.size()) throw Refused("index out of range (iCCP chunk)");
      if (s[at] != 0) throw Refused("Unknown compression method in iCCP chunk");
      std::string profile;
      if (inflate_text(s.substr(std::min(s.size(), at + 1)), profile) == Inflated::kTooLarge) {
        throw Refused("Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK");
      }
      return Call::kOk;
    }
    if (t == "eXIf") {
      s = safe_read(c.length);
      info_["exif"] = InfoValue{InfoValue::kBytes, std::string("Exif\0\0", 6) + std::string(s), 0};
      return Call::kOk;
    }
    if (t == "acTL") {
      s = safe_read(c.length);
      if (c.length < 8) throw Refused("APNG contains truncated acTL chunk");
      if (n_frames_) {
        n_frames_.reset();
        return Call::kOk;
      }
      const std::uint32_t frames = be32(s, 0);
      if (frames == 0 || frames > 0x80000000u) return Call::kOk;
      n_frames_ = frames;
      return Call::kOk;
    }
    if (t == "fcTL") {
      s = safe_read(c.length);
      if (c.length < 26) throw Refused("APNG contains truncated fcTL chunk");
      const std::int64_t seq = be32(s, 0);
      if ((!seq_ && seq != 0) || (seq_ && *seq_ != seq - 1)) throw Refused("APNG contains frame sequence errors");
      seq_ = seq;
      const std::int64_t w = be32(s, 4), h = be32(s, 8), px = be32(s, 12), py = be32(s, 16);
      if (px + w > static_cast<std::int64_t>(width_) || py + h > static_cast<std::int64_t>(height_)) {
        throw Refused("APNG contains invalid frames");
      }
      info_["bbox"] = InfoValue{InfoValue::kTuple, {}, 0};
      bbox_ = {px, py, px + w, py + h};
      return Call::kOk;
    }
    if (t == "fdAT") {
      if (c.length < 4) throw Refused("APNG contains truncated fDAT chunk");
      s = safe_read(4);
      const std::int64_t seq = be32(s, 0);
      if (!seq_ || *seq_ != seq - 1) throw Refused("APNG contains frame sequence errors");
      seq_ = seq;
      return idat(c.pos + 4, c.length - 4);
    }
    return Call::kUnknown;
  }

  Call idat(std::uint64_t pos, std::uint64_t length) {  // chunk_IDAT: the tile, then EOFError
    const auto bbox = info_.find("bbox");
    if (bbox != info_.end()) {
      extents_ = bbox->second;
      extents_box_ = bbox_;
    } else {
      if (n_frames_) info_["default_image"] = InfoValue{InfoValue::kInt, {}, 1};
      extents_ = InfoValue{InfoValue::kTuple, {}, 0};
      extents_box_ = {0, 0, static_cast<std::int64_t>(width_), static_cast<std::int64_t>(height_)};
    }
    tile_ = true;
    tile_pos_ = pos;
    (void)length;  // the length the data reads use is the last header chunk's (prepare_idat_)
    return Call::kEof;
  }

  void trns(std::string_view s) {
    if (mode_.mode == Mode::kP) {
      // _simple_palette: ^\xff*\x00\xff*$ (the $ also before one final newline): one index fully transparent.
      std::string_view body = s;
      if (!body.empty() && body.back() == '\n') body.remove_suffix(1);
      const std::size_t zero = body.find('\0');
      const bool simple = zero != std::string_view::npos &&
                          body.find_first_not_of('\xff') == zero && body.find_first_not_of('\xff', zero + 1) == std::string_view::npos;
      if (simple) {
        info_["transparency"] = InfoValue{InfoValue::kInt, {}, static_cast<long long>(s.find('\0'))};
      } else {
        info_["transparency"] = InfoValue{InfoValue::kBytes, std::string(s), 0};
      }
    } else if (mode_.mode == Mode::k1 || mode_.mode == Mode::kL || mode_.mode == Mode::kI16 || mode_.mode == Mode::kRGB) {
      if (s.size() < (mode_.mode == Mode::kRGB ? 6u : 2u)) throw Refused("Truncated tRNS chunk");
      if (mode_.mode == Mode::kRGB) {
        info_["transparency"] = InfoValue{InfoValue::kTuple, {}, 0};
      } else {
        const int v = be16(s, 0);
        info_["transparency"] = InfoValue{InfoValue::kInt, {}, mode_.mode == Mode::k1 ? (v ? 255 : 0) : v};
      }
    }
  }

  // A text chunk's value is kept only under the keys decoding reads (Pillow keeps every one, up to 64 MiB).
  void set_text(std::string_view key, InfoValue::Kind kind, std::string value) {
    static const std::string_view kRead[] = {"exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif", "interlace",
                                             "transparency", "bbox", "default_image"};
    if (std::find(std::begin(kRead), std::end(kRead), key) == std::end(kRead)) return;
    info_[std::string(key)] = InfoValue{kind, std::move(value), 0};
  }

  void add_text_memory(std::uint64_t chars) {
    text_memory_ += chars;
    if (text_memory_ > kMaxTextMemory) throw Refused("Too much memory used in text chunks");
  }

  void text(const std::string& t, std::string_view s) {
    const std::size_t nul = s.find('\0');
    const std::string_view k = nul == std::string_view::npos ? s : s.substr(0, nul);
    std::string_view v = nul == std::string_view::npos ? std::string_view() : s.substr(nul + 1);
    if (t == "tEXt") {
      if (k.empty()) return;
      set_text(k, k == "exif" ? InfoValue::kBytes : InfoValue::kStr, std::string(v));
      add_text_memory(v.size());
      return;
    }
    if (t == "zTXt") {
      if (!v.empty() && v[0] != 0) throw Refused("Unknown compression method in zTXt chunk");
      std::string value;
      const Inflated r = inflate_text(v.empty() ? v : v.substr(1), value);
      if (r == Inflated::kTooLarge) throw Refused("Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK");
      if (r == Inflated::kError) value.clear();
      if (k.empty()) return;
      add_text_memory(value.size());
      set_text(k, InfoValue::kStr, std::move(value));
      return;
    }
    // iTXt: keyword \0 flag method language \0 translated keyword \0 text
    if (nul == std::string_view::npos || v.size() < 2) return;
    const auto flag = static_cast<std::uint8_t>(v[0]), method = static_cast<std::uint8_t>(v[1]);
    v.remove_prefix(2);
    const std::size_t lang_end = v.find('\0');
    if (lang_end == std::string_view::npos) return;
    const std::size_t tk_end = v.find('\0', lang_end + 1);
    if (tk_end == std::string_view::npos) return;
    const std::string_view lang = v.substr(0, lang_end), tk = v.substr(lang_end + 1, tk_end - lang_end - 1);
    std::string value(v.substr(tk_end + 1));
    if (flag != 0) {
      if (method != 0) return;
      std::string out;
      const Inflated r = inflate_text(value, out);
      if (r == Inflated::kTooLarge) throw Refused("Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK");
      if (r == Inflated::kError) return;
      value = std::move(out);
    }
    if (k == "XML:com.adobe.xmp") info_["xmp"] = InfoValue{InfoValue::kBytes, value, 0};
    const auto chars = utf8_length(value);
    if (!utf8_length(lang) || !utf8_length(tk) || !chars) return;
    set_text(k, InfoValue::kStr, std::move(value));
    add_text_memory(*chars);
  }

  bool info_truthy(const char* key) const {
    const auto it = info_.find(key);
    return it != info_.end() && it->second.truthy();
  }

  // ---- PngImageFile._open --------------------------------------------------------------------------------
  void open() {
    fp_ = 8;
    Chunk last;
    try {
      while (true) {
        const Chunk c = read_chunk();
        last = c;
        std::string_view s;
        const Call r = call(c, s);
        if (r == Call::kEof) break;
        if (r == Call::kUnknown) s = safe_read(c.length);
        const std::string_view crc = read(4);  // ChunkStream.crc: every chunk before the image data
        if (crc.size() < 4) throw Refused("broken PNG file (incomplete checksum in " + c.cid + ")");
        std::uint32_t want = static_cast<std::uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(c.cid.data()), 4));
        if (!s.empty()) {  // crc32(crc, NULL, 0) would restart at 0
          want = static_cast<std::uint32_t>(crc32(want, reinterpret_cast<const Bytef*>(s.data()), static_cast<uInt>(s.size())));
        }
        if (want != be32(crc, 0)) throw Refused("broken PNG file (bad header checksum in " + c.cid + ")");
      }
    } catch (const BadChunk&) {
      throw Refused("cannot identify image file (broken chunk)");
    }
    prepare_idat_ = last.cid == "fdAT" ? last.length - 4 : last.length;
    std::uint64_t frames = n_frames_.value_or(1);
    if (n_frames_ && info_truthy("default_image")) ++frames;
    animated_ = frames > 1;
    if (mode_.mode == Mode::kNone || width_ == 0 || height_ == 0) throw Refused("cannot identify image file");
  }

  // ---- ImageFile.load with PngImageFile.load_read / load_end ---------------------------------------------
  struct Target {  // where the rows go
    PngFile* self;
    int xoff, yoff, xsize;
    bool raw;  // into the raw image (interlaced, or a palette image whose colours are known only at the end)
  };

  static void put_row(void* ctx, int y, int pass, const std::uint8_t* row, int row_len) {
    auto* t = static_cast<Target*>(ctx);
    PngFile& f = *t->self;
    const int bits = f.mode_.bits;
    std::uint8_t px[4] = {0, 0, 0, 0};
    if (pass < 0) {  // a whole row, at the tile's offset
      for (int x = 0; x < t->xsize; ++x) {
        unpack(f.mode_.raw, row, static_cast<std::size_t>(x) * bits, px);
        f.store(t->raw, t->xoff + x, t->yoff + y, px);
      }
      return;
    }
    // interlaced: ZipDecode puts pass pixels at (STARTING_COL + k * COL_INCREMENT, y) of the image, no offset
    static const int kStartingCol[] = {0, 4, 0, 2, 0, 1, 0};
    static const int kColIncrement[] = {8, 8, 4, 4, 2, 2, 1};
    const int count = ZipRows::pass_pixels(t->xsize, pass);
    (void)row_len;
    for (int k = 0; k < count; ++k) {
      unpack(f.mode_.raw, row, static_cast<std::size_t>(k) * bits, px);
      f.store(true, kStartingCol[pass] + k * kColIncrement[pass], y, px);
    }
  }

  // One pixel of the mode's samples at (x, y) of the image.
  void store(bool raw, int x, int y, const std::uint8_t* px) {
    const std::size_t i = static_cast<std::size_t>(y) * width_ + x;
    if (raw) {
      const int b = mode_bytes(mode_.mode);
      std::memcpy(&raw_[i * b], px, b);
    } else {
      to_rgb(px, &rgb_[i * 3]);
    }
  }

  // preprocess.to_rgb of one pixel of the mode's samples.
  void to_rgb(const std::uint8_t* px, std::uint8_t* o) const {
    switch (mode_.mode) {
      case Mode::k1: case Mode::kL:
        if (palette_) {  // an L image given a palette while it was still P: Pillow makes it P
          std::memcpy(o, &colors_[px[0] * 4], 3);
        } else {
          o[0] = o[1] = o[2] = px[0];
        }
        break;
      case Mode::kI16: {
        const double v = static_cast<double>(px[0] | (px[1] << 8));
        o[0] = o[1] = o[2] = static_cast<std::uint8_t>(std::nearbyint(v / 257.0));
        break;
      }
      case Mode::kRGB: std::memcpy(o, px, 3); break;
      case Mode::kLA:
        if (palette_) {
          const std::uint8_t* c = &colors_[px[0] * 4];
          over_white(c[0], c[1], c[2], px[1], o);
        } else {
          over_white(px[0], px[0], px[0], px[1], o);
        }
        break;
      case Mode::kRGBA: over_white(px[0], px[1], px[2], px[3], o); break;
      case Mode::kP: {
        const std::uint8_t* c = &colors_[px[0] * 4];
        if (info_.count("transparency")) {
          over_white(c[0], c[1], c[2], c[3], o);
        } else {
          std::memcpy(o, c, 3);
        }
        break;
      }
      case Mode::kNone: break;
    }
  }

  // The palette's colours (RGBA; entries beyond PLTE black and opaque) once the transparency is final.
  void realize_palette() {
    colors_.assign(256 * 4, 0);
    for (int i = 0; i < 256; ++i) colors_[i * 4 + 3] = 255;
    if (palette_) {
      if (palette_->size() / 3 > 256) throw Refused("invalid palette size");
      for (std::size_t i = 0; i < palette_->size() / 3; ++i) std::memcpy(&colors_[i * 4], palette_->data() + i * 3, 3);
    }
    if (mode_.mode != Mode::kP) return;
    const auto t = info_.find("transparency");
    if (t == info_.end()) return;
    if (t->second.kind == InfoValue::kInt) {
      if (t->second.number < 0 || t->second.number >= 256) throw Refused("palette index out of range");
      colors_[t->second.number * 4 + 3] = 0;
    } else if (t->second.kind == InfoValue::kBytes) {
      if (t->second.data.size() > 256) throw Refused("palette index out of range");
      for (std::size_t i = 0; i < t->second.data.size(); ++i) colors_[i * 4 + 3] = static_cast<std::uint8_t>(t->second.data[i]);
    } else {
      throw Refused("Transparency for P mode should be bytes or int");
    }
  }

  Image load(bool interlaced) {
    if (!tile_) throw Refused("cannot load this image");
    if (palette_ && mode_.mode != Mode::kP && mode_.mode != Mode::kL && mode_.mode != Mode::kLA) {
      throw Refused("unrecognized image mode (a palette for a " + std::string(mode_.mode == Mode::k1 ? "1" : "non-palette") + " image)");
    }
    // decoder.setimage(im, extents)
    if (extents_.kind != InfoValue::kTuple) throw Refused("invalid extents");
    const auto [x0, y0, x1, y1] = extents_box_;
    if (x0 < 0 || y0 < 0 || x1 <= x0 || y1 <= y0 || x1 > static_cast<std::int64_t>(width_) ||
        y1 > static_cast<std::int64_t>(height_)) {
      throw Refused("tile cannot extend outside image");
    }
    const int xsize = static_cast<int>(x1 - x0), ysize = static_cast<int>(y1 - y0);
    if (xsize > INT_MAX / mode_.bits - 7) throw Refused("out of memory (row too wide)");
    // The pixels: the RGB image (Pillow's zero-filled image, converted), and a raw one when colours wait.
    const bool deferred = interlaced || mode_.mode == Mode::kP;
    colors_.assign(256 * 4, 0);
    if (!deferred) realize_palette();  // L / LA given a palette: its colours are final here
    const std::size_t pixels = static_cast<std::size_t>(width_) * height_;
    rgb_.resize(pixels * 3);
    if (deferred) {
      raw_.assign(pixels * mode_bytes(mode_.mode), 0);
    } else {
      const std::uint8_t zero[4] = {0, 0, 0, 0};
      std::uint8_t fill[3];
      to_rgb(zero, fill);
      for (std::size_t i = 0; i < pixels; ++i) std::memcpy(&rgb_[i * 3], fill, 3);
    }
    Target target{this, static_cast<int>(x0), static_cast<int>(y0), xsize, deferred};
    bool done = false;
    {
      ZipRows rows(xsize, ysize, mode_.bits, interlaced, &PngFile::put_row, &target);
      fp_ = tile_pos_;
      std::uint64_t idat = prepare_idat_;
      while (!done) {
        // load_read(MAXBLOCK)
        while (idat == 0) {
          read(4);  // the previous chunk's CRC, not checked
          Chunk c;
          try {
            c = read_chunk();
          } catch (const BadChunk&) {
            throw Refused("image file is truncated");
          }
          if (c.cid != "IDAT" && c.cid != "DDAT" && c.cid != "fdAT") throw Refused("image file is truncated");
          if (c.cid == "fdAT") {
            std::string_view s;
            call(c, s);
            idat = c.length - 4;
          } else {
            idat = c.length;
          }
        }
        const std::uint64_t want = std::min(kMaxBlock, idat);
        idat -= want;
        const std::string_view piece = read(want);
        if (piece.empty()) throw Refused("image file is truncated");
        done = rows.decode(reinterpret_cast<const std::uint8_t*>(piece.data()), piece.size());
      }
      load_end(idat);
    }
    // Image.load: the palette realized (an L / LA image with one becomes P / PA), to_rgb's conversion.
    if (deferred) {
      realize_palette();
      const int b = mode_bytes(mode_.mode);
      for (std::size_t i = 0; i < pixels; ++i) to_rgb(&raw_[i * b], &rgb_[i * 3]);
      std::vector<std::uint8_t>().swap(raw_);
    }
    const auto t = info_.find("transparency");
    if (t != info_.end() && mode_.mode == Mode::kL && t->second.kind != InfoValue::kInt &&
        t->second.kind != InfoValue::kBytes) {
      throw Refused("color must be int or single-element tuple");  // convert("RGB")'s putpixel of it
    }
    Image img;
    img.width = static_cast<int>(width_);
    img.height = static_cast<int>(height_);
    img.rgb = std::move(rgb_);
    return img;
  }

  // PngImageFile.load_end: skip the rest of the current chunk, then walk the chunks after the image (no CRC).
  void load_end(std::uint64_t idat) {
    if (idat != 0) read(idat);
    while (true) {
      read(4);
      Chunk c;
      try {
        c = read_chunk();
      } catch (const BadChunk&) {
        return;
      }
      if (c.cid == "IEND") return;
      if (c.cid == "fcTL" && animated_) return;
      std::string_view s;
      const Call r = call(c, s);
      if (r == Call::kEof) {
        safe_read(c.cid == "fdAT" ? c.length - 4 : c.length);
      } else if (r == Call::kUnknown) {
        safe_read(c.length);
      }
    }
  }

  const std::uint8_t* d_;
  std::uint64_t n_;
  std::uint64_t fp_ = 0;
  // PngStream
  ModeInfo mode_{Mode::kNone, Raw::kL, 8};
  std::uint64_t width_ = 0, height_ = 0;
  std::optional<std::string> palette_;
  Info info_;
  std::array<std::int64_t, 4> bbox_{};
  std::optional<std::uint64_t> n_frames_;
  std::optional<std::int64_t> seq_;
  std::uint64_t text_memory_ = 0;
  bool tile_ = false;
  InfoValue extents_;
  std::array<std::int64_t, 4> extents_box_{};
  std::uint64_t tile_pos_ = 0, prepare_idat_ = 0;
  bool animated_ = false;
  // pixels
  std::vector<std::uint8_t> colors_, rgb_, raw_;
};

}  // namespace

Image decode_png(const std::uint8_t* data, std::size_t size, const DecodeLimits& limits) {
  return PngFile(data, size).decode(limits);
}

}  // namespace dtop::decode
