// The C++ wrapper on the fixtures: results, exceptions with status and message, moves.
// usage: test_cpp FIXTURE_DIR TMP_DIR LOSS_GRID8
#include "dino_bridge.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

static int failures = 0;
#define CHECK(cond, what)                                                            \
    do {                                                                             \
        if (!(cond)) {                                                               \
            std::cerr << "FAIL " << __FILE__ << ":" << __LINE__ << ": " << what << "\n"; \
            ++failures;                                                              \
        }                                                                            \
    } while (0)

static std::vector<float> npy(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    char head[10];
    f.read(head, 10);
    std::size_t header_len = static_cast<unsigned char>(head[8]) | (static_cast<unsigned char>(head[9]) << 8);
    f.seekg(0, std::ios::end);
    std::size_t n = (static_cast<std::size_t>(f.tellg()) - 10 - header_len) / 4;
    f.seekg(static_cast<std::streamoff>(10 + header_len));
    std::vector<float> v(n);
    f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * 4));
    return v;
}

static bool close_to(const std::vector<float>& a, const std::vector<float>& b) {
    float scale = 0, err = 0;
    for (std::size_t i = 0; i < b.size(); ++i) {
        scale = std::fmax(scale, std::fabs(b[i]));
        err = std::fmax(err, std::fabs(a[i] - b[i]));
    }
    return a.size() == b.size() && err <= 1e-4f * scale;
}

template <class F>
static int32_t status_of(F&& f) {
    try {
        f();
    } catch (const dino_bridge::Error& e) {
        return e.status();
    }
    return BRIDGE_OK;
}

int main(int argc, char** argv) {
    if (argc != 4) return 2;
    const std::string fx = argv[1], tmp = argv[2];
    const double want_loss = std::atof(argv[3]);
    using dino_bridge::Bridge;

    Bridge bridge = Bridge::open(fx + "/model.safetensors");
    CHECK(bridge.info().tokens == 16, "tokens");
    auto lat = npy(fx + "/latents.npy");
    auto out = bridge.forward(lat, 3);
    CHECK(close_to(out, npy(fx + "/out.npy")), "forward");

    auto pred = npy(fx + "/pred_grid8.npy");
    std::vector<float> grad(pred.size());
    float loss = bridge.loss_backward(pred, lat, grad, 3, 8);
    CHECK(std::fabs(loss - want_loss) <= 1e-5, "loss_grid8 " << loss);
    CHECK(close_to(grad, npy(fx + "/grad_pred_grid8.npy")), "grad_pred_grid8");

    std::vector<float> glat(lat.size());
    bridge.latent_loss_backward(lat, npy(fx + "/target.npy"), glat, 3);
    CHECK(close_to(glat, npy(fx + "/grad_latents.npy")), "grad_latents");

    auto stats = bridge.train_step(lat, npy(fx + "/target.npy"), 3);
    CHECK(stats.step == 1 && !stats.skipped, "train step");
    bridge.save(tmp + "/cpp.safetensors");
    Bridge again = Bridge::open(tmp + "/cpp.safetensors");
    CHECK(again.forward(lat, 3) == bridge.forward(lat, 3), "reload");

    // Moves transfer ownership; the moved-from object is empty and its destructor is a no-op.
    Bridge moved = std::move(again);
    CHECK(moved && !again, "move");
    moved = std::move(bridge);
    CHECK(moved && !bridge && moved.info().step == 1, "move assignment");

    // Errors: status and message.
    try {
        Bridge::open(tmp + "/missing.safetensors");
        CHECK(false, "missing checkpoint opened");
    } catch (const dino_bridge::Error& e) {
        CHECK(e.status() == BRIDGE_ERR_IO && std::strstr(e.what(), "[IO]") && std::strstr(e.what(), "missing"),
              e.what());
    }
    std::vector<float> short_buf(10);
    CHECK(status_of([&] { moved.forward(short_buf, out, 3); }) == BRIDGE_ERR_INVALID_ARGUMENT, "size check");
    CHECK(status_of([&] { moved.loss_backward(pred, lat, grad, 3, 6); }) == BRIDGE_ERR_INVALID_ARGUMENT, "grid 6");
    dino_bridge::Params p;
    p.raw.heads = 7;
    CHECK(status_of([&] { Bridge b(p); }) == BRIDGE_ERR_INVALID_ARGUMENT, "bad config");

    if (failures) return 1;
    std::printf("C++ wrapper: all checks passed\n");
    return 0;
}
