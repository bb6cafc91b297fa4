// The smallest program using the library: one image in, its DToP descriptor out (one value per line).
#include <cstdio>

#include <dtop/embedder.hpp>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s MODEL.onnx IMAGE.jpg\n", argv[0]);
    return 2;
  }
  try {
    dtop::Embedder embedder(argv[1]);                  // OpenVINO on the CPU; contract from the metadata
    const dtop::Image image = dtop::load_image(argv[2]);  // JPEG/PNG, EXIF-upright, RGB
    const std::vector<float> descriptor = embedder.embed(image);  // N floats, unit L2 norm
    for (const float v : descriptor) std::printf("%.9g\n", v);
  } catch (const dtop::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  return 0;
}
