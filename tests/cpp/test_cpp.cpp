// The C++ wrapper on the fixtures: results at the stored and at other latent sizes and
// caller grids (shared/fixtures/shapes), exceptions with status and message, moves.
// usage: test_cpp FIXTURE_DIR TMP_DIR LOSS_GRID8 LOSS_FINE_REPA LOSS_FINE_SPATIALNORM0.6_GRAM0.5
//        test_cpp --expect-abi-mismatch CHECKPOINT   (run with a library reporting another ABI)
#include "dino_bridge.hpp"

#include <algorithm>
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

/// Opening a bridge through a library of another ABI version must throw, naming both.
static int expect_abi_mismatch(const char* checkpoint) {
    try {
        dino_bridge::Bridge::open(checkpoint);
    } catch (const dino_bridge::Error& e) {
        const std::string header = "ABI version " + std::to_string(BRIDGE_ABI_VERSION);
        const std::string library = "ABI version " + std::to_string(bridge_abi_version());
        if (e.status() == BRIDGE_ERR_ABI_MISMATCH && std::strstr(e.what(), header.c_str()) &&
            std::strstr(e.what(), library.c_str())) {
            std::printf("refused: %s\n", e.what());
            return 0;
        }
        std::fprintf(stderr, "wrong error: %s\n", e.what());
        return 1;
    }
    std::fprintf(stderr, "a library of ABI %u was accepted\n", bridge_abi_version());
    return 1;
}

int main(int argc, char** argv) {
    if (argc == 3 && std::string(argv[1]) == "--expect-abi-mismatch") return expect_abi_mismatch(argv[2]);
    if (argc != 6) return 2;
    const std::string fx = argv[1], tmp = argv[2];
    const double want_loss = std::atof(argv[3]), want_fine_repa = std::atof(argv[4]),
                 want_fine_gram = std::atof(argv[5]);
    const std::string shapes = fx + "/../shapes";
    using dino_bridge::Bridge;
    using dino_bridge::Grid;
    using dino_bridge::Params;

    dino_bridge::check_abi();  // this library, this header
    try {
        dino_bridge::check_abi(BRIDGE_ABI_VERSION + 1);
        CHECK(false, "check_abi accepted another version");
    } catch (const dino_bridge::Error& e) {
        const std::string both = "ABI version " + std::to_string(BRIDGE_ABI_VERSION + 1);
        CHECK(e.status() == BRIDGE_ERR_ABI_MISMATCH && std::strstr(e.what(), both.c_str()) &&
                  std::strstr(e.what(), ("ABI version " + std::to_string(BRIDGE_ABI_VERSION)).c_str()),
              e.what());
    }

    // Aligning with the composite loss the fixtures' losses were made with.
    Bridge bridge = Bridge::open(fx + "/model.safetensors", Params().align_loss(1, 0.25f, 0.05f));
    CHECK(bridge.info().tokens == 16, "tokens");
    CHECK(bridge.latent_size() == 16 && bridge.grid() == (Grid{4, 4}), "stored size");
    CHECK(bridge.token_grid(16, 32) == (Grid{4, 8}) && bridge.latent_elems(3, 16, 32) == 3u * 4 * 16 * 32 &&
              bridge.token_elems(3, 4, 8) == 3u * 32 * 48 && bridge.token_elems(3) == 3u * 16 * 48,
          "sizes");
    auto lat = npy(fx + "/latents.npy");
    auto out = bridge.forward(lat, 3);
    CHECK(close_to(out, npy(fx + "/out.npy")), "forward");

    auto pred = npy(fx + "/pred_grid8.npy");
    std::vector<float> grad(pred.size());
    float loss = bridge.loss_backward(pred, lat, grad, 3, 8);
    CHECK(std::fabs(loss - want_loss) <= 1e-5, "loss_grid8 " << loss);
    CHECK(close_to(grad, npy(fx + "/grad_pred_grid8.npy")), "grad_pred_grid8");
    std::vector<float> grad2(pred.size());
    float loss2 = bridge.loss_backward(pred, lat, grad2, 3, 16, 16, 8, 8);  // the same, spelled out
    CHECK(loss2 == loss && grad2 == grad, "explicit sizes");
    CHECK(bridge.forward(lat, 3, 16, 16) == out, "explicit forward");

    // (ABI 3) The same calls on DLPack descriptors (dino_bridge::Tensor: host memory, each
    // tensor its own dtype): the same numbers.
    {
        using dino_bridge::DType;
        using dino_bridge::Tensor;
        const auto caps = dino_bridge::capabilities();
        CHECK(caps.abi_version == 5 && caps.dlpack_major == 1 && caps.dlpack_minor == 0 &&
                  caps.buffer_dtypes == 7u && caps.max_latent_side == 16384,
              "capabilities: abi " << caps.abi_version << " dlpack " << caps.dlpack_major << "."
                                   << caps.dlpack_minor);
        const Tensor lat_t(lat, {3, 4, 16, 16});
        std::vector<float> out_dl(out.size());
        bridge.forward(lat_t, Tensor(out_dl, {3, 16, 48}));
        CHECK(out_dl == out, "forward on DLTensors");
        std::vector<uint16_t> out16(out.size());
        bridge.forward(lat_t, Tensor(out16, {3, 16, 48}, DType::BF16));
        float worst = 0;
        for (std::size_t i = 0; i < out.size(); ++i) {
            uint32_t u = static_cast<uint32_t>(out16[i]) << 16;
            float v;
            std::memcpy(&v, &u, 4);
            worst = std::fmax(worst, std::fabs(v - out[i]) / std::fmax(std::fabs(out[i]), 1e-30f));
        }
        CHECK(worst <= 1.0f / 256, "bf16 out: relative error " << worst);
        // The 8x8 caller grid, as [B, T, D] (grid inferred) and as [B, ph, pw, D].
        std::vector<float> g3(pred.size()), g4(pred.size());
        float l3 = 0, l4 = 0;
        bridge.loss_backward(Tensor(pred, {3, 64, 48}), lat_t, Tensor(g3, {3, 64, 48}), Tensor(&l3, {}));
        bridge.loss_backward(Tensor(pred, {3, 8, 8, 48}), lat_t, Tensor(g4, {3, 8, 8, 48}), Tensor(&l4, {1}));
        CHECK(l3 == loss && l4 == loss && g3 == grad && g4 == grad, "loss_backward on DLTensors " << l3 << " " << l4);
        const auto target = npy(fx + "/target.npy");
        std::vector<float> glat_dl(lat.size()), glat_ptr(lat.size());
        float ll = 0;
        bridge.latent_loss_backward(lat_t, Tensor(target, {3, 16, 48}), Tensor(glat_dl, {3, 4, 16, 16}),
                                    Tensor(&ll, {}));
        float ll_ptr = bridge.latent_loss_backward(lat, target, glat_ptr, 3);
        CHECK(ll == ll_ptr && glat_dl == glat_ptr, "latent_loss_backward on DLTensors");
        // A train step on two bridges opened alike: the same step.
        Bridge a = Bridge::open(fx + "/model.safetensors"), b = Bridge::open(fx + "/model.safetensors");
        const auto sa = a.train_step(lat, target, 3);
        const auto sb = b.train_step(lat_t, Tensor(target, {3, 16, 48}));
        CHECK(sa.step == 1 && sb.step == 1 && sa.loss == sb.loss && sa.grad_norm == sb.grad_norm &&
                  a.forward(lat, 3) == b.forward(lat, 3),
              "train_step on DLTensors: loss " << sa.loss << " vs " << sb.loss);
        // The library checks the descriptors.
        Tensor f64(lat, {3, 4, 16, 16});
        f64.dl().dtype.bits = 64;
        try {
            bridge.forward(f64, Tensor(out_dl, {3, 16, 48}));
            CHECK(false, "float64 latents accepted");
        } catch (const dino_bridge::Error& e) {
            CHECK(e.status() == BRIDGE_ERR_INVALID_ARGUMENT && std::strstr(e.what(), "64 bits"), e.what());
        }
        CHECK(status_of([&] { bridge.forward(lat_t, Tensor(out_dl, {3, 16, 47})); }) == BRIDGE_ERR_SHAPE,
              "out [3, 16, 47]");
        Tensor copy = lat_t;  // a copy holds its own shape
        CHECK(copy.dl().shape != lat_t.dl().shape && copy.dl().shape[3] == 16, "Tensor copy");
        CHECK(out_dl == out, "out written by a refused call");

        // (ABI 5) The flat parameter vector: layout, get/set, gradients, apply.
        Bridge h = Bridge::open(fx + "/model.safetensors"), lib = Bridge::open(fx + "/model.safetensors");
        const auto layout = h.param_info();
        const int64_t n = h.param_count();
        CHECK(layout.size() == 55 && layout.front().name == "adapter.stem.weight" && layout.front().decays &&
                  layout.front().shape == (std::vector<int64_t>{32, 4, 3, 3}) &&
                  layout.back().offset + layout.back().numel == n && n == h.info().param_count,
              "param_info: " << layout.size() << " tensors, " << n << " parameters");
        const std::vector<float> w = h.get_params();
        h.set_params(w);
        CHECK(h.get_params() == w && h.forward(lat, 3) == out, "get/set round trip");
        std::vector<float> gp(static_cast<std::size_t>(n)), gl(lat.size());
        float lg = 0;
        const Tensor gl_t(gl, {3, 4, 16, 16});
        h.loss_grads(lat_t, Tensor(target, {3, 16, 48}), Tensor(gp, {n}), &gl_t.dl(), Tensor(&lg, {}), 7);
        CHECK(std::fabs(lg - sa.loss) <= 1e-6f && close_to(gl, npy(fx + "/grad_latents.npy")),
              "loss_grads: loss " << lg << " vs the train step's " << sa.loss);
        const auto applied = h.apply_grads(gp);
        const auto stepped = lib.train_step(lat, target, 3);
        CHECK(applied.step == 1 && applied.grad_norm == stepped.grad_norm && h.get_params() == lib.get_params(),
              "loss_grads + apply_grads = train_step, bit for bit");
        std::vector<float> tok(out.size()), gv(static_cast<std::size_t>(n));
        h.forward_train(lat_t, Tensor(tok, {3, 16, 48}), 7);
        CHECK(close_to(tok, h.forward(lat, 3)), "dropout 0: forward_train is forward (the differentiable ops)");
        h.vjp(lat_t, Tensor(npy(fx + "/cotangent.npy"), {3, 16, 48}), Tensor(gv, {n}), nullptr, 7);
        CHECK(std::any_of(gv.begin(), gv.end(), [](float v) { return v != 0.0f; }), "vjp");
        CHECK(status_of([&] { h.set_params(std::vector<float>(10)); }) == BRIDGE_ERR_SHAPE, "set_params [10]");
    }

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
    // The library's own refusals come through with its message.
    std::vector<float> pred6(3 * 36 * 48), grad6(pred6.size());
    try {
        moved.loss_backward(pred6, lat, grad6, 3, 16, 16, 6, 6);
        CHECK(false, "6x6 caller grid accepted");
    } catch (const dino_bridge::Error& e) {
        CHECK(e.status() == BRIDGE_ERR_INVALID_ARGUMENT && std::strstr(e.what(), "6x6") &&
                  std::strstr(e.what(), "4x4"),
              e.what());
    }
    try {
        moved.forward(lat, out, 3, 18, 16);
        CHECK(false, "height 18 accepted");
    } catch (const dino_bridge::Error& e) {
        CHECK(e.status() == BRIDGE_ERR_SHAPE && std::strstr(e.what(), "height = 18"), e.what());
    }
    CHECK(status_of([&] { moved.token_grid(16, 6); }) == BRIDGE_ERR_SHAPE, "token_grid 16x6");
    CHECK(status_of([&] { moved.forward(lat, out, 3, 16, 32); }) == BRIDGE_ERR_INVALID_ARGUMENT, "16x32 size check");
    Params p;
    p.raw.heads = 7;
    CHECK(status_of([&] { Bridge b(p); }) == BRIDGE_ERR_INVALID_ARGUMENT, "bad config");
    CHECK(status_of([&] { Bridge::open(fx + "/model.safetensors", Params().spatial_norm(-1.0f)); }) ==
              BRIDGE_ERR_INVALID_ARGUMENT,
          "spatial_norm(-1)");
    CHECK(status_of([&] { Bridge::open(fx + "/model.safetensors", Params().train_loss(1, 0, 0, -1)); }) ==
              BRIDGE_ERR_INVALID_ARGUMENT,
          "w_gram -1");

    // Other latent sizes and caller grids: the shapes fixtures (a bridge with
    // adapter_depth 1: 12x20 latents give a 6x10 token grid).
    {
        Bridge s = Bridge::open(shapes + "/model.safetensors");
        auto lat_rect = npy(shapes + "/latents_rect.npy");
        CHECK(s.token_grid(12, 20) == (Grid{6, 10}), "rect grid");
        CHECK(close_to(s.forward(lat_rect, 2, 12, 20), npy(shapes + "/out_rect.npy")), "out_rect");
        std::vector<float> out_small(s.token_elems(2, s.token_grid(4, 6)));
        s.forward(npy(shapes + "/latents_small.npy"), out_small, 2, 4, 6);
        CHECK(close_to(out_small, npy(shapes + "/out_small.npy")), "out_small");

        auto fine = npy(shapes + "/pred_fine.npy");
        std::vector<float> g(fine.size());
        Bridge repa = Bridge::open(shapes + "/model.safetensors");  // alignment's default: REPA's loss
        float l = repa.loss_backward(fine, lat_rect, g, 2, 12, 20, 12, 20);
        CHECK(std::fabs(l - want_fine_repa) <= 1e-5, "loss_fine_repa " << l);
        CHECK(close_to(g, npy(shapes + "/grad_pred_fine_repa.npy")), "grad_pred_fine_repa");

        Params opts;  // the raw fields, as set by the setters above
        opts.raw.align_w_norm = 0.25f;
        opts.raw.align_w_raw = 0.05f;
        opts.raw.align_w_gram = 0.5f;
        opts.raw.spatial_norm_gamma = 0.6f;
        opts.checkpoint = shapes + "/model.safetensors";
        Bridge normed(opts);
        l = normed.loss_backward(fine, lat_rect, g, 2, 12, 20, 12, 20);
        CHECK(std::fabs(l - want_fine_gram) <= 1e-5, "loss_fine_spatialnorm0.6_gram0.5 " << l);
        CHECK(close_to(g, npy(shapes + "/grad_pred_fine_spatialnorm0.6_gram0.5.npy")), "grad_pred_fine_gram");
    }

    if (failures) return 1;
    std::printf("C++ wrapper: all checks passed\n");
    return 0;
}
