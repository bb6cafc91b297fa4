"""The C++ library as a product links it: a program built against the test run's libdtop.a (conftest's `client`
build) that shares one Embedder between threads and hands it images and tensors it filled in itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <dtop/embedder.hpp>

#include <signal.h>

#include <cstdint>
#include <fstream>
#include <sstream>

// Whether this thread's alternate signal stack, if it has one, is mapped memory (/proc/self/maps).
bool signal_stack_mapped() {
  stack_t st{};
  if (sigaltstack(nullptr, &st) != 0 || st.ss_sp == nullptr) return true;
  const auto sp = reinterpret_cast<std::uintptr_t>(st.ss_sp);
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    std::uintptr_t a = 0, b = 0;
    char dash = 0;
    std::istringstream in(line);
    in >> std::hex >> a >> dash >> b;
    if (a <= sp && sp < b) return true;
  }
  return false;
}

// A Runtime around OpenVINO's that keeps the most forward passes it saw at once. Once armed, the first pass waits for
// a second to come in (60 s at most: a guard against a hang, not a measure), so passes that may overlap do, every
// time. `serial`: it says it is not concurrent, as ExecuTorch's runtime.
struct Watch : dtop::Runtime {
  Watch(std::unique_ptr<dtop::Runtime> in, bool s) : inner(std::move(in)), serial(s) {}
  const dtop::Metadata& metadata() const override { return inner->metadata(); }
  std::string describe() const override { return inner->describe(); }
  // no `override`: against a libdtop without Runtime::concurrent() this builds, and the test fails on its assertion
  bool concurrent() const { return !serial; }
  std::vector<float> run(const float* images, int batch, int height, int width, int* dim) override {
    {
      std::unique_lock<std::mutex> lock(m);
      peak = std::max(peak, ++running);
      if (armed && !met) {
        cv.wait_for(lock, std::chrono::seconds(60), [&] { return running >= 2; });
        met = true;
        cv.notify_all();
      }
    }
    struct Done {
      Watch& w;
      ~Done() {
        const std::lock_guard<std::mutex> lock(w.m);
        --w.running;
      }
    } done{*this};
    return inner->run(images, batch, height, width, dim);
  }
  std::unique_ptr<dtop::Runtime> inner;
  bool serial;
  std::mutex m;
  std::condition_variable cv;
  int running = 0, peak = 0;
  bool armed = false, met = false;
};

// A custom Runtime that breaks its contract: half the values it should return (`short`), or a dim of 0 (`nodim`).
struct Broken : dtop::Runtime {
  Broken(std::unique_ptr<dtop::Runtime> in, std::string h) : inner(std::move(in)), how(std::move(h)) {}
  const dtop::Metadata& metadata() const override { return inner->metadata(); }
  std::string describe() const override { return inner->describe(); }
  std::vector<float> run(const float* images, int batch, int height, int width, int* dim) override {
    std::vector<float> d = inner->run(images, batch, height, width, dim);
    if (how == "short") d.resize(d.size() / 2);
    if (how == "nodim") *dim = 0;
    return d;
  }
  std::unique_ptr<dtop::Runtime> inner;
  std::string how;
};

// Four threads, 200 embeds on one Embedder: each must get its own image's descriptor (`want`, one thread's).
void share(dtop::Embedder& e, const std::vector<dtop::Image>& images, const std::vector<std::vector<float>>& want,
           const dtop::EmbedOptions& o) {
  std::atomic<int> wrong{0}, errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 50; ++k) {
        const std::size_t i = static_cast<std::size_t>(t + k) % images.size();
        try {
          const std::vector<float> d = e.embed(images[i], o);
          double dot = 0;
          for (std::size_t j = 0; j < d.size() && j < want[i].size(); ++j) dot += double(d[j]) * want[i][j];
          if (d.size() != want[i].size() || dot < 0.9999) ++wrong;
        } catch (const dtop::Error&) {
          ++errors;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  std::printf("wrong %d errors %d\n", wrong.load(), errors.load());
}

int main(int argc, char** argv) {
  const std::string mode = argv[1];
  dtop::EmbedOptions o;
  o.image_size = 64;
  std::vector<dtop::Image> images;
  for (int i = 3; i < argc; ++i) images.push_back(dtop::load_image(argv[i]));
  if (mode == "parallel" || mode == "serial") {  // the forward passes of one shared Embedder, watched
    auto watched = std::make_unique<Watch>(dtop::open_openvino(argv[2]), mode == "serial");
    Watch& watch = *watched;
    dtop::Embedder e(std::move(watched), argv[2]);
    std::vector<std::vector<float>> want;
    for (const auto& im : images) want.push_back(e.embed(im, o));
    {
      const std::lock_guard<std::mutex> lock(watch.m);
      watch.armed = !watch.serial;  // a serial runtime's first pass would wait for a second in vain
    }
    share(e, images, want, o);
    std::printf("peak %d\n", watch.peak);
    return 0;
  }
  if (mode == "altstack") {  // two Embedders freed first-in first-out, then one freed on another thread
    {
      auto a = std::make_unique<dtop::Embedder>(argv[2]);
      auto b = std::make_unique<dtop::Embedder>(argv[2]);
      a->embed(images.at(0), o);
      b->embed(images.at(0), o);
      a.reset();
      b.reset();
    }
    std::printf("fifo %s\n", signal_stack_mapped() ? "mapped" : "unmapped");
    auto c = std::make_unique<dtop::Embedder>(argv[2]);
    c->embed(images.at(0), o);
    std::thread([&] { c.reset(); }).join();
    std::printf("thread %s\n", signal_stack_mapped() ? "mapped" : "unmapped");
    return 0;
  }
  if (mode == "short" || mode == "nodim") {
    dtop::Embedder e(std::make_unique<Broken>(dtop::open_openvino(argv[2]), mode), argv[2]);
    try {
      const std::vector<float> d = e.embed(images.at(0), o);
      std::printf("%s embedded %zu\n", mode.c_str(), d.size());
    } catch (const dtop::Error& x) {
      std::printf("%s refused: %s\n", mode.c_str(), x.what());
    }
    return 0;
  }
  dtop::Embedder opened(argv[2]);
  dtop::Embedder e = std::move(opened);  // movable: the moved-to one works
  if (mode == "threads") {
    std::vector<std::vector<float>> want;
    for (const auto& im : images) want.push_back(e.embed(im, o));
    share(e, images, want, o);
    return 0;
  }
  // mode "caller-buffers": an Image or Tensor whose buffer does not match its size is refused, never read past
  try {
    e.embed(dtop::Image{64, 64, {}}, o);
    std::printf("image embedded\n");
  } catch (const dtop::Error& x) {
    std::printf("image refused: %s\n", x.what());
  }
  const dtop::Tensor small{64, 64, std::vector<float>(10)};
  try {
    e.run({&small});
    std::printf("tensor run\n");
  } catch (const dtop::Error& x) {
    std::printf("tensor refused: %s\n", x.what());
  }
  dtop::EmbedOptions huge = o;  // a scale no image is resized by: the int sides overflowed to 16 x 16
  huge.scales = {1e12};
  try {
    e.embed(dtop::Image{2, 2, std::vector<std::uint8_t>(12)}, huge);
    std::printf("scale embedded\n");
  } catch (const dtop::Error& x) {
    std::printf("scale refused: %s\n", x.what());
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def program(client: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dtop_export.cpp import openvino_sdk

    ov_cmake, _ = openvino_sdk()
    libs = ov_cmake.parent / "libs"
    (libopenvino,) = [p for p in libs.glob("libopenvino.so.*") if p.name.count(".") == 2]
    d = tmp_path_factory.mktemp("cpp-api")
    (d / "main.cpp").write_text(PROGRAM)
    cmd = ["c++", "-std=c++17", "-O1", "-Wall", "-Wextra", f"-I{REPO / 'cpp' / 'include'}", str(d / "main.cpp"),
           str(client.parent / "libdtop.a"), str(libopenvino), "-ljpeg", "-lz", "-lcrypto", "-pthread",
           f"-Wl,-rpath,{libs}", "-o", str(d / "api")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "api"


def _run(program: Path, *args: object) -> str:
    r = subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    return r.stdout


def test_one_embedder_shared_by_threads(program: Path, small_onnx: Path) -> None:
    """Two threads on one Embedder shared its one OpenVINO infer request: most calls failed ('Infer Request is busy')
    and some returned another thread's descriptor (12 of 200 here) without an error (a C++ API review). The forward
    passes run on infer requests of their own now (a pool); every descriptor is its own image's."""
    assert _run(program, "threads", small_onnx, *_photos()).split() == ["wrong", "0", "errors", "0"]


def test_forward_passes_of_one_shared_embedder_run_in_parallel(program: Path, small_onnx: Path) -> None:
    """Threads sharing an Embedder took turns on its one model, so a service of many threads needed an Embedder (a
    compiled model) per thread (the task that made it safe). OpenVINO's runtime runs each pass on an infer request of
    its own now and Embedder takes no lock for it: a runtime watching the passes sees two at once, every descriptor
    still its image's. A runtime that is not concurrent (ExecuTorch's Module) still sees one at a time."""
    out = _run(program, "parallel", small_onnx, *_photos()).split()
    assert out[:4] == ["wrong", "0", "errors", "0"] and out[4] == "peak" and int(out[5]) >= 2, out
    assert _run(program, "serial", small_onnx, *_photos()).split() == ["wrong", "0", "errors", "0", "peak", "1"]


def _photos() -> list[Path]:
    from dtop_export.retrieval.sample_data import skimage_data_dir

    return [skimage_data_dir() / n for n in ("astronaut.png", "coffee.png", "rocket.jpg", "camera.png")]


def test_an_image_or_tensor_the_caller_filled_wrongly_is_refused(program: Path, small_onnx: Path) -> None:
    """An Image whose rgb is not width*height*3 bytes (a caller's own decoder) was read past its buffer (a crash or
    garbage), and so was a Tensor shorter than 3*height*width for Embedder::run; a scale of 1e12 overflowed the int
    sides (undefined behaviour; here a 16x16 input, embedded without a word). Each is a dtop::Error now."""
    out = _run(program, "caller-buffers", small_onnx).splitlines()
    assert out == [
        "image refused: not an RGB image: 64x64 needs width * height * 3 bytes of rgb, it has 0",
        "tensor refused: Embedder::run: a tensor of 64x64 needs 3 * height * width floats, it has 10",
        "scale refused: a longer side of 6.4e+13 (image size x scale) is over the 1048576 the client resizes to: use a "
        "smaller size or scale",
    ]


def test_a_runtime_that_breaks_its_contract_is_refused(program: Path, small_onnx: Path) -> None:
    """Embedder::run copied count x dim values from whatever a custom Runtime returned (noticed last stop): half the
    values it should return were read past the vector's end (garbage descriptors, or a crash). A dtop::Error now; a
    dim other than the metadata's was refused already."""
    got = _run(program, "short", small_onnx, _photos()[0]).strip()
    assert got == (
        f"short refused: {small_onnx}: the runtime returned 128 values for a batch of 1 descriptors of 256 values; "
        "Runtime::run must return batch x dim floats"
    ), got
    got = _run(program, "nodim", small_onnx, _photos()[0]).strip()
    assert got == f"nodim refused: {small_onnx} returned descriptors of 0 values; its metadata says 256", got


def test_embedders_freed_in_any_order_leave_the_signal_stack_mapped(program: Path, small_onnx: Path) -> None:
    """Each OpenVINO runtime had an ov::Core of its own, whose CPU plugin gives the thread that loads it an alternate
    signal stack and unmaps it when it goes: Embedders freed first-in first-out, or on another thread, left the
    thread's signal stack unmapped, and the next signal handled on it (a crash reporter's, an embedding Python's)
    killed the process (the Python engines' case: tests/test_recommend.py). One Core per process now."""
    assert _run(program, "altstack", small_onnx, _photos()[0]).split() == ["fifo", "mapped", "thread", "mapped"]
