// dtop-embed MODEL IMAGE... -o OUT.npy: the C++ twin of `dtop-export embed` (same .npy, same .json sidecar).
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <new>
#include <string>
#include <vector>

#include "../src/json.hpp"
#include "dtop/embedder.hpp"
#include "dtop/executorch.hpp"

namespace fs = std::filesystem;

namespace {

constexpr const char* kUsage =
    "usage: dtop-embed MODEL IMAGE... -o OUT.npy [--json OUT.json] [--force] [--scales S] [--image-size N]\n"
    "                  [--batch-size N] [--threads N] [--precision f32|bf16|f16] [--device CPU]\n"
    "                  [--max-pixels N] [--max-decode-mb N] [--max-scans N] [--dump-inputs DIR] [--no-progress]\n"
    "\n"
    "Descriptors of images with a dtop-export model (.onnx or OpenVINO .xml; ExecuTorch .pte when built with it):\n"
    "OUT.npy (n x N float32) and\n"
    "OUT.json (paths in row order, skipped images with the reason), as `dtop-export embed` writes them.\n"
    "Folders are searched recursively for image files; unreadable images are reported and skipped.\n"
    "\n"
    "  -o, --output OUT.npy   descriptor matrix to write\n"
    "  --json OUT.json        sidecar path (default: OUT with .json)\n"
    "  -f, --force            overwrite OUT.npy and OUT.json (without it an existing one is refused)\n"
    "  --scales S             comma-separated scales, or `ms` for 1,1/sqrt(2),sqrt(2) (default 1)\n"
    "  --image-size N         longer side before scaling (default: the model's, from its metadata)\n"
    "  --batch-size N, -b N   same-shape images per forward pass (default 1)\n"
    "  --threads N            inference threads (default: the runtime's choice)\n"
    "  --precision P          OpenVINO inference precision hint: f32 (exact), bf16, f16 (default: the hint the\n"
    "                         model records, dtop.inference_precision, as `openvino --precision auto` writes; else f32)\n"
    "  --max-pixels N         refuse images of more pixels (default 178956970, Pillow's limit)\n"
    "  --max-decode-mb N      refuse images whose decoding needs more MiB: the file, the RGB image and a rotated\n"
    "                         copy, the decoder's buffers; checked from the header (default 1024)\n"
    "  --max-scans N          refuse JPEGs of more scans (progressive JPEGs re-read every block; default 100)\n"
    "  --dump-inputs DIR      also write every image's model input (first scale) as DIR/<row>.npy\n"
    "  --no-progress          no progress line on stderr\n";

// The image suffixes dtop_export.preprocess.IMAGE_SUFFIXES lists (folders are searched for these).
bool is_image_file(const fs::path& p) {
  static const std::vector<std::string> kSuffixes = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif",
                                                     ".tiff", ".webp", ".ppm", ".pgm"};
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  std::error_code ec;
  return std::find(kSuffixes.begin(), kSuffixes.end(), ext) != kSuffixes.end() && fs::is_regular_file(p, ec);
}

// A path written the way Python's str(Path(text)) writes it: no "." parts, no doubled or trailing slashes.
std::string python_path(const std::string& text) {
  const bool absolute = !text.empty() && text[0] == '/';
  std::vector<std::string> parts;
  std::string part;
  for (std::size_t i = 0; i <= text.size(); ++i) {
    if (i == text.size() || text[i] == '/') {
      if (!part.empty() && part != ".") parts.push_back(part);
      part.clear();
    } else {
      part += text[i];
    }
  }
  std::string out = absolute ? "/" : "";
  for (std::size_t i = 0; i < parts.size(); ++i) out += (i ? "/" : "") + parts[i];
  return out.empty() ? "." : out;
}

// Files as given, folders replaced by the images under them, sorted (dtop_export.preprocess.expand_images).
std::vector<std::string> expand_images(const std::vector<std::string>& items) {
  std::vector<std::string> out;
  for (const auto& item : items) {
    const std::string p = python_path(item);
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
      std::vector<fs::path> found;
      for (auto it = fs::recursive_directory_iterator(p, fs::directory_options::skip_permission_denied, ec);
           it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (ec) break;
        if (is_image_file(it->path())) found.push_back(it->path());
      }
      std::sort(found.begin(), found.end());
      for (const auto& f : found) out.push_back(python_path(f.string()));
    } else {
      out.push_back(p);
    }
  }
  return out;
}

struct Args {
  std::string model, output, sidecar, scales = "1", precision, device = "CPU", dump;
  std::vector<std::string> images;
  int image_size = 0, batch_size = 1, threads = 0;
  bool progress = true, force = false;
  dtop::DecodeLimits decode;
};

// CPUs this process may run on: its affinity (taskset, a cgroup cpuset), not the host's count.
int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

std::uint64_t to_count(const std::string& flag, const std::string& v) {
  try {
    std::size_t used = 0;
    const unsigned long long n = std::stoull(v, &used);
    if (used == v.size() && n >= 1 && v.find('-') == std::string::npos) return n;
  } catch (const std::exception&) {
  }
  throw dtop::Error(flag + " expects a whole number >= 1, got '" + v + "'");
}

int to_int(const std::string& flag, const std::string& v) {
  try {
    std::size_t used = 0;
    const int n = std::stoi(v, &used);
    if (used == v.size()) return n;
  } catch (const std::exception&) {
  }
  throw dtop::Error(flag + " expects an integer, got '" + v + "'");
}

// Whether two paths name one file, existing or not (symlinks, "..", "." and doubled slashes resolved as far as the
// folders exist).
bool same_file(const std::string& a, const std::string& b) {
  auto resolve = [](const std::string& p, std::error_code& ec) {
    const fs::path absolute = fs::absolute(p, ec);
    return ec ? fs::path() : fs::weakly_canonical(absolute, ec);
  };
  std::error_code ea, eb;
  const fs::path pa = resolve(a, ea), pb = resolve(b, eb);
  return ea || eb ? fs::path(a).lexically_normal() == fs::path(b).lexically_normal() : pa == pb;
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw dtop::Error(arg + " needs a value (see dtop-embed --help)");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (arg == "-o" || arg == "--output") {
      a.output = value();
    } else if (arg == "--json") {
      a.sidecar = value();
    } else if (arg == "-f" || arg == "--force") {
      a.force = true;
    } else if (arg == "--scales") {
      a.scales = value();
    } else if (arg == "--image-size") {
      a.image_size = to_int(arg, value());
    } else if (arg == "-b" || arg == "--batch-size") {
      a.batch_size = to_int(arg, value());
    } else if (arg == "--threads") {
      a.threads = to_int(arg, value());
    } else if (arg == "--precision") {
      a.precision = value();
    } else if (arg == "--device") {
      a.device = value();
    } else if (arg == "--max-pixels") {
      a.decode.max_pixels = to_count(arg, value());
    } else if (arg == "--max-decode-mb") {
      a.decode.max_decode_mb = to_count(arg, value());
    } else if (arg == "--max-scans") {
      a.decode.max_scans = to_count(arg, value());
    } else if (arg == "--dump-inputs") {
      a.dump = value();
    } else if (arg == "--no-progress") {
      a.progress = false;
    } else if (arg.size() > 1 && arg[0] == '-') {
      throw dtop::Error("unknown option " + arg + " (see dtop-embed --help)");
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.empty()) throw dtop::Error("no model given: dtop-embed MODEL IMAGE... -o OUT.npy");
  a.model = positional[0];
  a.images.assign(positional.begin() + 1, positional.end());
  if (a.output.empty()) throw dtop::Error("no output given: add -o OUT.npy");
  if (fs::path(a.output).extension() != ".npy") throw dtop::Error("output " + a.output + " should end in .npy");
  if (a.sidecar.empty()) a.sidecar = fs::path(a.output).replace_extension(".json").string();
  if (same_file(a.output, a.sidecar)) {  // the sidecar was written over the matrix (exit 0)
    throw dtop::Error("--json " + a.sidecar + " is the output " + a.output +
                      ": give the sidecar another name, or leave --json out (OUT with .json)");
  }
  if (a.image_size < 0) throw dtop::Error("--image-size must be positive");
  if (a.batch_size < 1) throw dtop::Error("batch size must be >= 1, got " + std::to_string(a.batch_size));
  if (a.threads < 0) throw dtop::Error("--threads must be >= 0");
  const int cpus = usable_cpus();
  if (a.threads > cpus) {  // as dtop-export embed refuses it (dtop_export.host.usable_cpus: the affinity)
    throw dtop::Error(std::to_string(a.threads) + " threads asked for (--threads), and this process can run on " +
                      std::to_string(cpus) + " CPU(s): use " + std::to_string(cpus) +
                      " or fewer (more threads than CPUs only wait for each other)");
  }
  return a;
}

// The runtime of MODEL: ExecuTorch for a .pte (when this binary has it), OpenVINO otherwise.
std::unique_ptr<dtop::Runtime> open_runtime(const std::string& model, const dtop::RuntimeOptions& options) {
  if (dtop::is_executorch_program(model)) {
#ifdef DTOP_WITH_EXECUTORCH
    return dtop::open_executorch(model, options);
#else
    throw dtop::Error(model + " is an ExecuTorch program and this dtop-embed was built without ExecuTorch: pip install "
                      "'dtop-export[edge]' and run `dtop-export cpp build` again");
#endif
  }
  return dtop::open_openvino(model, options);
}

// Bytes this process can still allocate: MemAvailable of /proc/meminfo (0 where unknown: no check).
double available_memory() {
  std::FILE* f = std::fopen("/proc/meminfo", "r");
  if (f == nullptr) return 0;
  char line[256];
  double kib = 0;
  while (std::fgets(line, sizeof line, f) != nullptr) {
    if (std::sscanf(line, "MemAvailable: %lf kB", &kib) == 1) break;
  }
  std::fclose(f);
  return kib * 1024.0;
}

// The Python side's lower bound (dtop_export/memory.py inference_bytes): per image of longer side `size` at the
// largest scale, the resized RGB and its float32 input with one temporary of each (30 bytes a pixel) and one float32
// attention map over its tokens. Refused before any image is decoded, as `dtop-export embed` refuses it: an
// --image-size of 100000 otherwise touched ~20 GB before the allocator gave up.
void check_memory(int image_size, const std::vector<double>& scales, int batch, int stride) {
  const double side = std::max<double>(stride, std::round(image_size * *std::max_element(scales.begin(), scales.end())));
  const double tokens = std::pow(std::floor(side / stride), 2);
  const double need = batch * (30.0 * side * side + 4.0 * tokens * tokens);
  const double free = available_memory();
  if (free > 0 && need > free) {
    char msg[256];
    std::snprintf(msg, sizeof msg, "--image-size %d needs at least %.1f GiB for a batch of %d; %.1f GiB are available "
                  "here: use a smaller --image-size", image_size, need / 1073741824.0, batch, free / 1073741824.0);
    throw dtop::Error(msg);
  }
}

std::string sidecar_json(const Args& a, const dtop::Embedder& e, const std::vector<std::string>& paths,
                         const dtop::EmbedResult& r, int image_size, const std::vector<double>& scales) {
  using dtop::json::number;
  using dtop::json::quote;
  std::string s = "{\n  \"model\": " + quote(python_path(a.model)) + ",\n";
  // what `evaluate --distractors` and `search` check a descriptor file against (as `dtop-export embed` writes it)
  s += "  \"checkpoint_sha256\": " + quote(e.contract().checkpoint_sha256) + ",\n";
  const bool pte = dtop::is_executorch_program(a.model);
  const std::string precision = e.inference_precision();  // a program's compiled one; OpenVINO's hint (or int8)
  s += "  \"engine\": {\n    \"name\": " + quote(pte ? "executorch-cpp" : "openvino-cpp") +
       ",\n    \"precision\": " + quote(precision) +
       ",\n    \"device\": " + quote(a.device == "CPU" ? "cpu" : a.device) +
       ",\n    \"descriptor_dim\": " + std::to_string(r.dim) + ",\n    \"source\": " + quote(python_path(a.model)) +
       ",\n    \"runtime\": " + quote(e.describe()) + "\n  },\n";
  s += "  \"descriptor_dim\": " + std::to_string(r.dim) + ",\n  \"image_size\": " + std::to_string(image_size) + ",\n";
  s += "  \"scales\": [";
  for (std::size_t i = 0; i < scales.size(); ++i) s += (i ? ", " : "") + number(scales[i]);
  s += "],\n  \"images\": [";
  for (std::size_t i = 0; i < r.rows.size(); ++i) s += std::string(i ? "," : "") + "\n    " + quote(paths[r.rows[i]]);
  s += r.rows.empty() ? "],\n" : "\n  ],\n";
  s += "  \"skipped\": [";
  for (std::size_t i = 0; i < r.skipped.size(); ++i) {
    s += std::string(i ? "," : "") + "\n    {\"path\": " + quote(paths[r.skipped[i].index]) +
         ", \"error\": " + quote(r.skipped[i].reason) + "}";
  }
  s += r.skipped.empty() ? "]\n}\n" : "\n  ]\n}\n";
  return s;
}

// Refuse, before any work, an output whose folder is missing or will not take the file: access() says yes for root in
// /proc, where the write failed after every image was embedded. The temp file the writer makes there is made now.
void check_writable(const std::string& out) {
  const fs::path dir = fs::path(out).has_parent_path() ? fs::path(out).parent_path() : fs::path(".");
  std::error_code dir_error;  // e.g. "File name too long": one error line, not a std::filesystem_error (exit 1)
  if (!fs::is_directory(dir, dir_error)) {
    const bool missing = !dir_error || dir_error == std::errc::no_such_file_or_directory ||
                         dir_error == std::errc::not_a_directory;
    throw dtop::Error("cannot write " + out + ": " +
                      (missing ? "folder " + dir.string() + " does not exist" : dir_error.message()));
  }
  if (::access(dir.c_str(), W_OK) != 0) throw dtop::Error("cannot write " + out + ": folder " + dir.string() + " is not writable");
  const fs::path probe = dir / ("." + fs::path(out).filename().string() + ".tmp" + std::to_string(::getpid()));
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) return;
    throw dtop::Error("cannot write " + out + ": " + std::strerror(errno));
  }
  ::close(fd);
  ::unlink(probe.c_str());
}

int run(int argc, char** argv) {
  const Args a = parse_args(argc, argv);
  const std::vector<double> scales = dtop::parse_scales(a.scales);
  const std::vector<std::string> paths = expand_images(a.images);
  if (paths.empty()) {
    throw dtop::Error("no images given (folders are searched for .jpg, .jpeg, .png, .bmp, .gif, .tif, .tiff, .webp, "
                      ".ppm, .pgm)");
  }
  for (const std::string& out : {a.output, a.sidecar}) check_writable(out);
  // as `dtop-export embed`: an existing output (a dangling symlink too) is kept unless --force, a folder never
  // replaced; both before any work
  std::vector<std::string> existing;
  for (const std::string& out : {a.output, a.sidecar}) {
    std::error_code ec;
    if (fs::is_directory(out, ec)) throw dtop::Error(out + " is a folder: give the name of a file to write");
    if (fs::exists(fs::symlink_status(out, ec))) existing.push_back(out);
  }
  if (!a.force && !existing.empty()) {
    const bool one = existing.size() == 1;
    throw dtop::Error(existing[0] + (one ? " exists" : ", " + existing[1] + " exist") + ": pass --force to overwrite " +
                      (one ? "it" : "them"));
  }

  dtop::RuntimeOptions options;
  options.threads = a.threads;
  options.precision = a.precision;
  options.device = a.device;
  dtop::Embedder embedder(open_runtime(a.model, options), a.model);
  const std::string ran = embedder.inference_precision();
  const std::string asked = a.precision == "f32" ? "fp32" : (a.precision == "f16" ? "fp16" : a.precision);
  if (!asked.empty() && ran != "int8" && asked != ran) {  // OpenVINO's CPU plugin drops a hint the CPU lacks
    std::cerr << "warning: " << (a.device == "CPU" ? std::string("this CPU") : a.device) << " has no " << asked
              << " inference: OpenVINO runs " << a.model << " at " << ran << "\n";
  }
  if (ran == "fp16" && embedder.fp32_islands() == 0) {
    std::cerr << "warning: " << a.model << " marks no FP32 islands: under f16 its whitening and L2 norms run in "
              << "FP16 too; give dtop-embed the IR from `dtop-export openvino MODEL.onnx`\n";
  }
  const int image_size = a.image_size > 0 ? a.image_size : embedder.contract().preprocess.size;
  check_memory(image_size, scales, a.batch_size, embedder.contract().preprocess.stride);

  if (!a.dump.empty()) {
    std::error_code dump_error;  // a file there, no permission: one error line, not a std::filesystem_error
    fs::create_directories(a.dump, dump_error);
    if (dump_error || !fs::is_directory(a.dump, dump_error)) {
      throw dtop::Error("cannot make --dump-inputs folder " + a.dump + ": " +
                        (dump_error ? dump_error.message() : std::string("a file of that name exists")));
    }
    for (std::size_t i = 0; i < paths.size(); ++i) {
      try {
        const dtop::Tensor t = embedder.preprocess(dtop::load_image(paths[i], a.decode), image_size, scales[0]);
        dtop::write_npy((fs::path(a.dump) / (std::to_string(i) + ".npy")).string(), t.data,
                        std::vector<std::size_t>{3, static_cast<std::size_t>(t.height), static_cast<std::size_t>(t.width)});
      } catch (const dtop::ImageError&) {
        // reported by the embedding pass below
      }
    }
  }

  const bool show = a.progress && ::isatty(STDERR_FILENO);
  dtop::EmbedOptions eo;
  eo.image_size = image_size;
  eo.scales = scales;
  eo.batch_size = a.batch_size;
  eo.decode = a.decode;
  const dtop::EmbedResult r = embedder.embed_files(paths, eo, [&](std::size_t done, std::size_t total) {
    if (show) std::fprintf(stderr, "\rembedding %zu/%zu", done, total);
  });
  if (show) std::fprintf(stderr, "\n");
  for (const auto& s : r.skipped) std::fprintf(stderr, "skipped: %s\n", s.reason.c_str());
  if (r.rows.empty()) throw dtop::Error("none of the " + std::to_string(paths.size()) + " images could be read");
  dtop::write_npy(a.output, r.descriptors, r.rows.size(), static_cast<std::size_t>(r.dim));
  dtop::write_text_atomic(a.sidecar, sidecar_json(a, embedder, paths, r, image_size, scales));
  std::printf("wrote %s (%zu x %d float32) and %s", a.output.c_str(), r.rows.size(), r.dim, a.sidecar.c_str());
  if (!r.skipped.empty()) std::printf("; skipped %zu unreadable image(s)", r.skipped.size());
  std::printf("\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const dtop::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {  // the model's activations at this size (or batch) do not fit in memory
    std::fprintf(stderr, "error: out of memory: use a smaller --image-size, --batch-size or --scales\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
